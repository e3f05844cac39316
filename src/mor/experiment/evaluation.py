"""Evaluation after training: causal NLL, test-time depth scaling, few-shot accuracy, throughput.

Everything here calls library functions: the NLL is :func:`mor.eval.nll.evaluate_nll` (the
one validation-NLL definition, over the whole validation split), depth scaling runs it on
:func:`mor.eval.depth.forward_depth`, few-shot tasks go through :mod:`mor.eval.fewshot`, and
generation throughput is :func:`mor.bench.infer.benchmark`. Results are cached in each
model's record, so a rerun computes only what is missing.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field

from .. import checkpoint as ckpt
from ..config import ModelConfig
from ..recipe import apply_overrides
from ..runtime import autocast_for, resolve_device
from .plan import ExperimentError, Run, train_config
from .records import read_record, write_record


@dataclass
class EvalOptions:
    """What to evaluate after training besides the NLLs."""

    fewshot: bool = False
    fewshot_tasks: str = "paper"
    fewshot_limit: float | None = None
    bench_overrides: list[str] = field(default_factory=list)  # key=value settings of mor.bench.infer


def depth_range(model_cfg: ModelConfig) -> list[int]:
    """Test-time depths scored: 1..N_r, plus one extra pass where forward_depth defines it."""
    if model_cfg.architecture == "vanilla":
        return []
    extra = 0 if (model_cfg.architecture == "mor" and model_cfg.router_type == "token") else 1
    return list(range(1, model_cfg.num_recursions + 1 + extra))


def analyze_run(run: Run, rec: dict, data_dir: str, opts: EvalOptions, notes: set[str]) -> dict:
    """Causal NLL, test-time depth scaling and (with ``opts.fewshot``) few-shot accuracy of a
    trained model; cached in its record, so a rerun computes only what is missing."""
    from ..data import read_split
    from ..eval.depth import forward_depth
    from ..eval.nll import evaluate_nll

    analysis = dict(rec.get("analysis") or {})
    need = [k for k in ("causal_nll", "depth_scaling") if k not in analysis]
    if opts.fewshot and "fewshot" not in analysis:
        need.append("fewshot")
    if not need:
        return analysis
    ckpt_dir = rec["summary"].get("checkpoint") or str(ckpt.latest_checkpoint(run.run_dir))
    cfg = train_config(run.recipe, run.variant)
    device = resolve_device(cfg.device)
    model = ckpt.load_model(ckpt_dir, device=device)
    model_cfg = model.config
    stream = read_split(data_dir, "val")

    def nll(routing: str, forward=None) -> float:
        return evaluate_nll(model, stream, seq_len=cfg.seq_len, routing=routing, batch_size=max(1, cfg.batch_size),
                            device=device, forward=forward)["nll"]

    t0 = time.time()
    with autocast_for(device, cfg.dtype)():
        if "causal_nll" in need:
            expert = model_cfg.architecture == "mor" and model_cfg.router_type == "expert"
            routing = "threshold" if expert else "topk"
            analysis["causal_nll"] = nll(routing)
            analysis["causal_routing"] = routing
        if "depth_scaling" in need:
            analysis["depth_scaling"] = {
                str(d): nll("topk", lambda x, d=d: forward_depth(model, x, routing="topk", max_depth=d))
                for d in depth_range(model_cfg)}
    analysis["eval_s"] = round(time.time() - t0, 2)
    if "fewshot" in need:
        res = fewshot_scores(model, ckpt_dir, opts, notes)
        if res is not None:
            analysis["fewshot"] = res
    rec["analysis"] = analysis
    write_record(run, rec)
    return analysis


def fewshot_scores(model, ckpt_dir: str, opts: EvalOptions, notes: set[str]) -> dict | None:
    """The paper's 0-shot tasks through mor.eval.fewshot (lm-eval); None with a note when unavailable."""
    from ..eval.fewshot import EvalDependencyError, run_tasks

    tok = ckpt.load_tokenizer(ckpt_dir, vocab_size=model.config.vocab_size)
    try:
        res = run_tasks(model, tok, opts.fewshot_tasks, limit=opts.fewshot_limit, checkpoint=str(ckpt_dir))
    except EvalDependencyError as e:
        notes.add(f"few-shot accuracy skipped: {e}")
        return None
    return {"table": res.get("table"), "limit": opts.fewshot_limit, "tasks": opts.fewshot_tasks}


def bench_settings(run: Run, ckpt_dir: str, vanilla_ckpt: str, overrides: list[str]):
    """The ``mor bench infer`` settings for one MoR checkpoint and its vanilla partner: the
    fixed-batch setting of the paper's protocol, without the transformers baseline, with an
    output length that fits the model's context (mean 256 as in the paper when it fits; lengths
    vary by +-50%); on a CPU a smaller workload (batch 8, 32 requests, mean length <= 64); the
    fastest of 3 timed runs counts. ``overrides`` (``key=value``) change any setting."""
    from ..bench.infer import InferBench

    device = resolve_device(train_config(run.recipe, run.variant).device)
    cpu = device.type == "cpu"
    ctx = run.config.max_position_embeddings if run.config else 2048
    settings = dict(mor_checkpoint=[str(ckpt_dir)], vanilla_checkpoint=str(vanilla_ckpt), hf="none", skip_max=True,
                    mean_len=max(1, min(64 if cpu else 256, int((ctx - 2) / 1.5))), len_spread=0.5, repeats=3,
                    device=str(device))
    if cpu:  # a CPU-sized workload: 32 requests of ~64 tokens
        settings.update(batch=8, requests_per_slot=4)
    names = {f.name for f in dataclasses.fields(InferBench)}
    apply_overrides(settings, overrides)
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ExperimentError(f"--bench-set: unknown setting(s) {unknown}; valid: {sorted(names)}")
    return InferBench(**settings)


def measure_throughput(runs: list[Run], opts: EvalOptions, notes: set[str]) -> None:
    """Generation throughput of every trained MoR model against the trained vanilla model of its
    group (same shape and budget), measured by :func:`mor.bench.infer.benchmark`.

    One benchmark call per MoR checkpoint, each timing the MoR model and the vanilla partner in the
    same process (a paired measurement, robust to a busy machine); cached in the MoR record.
    The benchmark serves vanilla and MoR models only, so recursive models have no throughput."""
    from ..bench.infer import InferBench, benchmark

    notes.add("throughput: `mor bench infer` serves vanilla and MoR models only; recursive models have none")
    groups: dict[tuple, dict[str, tuple[Run, dict]]] = {}
    for r in runs:
        rec = read_record(r)
        if rec.get("status") == "done":
            groups.setdefault((r.shape.name, r.budget), {})[r.variant.name] = (r, rec)
    defaults = InferBench()
    for (shape, budget), members in groups.items():
        if "vanilla" not in members:
            if any(r.variant.is_mor for r, _ in members.values()):
                notes.add(f"throughput skipped for {shape} @ {budget:.3g}: no trained vanilla partner in the experiment")
            continue
        vanilla_ckpt = members["vanilla"][1]["summary"]["checkpoint"]
        for r, rec in members.values():
            if not r.variant.is_mor:
                continue
            analysis = rec.setdefault("analysis", {})
            if "throughput" in analysis:
                continue
            settings = bench_settings(r, rec["summary"]["checkpoint"], vanilla_ckpt, opts.bench_overrides)
            changed = {k: v for k, v in dataclasses.asdict(settings).items() if v != getattr(defaults, k)}
            print(f"[experiment] throughput of {r.key}: mor bench infer with {changed}", file=sys.stderr)
            try:
                res = benchmark(settings)
            except Exception as e:  # a benchmark failure must not lose the trained results
                notes.add(f"throughput of {r.key} failed: {type(e).__name__}: {e}")
                continue
            rows = res.get("rows", [])
            mor_row = next((x for x in rows if x.get("kind") == "mor" and x.get("setting") == "batch"), None)
            vanilla_row = next((x for x in rows if x.get("kind") == "vanilla" and x.get("setting") == "batch"), None)
            if mor_row is None or vanilla_row is None:
                notes.add(f"throughput of {r.key}: mor bench infer returned no batch-setting rows")
                continue
            analysis["throughput"] = {
                "settings": changed, "tok_per_s": mor_row["tokens_per_s"],
                "vanilla_tok_per_s": vanilla_row["tokens_per_s"],
                "speedup": mor_row["tokens_per_s"] / vanilla_row["tokens_per_s"], "batch": mor_row.get("batch"),
                "mean_depth": mor_row.get("mean_depth"), "mean_len": res.get("mean_len"),
                "device": res.get("device"), "threads": res.get("threads")}
            write_record(r, rec)

