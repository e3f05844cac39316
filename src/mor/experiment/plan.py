"""The plan of an isoFLOP experiment: shapes, budgets, each model's recipe and step count.

Each model's training recipe is a *base recipe* (the shape) plus the model variant's fields
(:mod:`mor.variants`) plus the budget, the corpus and its output directory. The step count
comes from the trainer's own rule (:func:`mor.flops.steps_for_budget`), so the plan is what
the trainer will run; :func:`check_tolerance` refuses a plan whose rounding to whole steps
puts a model too far from the budget.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..flops import paper_flops_per_token, steps_for_budget
from ..recipe import apply_overrides, read_recipe_file
from ..runtime import jsonable
from ..train import TrainConfig, TrainError
from ..variants import KIND_KEYS, Variant

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "configs"
PAPER_SHAPES = ("135m", "360m")
#: The paper sets warm-up to 5% of the steps of its smallest budget (SPEC.md section 7).
PAPER_WARMUP_BUDGET = 2e18
PAPER_WARMUP_FRAC = 0.05
DEFAULT_MODELS = "vanilla,recursive,mor-expert,mor-token:3,mor-expert-kvshare:3,mor-expert-cycle:2"
DEFAULT_NR = "2,3"
#: recipe keys that do not change what is trained (ignored when deciding skip/resume)
COSMETIC_KEYS = ("overwrite", "progress")


class ExperimentError(ConfigError):
    """The experiment cannot be planned or run (bad model list, shape, budget, data)."""


# ---------------------------------------------------------------------- shapes and recipes
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


def budget_tag(budget: float) -> str:
    """A short, filesystem-safe budget label: 1.5e13 -> ``1.5e13``."""
    m, e = f"{budget:.6e}".split("e")
    return f"{float(m):g}e{int(e)}"


def model_recipe(shape: Shape, variant: Variant, budget: float, data: str, out_dir: str | Path,
                 overrides: list[str] = (), vocab_size: int | None = None) -> dict:
    """The full training recipe (TrainConfig fields) of one model of the experiment."""
    recipe = copy.deepcopy(shape.recipe)
    for k in ("max_steps", "max_tokens", "flops_budget"):
        recipe.pop(k, None)
    model = {k: v for k, v in dict(recipe.get("model") or {}).items() if k not in KIND_KEYS}
    model.update(variant.model_fields())
    if variant.kind != "vanilla":
        if "num_hidden_layers" in model:
            model["num_hidden_layers"] = variant.fit_layers(int(model["num_hidden_layers"]))
        elif "preset" not in model:
            model["num_hidden_layers"] = variant.fit_layers(ModelConfig.num_hidden_layers)
    recipe["model"] = model
    recipe["flops_budget"] = float(budget)
    recipe["data"] = str(data)
    recipe["out_dir"] = str(out_dir)
    recipe["overwrite"] = False
    apply_overrides(recipe, list(overrides))
    cfg = train_config(recipe, variant)
    if shape.paper and "warmup_steps" not in _override_keys(overrides):
        model_cfg = cfg.model_config(vocab_size)
        per_step = cfg.seq_len * cfg.batch_size * cfg.grad_accum
        steps_ref = min(float(budget), PAPER_WARMUP_BUDGET) / (paper_flops_per_token(model_cfg, cfg.seq_len) * per_step)
        recipe["warmup_steps"] = max(1, math.ceil(PAPER_WARMUP_FRAC * steps_ref))
    return recipe


def _override_keys(overrides) -> set[str]:
    return {ov.split("=", 1)[0] for ov in overrides}


def train_config(recipe: dict, variant: Variant | None = None) -> TrainConfig:
    """The TrainConfig of a recipe; an ExperimentError naming the model when it is invalid."""
    try:
        return TrainConfig.from_dict(copy.deepcopy(recipe), source=f"recipe of {variant.name}" if variant else "recipe")
    except ConfigError as e:
        raise ExperimentError(str(e)) from None


def comparable(recipe: dict) -> dict:
    """A recipe as stored in a record (JSON types), without the keys that do not change training."""
    return json.loads(json.dumps({k: v for k, v in recipe.items() if k not in COSMETIC_KEYS}, default=jsonable))


# ---------------------------------------------------------------------- runs
@dataclass
class Run:
    """One model trained at one shape and budget."""

    shape: Shape
    variant: Variant
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
        return f"{self.shape.name}-{budget_tag(self.budget)}/{self.variant.name}"

    @property
    def flops_error(self) -> float:
        return self.flops / self.budget - 1.0


def count_unique_params(model_cfg: ModelConfig) -> int:
    """Unique non-embedding parameters (the paper's count), from a model built on the meta device."""
    from ..model import MoRForCausalLM

    with torch.device("meta"):
        model = MoRForCausalLM(model_cfg)
    return model.num_parameters()


def plan_run(run: Run, vocab_size: int | None) -> Run:
    """Fill in the steps, tokens, FLOPs and parameters the trainer will use for ``run``."""
    cfg = train_config(run.recipe, run.variant)
    try:
        model_cfg = cfg.model_config(vocab_size)
    except (ConfigError, TrainError) as e:
        raise ExperimentError(f"{run.variant.name}: {e}") from None
    run.config = model_cfg
    run.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    run.flops_per_token = paper_flops_per_token(model_cfg, cfg.seq_len)
    run.steps = steps_for_budget(cfg.flops_budget, run.flops_per_token, run.tokens_per_step)
    run.tokens = run.steps * run.tokens_per_step
    run.flops = run.flops_per_token * run.tokens
    run.unique_params = count_unique_params(model_cfg)
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


# ---------------------------------------------------------------------- the corpus
def ensure_data(out_dir: Path, data: str | None, corpus: list[str], vocab_size: int,
                val_fraction: float) -> tuple[str, dict]:
    """The prepared corpus: ``data`` if given, else ``corpus`` prepared once into ``OUT/data``."""
    from ..data import load_meta, prepare

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


def budgets_of(shape: Shape, budget: str | None) -> list[float]:
    """The FLOPs budgets of a shape: ``budget`` (a comma list) or the shape recipe's flops_budget."""
    if budget is not None:
        try:
            budgets = [float(b) for b in str(budget).split(",") if b.strip()]
        except ValueError:
            raise ExperimentError(f"--budget={budget!r} must be a number (FLOPs), e.g. 2e15") from None
    elif shape.recipe.get("flops_budget") is not None:
        budgets = [float(shape.recipe["flops_budget"])]
    else:
        raise ExperimentError(f"shape {shape.name}: its recipe {shape.path} sets no flops_budget; give --budget")
    for b in budgets:
        if not (b > 0 and math.isfinite(b)):
            raise ExperimentError(f"--budget {b} must be a positive number of FLOPs")
    return budgets


def build_runs(shapes: str, budget: str | None, variants: list[Variant], out: Path, data: str,
               overrides: list[str], vocab_size: int | None) -> list[Run]:
    """Every (shape, budget, variant) of the experiment, planned."""
    shape_list = [load_shape(s.strip()) for s in str(shapes).split(",") if s.strip()]
    if not shape_list:
        raise ExperimentError("--shapes is empty")
    runs = []
    for shape in shape_list:
        for b in budgets_of(shape, budget):
            for variant in variants:
                run_dir = out / f"{shape.name}-{budget_tag(b)}" / variant.name
                recipe = model_recipe(shape, variant, b, data, run_dir, overrides, vocab_size)
                runs.append(plan_run(Run(shape, variant, b, recipe, run_dir), vocab_size))
    return runs
