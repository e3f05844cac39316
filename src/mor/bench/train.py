"""``mor bench train``: training throughput of vanilla, recursive and MoR side by side.

Every model has the same effective shape (unrolled depth, width, vocabulary) taken from a
recipe (default ``configs/bench.yaml``). For each model the benchmark runs full optimizer
steps (forward, backward, AdamW) on random tokens and reports:

* tokens/s and step time (median over timed steps, warm-up excluded; the models are
  measured in interleaved rounds so that machine drift hits all of them alike),
* model FLOPs per token: analytic (paper counting, SPEC section 6) and executed (for MFU),
* MFU against this machine's dense matmul peak measured in the same run,
* peak training memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the live-tensor
  peak tracked by PyTorch's ``MemTracker`` (parameters, gradients, optimizer state,
  activations) over one step.

Then the issue's targets are checked and reported as ratios: MoR expert-choice step time vs
(executed-FLOPs ratio x vanilla step time), vanilla MFU, MoR N_r=2 memory vs vanilla.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from .. import validate
from ..config import ModelConfig
from ..flops import executed_flops_per_token, measure_matmul_peak, paper_flops_per_token
from ..model import MoRForCausalLM
from ..runtime import autocast_for, resolve_device
from ..train import build_optimizer, load_recipe
from ..variants import parse_variant

MODELS = ("vanilla", "recursive", "mor-expert", "mor-token", "mor-expert-nr2")
# the default recipe, found from the package (not the current directory): the source tree's configs/
DEFAULT_RECIPE = Path(__file__).resolve().parents[3] / "configs" / "bench.yaml"


def model_config(base: ModelConfig, name: str, nr: int) -> ModelConfig:
    """The model ``name`` (a variant of :mod:`mor.variants`; ``nr`` when the name gives no N_r) on
    the shape of ``base``."""
    return parse_variant(name, nr, what="--models").config(base)


class Runner:
    """One model with its optimizer and a fixed random batch."""

    def __init__(self, cfg: ModelConfig, tcfg, device, seed: int):
        torch.manual_seed(seed)
        with torch.device(device):
            self.model = MoRForCausalLM(cfg).train()
        self.cfg = cfg
        self.opt = build_optimizer(self.model, tcfg, fused=True)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, cfg.vocab_size, (tcfg.batch_size, tcfg.seq_len), generator=g).to(device)
        self.y = torch.roll(self.x, -1, 1)
        self.autocast = autocast_for(device, tcfg.dtype)
        self.device = device
        self.times: list[float] = []
        self.fwd = torch.compile(self.model) if tcfg.compile else self.model

    def step(self) -> None:
        with self.autocast():
            out = self.fwd(self.x, labels=self.y)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.update_balance_bias()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, n: int) -> None:
        for _ in range(n):
            self.sync()
            t = time.perf_counter()
            self.step()
            self.sync()
            self.times.append(time.perf_counter() - t)

    def peak_memory(self) -> float | None:
        """Peak bytes over one training step (params, grads, optimizer state, activations)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step()
            self.sync()
            return float(torch.cuda.max_memory_allocated(self.device))
        try:
            from torch.distributed._tools.mem_tracker import MemTracker
        except ImportError:
            return None
        mt = MemTracker()
        mt.track_external(self.model, self.opt)
        with mt:
            self.step()
        snap = mt.get_tracker_snapshot("peak")
        return float(sum(v.get("Total", 0) for v in snap.values()))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="recipe giving the shape, seq_len, batch_size (default: the repository's configs/bench.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (e.g. batch_size=4)")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma list of model variants (mor.variants), default: {', '.join(MODELS)}")
    p.add_argument("--nr", type=validate.positive_int, default=3, help="recursions of the recursive / MoR models (default 3)")
    p.add_argument("--steps", type=validate.positive_int, default=6, help="timed steps per model per round (default 6)")
    p.add_argument("--rounds", type=validate.positive_int, default=2, help="interleaved measuring rounds (default 2)")
    p.add_argument("--warmup", type=validate.nonneg_int, default=2, help="untimed steps per model first (default 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--seed", type=validate.nonneg_int, default=0)


def run(args: argparse.Namespace) -> dict:
    tcfg = load_recipe(args.config or str(DEFAULT_RECIPE), args.overrides)
    device = resolve_device(tcfg.device)
    base = tcfg.model_config()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        parse_variant(n, args.nr, what="--models")  # a bad name fails before anything is measured
    T, B = tcfg.seq_len, tcfg.batch_size
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    log(f"[bench train] device {device}, shape L={base.num_hidden_layers} d={base.hidden_size} "
        f"d_ff={base.intermediate_size} V={base.vocab_size}, batch {B} x {T}, N_r={args.nr}")
    peak = measure_matmul_peak(device, seconds=1.5)
    log(f"[bench train] measured matmul peak: {peak / 1e9:.1f} GFLOP/s")
    runners = {n: Runner(model_config(base, n, args.nr), tcfg, device, args.seed) for n in names}
    for r in runners.values():
        for _ in range(args.warmup):
            r.step()
        r.sync()
    for _ in range(args.rounds):
        for r in runners.values():
            r.timed(args.steps)
    peak_after = measure_matmul_peak(device, seconds=1.5)
    peak = max(peak, peak_after)
    rows = {}
    for n, r in runners.items():
        st = statistics.median(r.times)
        ex = executed_flops_per_token(r.cfg, T)
        rows[n] = {
            "architecture": r.cfg.architecture, "num_recursions": r.cfg.num_recursions,
            "unique_params": r.model.num_parameters(),
            "step_s": st, "tok_per_s": B * T / st,
            "paper_flops_per_token": paper_flops_per_token(r.cfg, T),
            "executed_flops_per_token": ex,
            "mfu": 3 * ex * B * T / st / peak,
            "peak_mem_bytes": None,
        }
    if not args.no_memory:
        for n, r in runners.items():
            rows[n]["peak_mem_bytes"] = r.peak_memory()
    targets = {}
    if "vanilla" in rows:
        v = rows["vanilla"]
        targets["vanilla_mfu"] = v["mfu"]
        targets["vanilla_mfu_ok"] = v["mfu"] >= 0.40
        if "mor-expert" in rows:
            m = rows["mor-expert"]
            flops_ratio = m["executed_flops_per_token"] / v["executed_flops_per_token"]
            predicted = flops_ratio * v["step_s"]
            targets["mor_expert_time_over_flops_prediction"] = m["step_s"] / predicted
            targets["mor_expert_time_ok"] = m["step_s"] <= 1.10 * predicted
        if "mor-expert-nr2" in rows and v["peak_mem_bytes"] and rows["mor-expert-nr2"]["peak_mem_bytes"]:
            ratio = rows["mor-expert-nr2"]["peak_mem_bytes"] / v["peak_mem_bytes"]
            targets["mor_nr2_memory_ratio"] = ratio
            targets["mor_nr2_memory_ok"] = ratio <= 0.8
    _print_table(rows, targets, peak)
    return {"device": str(device), "matmul_peak_flops": peak, "batch_size": B, "seq_len": T,
            "models": rows, "targets": targets}


def _print_table(rows: dict, targets: dict, peak: float) -> None:
    v = rows.get("vanilla")
    hdr = f"{'model':<16}{'params':>9}{'step ms':>9}{'tok/s':>9}{'xVan':>7}{'GF/tok(paper)':>15}{'GF/tok(exec)':>14}{'MFU':>7}{'mem MiB':>9}"
    print(hdr)
    print("-" * len(hdr))
    for n, r in rows.items():
        speed = (r["tok_per_s"] / v["tok_per_s"]) if v else float("nan")
        mem = f"{r['peak_mem_bytes'] / 2**20:9.1f}" if r["peak_mem_bytes"] else f"{'-':>9}"
        print(f"{n:<16}{r['unique_params'] / 1e6:8.2f}M{1e3 * r['step_s']:9.1f}{r['tok_per_s']:9.0f}{speed:7.2f}"
              f"{r['paper_flops_per_token'] / 1e9:15.4f}{r['executed_flops_per_token'] / 1e9:14.4f}"
              f"{100 * r['mfu']:6.1f}%{mem}")
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s")
    for k, val in targets.items():
        print(f"  {k}: {val:.3f}" if isinstance(val, float) else f"  {k}: {val}")
