"""This checkout's engine against an earlier revision's, side by side in one process.

Performance work on the engine (issue 17) is judged by ratios measured in one process, the
contenders interleaved (the machine is shared and its speed drifts). This script extracts
``src/mor`` of ``--base`` (a git revision) into a temporary package, builds one model per
``--models`` entry with this checkout's code, and runs the same steady decode on both
engines in turn, ``--rounds`` times: ``--warmup`` steps, then ``--steps`` timed steps of
``--batch`` sequences (the ``mor bench infer --profile`` workload: unprompted, temperature 1;
MoR expert-choice with calibrated routers). For each engine it reports, each the best over
the rounds,

* tokens per second (wall clock), and
* host CPU ms per step: the main thread's CPU time outside the compiled CPU kernels' calls
  (Python, NumPy and PyTorch dispatch; a call bound to its operands, such as ``DecodeRows`` or
  the whole-step ``DecodeStep``, counts as a kernel call with its own argument handling). CPU time does not grow when the virtual machine loses
  its core to another tenant, so this column is steadier than the wall clock.

    PYTHONPATH=src python scripts/engine_ab.py --base 0115880 [--hidden 256] [--batch 32] [--threads 2]

The last line is the results as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mor.bench.infer import _build, calibrate_expert_routers, mor_config
from mor.config import preset

ROOT = Path(__file__).resolve().parents[1]
KERNEL_CALLS = ("decode_rows", "route_rows", "decode_layers", "linear", "linear_silu_mul", "rms_norm", "rope_", "kv_write", "paged_attention",
                "sample")


def load_revision(rev: str, into: Path):
    """``src/mor`` at git revision ``rev`` as the package ``mor_base`` (its engine module)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src/mor"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"engine_ab: --base {rev!r} is not a revision with src/mor in {ROOT}: "
                         f"{archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    (into / "src" / "mor").rename(into / "mor_base")
    sys.path.insert(0, str(into))
    return importlib.import_module("mor_base.engine")


class KernelClock:
    """Main-thread CPU seconds spent inside the compiled kernels' calls of the given modules."""

    def __init__(self, *kernel_modules):
        self.seconds = 0.0
        for mod in kernel_modules:
            names = [n for n in KERNEL_CALLS if hasattr(mod, n)]
            for name in names:
                setattr(mod, name, self._timed(getattr(mod, name)))
            if "decode_layers" not in names and hasattr(mod, "DecodeLayer"):  # one call per layer
                mod.DecodeLayer.__call__ = self._timed(mod.DecodeLayer.__call__)
            for cls in ("DecodeRows", "RouteRows", "DecodeStep"):  # calls bound to their fixed operands
                if hasattr(mod, cls):
                    setattr(getattr(mod, cls), "__call__", self._timed(getattr(mod, cls).__call__))
        self._depth = 0

    def _timed(self, fn):
        def call(*args, **kwargs):
            if self._depth:  # inside a timed call already (decode_rows -> DecodeRows.__call__)
                return fn(*args, **kwargs)
            self._depth += 1
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - t0
                self._depth -= 1
        return call


def run(engine_module, model, batch: int, warmup: int, steps: int, clock: KernelClock) -> tuple[float, float, float]:
    """(tokens/s, host CPU ms per step, tokens per step) over ``steps`` steady steps."""
    schedule = "sequence" if model.config.architecture == "vanilla" else "depth"
    eng = engine_module.Engine(model, max_batch=batch, max_model_len=warmup + steps + 64, seed=0, schedule=schedule)
    for _ in range(batch):
        eng.add_request([0], engine_module.SamplingParams(max_tokens=warmup + steps + 32, temperature=1.0,
                                                          ignore_eos=True))
    for _ in range(warmup):
        eng.step()
    eng.reset_stats()
    clock.seconds = 0.0
    cpu0 = time.thread_time()
    for _ in range(steps):
        eng.step()
    host_ms = (time.thread_time() - cpu0 - clock.seconds) / steps * 1e3
    return eng.stats.tokens_per_s, host_ms, eng.stats.generated_tokens / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="git revision to compare against (e.g. a commit hash)")
    p.add_argument("--models", nargs="+", default=["vanilla", "MoR-2", "MoR-4"])
    p.add_argument("--hidden", type=int, default=256, help="hidden size (FFN 3x); 256 is the 'small' preset")
    p.add_argument("--layers", type=int, default=14)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import mor.engine as this_engine
    from mor.engine import kernels as this_kernels

    with tempfile.TemporaryDirectory(prefix="engine-ab-") as tmp:
        base_engine = load_revision(a.base, Path(tmp))
        base_kernels = importlib.import_module("mor_base.engine.kernels")
        clock = KernelClock(this_kernels, base_kernels)
        kw = {} if a.hidden == 256 else dict(hidden_size=a.hidden, intermediate_size=3 * a.hidden)
        models = {}
        for name in a.models:
            if name == "vanilla":
                models[name] = _build(preset("small", "vanilla", **kw).replace(num_hidden_layers=a.layers), "cpu",
                                      torch.float32, 0)
            else:
                m = _build(mor_config("small", int(name.split("-")[1]), a.layers, "recursion_wise", **kw), "cpu",
                           torch.float32, 0)
                calibrate_expert_routers(m)
                models[name] = m
        best: dict[tuple[str, str], list[float]] = {}
        for _ in range(a.rounds):
            for name, model in models.items():
                for tag, module in (("base", base_engine), ("this", this_engine)):
                    tps, host, tok_step = run(module, model, a.batch, a.warmup, a.steps, clock)
                    b = best.setdefault((name, tag), [0.0, float("inf"), tok_step])
                    b[0], b[1] = max(b[0], tps), min(b[1], host)
    print(f"engine A/B: {a.base} (base) vs this checkout; hidden {a.hidden}, batch {a.batch}, {a.threads} threads, "
          f"best of {a.rounds}")
    print(f"{'model':<10}{'tok/s base':>12}{'tok/s this':>12}{'x':>7}{'host ms base':>14}{'host ms this':>14}"
          f"{'x':>7}{'tok/step':>10}")
    rows = []
    for name in models:
        (tb, hb, _), (tt, ht, ts) = best[(name, "base")], best[(name, "this")]
        rows.append({"model": name, "tokens_per_s_base": tb, "tokens_per_s": tt, "speedup": tt / tb,
                     "host_ms_base": hb, "host_ms": ht, "host_ratio": ht / hb, "tokens_per_step": ts})
        print(f"{name:<10}{tb:>12.0f}{tt:>12.0f}{tt / tb:>7.2f}{hb:>14.3f}{ht:>14.3f}{ht / hb:>7.2f}{ts:>10.1f}")
    vanilla = next((r for r in rows if r["model"] == "vanilla"), None)
    if vanilla:
        for r in rows:
            if r is not vanilla:
                r["vs_vanilla_base"] = r["tokens_per_s_base"] / vanilla["tokens_per_s_base"]
                r["vs_vanilla"] = r["tokens_per_s"] / vanilla["tokens_per_s"]
                print(f"{r['model']} / vanilla: base {r['vs_vanilla_base']:.3f}, this {r['vs_vanilla']:.3f}")
    print(json.dumps({"base": a.base, "hidden": a.hidden, "batch": a.batch, "threads": a.threads, "rows": rows}))


if __name__ == "__main__":
    main()
