"""Few-shot (0-shot by default) accuracy on the paper's six benchmarks through lm-eval.

:func:`run_tasks` evaluates a loaded model on the packaged offline tasks
(:mod:`mor.eval.tasks`) and :func:`paper_table` lays the scores out as the paper's table:
LAMBADA (acc), HellaSwag, PIQA, ARC (mean of Easy and Challenge; acc_norm), WinoGrande
(acc), MMLU cloze (acc), and their average, in percent.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from .tasks import COLUMNS, TaskSpec, check_data, resolve_tasks, write_task_dir

LM_EVAL_INSTALL = "pip install 'mor[eval]' (or: pip install lm-eval==0.4.13)"


class EvalDependencyError(RuntimeError):
    """lm-eval or the evaluation sets are missing."""


def require_lm_eval():
    """Import lm-eval, or fail with how to install it."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as e:
        raise EvalDependencyError(f"few-shot tasks need lm-eval 0.4.13, which is not installed: {LM_EVAL_INSTALL}"
                                  f" ({e})") from None
    return lm_eval


def run_tasks(model, tokenizer, tasks: str | list[str] = "paper", *, routing: str = "topk",
              limit: int | float | None = None, num_fewshot: int = 0, batch_size: int = 16,
              checkpoint: str | None = None, lm=None) -> dict[str, Any]:
    """Evaluate ``model`` on ``tasks`` (see :func:`mor.eval.tasks.resolve_tasks`) with lm-eval.

    ``lm``: an already built lm-eval model to use instead of wrapping ``model`` (then
    ``model``, ``tokenizer``, ``routing`` and ``batch_size`` are not used).
    Returns ``{"tasks": {name: {metric: value, metric_stderr: value, ..., "score": the paper's
    metric}}, "table": paper_table(...), ...}``; scores are fractions in [0, 1] (standard errors
    from lm-eval's closed form for means), the table is in percent."""
    from .tasks import TaskDataError

    specs = resolve_tasks(tasks)
    lm_eval = require_lm_eval()
    try:
        check_data(specs)
    except TaskDataError as e:
        raise EvalDependencyError(str(e)) from None
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # every file is local
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lm_eval.tasks import TaskManager

    from .lm_eval_adapter import MoRLM

    if lm is None:
        lm = MoRLM(pretrained=checkpoint, model=model, tokenizer=tokenizer, routing=routing, batch_size=batch_size)
    task_dir = write_task_dir()
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the one-off preprocessing of whole splits is noise here
    t0 = time.time()
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=[s.task for s in specs], num_fewshot=num_fewshot,
                                      limit=limit, task_manager=tm, log_samples=False, bootstrap_iters=1000,
                                      verbosity="WARNING")
    finally:
        if bars:
            datasets.enable_progress_bars()
    per: dict[str, dict[str, Any]] = {}
    for s in specs:
        r = out["results"][s.task]
        vals = {k.partition(",")[0]: float(v) for k, v in r.items()
                if k.partition(",")[2] == "none" and isinstance(v, (int, float))}  # acc, acc_stderr, ...
        per[s.name] = {**vals, "metric": s.metric, "score": vals[s.metric],
                       "samples": out.get("n-samples", {}).get(s.task, {}).get("effective")}
    return {"tasks": per, "table": paper_table(per), "routing": getattr(lm, "routing", routing), "limit": limit,
            "num_fewshot": num_fewshot, "seconds": round(time.time() - t0, 2),
            "lm_eval_version": getattr(lm_eval, "__version__", None)}


def paper_table(per_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Paper columns in percent: ARC is the mean of the ARC-Easy and ARC-Challenge scores
    present; ``Avg`` is the mean of the six columns (None unless all six are present)."""
    cols: dict[str, float | None] = {}
    for c in COLUMNS:
        vals = [v["score"] for k, v in per_task.items() if _column(k) == c]
        cols[c] = 100.0 * sum(vals) / len(vals) if vals else None
    have = [v for v in cols.values() if v is not None]
    cols["Avg"] = sum(have) / len(have) if len(have) == len(COLUMNS) else None
    return cols


def _column(name: str) -> str:
    from .tasks import TASKS

    return TASKS[name].column


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table in the paper's layout, one row per label (e.g. per routing mode)."""
    head = ["model", *COLUMNS, "Avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, t in rows.items():
        cells = [label] + ["-" if t.get(c) is None else f"{t[c]:.1f}" for c in (*COLUMNS, "Avg")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chance_table(specs: list[TaskSpec] | None = None) -> dict[str, Any]:
    """Scores of uniform guessing (LAMBADA 0), in the table's layout, for comparison."""
    chance = {"lambada": 0.0, "hellaswag": 0.25, "piqa": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25,
              "winogrande": 0.5, "mmlu": 0.25}
    specs = specs or resolve_tasks("paper")
    return paper_table({s.name: {"score": chance[s.name]} for s in specs})
