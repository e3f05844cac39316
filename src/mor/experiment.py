"""The paper's comparisons as one rerunnable command: ``mor experiment isoflop``.

The MoR paper (SPEC.md section 8, Table 3) trains vanilla, recursive and Mixture-of-Recursions
models to the same training compute and compares validation NLL, unique parameters, tokens
and few-shot accuracy. This module does the same at any scale the library can run:

.. code-block:: bash

    mor experiment isoflop                                   # micro shape, 8 models, ~1 h on 2 CPU cores
    mor experiment isoflop --shapes 360m --data data/fineweb-edu --budget 16.5e18   # the paper, on a GPU
    mor experiment isoflop --models vanilla,mor-expert --nr 2,3 --kv recursion_wise,shared
    mor experiment isoflop --out runs/experiment-micro-s1 --set seed=1      # a replicate
    mor experiment combine runs/experiment-micro runs/experiment-micro-s1   # mean, spread, paired diffs

**Models.** ``--models`` is a comma list of *kinds*, each optionally with ``:N_r``:
``vanilla``, ``recursive``, ``mor-expert``, ``mor-token``, with optional modifiers appended
with ``-``: ``kvshare`` (recursive KV sharing) and a sharing scheme (``cycle``, ``sequence``,
``middle-cycle``, ``middle-sequence``; default Middle-Cycle). A kind without ``:N_r`` is
crossed with every ``--nr``; a MoR kind without ``kvshare`` is crossed with every ``--kv``;
a recursive or MoR kind without a sharing modifier is crossed with every ``--sharing``.
The default list is the paper's Table 3 plus one sharing ablation (8 models)::

    vanilla, recursive N_r=2/3, MoR expert-choice N_r=2/3, MoR token-choice N_r=3,
    MoR expert-choice with KV sharing N_r=3, MoR expert-choice with Cycle sharing N_r=2

**Recipes.** Each model's training recipe is a *base recipe* (the shape) plus the model's
overrides (architecture, N_r, sharing, router, KV mode) plus the budget, the corpus and its
output directory. Shapes: ``micro`` and ``tiny`` read ``configs/experiment/<shape>.yaml``;
``135m`` and ``360m`` read ``configs/paper/vanilla-<shape>.yaml`` (the paper recipe: sequence
2048, ~2M tokens per step, AdamW 3e-3, WSD) and set every model's warm-up to 5% of the steps
of the smallest budget (min(2e18, budget)), as ``configs/paper/generate.py`` does; any other
value is a path to a YAML base recipe. Token-choice uses a softmax router with the balancing
loss (the paper's recipe). When the shape's layer count does not fit a model's sharing
scheme, layers are added (SPEC.md section 1). ``--set key=value`` (dotted for the model
section) overrides every recipe, e.g. ``--set device=cuda grad_accum=16``.

**Equal compute.** Every model trains with the trainer's ``flops_budget`` (SPEC.md section 6
counting: steps = round(budget / (paper FLOPs per token x tokens per step))). Before anything
trains, the plan checks that the rounding keeps every model's FLOPs within ``--tolerance``
(2%) of the budget and stops with the offending model otherwise.

**Corpus.** One prepared corpus for all models: ``--data DIR`` (a ``mor prepare`` output), or
``--corpus`` sources (default ``shakespeare``) prepared once into ``OUT/data``.

**Resume.** Each model runs in ``OUT/<shape>-<budget>/<model>/`` and keeps a record,
``experiment.json``, holding its exact recipe, its training segments and its summary. A model
whose record says done (same recipe, final checkpoint present) is not trained again; a model
with checkpoints from the same recipe resumes from its latest one (``train(resume=True)``);
a model whose recipe changed starts over. Rerunning the command after an interruption
therefore continues where it stopped.

**Evaluation.** The NLL column is the trainer's final validation loss (top-k routing, how the
paper reports it). After training, each model is also scored on the whole validation split
with the causal routing rule (threshold rule for expert-choice; identical for other models),
and, for recursive and MoR models, at every test-time recursion depth 1..N_r (+1 extra pass
where the model defines it) through :func:`mor.eval.depth.forward_depth`. With
``--fewshot`` the paper's 0-shot tasks run through :mod:`mor.eval.fewshot` (needs lm-eval and
the task data). With ``--throughput`` (default on when ``mor bench infer`` is installed) the
generation throughput of each checkpoint comes from :mod:`mor.bench.infer`.

**Report.** ``--report-dir`` (default ``OUT``) receives ``results.md`` (the table in the paper's
layout: model, N_r, unique params, FLOPs, tokens, NLL, accuracy), ``results.json`` and PNG
plots (matplotlib, Agg): NLL vs unique parameters and NLL vs FLOPs (with Pareto frontiers),
training/validation loss curves from every run's ``metrics.jsonl``, test-time depth scaling,
and throughput vs NLL when throughput was measured.

**Seeds.** At small scale the seed (initialisation and batch order) moves a model's NLL by as
much as the differences being measured, so one run decides little. Replicates are the same
command with ``--set seed=N`` and their own ``--out``; ``mor experiment combine DIR DIR ...``
reads their ``results.json``, checks that they trained the same plan with different seeds,
and reports each model's NLL per seed with mean and standard deviation, and the paper's
comparisons (MoR vs vanilla, MoR vs recursive, expert vs token choice, KV sharing, N_r, sharing
scheme) as paired differences within each seed, with how many seeds agree with the sign of
the paper's Table 3 difference (``seeds.png`` plots both).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from . import checkpoint as ckpt
from .config import ConfigError, ModelConfig, atomic_write_text, valid_num_layers
from .flops import paper_flops_per_token
from .train import TrainConfig, TrainError, read_recipe_file, resolve_device, train

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
PAPER_SHAPES = ("135m", "360m")
#: The paper sets warm-up to 5% of the steps of its smallest budget (SPEC.md section 7).
PAPER_WARMUP_BUDGET = 2e18
PAPER_WARMUP_FRAC = 0.05

DEFAULT_MODELS = "vanilla,recursive,mor-expert,mor-token:3,mor-expert-kvshare:3,mor-expert-cycle:2"
DEFAULT_NR = "2,3"
RECORD = "experiment.json"

#: model-section keys that belong to the model kind; the base recipe's values are replaced
KIND_KEYS = ("architecture", "num_recursions", "sharing", "router_type", "router_func", "balancing",
             "kv_mode", "router_alpha", "capacities")
KINDS: dict[str, dict[str, Any]] = {
    "vanilla": dict(architecture="vanilla"),
    "recursive": dict(architecture="recursive"),
    "mor-expert": dict(architecture="mor", router_type="expert"),
    # the paper's token-choice recipe: softmax router, auxiliary balancing loss
    "mor-token": dict(architecture="mor", router_type="token", router_func="softmax", balancing="loss"),
}
LABELS = {"vanilla": "Vanilla", "recursive": "Recursive", "mor-expert": "MoR expert-choice",
          "mor-token": "MoR token-choice"}
#: sharing modifiers in names (longest first so "middle-cycle" is not read as "cycle")
SHARING_TAGS = {"middle-sequence": "middle_sequence", "middle-cycle": "middle_cycle", "sequence": "sequence",
                "cycle": "cycle"}
SHARING_NAMES = {"cycle": "Cycle", "sequence": "Sequence", "middle_cycle": "Middle-Cycle",
                 "middle_sequence": "Middle-Sequence"}
#: The paper's Table 3 (360M shape, 16.5e18 FLOPs; SPEC.md section 8): name -> (unique params, tokens,
#: validation NLL, average few-shot accuracy)
PAPER_TABLE3 = {
    "vanilla": (315e6, 20e9, 2.7824, 42.3),
    "recursive-nr2": (167e6, 20e9, 2.8079, 42.6),
    "recursive-nr3": (118e6, 20e9, 2.8466, 41.5),
    "mor-expert-nr2": (167e6, 27e9, 2.7511, 43.1),
    "mor-expert-nr3": (118e6, 30e9, 2.7925, 42.6),
    "mor-token-nr3": (118e6, 30e9, 2.9163, 40.0),
    "mor-expert-kvshare-nr3": (118e6, 31e9, 2.7983, 41.9),
}
#: recipe keys that do not change what is trained (ignored when deciding skip/resume)
COSMETIC_KEYS = ("overwrite", "progress")


class ExperimentError(ConfigError):
    """The experiment cannot be planned or run (bad model list, shape, budget, data)."""


# ====================================================================== model specs
@dataclass(frozen=True)
class ModelSpec:
    """One model of the comparison: a kind, its recursions, sharing scheme and KV mode."""

    kind: str  # a key of KINDS
    num_recursions: int = 1
    sharing: str = "middle_cycle"
    kv_mode: str = "recursion_wise"

    @property
    def name(self) -> str:
        """Directory / row name, e.g. ``mor-expert-kvshare-nr3``, ``mor-expert-cycle-nr2``."""
        if self.kind == "vanilla":
            return "vanilla"
        parts = [self.kind]
        if self.kv_mode == "shared":
            parts.append("kvshare")
        if self.sharing != "middle_cycle":
            parts.append(self.sharing.replace("_", "-"))
        return "-".join(parts) + f"-nr{self.num_recursions}"

    @property
    def label(self) -> str:
        """The table's model column, e.g. ``MoR expert-choice, KV sharing``."""
        s = LABELS[self.kind]
        if self.kind == "recursive" and self.sharing == "middle_cycle":
            s += " (Middle-Cycle)"
        elif self.kind != "vanilla" and self.sharing != "middle_cycle":
            s += f", {SHARING_NAMES[self.sharing]} sharing"
        if self.kv_mode == "shared":
            s += ", KV sharing"
        return s

    def model_overrides(self) -> dict[str, Any]:
        """The model-section fields this spec sets."""
        m = dict(KINDS[self.kind])
        if self.kind == "vanilla":
            m["num_recursions"] = 1
            return m
        m.update(num_recursions=self.num_recursions, sharing=self.sharing, kv_mode=self.kv_mode)
        return m


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ExperimentError(f"{what}={text!r} must be a comma list of integers (e.g. 2,3)") from None
    if not vals or any(v < 1 for v in vals):
        raise ExperimentError(f"{what}={text!r} must list positive integers")
    return vals


def _str_list(text: str, what: str, choices: tuple[str, ...]) -> list[str]:
    vals = [v.strip().replace("-", "_") for v in str(text).split(",") if v.strip()]
    for v in vals:
        if v not in choices:
            raise ExperimentError(f"{what}: {v!r} is not valid; choose from: {', '.join(choices)}")
    if not vals:
        raise ExperimentError(f"{what} is empty; choose from: {', '.join(choices)}")
    return vals


def parse_models(models: str = DEFAULT_MODELS, nr: str = DEFAULT_NR, kv: str = "recursion_wise",
                 sharing: str = "middle_cycle") -> list[ModelSpec]:
    """Expand a ``--models`` list (module docstring) into model specs, in order, without duplicates."""
    nrs = _int_list(nr, "--nr")
    kvs = _str_list(kv, "--kv", ("recursion_wise", "shared"))
    sharings = _str_list(sharing, "--sharing", tuple(SHARING_NAMES))
    out: list[ModelSpec] = []
    entries = [e.strip() for e in str(models).split(",") if e.strip()]
    if not entries:
        raise ExperimentError("--models is empty")
    for entry in entries:
        body, _, nr_text = entry.partition(":")
        kind = next((k for k in sorted(KINDS, key=len, reverse=True)
                     if body == k or body.startswith(k + "-")), None)
        if kind is None:
            raise ExperimentError(f"--models: unknown model {entry!r}; kinds: {', '.join(KINDS)} "
                                  "(modifiers: -kvshare, -cycle, -sequence, -middle-cycle, -middle-sequence; "
                                  "N_r as :N, e.g. mor-token:3)")
        rest = body[len(kind):].lstrip("-")
        kv_fixed, sharing_fixed = None, None
        while rest:
            if rest.startswith("kvshare"):
                kv_fixed, rest = "shared", rest[len("kvshare"):]
            else:
                tag = next((t for t in SHARING_TAGS if rest.startswith(t)), None)
                if tag is None:
                    raise ExperimentError(f"--models: unknown modifier {rest!r} in {entry!r}; modifiers: "
                                          f"kvshare, {', '.join(SHARING_TAGS)}")
                sharing_fixed, rest = SHARING_TAGS[tag], rest[len(tag):]
            rest = rest.lstrip("-")
        if kind == "vanilla":
            if nr_text or kv_fixed or sharing_fixed:
                raise ExperimentError(f"--models: {entry!r}: a vanilla model has no recursions, sharing or KV mode")
            specs = [ModelSpec("vanilla")]
        else:
            if kv_fixed and kind == "recursive":
                raise ExperimentError(f"--models: {entry!r}: KV sharing is a MoR option (use mor-expert-kvshare)")
            entry_nrs = _int_list(nr_text, f"--models {entry}") if nr_text else nrs
            entry_kvs = [kv_fixed] if kv_fixed else (kvs if kind.startswith("mor") else ["recursion_wise"])
            entry_sh = [sharing_fixed] if sharing_fixed else sharings
            specs = [ModelSpec(kind, n, s, k) for n in entry_nrs for s in entry_sh for k in entry_kvs]
        for s in specs:
            if s.kind != "vanilla" and s.num_recursions < 2:
                raise ExperimentError(f"--models: {s.name}: recursive and MoR models need N_r >= 2")
            if s not in out:
                out.append(s)
    return out


# ====================================================================== shapes and recipes
@dataclass
class Shape:
    name: str
    path: Path
    recipe: dict
    paper: bool  # paper shape: warm-up from the smallest budget (SPEC section 7)


def load_shape(shape: str) -> Shape:
    """A shape name (``micro``, ``tiny``, ``135m``, ``360m``, any configs/experiment/NAME.yaml)
    or a path to a YAML base recipe."""
    if shape in PAPER_SHAPES:
        path, paper = CONFIGS / "paper" / f"vanilla-{shape}.yaml", True
    elif (CONFIGS / "experiment" / f"{shape}.yaml").is_file():
        path, paper = CONFIGS / "experiment" / f"{shape}.yaml", False
    elif Path(shape).is_file():
        path, paper = Path(shape), False
    else:
        known = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml")) + list(PAPER_SHAPES)
        raise ExperimentError(f"--shapes: unknown shape {shape!r}; choose one of {', '.join(known)} "
                              "or give the path of a YAML base recipe")
    recipe = read_recipe_file(path, "base recipe")
    name = shape if shape in PAPER_SHAPES or path.parent == CONFIGS / "experiment" else path.stem
    return Shape(name=name, path=path, recipe=recipe, paper=paper)


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """``key=value`` overrides (dotted keys for sections; values parsed as YAML), like ``mor train``."""
    for ov in overrides:
        if "=" not in ov:
            raise ExperimentError(f"--set {ov!r} must look like key=value (e.g. device=cuda or model.rope_theta=1e4)")
        key, val = ov.split("=", 1)
        node = d
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ExperimentError(f"--set {ov!r}: {part} is not a section")
        node[parts[-1]] = _yaml_value(val)
    return d


def _yaml_value(text: str) -> Any:
    """A YAML scalar, with numbers YAML 1.1 leaves as strings (``1e-3``) read as numbers."""
    if text == "":
        return None
    v = yaml.safe_load(text)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def budget_tag(budget: float) -> str:
    """A short, filesystem-safe budget label: 1.5e13 -> ``1.5e13``."""
    m, e = f"{budget:.6e}".split("e")
    return f"{float(m):g}e{int(e)}"


def model_recipe(shape: Shape, spec: ModelSpec, budget: float, data: str, out_dir: str | Path,
                 overrides: list[str] = (), vocab_size: int | None = None) -> dict:
    """The full training recipe (TrainConfig fields) of one model of the experiment."""
    r = copy.deepcopy(shape.recipe)
    for k in ("max_steps", "max_tokens", "flops_budget"):
        r.pop(k, None)
    m = {k: v for k, v in dict(r.get("model") or {}).items() if k not in KIND_KEYS}
    m.update(spec.model_overrides())
    if spec.kind != "vanilla":
        if "num_hidden_layers" in m:
            m["num_hidden_layers"] = valid_num_layers(int(m["num_hidden_layers"]), spec.num_recursions, spec.sharing)
        elif "preset" not in m:
            m["num_hidden_layers"] = valid_num_layers(ModelConfig.num_hidden_layers, spec.num_recursions,
                                                      spec.sharing)
    r["model"] = m
    r["flops_budget"] = float(budget)
    r["data"] = str(data)
    r["out_dir"] = str(out_dir)
    r["overwrite"] = False
    apply_overrides(r, list(overrides))
    cfg = _train_config(r, spec)
    if shape.paper and "warmup_steps" not in _override_keys(overrides):
        mcfg = cfg.model_config(vocab_size)
        per_step = cfg.seq_len * cfg.batch_size * cfg.grad_accum
        steps_ref = min(float(budget), PAPER_WARMUP_BUDGET) / (paper_flops_per_token(mcfg, cfg.seq_len) * per_step)
        r["warmup_steps"] = max(1, math.ceil(PAPER_WARMUP_FRAC * steps_ref))
    return r


def _override_keys(overrides) -> set[str]:
    return {ov.split("=", 1)[0] for ov in overrides}


def _train_config(r: dict, spec: ModelSpec | None = None) -> TrainConfig:
    try:
        return TrainConfig.from_dict(copy.deepcopy(r), source=f"recipe of {spec.name}" if spec else "recipe")
    except ConfigError as e:
        raise ExperimentError(str(e)) from None


def _comparable(r: dict) -> dict:
    """A recipe as stored in a record (JSON types), without the keys that do not change training."""
    return json.loads(json.dumps({k: v for k, v in r.items() if k not in COSMETIC_KEYS}, default=_jsonable))


# ====================================================================== the plan
@dataclass
class Run:
    """One model trained at one shape and budget."""

    shape: Shape
    spec: ModelSpec
    budget: float
    recipe: dict
    run_dir: Path
    # plan (computed from the recipe, before training)
    steps: int = 0
    tokens_per_step: int = 0
    tokens: int = 0
    flops: float = 0.0
    flops_per_token: float = 0.0
    unique_params: int = 0
    config: ModelConfig | None = None

    @property
    def key(self) -> str:
        return f"{self.shape.name}-{budget_tag(self.budget)}/{self.spec.name}"

    @property
    def flops_error(self) -> float:
        return self.flops / self.budget - 1.0


def count_unique_params(mcfg: ModelConfig) -> int:
    """Unique non-embedding parameters (the paper's count), from a model built on the meta device."""
    from .model import MoRForCausalLM

    with torch.device("meta"):
        model = MoRForCausalLM(mcfg)
    return model.num_parameters()


def plan_run(run: Run, vocab_size: int | None) -> Run:
    """Fill in the steps, tokens, FLOPs and parameters the trainer will use for ``run``."""
    cfg = _train_config(run.recipe, run.spec)
    try:
        mcfg = cfg.model_config(vocab_size)
    except (ConfigError, TrainError) as e:
        raise ExperimentError(f"{run.spec.name}: {e}") from None
    run.config = mcfg
    run.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    run.flops_per_token = paper_flops_per_token(mcfg, cfg.seq_len)
    # exactly the trainer's rule (train.py, flops_budget run length; one process)
    run.steps = max(1, round(float(cfg.flops_budget) / (run.flops_per_token * run.tokens_per_step)))
    run.tokens = run.steps * run.tokens_per_step
    run.flops = run.flops_per_token * run.tokens
    run.unique_params = count_unique_params(mcfg)
    return run


def check_tolerance(runs: list[Run], tolerance: float) -> None:
    """Every model must land within ``tolerance`` of the budget after rounding to whole steps."""
    bad = [r for r in runs if abs(r.flops_error) > tolerance]
    if bad:
        lines = [f"{r.key}: {r.steps} steps of {r.tokens_per_step} tokens = {r.flops:.4g} FLOPs "
                 f"({100 * r.flops_error:+.2f}% of {r.budget:.4g})" for r in bad]
        raise ExperimentError(
            f"rounding to whole optimizer steps puts {len(bad)} model(s) more than {100 * tolerance:g}% off the "
            f"budget: {'; '.join(lines)}. Raise --budget or make steps smaller (--set batch_size=... or "
            "grad_accum=...), so every model runs at least ~{:d} steps".format(math.ceil(0.5 / tolerance)))


# ====================================================================== data
def ensure_data(out_dir: Path, data: str | None, corpus: list[str], vocab_size: int,
                val_fraction: float) -> tuple[str, dict]:
    """The prepared corpus: ``data`` if given, else ``corpus`` prepared once into ``OUT/data``."""
    from .data import load_meta, prepare

    if data:
        return str(data), load_meta(data)
    d = out_dir / "data"
    sources = [_source_id(s) for s in corpus]
    if (d / "meta.json").is_file():
        meta = load_meta(d)
        if list(meta.get("sources", [])) != sources:
            raise ExperimentError(f"{d} holds a corpus prepared from {meta.get('sources')}, not {corpus}; "
                                  "use another --out, or --data to point at a prepared corpus")
        return str(d), meta
    print(f"[experiment] preparing {', '.join(corpus)} into {d} (vocab {vocab_size})", file=sys.stderr)
    prepare(sources, d, vocab_size=vocab_size, val_fraction=val_fraction)
    return str(d), load_meta(d)


def _source_id(s: str) -> str:
    p = Path(s).expanduser()
    return str(p.resolve()) if p.exists() else s


# ====================================================================== records and resume
def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(str(path), json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def run_state(run: Run) -> tuple[str, dict]:
    """What to do with ``run``: ``done`` (skip), ``resume``, ``restart`` (recipe changed) or ``fresh``;
    and its record."""
    rec = read_json(run.run_dir / RECORD) or {}
    same = rec.get("recipe") is not None and _comparable(rec["recipe"]) == _comparable(run.recipe)
    latest = ckpt.latest_checkpoint(run.run_dir)
    if same and rec.get("status") == "done" and rec.get("summary") and latest is not None:
        meta = read_json(latest / "meta.json") or {}
        if int(meta.get("step", -1)) == int(rec["summary"].get("steps", -2)):
            return "done", rec
    if latest is not None:
        return ("resume" if same else "restart"), rec
    return "fresh", rec


def _close_open_segment(rec: dict, run_dir: Path) -> None:
    """An interrupted segment's time: from its start to its last checkpoint (work after that is redone)."""
    segs = rec.get("segments") or []
    if segs and segs[-1].get("end") is None:
        latest = ckpt.latest_checkpoint(run_dir)
        saved = (read_json(latest / "meta.json") or {}).get("saved_at") if latest else None
        seg = segs[-1]
        seg["interrupted"] = True
        seg["end"] = saved
        seg["wall_s"] = max(0.0, float(saved) - float(seg["start"])) if saved else 0.0


def train_run(run: Run, progress: bool, train_fn: Callable[..., dict] | None = None) -> tuple[str, dict]:
    """Train one model unless it is done; returns (what happened: skipped, trained, resumed, restarted or
    failed; its record)."""
    train_fn = train_fn or train
    action, rec = run_state(run)
    if action == "done":
        return "skipped", rec
    run.run_dir.mkdir(parents=True, exist_ok=True)
    recipe = copy.deepcopy(run.recipe)
    recipe["progress"] = progress
    if action == "restart":
        print(f"[experiment] {run.key}: its recipe changed since the checkpoints in {run.run_dir} were written; "
              "training it again from scratch", file=sys.stderr)
        recipe["overwrite"] = True
        rec = {}
    elif action == "fresh":
        # an attempt interrupted before its first checkpoint leaves only logs behind
        for stale in ("metrics.jsonl", "metrics.prev.jsonl"):
            (run.run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(run.run_dir / "tb", ignore_errors=True)
        rec = {}
    else:
        _close_open_segment(rec, run.run_dir)
    rec.update(name=run.spec.name, label=run.spec.label, shape=run.shape.name, budget=run.budget,
               recipe=run.recipe, status="running", error=None)
    rec.setdefault("segments", []).append({"start": time.time(), "end": None, "resume": action == "resume"})
    rec.pop("analysis", None)
    write_json(run.run_dir / RECORD, rec)
    t0, cpu0 = time.time(), _cpu_seconds()
    try:
        summary = train_fn(TrainConfig.from_dict(recipe), resume=action == "resume")
    except (TrainError, ConfigError, RuntimeError) as e:
        seg = rec["segments"][-1]
        seg.update(end=time.time(), wall_s=time.time() - t0, cpu_s=_cpu_seconds() - cpu0, failed=True)
        rec.update(status="failed", error=f"{type(e).__name__}: {e}")
        write_json(run.run_dir / RECORD, rec)
        print(f"[experiment] {run.key} failed: {e}", file=sys.stderr)
        return "failed", rec
    seg = rec["segments"][-1]
    seg.update(end=time.time(), wall_s=time.time() - t0, train_wall_s=summary.get("wall_s"),
               cpu_s=_cpu_seconds() - cpu0)
    rec.update(status="done", summary=summary, finished_at=time.time(),
               wall_s=sum(float(s.get("wall_s") or 0.0) for s in rec["segments"]),
               cpu_s=sum(float(s["cpu_s"]) for s in rec["segments"]) if all("cpu_s" in s for s in rec["segments"])
               else None)
    write_json(run.run_dir / RECORD, rec)
    return {"resume": "resumed", "restart": "restarted"}.get(action, "trained"), rec


def _cpu_seconds() -> float:
    """CPU time (user + system, all threads) of this process: a measure of a model's training cost that a
    busy machine distorts much less than wall-clock."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ====================================================================== evaluation after training
def val_stream(data_dir: str) -> np.ndarray:
    """The validation split of a prepared corpus as one int64 token stream."""
    from .data import load_meta

    meta = load_meta(data_dir)
    dtype = np.dtype(meta["dtype"])
    parts = [np.asarray(np.memmap(Path(data_dir) / s["file"], dtype=dtype, mode="r"), dtype=np.int64)
             for s in meta["splits"]["val"]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


@torch.no_grad()
def stream_nll(logits_fn: Callable[[torch.Tensor], torch.Tensor], stream: np.ndarray, seq_len: int,
               batch_size: int, device: torch.device) -> float:
    """Mean NLL (nats/token) over the full ``seq_len`` windows of ``stream`` (the training windows)."""
    n_win = (len(stream) - 1) // seq_len
    if n_win < 1:
        raise ExperimentError(f"the validation split has {len(stream)} tokens, fewer than one window of {seq_len}")
    tot, n = 0.0, 0
    for i in range(0, n_win, batch_size):
        buf = np.stack([stream[w * seq_len: w * seq_len + seq_len + 1] for w in range(i, min(n_win, i + batch_size))])
        x = torch.from_numpy(buf[:, :-1]).to(device)
        y = torch.from_numpy(buf[:, 1:]).to(device)
        logits = logits_fn(x).float()
        tot += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                                 reduction="sum").item()
        n += y.numel()
    return tot / n


def depth_range(mcfg: ModelConfig) -> list[int]:
    """Test-time depths scored: 1..N_r, plus one extra pass where forward_depth defines it."""
    if mcfg.architecture == "vanilla":
        return []
    extra = 0 if (mcfg.architecture == "mor" and mcfg.router_type == "token") else 1
    return list(range(1, mcfg.num_recursions + 1 + extra))


def _device_of(cfg: TrainConfig) -> torch.device:
    return resolve_device(cfg.device)


def analyze_run(run: Run, rec: dict, data_dir: str, opts: argparse.Namespace, notes: set[str]) -> dict:
    """Causal NLL, test-time depth scaling and (with ``--fewshot``) few-shot accuracy of a trained
    model; cached in its record, so a rerun computes only what is missing."""
    analysis = dict(rec.get("analysis") or {})
    need = [k for k in ("causal_nll", "depth_scaling") if k not in analysis]
    if opts.fewshot and "fewshot" not in analysis:
        need.append("fewshot")
    if not need:
        return analysis
    ckpt_dir = rec["summary"].get("checkpoint") or str(ckpt.latest_checkpoint(run.run_dir))
    cfg = _train_config(run.recipe, run.spec)
    device = _device_of(cfg)
    model = ckpt.load_model(ckpt_dir, device=device)
    model.eval()
    mcfg = model.config
    stream = val_stream(data_dir)
    bs = max(1, cfg.batch_size)
    amp = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast(device_type="cpu", enabled=False))
    t0 = time.time()
    with amp:
        if "causal_nll" in need:
            expert = mcfg.architecture == "mor" and mcfg.router_type == "expert"
            routing = "threshold" if expert else "topk"
            analysis["causal_nll"] = stream_nll(lambda x: model(x, routing=routing).logits, stream, cfg.seq_len,
                                                bs, device)
            analysis["causal_routing"] = routing
        if "depth_scaling" in need:
            depths = depth_range(mcfg)
            if not depths:
                analysis["depth_scaling"] = {}
            else:
                try:
                    from .eval.depth import forward_depth
                except ImportError as e:
                    notes.add(f"depth scaling skipped: mor.eval.depth is not importable ({e})")
                else:
                    analysis["depth_scaling"] = {
                        str(d): stream_nll(lambda x, d=d: forward_depth(model, x, routing="topk", max_depth=d).logits,
                                           stream, cfg.seq_len, bs, device) for d in depths}
    analysis["eval_s"] = round(time.time() - t0, 2)
    if "fewshot" in need:
        res = fewshot_scores(model, ckpt_dir, opts, notes)
        if res is not None:
            analysis["fewshot"] = res
    rec["analysis"] = analysis
    write_json(run.run_dir / RECORD, rec)
    return analysis


def fewshot_scores(model, ckpt_dir: str, opts: argparse.Namespace, notes: set[str]) -> dict | None:
    """The paper's 0-shot tasks through mor.eval.fewshot (lm-eval); None with a note when unavailable."""
    try:
        from .eval.fewshot import EvalDependencyError, run_tasks
    except ImportError as e:
        notes.add(f"few-shot accuracy skipped: mor.eval.fewshot is not importable ({e})")
        return None
    tok = ckpt.load_tokenizer(ckpt_dir, vocab_size=model.config.vocab_size)
    try:
        res = run_tasks(model, tok, opts.fewshot_tasks, limit=opts.fewshot_limit, checkpoint=str(ckpt_dir))
    except EvalDependencyError as e:
        notes.add(f"few-shot accuracy skipped: {e}")
        return None
    return {"table": res.get("table"), "limit": opts.fewshot_limit, "tasks": opts.fewshot_tasks}


def bench_infer_module():
    """``mor.bench.infer`` if this version of the library has it, else None."""
    import importlib

    try:
        return importlib.import_module("mor.bench.infer")
    except ModuleNotFoundError as e:
        if e.name not in ("mor.bench.infer", "mor.bench"):
            raise
        return None


def measure_throughput(runs: list[Run], opts: argparse.Namespace, notes: set[str]) -> None:
    """Generation throughput of every trained MoR model against the trained vanilla model of its
    group (same shape and budget), measured by ``mor bench infer`` (its own parser and ``run``).

    One benchmark call per MoR checkpoint, each timing the MoR model and the vanilla partner in the
    same process (a paired measurement, robust to a busy machine); cached in the MoR record.
    ``mor bench infer`` serves vanilla and MoR models only, so recursive models have no throughput."""
    bench = bench_infer_module()
    if bench is None:
        notes.add("throughput vs NLL not plotted: `mor bench infer` (mor.bench.infer) is not installed in this "
                  "version of the library")
        return
    notes.add("throughput: `mor bench infer` serves vanilla and MoR models only; recursive models have none")
    groups: dict[tuple, dict[str, tuple[Run, dict]]] = {}
    for r in runs:
        rec = read_json(r.run_dir / RECORD) or {}
        if rec.get("status") == "done":
            groups.setdefault((r.shape.name, r.budget), {})[r.spec.name] = (r, rec)
    for (shape, budget), members in groups.items():
        if "vanilla" not in members:
            if any(s.kind.startswith("mor") for s, _ in [(r.spec, 0) for r, _ in members.values()]):
                notes.add(f"throughput skipped for {shape} @ {budget:.3g}: no trained vanilla partner in the experiment")
            continue
        _, vrec = members["vanilla"]
        vckpt = vrec["summary"]["checkpoint"]
        for name, (r, rec) in members.items():
            if not r.spec.kind.startswith("mor"):
                continue
            analysis = rec.setdefault("analysis", {})
            if "throughput" in analysis:
                continue
            parser = argparse.ArgumentParser(prog="mor bench infer")
            bench.add_arguments(parser)
            argv = bench_infer_argv(parser, r, rec["summary"]["checkpoint"], vckpt, opts.bench_args)
            print(f"[experiment] throughput of {r.key}: mor bench infer {' '.join(argv)}", file=sys.stderr)
            try:
                res = bench.run(parser.parse_args(argv))
            except (Exception, SystemExit) as e:  # a benchmark failure must not lose the trained results
                notes.add(f"throughput of {r.key} failed: {type(e).__name__}: {e}")
                continue
            rows = res.get("rows", [])
            mrow = next((x for x in rows if x.get("kind") == "mor" and x.get("setting") == "batch"), None)
            vrow = next((x for x in rows if x.get("kind") == "vanilla" and x.get("setting") == "batch"), None)
            if mrow is None or vrow is None:
                notes.add(f"throughput of {r.key}: mor bench infer returned no batch-setting rows")
                continue
            analysis["throughput"] = {
                "argv": argv, "tok_per_s": mrow["tokens_per_s"], "vanilla_tok_per_s": vrow["tokens_per_s"],
                "speedup": mrow["tokens_per_s"] / vrow["tokens_per_s"], "batch": mrow.get("batch"),
                "mean_depth": mrow.get("mean_depth"), "mean_len": res.get("mean_len"), "device": res.get("device"),
                "threads": res.get("threads")}
            write_json(r.run_dir / RECORD, rec)


def bench_infer_argv(parser: argparse.ArgumentParser, run: Run, ckpt_dir: str, vanilla_ckpt: str,
                     extra: list[str]) -> list[str]:
    """``mor bench infer`` arguments for one MoR checkpoint and its vanilla partner: the fixed-batch
    setting of the paper's protocol, without the transformers baseline, with an output length that
    fits the model's context (mean 256 as in the paper when it fits; lengths vary by +-50%); on a CPU a
    smaller workload (batch 8, 32 requests, mean length <= 64); the fastest of 3 timed runs counts.
    Options are taken from the benchmark's own parser, so only options it has are passed."""
    opts = {o for a in parser._actions for o in a.option_strings}
    device = _device_of(_train_config(run.recipe, run.spec))
    cpu = device.type == "cpu"
    argv = ["--mor-checkpoint", str(ckpt_dir), "--vanilla-checkpoint", str(vanilla_ckpt)]
    if "--hf" in opts and "--hf" not in extra:
        argv += ["--hf", "none"]
    elif "--no-hf" in opts:
        argv += ["--no-hf"]
    if "--skip-max" in opts:
        argv += ["--skip-max"]
    if "--mean-len" in opts and "--mean-len" not in extra:
        ctx = run.config.max_position_embeddings if run.config else 2048
        argv += ["--mean-len", str(max(1, min(64 if cpu else 256, int((ctx - 2) / 1.5))))]
    if "--len-spread" in opts and "--len-spread" not in extra:
        argv += ["--len-spread", "0.5"]
    if cpu and "--batch" in opts and "--batch" not in extra:  # a CPU-sized workload: 32 requests of ~64 tokens
        argv += ["--batch", "8"]
    if cpu and "--requests-per-slot" in opts and "--requests-per-slot" not in extra:
        argv += ["--requests-per-slot", "4"]
    if "--repeats" in opts and "--repeats" not in extra:  # the fastest of 3 timed runs (busy machines)
        argv += ["--repeats", "3"]
    if "--device" in opts and "--device" not in extra:
        argv += ["--device", str(device)]
    return argv + list(extra)


# ====================================================================== results
def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a run's metrics.jsonl, one per step (the last one
    written wins, so steps redone after a resume are not counted twice)."""
    train_recs: dict[int, dict] = {}
    val_recs: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return [], []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
        if "loss" in r:
            train_recs[int(r["step"])] = r
        if "val_loss" in r:
            val_recs[int(r["step"])] = r
    return [train_recs[k] for k in sorted(train_recs)], [val_recs[k] for k in sorted(val_recs)]


def result_row(run: Run, rec: dict) -> dict:
    """One row of the results table."""
    s = rec.get("summary") or {}
    a = rec.get("analysis") or {}
    fs = (a.get("fewshot") or {}).get("table") or {}
    acc = None
    if isinstance(fs, dict) and fs:  # mor.eval.fewshot.paper_table: columns in percent and "Avg"
        acc = fs.get("Avg")
        if acc is None:  # a subset of the tasks: the mean of the columns that ran
            have = [v for k, v in fs.items() if k != "Avg" and isinstance(v, (int, float))]
            acc = sum(have) / len(have) if have else None
    row = {
        "key": run.key, "name": run.spec.name, "model": run.spec.label, "kind": run.spec.kind,
        "shape": run.shape.name, "budget": run.budget,
        "num_recursions": run.spec.num_recursions if run.spec.kind != "vanilla" else None,
        "sharing": run.spec.sharing if run.spec.kind != "vanilla" else None,
        "kv_mode": run.spec.kv_mode if run.spec.kind.startswith("mor") else None,
        "status": rec.get("status", "missing"), "error": rec.get("error"),
        "planned_steps": run.steps, "planned_flops": run.flops, "planned_unique_params": run.unique_params,
        "unique_params": s.get("unique_params"), "steps": s.get("steps"), "tokens": s.get("tokens"),
        "flops": s.get("flops"), "flops_error": (s["flops"] / run.budget - 1.0) if s.get("flops") else None,
        "nll": s.get("val_loss"), "causal_nll": a.get("causal_nll"), "causal_routing": a.get("causal_routing"),
        "depth_scaling": a.get("depth_scaling"), "accuracy": acc, "fewshot": fs or None,
        "tok_per_s_train": s.get("tok_per_s"), "mfu": s.get("mfu"), "train_wall_s": s.get("wall_s"),
        "wall_s": rec.get("wall_s"), "cpu_s": rec.get("cpu_s"), "segments": len(rec.get("segments") or []),
        "started_at": (rec.get("segments") or [{}])[0].get("start"), "finished_at": rec.get("finished_at"),
        "infer_tok_per_s": (a.get("throughput") or {}).get("tok_per_s"),
        "infer_speedup": (a.get("throughput") or {}).get("speedup"),
        "infer_vanilla_tok_per_s": (a.get("throughput") or {}).get("vanilla_tok_per_s"),
        "checkpoint": s.get("checkpoint"), "run_dir": str(run.run_dir),
    }
    return row


def _fmt_params(n: float | None) -> str:
    return "-" if n is None else (f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}B")


def _fmt_num(x: float | None) -> str:
    """Token counts: 1.23M, 20.00B."""
    if x is None:
        return "-"
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suf}"
    return f"{x:g}"


def _fmt_wall(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _fmt_flops(x: float | None) -> str:
    return "-" if x is None else f"{x:.3e}"


def markdown_table(rows: list[dict]) -> str:
    """The results in the paper's Table 3 layout (plus the causal NLL and wall-clock)."""
    multi_shape = len({r["shape"] for r in rows}) > 1
    multi_budget = len({r["budget"] for r in rows}) > 1
    best = {}
    for r in rows:
        grp = (r["shape"], r["budget"])
        if r["nll"] is not None and (grp not in best or r["nll"] < best[grp]):
            best[grp] = r["nll"]
    head = (["shape"] if multi_shape else []) + (["budget"] if multi_budget else []) + [
        "model", "N_r", "unique params", "FLOPs", "FLOPs vs budget", "tokens", "NLL", "causal NLL",
        "accuracy", "wall-clock"] + (["CPU time"] if any(r.get("cpu_s") for r in rows) else []) + (
        ["decode speed-up"] if any(r.get("infer_speedup") for r in rows) else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        nll = "-" if r["nll"] is None else f"{r['nll']:.4f}"
        if r["nll"] is not None and r["nll"] == best.get((r["shape"], r["budget"])):
            nll = f"**{nll}**"
        if r["status"] != "done":
            nll = f"({r['status']})"
        cells = ([r["shape"]] if multi_shape else []) + ([f"{r['budget']:.3g}"] if multi_budget else []) + [
            r["model"], "-" if r["num_recursions"] is None else str(r["num_recursions"]),
            _fmt_params(r["unique_params"]), _fmt_flops(r["flops"]),
            "-" if r["flops_error"] is None else f"{100 * r['flops_error']:+.2f}%",
            _fmt_num(r["tokens"]), nll,
            "-" if r["causal_nll"] is None else f"{r['causal_nll']:.4f}",
            "-" if r["accuracy"] is None else f"{r['accuracy']:.1f}",
            _fmt_wall(r["wall_s"])]
        if "CPU time" in head:
            cells.append(_fmt_wall(r.get("cpu_s")))
        if "decode speed-up" in head:
            cells.append("-" if r.get("infer_speedup") is None else f"{r['infer_speedup']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paper_table(rows: list[dict]) -> str:
    """This run next to the paper's Table 3, as differences from vanilla (the scale-free comparison)."""
    out = []
    for grp in sorted({(r["shape"], r["budget"]) for r in rows}):
        g = {r["name"]: r for r in rows if (r["shape"], r["budget"]) == grp and r["status"] == "done"}
        if "vanilla" not in g or not any(n in PAPER_TABLE3 for n in g if n != "vanilla"):
            continue
        v, pv = g["vanilla"], PAPER_TABLE3["vanilla"]
        head = ["model", "params / vanilla (ours, paper)", "tokens / vanilla (ours, paper)",
                "NLL - vanilla NLL (ours)", "(paper)", "same sign"]
        lines = [f"\n{grp[0]} @ {grp[1]:.3g} FLOPs vs the paper's Table 3 (360M @ 16.5e18), relative to each "
                 "one's vanilla model:\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, p in PAPER_TABLE3.items():
            if name == "vanilla" or name not in g:
                continue
            r = g[name]
            d, dp = r["nll"] - v["nll"], p[2] - pv[2]
            lines.append(f"| {r['model']}, N_r={r['num_recursions']} | {r['unique_params'] / v['unique_params']:.2f}, "
                         f"{p[0] / pv[0]:.2f} | {r['tokens'] / v['tokens']:.2f}, {p[1] / pv[1]:.2f} | {d:+.4f} | "
                         f"{dp:+.4f} | {'yes' if (d < 0) == (dp < 0) else 'no'} |")
        out.append("\n".join(lines) + "\n")
    return "".join(out)


def depth_table(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("depth_scaling")]
    if not rows:
        return ""
    depths = sorted({int(d) for r in rows for d in r["depth_scaling"]})
    head = ["model", "N_r"] + [f"depth {d}" for d in depths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r["num_recursions"])]
        for d in depths:
            v = r["depth_scaling"].get(str(d))
            mark = "" if v is None or d <= r["num_recursions"] else " (+1)"
            cells.append("-" if v is None else f"{v:.4f}{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- plots
_COLORS = {"vanilla": "#444444", "recursive": "#1f77b4", "mor-expert": "#d62728", "mor-token": "#2ca02c"}
_MARKERS = {1: "o", 2: "s", 3: "^", 4: "D"}


def _style(r: dict) -> dict:
    kv = r.get("kv_mode") == "shared"
    cyc = r.get("sharing") not in (None, "middle_cycle")
    return dict(color="#9467bd" if kv else ("#ff7f0e" if cyc else _COLORS.get(r["kind"], "k")),
                marker=_MARKERS.get(r["num_recursions"] or 1, "o"))


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by another with smaller-or-equal x and smaller y, sorted by x."""
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def make_plots(rows: list[dict], report_dir: Path, notes: set[str]) -> list[str]:
    """Write the PNG plots; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "done" and r["nll"] is not None]
    files: list[str] = []
    if not done:
        return files
    title_sfx = ", ".join(sorted({f"{r['shape']} @ {r['budget']:.3g} FLOPs" for r in done}))

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(report_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)

    # NLL vs unique parameters
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for r in done:
        ax.scatter(r["unique_params"] / 1e6, r["nll"], s=60, label=r["model"] + (
            f" N_r={r['num_recursions']}" if r["num_recursions"] else ""), **_style(r))
        ax.annotate(r["name"], (r["unique_params"] / 1e6, r["nll"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    front = pareto([(r["unique_params"] / 1e6, r["nll"]) for r in done])
    xmax = max(r["unique_params"] for r in done) / 1e6 * 1.15
    ax.step([p[0] for p in front] + [xmax], [p[1] for p in front] + [front[-1][1]], where="post", ls="--",
            color="k", lw=1, label="Pareto frontier (fewest parameters for a given NLL)")
    ax.scatter([p[0] for p in front], [p[1] for p in front], s=180, facecolors="none", edgecolors="k", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("unique non-embedding parameters (M)")
    ax.set_ylabel("validation NLL (nats/token)")
    ax.set_title(f"NLL vs unique parameters ({title_sfx})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "nll_vs_params.png")

    # NLL vs FLOPs: validation curves (stable-phase evaluations) and final points
    fig, ax = plt.subplots(figsize=(7, 4.8))
    pts = []
    for r in done:
        _, val = read_metrics(Path(r["run_dir"]))
        fpt = r["flops"] / r["tokens"]
        tps = r["tokens"] / r["steps"]
        xs = [v["step"] * tps * fpt for v in val]
        ys = [v["val_loss"] for v in val]
        st = _style(r)
        ax.plot(xs, ys, color=st["color"], alpha=0.5, lw=1)
        ax.scatter([r["flops"]], [r["nll"]], s=60, color=st["color"], marker=st["marker"], label=r["name"], zorder=3)
        pts += list(zip(xs, ys))
    front = pareto(pts)
    ax.plot([p[0] for p in front], [p[1] for p in front], ls="--", color="k", lw=1, label="Pareto frontier")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (paper counting, SPEC section 6)")
    ax.set_ylabel("validation NLL")
    lo = min(r["nll"] for r in done)
    ax.set_ylim(lo - 0.1, max(lo + 1.5, max(r["nll"] for r in done) + 0.2))
    ax.set_title(f"NLL vs FLOPs ({title_sfx}); lines: evaluations during training", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "nll_vs_flops.png")

    # loss curves
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    low = lo
    for r in done:
        tr, val = read_metrics(Path(r["run_dir"]))
        st = _style(r)
        if tr:
            xs = [t.get("flops", math.nan) for t in tr]
            ys = np.array([t["loss"] for t in tr])
            k = max(1, min(5, len(ys) // 10))  # a short moving average: micro-batches are noisy
            smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
            axes[0].plot(xs[k - 1:], smooth, color=st["color"], label=r["name"], lw=1,
                         ls="--" if r["num_recursions"] == 2 else "-")
            low = min(low, float(smooth.min()))
        fpt, tps = r["flops"] / r["tokens"], r["tokens"] / r["steps"]
        axes[1].plot([v["step"] * tps * fpt for v in val], [v["val_loss"] for v in val], color=st["color"],
                     marker=st["marker"], ms=3, lw=1, label=r["name"], ls="--" if r["num_recursions"] == 2 else "-")
    axes[0].set_title("training loss (moving average)", fontsize=9)
    axes[1].set_title("validation NLL", fontsize=9)
    for a in axes:
        a.set_xlabel("training FLOPs")
        a.grid(alpha=0.3)
        a.set_ylim(low - 0.1, low + 2.0)
    axes[0].set_ylabel("NLL")
    axes[1].legend(fontsize=7)
    save(fig, "loss_curves.png")

    # test-time depth scaling
    ds = [r for r in done if r.get("depth_scaling")]
    if ds:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for r in ds:
            d = sorted((int(k), v) for k, v in r["depth_scaling"].items())
            st = _style(r)
            ax.plot([x for x, _ in d], [y for _, y in d], color=st["color"], marker=st["marker"], label=r["name"],
                    ls="--" if r["num_recursions"] == 2 else "-")
            ax.axvline(r["num_recursions"], color=st["color"], alpha=0.15)
        ax.set_xlabel("recursions allowed at test time (trained N_r marked)")
        ax.set_ylabel("validation NLL")
        ax.set_xticks(sorted({int(k) for r in ds for k in r["depth_scaling"]}))
        ax.set_title("test-time recursion depth (beyond the trained N_r: extra passes of the last recursion)",
                     fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, "depth_scaling.png")

    # generation throughput (paired with vanilla) vs NLL
    tp = [r for r in done if r.get("infer_speedup")]
    if tp:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for r in tp:
            ax.scatter(r["infer_speedup"], r["nll"], s=60, **_style(r))
            ax.annotate(f"{r['name']} ({r['infer_tok_per_s']:.0f} tok/s)", (r["infer_speedup"], r["nll"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.axvline(1.0, color="k", alpha=0.2)
        xs = [r["infer_speedup"] for r in tp]
        ax.set_xlim(min(xs) - 0.1, max(xs) + 0.45 * (max(xs) - min(xs) + 0.2))
        ax.set_xlabel("generation throughput relative to vanilla (mor bench infer, paired runs)")
        ax.set_ylabel("validation NLL")
        ax.set_title("inference throughput vs NLL", fontsize=9)
        ax.grid(alpha=0.3)
        save(fig, "throughput_vs_nll.png")
    return files


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def _wall_line(header: dict, rows: list[dict]) -> str:
    """Wall-clock: the models' own times summed, and the span of the invocations that did the work."""
    inv = [i for i in header.get("invocations", []) if i.get("end")]
    span = sum(i["end"] - i["start"] for i in inv)
    trained = sum(r["wall_s"] or 0 for r in rows)
    starts = [r["started_at"] for r in rows if r.get("started_at")]
    ends = [r["finished_at"] for r in rows if r.get("finished_at")]
    first_last = (max(ends) - min(starts)) if starts and ends else None
    return (f"Wall-clock: the models' training runs (including checkpoints, final validation and any time lost "
            f"to interruptions up to the last checkpoint): {trained / 60:.1f} min in total"
            + (f"; first model started to last model finished: {first_last / 60:.1f} min" if first_last else "")
            + (f"; recorded invocations (training, evaluation, throughput, report): {span / 60:.1f} min over "
               f"{len(inv)}" if inv else "") + ".\n")


def write_report(runs: list[Run], report_dir: Path, header: dict, notes: set[str]) -> dict:
    """results.json, results.md and the plots, from the runs' records."""
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = [result_row(r, read_json(r.run_dir / RECORD) or {}) for r in runs]
    for r in rows:  # vanilla's throughput: the median of its paired measurements against each MoR model
        if r["kind"] == "vanilla" and r["infer_tok_per_s"] is None:
            vals = [x["infer_vanilla_tok_per_s"] for x in rows if x["shape"] == r["shape"]
                    and x["budget"] == r["budget"] and x.get("infer_vanilla_tok_per_s")]
            if vals:
                r["infer_tok_per_s"], r["infer_speedup"] = float(np.median(vals)), 1.0
    plots = make_plots(rows, report_dir, notes)
    result = {"experiment": header, "rows": rows, "plots": plots, "notes": sorted(notes)}
    write_json(report_dir / "results.json", result)
    md = [f"# isoFLOP comparison: {', '.join(header['shapes'])} at "
          f"{', '.join(f'{b:.3g}' for b in header['budgets'])} FLOPs\n",
          f"Command: `{header['command']}`\n",
          f"Machine: {header['machine'].get('cpu', '?')}, {header['machine']['cpu_count']} CPU cores"
          + (f", {header['machine']['gpu']}" if header['machine'].get('gpu') else "")
          + f"; torch {header['machine']['torch']}. Corpus: {header['data']}.\n",
          _wall_line(header, rows),
          "NLL: the trainer's final validation loss (top-k routing, as the paper reports it). Causal NLL: the "
          "whole validation split with the causal routing rule (threshold rule for expert-choice; the same "
          "model forward otherwise). FLOPs: paper counting (SPEC section 6). Unique params: non-embedding, "
          "shared tensors once, routers excluded.\n",
          markdown_table(rows)]
    pt = paper_table(rows)
    if pt:
        md.append(pt)
    dt = depth_table(rows)
    if dt:
        md += ["\nValidation NLL with the recursion depth capped (or extended by one extra pass of the last "
               "recursion, marked +1) at test time:\n", dt]
    if plots:
        md.append("\n" + "\n".join(f"![{p[:-4]}]({p})" for p in plots) + "\n")
    if notes:
        md.append("\nNotes:\n" + "\n".join(f"- {n}" for n in sorted(notes)) + "\n")
    atomic_write_text(str(report_dir / "results.md"), "\n".join(md))
    for f in ("results.md", "results.json"):
        os.chmod(report_dir / f, 0o644)
    return result


# ====================================================================== replicates
#: Paired comparisons checked across replicates (A, B): "A - B" in validation NLL, per seed; the paper's
#: difference comes from PAPER_TABLE3 where it has both models.
COMPARISONS = (
    ("mor-expert-nr2", "vanilla", "MoR expert N_r=2 vs vanilla (equal FLOPs, 0.6x params)"),
    ("mor-expert-nr3", "vanilla", "MoR expert N_r=3 vs vanilla (equal FLOPs, 0.5x params)"),
    ("mor-token-nr3", "vanilla", "MoR token N_r=3 vs vanilla"),
    ("mor-expert-kvshare-nr3", "vanilla", "MoR expert N_r=3, KV sharing vs vanilla"),
    ("recursive-nr2", "vanilla", "recursive N_r=2 vs vanilla"),
    ("recursive-nr3", "vanilla", "recursive N_r=3 vs vanilla"),
    ("mor-expert-nr2", "recursive-nr2", "MoR expert vs recursive, N_r=2 (same unique params)"),
    ("mor-expert-nr3", "recursive-nr3", "MoR expert vs recursive, N_r=3 (same unique params)"),
    ("mor-expert-nr3", "mor-token-nr3", "expert-choice vs token-choice, N_r=3"),
    ("mor-expert-kvshare-nr3", "mor-expert-nr3", "KV sharing vs recursion-wise KV, N_r=3"),
    ("mor-expert-nr2", "mor-expert-nr3", "MoR expert N_r=2 vs N_r=3"),
    ("mor-expert-nr3", "mor-expert-cycle-nr2",
     "Middle-Cycle N_r=3 vs Cycle N_r=2 (same unique params)"),
)


def _replicate_seed(row: dict, source: Path) -> int:
    """The seed a finished model was trained with, from its recorded recipe: in SOURCE/<key>
    when SOURCE is the experiment directory, else where results.json says the run was (a path
    relative to the directory the experiment ran from)."""
    dirs = ([source / row["key"]] if source.is_dir() else []) + [Path(row["run_dir"])]
    for run_dir in dirs:
        rec = read_json(run_dir / RECORD)
        if rec and rec.get("recipe") is not None:
            return int(rec["recipe"].get("seed", 0))
        if (run_dir / "recipe.yaml").is_file():
            return int(read_recipe_file(run_dir / "recipe.yaml").get("seed", 0))
    raise ExperimentError(f"{source}: model {row['key']} has no record or recipe.yaml in "
                          f"{' or '.join(map(str, dirs))}; cannot tell its seed")


def load_replicates(dirs: list[str]) -> list[dict]:
    """Read the results.json of every experiment directory and check that they are replicates:
    the same models, the same planned FLOPs and unique parameters, different seeds."""
    if len(dirs) < 2:
        raise ExperimentError(f"combine needs at least two experiment directories (got {len(dirs)})")
    reps = []
    for d in dirs:
        f = Path(d) / "results.json"
        if not f.is_file():
            f = Path(d)
        res = read_json(f) if f.is_file() else None
        if not res or "rows" not in res:
            raise ExperimentError(f"{d}: no results.json from `mor experiment isoflop` (run it, or "
                                  "`--report-only` to rebuild the report)")
        rows = {r["key"]: r for r in res["rows"] if r.get("status") == "done" and r.get("nll") is not None}
        if not rows:
            raise ExperimentError(f"{d}: no finished model in {f}")
        seeds = {_replicate_seed(r, Path(d)) for r in rows.values()}
        if len(seeds) != 1:
            raise ExperimentError(f"{d}: models were trained with different seeds {sorted(seeds)}")
        reps.append({"dir": str(d), "seed": seeds.pop(), "rows": rows,
                     "command": (res.get("experiment") or {}).get("command")})
    by_seed: dict[int, str] = {}
    for rep in reps:
        if rep["seed"] in by_seed:
            raise ExperimentError(f"{rep['dir']} and {by_seed[rep['seed']]} both used seed {rep['seed']}: "
                                  "they are not independent replicates (rerun with --set seed=N)")
        by_seed[rep["seed"]] = rep["dir"]
    common = set(reps[0]["rows"]).intersection(*(set(r["rows"]) for r in reps[1:]))
    if not common:
        raise ExperimentError("the experiment directories share no finished model: "
                              + "; ".join(f"{r['dir']}: {sorted(r['rows'])}" for r in reps))
    for key in sorted(common):
        ref = reps[0]["rows"][key]
        for rep in reps[1:]:
            r = rep["rows"][key]
            for field in ("planned_flops", "planned_unique_params", "tokens"):
                a, b = ref.get(field), r.get(field)
                if a is None or b is None or not math.isclose(a, b, rel_tol=1e-9):
                    raise ExperimentError(f"{key}: {field} differs between {reps[0]['dir']} ({a}) and "
                                          f"{rep['dir']} ({b}); replicates must train the same plan")
    for rep in reps:
        rep["rows"] = {k: v for k, v in rep["rows"].items() if k in common}
    return sorted(reps, key=lambda r: r["seed"])


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def combine_replicates(reps: list[dict]) -> dict:
    """Per-model mean and spread over seeds, and the paired comparisons (same seed, same data order)."""
    keys = list(reps[0]["rows"])  # the first replicate's table order
    seeds = [r["seed"] for r in reps]
    models = []
    for k in keys:
        base = reps[0]["rows"][k]
        nll = [r["rows"][k]["nll"] for r in reps]
        cn = [r["rows"][k].get("causal_nll") for r in reps]
        sp = [r["rows"][k].get("infer_speedup") for r in reps]
        m, s = _mean_std(nll)
        models.append({
            "key": k, "name": base["name"], "model": base["model"], "kind": base["kind"],
            "num_recursions": base.get("num_recursions"), "sharing": base.get("sharing"),
            "kv_mode": base.get("kv_mode"), "shape": base["shape"], "budget": base["budget"],
            "unique_params": base["unique_params"], "flops": base["flops"], "tokens": base["tokens"],
            "nll_by_seed": dict(zip(map(str, seeds), nll)), "nll_mean": m, "nll_std": s,
            "causal_nll_mean": _mean_std(cn)[0] if all(c is not None for c in cn) else None,
            "infer_speedup_mean": _mean_std(sp)[0] if all(x is not None for x in sp) else None,
        })
    comparisons = []
    groups = sorted({k.rsplit("/", 1)[0] for k in keys})
    for g in groups:
        for a, b, label in COMPARISONS:
            ka, kb = f"{g}/{a}", f"{g}/{b}"
            if ka not in keys or kb not in keys:
                continue
            d = [r["rows"][ka]["nll"] - r["rows"][kb]["nll"] for r in reps]
            m, s = _mean_std(d)
            paper = (PAPER_TABLE3[a][2] - PAPER_TABLE3[b][2]) if a in PAPER_TABLE3 and b in PAPER_TABLE3 else None
            first_better = sum(x < 0 for x in d)
            agree = None if paper is None else sum((x < 0) == (paper < 0) for x in d)
            comparisons.append({"group": g, "a": a, "b": b, "label": label, "diff_by_seed": dict(zip(map(str, seeds), d)),
                                "diff_mean": m, "diff_std": s, "a_better": first_better, "paper_diff": paper,
                                "seeds_agreeing_with_paper": agree, "n": len(d)})
    return {"seeds": seeds, "dirs": [r["dir"] for r in reps], "commands": [r["command"] for r in reps],
            "models": models, "comparisons": comparisons}


def _verdict(c: dict) -> str:
    n = c["n"]
    if c["paper_diff"] is None:
        return f"first better in {c['a_better']}/{n}"
    k = c["seeds_agreeing_with_paper"]
    return f"holds ({k}/{n})" if k == n else (f"reversed (0/{n})" if k == 0 else f"mixed ({k}/{n})")


def combined_markdown(res: dict) -> str:
    seeds = res["seeds"]
    n = len(seeds)
    md = [f"# isoFLOP comparison over {n} seeds ({', '.join(map(str, seeds))})\n",
          "Replicates (one `mor experiment isoflop` run each; same plan, different `seed`, which changes the "
          "initialisation and the order of training batches):\n"]
    md += [f"- seed {s}: `{(c or '?').strip()}` ({d})" for s, c, d in zip(seeds, res["commands"], res["dirs"])]
    md.append("\nValidation NLL per seed, mean and sample standard deviation over seeds:\n")
    head = ["model", "N_r", "unique params", "FLOPs", "tokens"] + [f"seed {s}" for s in seeds] + [
        "mean", "std", "causal NLL (mean)"]
    if any(m["infer_speedup_mean"] is not None for m in res["models"]):
        head.append("decode speed-up (mean)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = min(m["nll_mean"] for m in res["models"])
    for m in res["models"]:
        mean = f"{m['nll_mean']:.4f}"
        cells = [m["model"],
                 "-" if m["num_recursions"] is None else str(m["num_recursions"]), _fmt_params(m["unique_params"]),
                 _fmt_flops(m["flops"]), _fmt_num(m["tokens"])]
        cells += [f"{m['nll_by_seed'][str(s)]:.4f}" for s in seeds]
        cells += [f"**{mean}**" if m["nll_mean"] == best else mean, f"{m['nll_std']:.4f}",
                  "-" if m["causal_nll_mean"] is None else f"{m['causal_nll_mean']:.4f}"]
        if "decode speed-up (mean)" in head:
            cells.append("-" if m["infer_speedup_mean"] is None else f"{m['infer_speedup_mean']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    md.append("\n".join(lines) + "\n")
    md.append("Paired comparisons: NLL(first) - NLL(second) within each seed (negative: the first model is "
              "better). Paper: the same difference in Table 3 (360M, 16.5e18 FLOPs). Verdict: in how many "
              "seeds the sign agrees with the paper's.\n")
    head = ["comparison", "paper"] + [f"seed {s}" for s in seeds] + ["mean", "std", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    multi = len({c["group"] for c in res["comparisons"]}) > 1
    for c in res["comparisons"]:
        cells = [(f"{c['group']}: " if multi else "") + c["label"],
                 "-" if c["paper_diff"] is None else f"{c['paper_diff']:+.4f}"]
        cells += [f"{c['diff_by_seed'][str(s)]:+.4f}" for s in seeds]
        cells += [f"{c['diff_mean']:+.4f}", f"{c['diff_std']:.4f}", _verdict(c)]
        lines.append("| " + " | ".join(cells) + " |")
    md.append("\n".join(lines) + "\n")
    return "\n".join(md)


def combined_plot(res: dict, report_dir: Path) -> str:
    """NLL vs unique parameters (mean, min-max over seeds) and the paired differences to vanilla."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (matplotlib.ticker below)

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    seen: dict[int, int] = {}
    for m in res["models"]:
        st = _style(m)
        vals = list(m["nll_by_seed"].values())
        j = seen[m["unique_params"]] = seen.get(m["unique_params"], -1) + 1
        x = m["unique_params"] / 1e6 * (1 + 0.025 * j)  # models with equal counts side by side
        ax.errorbar([x], [m["nll_mean"]], yerr=[[m["nll_mean"] - min(vals)], [max(vals) - m["nll_mean"]]],
                    fmt=st["marker"], color=st["color"], capsize=3, ms=7, label=m["name"])
        ax.scatter([x] * len(vals), vals, s=10, color=st["color"], alpha=0.5)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("unique non-embedding parameters (M; equal counts drawn side by side)")
    ax.set_ylabel("validation NLL (mean; bars: min-max over seeds)")
    ax.set_title(f"equal training FLOPs, {len(res['seeds'])} seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    comps = [c for c in res["comparisons"] if c["b"] == "vanilla"]
    for i, c in enumerate(comps):
        ds = list(c["diff_by_seed"].values())
        bx.scatter(ds, [i] * len(ds), color="k", s=14, alpha=0.6, label="ours, one seed" if i == 0 else None)
        bx.plot([c["diff_mean"]], [i], "|", color="k", ms=16, mew=2, label="ours, mean" if i == 0 else None)
        if c["paper_diff"] is not None:
            bx.scatter([c["paper_diff"]], [i], marker="x", color="#d62728", s=40,
                       label="paper (360M)" if i == 0 else None)
    bx.axvline(0, color="k", alpha=0.3)
    bx.set_yticks(range(len(comps)))
    bx.set_yticklabels([c["a"] for c in comps], fontsize=8)
    bx.set_xlabel("NLL - vanilla NLL (same seed)")
    bx.set_title("difference to vanilla: left of 0 = better than vanilla", fontsize=9)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    name = "seeds.png"
    fig.savefig(report_dir / name, dpi=120)
    plt.close(fig)
    return name


def run_combine(args: argparse.Namespace) -> dict:
    reps = load_replicates(list(args.dirs))
    res = combine_replicates(reps)
    report_dir = Path(args.report_dir or (str(Path(args.dirs[0])).rstrip("/") + "-seeds"))
    report_dir.mkdir(parents=True, exist_ok=True)
    plot = combined_plot(res, report_dir)
    md = combined_markdown(res) + f"\n![seeds]({plot})\n"
    res["plots"] = [plot]
    write_json(report_dir / "results.json", res)
    atomic_write_text(str(report_dir / "results.md"), md)
    for f in ("results.md", "results.json"):
        os.chmod(report_dir / f, 0o644)
    print(md)
    print(f"[experiment] combined report: {report_dir / 'results.md'}", file=sys.stderr)
    return {"experiment": "combine", "report": str(report_dir / "results.md"), "seeds": res["seeds"],
            "models": {m["key"]: {"nll_mean": m["nll_mean"], "nll_std": m["nll_std"]} for m in res["models"]},
            "comparisons": [{k: c[k] for k in ("a", "b", "diff_mean", "diff_std", "a_better", "paper_diff",
                                                "seeds_agreeing_with_paper")} for c in res["comparisons"]]}


# ====================================================================== the command
def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    sp = sub.add_parser("isoflop", help="train every model to the same FLOPs budget and compare",
                        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("--shapes", default="micro",
                    help="comma list: micro, tiny, 135m, 360m or a base-recipe YAML (default micro)")
    sp.add_argument("--budget", default=None,
                    help="FLOPs budget(s), comma list (default: the shape's recipe, e.g. micro's flops_budget)")
    sp.add_argument("--models", default=DEFAULT_MODELS, help=f"model kinds (default {DEFAULT_MODELS})")
    sp.add_argument("--nr", default=DEFAULT_NR, help="N_r values for kinds without :N (default 2,3)")
    sp.add_argument("--kv", default="recursion_wise", help="KV modes for MoR kinds: recursion_wise,shared")
    sp.add_argument("--sharing", default="middle_cycle", help="sharing schemes for recursive/MoR kinds")
    sp.add_argument("--out", default=None, help="experiment directory (default runs/experiment-<shapes>)")
    sp.add_argument("--data", default=None, help="a prepared corpus (mor prepare output) to use as is")
    sp.add_argument("--corpus", nargs="+", default=["shakespeare"],
                    help="sources prepared into OUT/data when --data is not given (default shakespeare)")
    sp.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary when preparing --corpus")
    sp.add_argument("--val-fraction", type=float, default=0.005, help="validation share when preparing --corpus")
    sp.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="recipe overrides for every model (dotted for the model section)")
    sp.add_argument("--tolerance", type=float, default=0.02,
                    help="largest allowed |FLOPs / budget - 1| after rounding to whole steps (default 0.02)")
    sp.add_argument("--report-dir", default=None, help="where results.md/json and plots go (default OUT)")
    sp.add_argument("--plan", action="store_true", help="print the plan (steps, tokens, FLOPs, params) and stop")
    sp.add_argument("--report-only", action="store_true", help="train nothing; rebuild the report from records")
    sp.add_argument("--no-analysis", action="store_true",
                    help="skip the post-training evaluation (causal NLL, depth scaling, few-shot, throughput)")
    sp.add_argument("--fewshot", action="store_true", help="also run the paper's 0-shot tasks (needs lm-eval)")
    sp.add_argument("--fewshot-tasks", default="paper", help="tasks for --fewshot (default: the paper's six)")
    sp.add_argument("--fewshot-limit", type=float, default=None, help="examples per task for --fewshot")
    sp.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=None,
                    help="measure generation throughput with `mor bench infer` (default: when installed)")
    sp.add_argument("--bench-args", default="", help="extra arguments for `mor bench infer`, one quoted string")
    sp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="trainer progress bars (default: when stderr is a terminal)")
    cp = sub.add_parser("combine", help="combine isoflop runs that differ only in seed: mean, spread, paired "
                        "comparisons", description="Combine replicates of `mor experiment isoflop` (the same plan "
                        "run with different --set seed=N) into one report: NLL per seed, mean and standard "
                        "deviation per model, and the paper's comparisons as paired differences within each "
                        "seed, with how many seeds agree with the paper's sign.")
    cp.add_argument("dirs", nargs="+", metavar="DIR", help="experiment directories (or their results.json)")
    cp.add_argument("--report-dir", default=None, help="where results.md/json and seeds.png go "
                    "(default: the first DIR + '-seeds')")


def build_runs(args: argparse.Namespace, out: Path, data: str, vocab_size: int | None) -> list[Run]:
    shapes = [load_shape(s.strip()) for s in str(args.shapes).split(",") if s.strip()]
    if not shapes:
        raise ExperimentError("--shapes is empty")
    specs = parse_models(args.models, args.nr, args.kv, args.sharing)
    runs = []
    for shape in shapes:
        if args.budget is not None:
            try:
                budgets = [float(b) for b in str(args.budget).split(",") if b.strip()]
            except ValueError:
                raise ExperimentError(f"--budget={args.budget!r} must be a number (FLOPs), e.g. 2e15") from None
        elif shape.recipe.get("flops_budget") is not None:
            budgets = [float(shape.recipe["flops_budget"])]
        else:
            raise ExperimentError(f"shape {shape.name}: its recipe {shape.path} sets no flops_budget; give --budget")
        for b in budgets:
            if not (b > 0 and math.isfinite(b)):
                raise ExperimentError(f"--budget {b} must be a positive number of FLOPs")
            for spec in specs:
                run_dir = out / f"{shape.name}-{budget_tag(b)}" / spec.name
                recipe = model_recipe(shape, spec, b, data, run_dir, args.overrides, vocab_size)
                runs.append(plan_run(Run(shape, spec, b, recipe, run_dir), vocab_size))
    return runs


def print_plan(runs: list[Run], corpus_tokens: int | None) -> None:
    print(f"{'model':40s} {'params':>9s} {'steps':>7s} {'tokens':>10s} {'FLOPs':>11s} {'vs budget':>9s}"
          + ("  epochs" if corpus_tokens else ""))
    for r in runs:
        ep = f"  {r.tokens / corpus_tokens:6.2f}" if corpus_tokens else ""
        print(f"{r.key:40s} {_fmt_params(r.unique_params):>9s} {r.steps:7d} {_fmt_num(r.tokens):>10s} "
              f"{r.flops:11.4e} {100 * r.flops_error:+8.3f}%{ep}")


def run(args: argparse.Namespace) -> dict:
    if args.experiment == "combine":
        return run_combine(args)
    if args.experiment != "isoflop":
        raise ExperimentError(f"unknown experiment {args.experiment!r}; choose: isoflop, combine")
    t_start = time.time()
    shape_names = [Path(s.strip()).stem for s in str(args.shapes).split(",") if s.strip()]
    out = Path(args.out or f"runs/experiment-{'+'.join(shape_names)}")
    if not args.plan and not getattr(args, "_locked", False):  # one writer per experiment directory
        from .runlock import RunLock

        with RunLock(out, "mor experiment"):
            return run(argparse.Namespace(**vars(args), _locked=True))
    report_dir = Path(args.report_dir) if args.report_dir else out
    notes: set[str] = set()
    # the plan first: every recipe must be valid and within tolerance before anything trains
    meta = None
    if args.data or (out / "data" / "meta.json").is_file():
        from .data import load_meta

        data_dir = str(args.data or out / "data")
        meta = load_meta(data_dir)
    else:
        data_dir = str(out / "data")
    vocab = meta["vocab_size"] if meta else None
    runs = build_runs(args, out, data_dir, vocab)
    corpus_tokens = meta["splits"]["train"]["tokens"] if meta else None
    print_plan(runs, corpus_tokens)
    check_tolerance(runs, args.tolerance)
    if args.plan:
        return {"experiment": "isoflop", "plan": [{"key": r.key, "steps": r.steps, "tokens": r.tokens,
                                                   "flops": r.flops, "flops_error": r.flops_error,
                                                   "unique_params": r.unique_params} for r in runs]}
    if not args.report_only:
        data_dir, meta = ensure_data(out, args.data, list(args.corpus), args.vocab_size, args.val_fraction)
        if vocab is None:  # the plan used the recipes' vocabulary; the corpus decides the real one
            runs = build_runs(args, out, data_dir, meta["vocab_size"])
            check_tolerance(runs, args.tolerance)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    opts = argparse.Namespace(fewshot=args.fewshot, fewshot_tasks=args.fewshot_tasks,
                              fewshot_limit=args.fewshot_limit, bench_args=shlex.split(args.bench_args))
    actions: dict[str, str] = {}
    for i, r in enumerate(runs, 1):
        if args.report_only:
            actions[r.key] = "report-only"
            continue
        print(f"[experiment] {i}/{len(runs)} {r.key}: {r.steps} steps, {_fmt_num(r.tokens)} tokens, "
              f"{_fmt_params(r.unique_params)} unique params", file=sys.stderr)
        action, rec = train_run(r, progress)
        actions[r.key] = action
        if action == "skipped":
            print(f"[experiment] {r.key}: already trained (val NLL {rec['summary'].get('val_loss'):.4f}); "
                  "not training it again", file=sys.stderr)
    # evaluation after training (cached per model, so reruns only fill in what is missing)
    if not args.report_only and not args.no_analysis:
        for r in runs:
            rec = read_json(r.run_dir / RECORD) or {}
            if rec.get("status") == "done":
                analyze_run(r, rec, data_dir, opts, notes)
        want_tp = args.throughput if args.throughput is not None else bench_infer_module() is not None
        if want_tp:
            measure_throughput(runs, opts, notes)
    if not any((read_json(r.run_dir / RECORD) or {}).get("analysis", {}).get("throughput") for r in runs):
        notes.add("throughput vs NLL not plotted: no throughput was measured" + (
            "; `mor bench infer` (mor.bench.infer) is not installed in this version of the library"
            if bench_infer_module() is None else " (run with --throughput)"))
    if not args.fewshot:
        notes.add("accuracy column empty: few-shot tasks are off by default (--fewshot runs the paper's 0-shot "
                  "tasks through lm-eval)")
    command = " ".join(["mor experiment isoflop", *(shlex.quote(a) for a in _argv_of(args))])
    # the experiment's own record: every invocation that trained or evaluated, for the report
    log = read_json(out / "experiment.json") or {"invocations": []}
    if not args.report_only:
        log["invocations"].append({"command": command, "start": t_start, "end": time.time(), "actions": actions})
        write_json(out / "experiment.json", log)
    first = log["invocations"][0]["command"] if log["invocations"] else command
    header = {
        "command": first, "invocations": log["invocations"],
        "shapes": sorted({r.shape.name for r in runs}), "budgets": sorted({r.budget for r in runs}),
        "models": [r.spec.name for r in runs if r.shape is runs[0].shape and r.budget == runs[0].budget],
        "data": data_dir, "out": str(out), "machine": machine_info(), "tolerance": args.tolerance,
    }
    result = write_report(runs, report_dir, header, notes)
    failed = [k for k, a in actions.items() if a == "failed"]
    print(f"[experiment] report: {report_dir / 'results.md'}", file=sys.stderr)
    print(markdown_table(result["rows"]))
    return {"experiment": "isoflop", "out": str(out), "report": str(report_dir / "results.md"),
            "actions": actions, "failed": failed, "wall_s": time.time() - t_start,
            "rows": [{k: row[k] for k in ("key", "unique_params", "flops", "tokens", "nll", "causal_nll", "status")}
                     for row in result["rows"]]}


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The command line that reproduces ``args`` (non-default options only)."""
    out = ["isoflop"]
    defaults = {"shapes": "micro", "budget": None, "models": DEFAULT_MODELS, "nr": DEFAULT_NR,
                "kv": "recursion_wise", "sharing": "middle_cycle", "out": None, "data": None,
                "corpus": ["shakespeare"], "vocab_size": 8192, "val_fraction": 0.005, "overrides": [],
                "tolerance": 0.02, "report_dir": None, "fewshot": False, "fewshot_tasks": "paper",
                "fewshot_limit": None, "throughput": None, "bench_args": ""}
    for k, d in defaults.items():
        v = getattr(args, k, d)
        if v == d:
            continue
        flag = "--" + {"overrides": "set"}.get(k, k).replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else f"--no-{flag[2:]}")
        elif isinstance(v, list):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out[1:]
