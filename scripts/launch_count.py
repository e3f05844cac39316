"""Count what a decode step would launch on a GPU, measured on the CPU.

CUDA graphs replay the fixed-shape calls (``mor.engine.graphs``); a step's device time at small
sizes then follows the number of kernels inside them, and its host time the ops launched from
Python outside them. This script runs those calls eagerly on the CPU (``capture=False``) under
``torch.profiler`` and counts, per steady decode step:

* ``inside``: data-making leaf ops inside the fixed-shape calls (views and other metadata ops
  left out; ``_fused_rms_norm`` counted once, as the one CUDA kernel it is on a GPU);
* ``outside``: data-making leaf ops launched outside them (copies included: on CUDA the
  host-to-device ones go through pinned memory, ``mor.runtime.to_device``), by name.

Run it in two checkouts to compare changes (``PYTHONPATH=<tree>/src``). Prints one JSON line last.

    PYTHONPATH=src python scripts/launch_count.py
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import build  # noqa: E402
from test_engine import prompts, tiny  # noqa: E402

from mor.engine import Engine, SamplingParams  # noqa: E402
from mor.engine import graphs as G  # noqa: E402

METADATA = {"view", "transpose", "unsqueeze", "select", "slice", "reshape", "squeeze", "detach", "detach_", "expand",
            "as_strided", "chunk", "split", "empty", "empty_strided", "t", "unflatten", "flatten", "_unsafe_view", "alias",
            "result_type", "lift_fresh", "resolve_conj", "resolve_neg", "permute", "contiguous", "_reshape_alias",
            "unbind", "narrow", "_to_copy", "is_pinned", "_pin_memory", "pin_memory", "to", "type_as", "empty_like",
            "scalar_tensor", "resize_"}  # (scalar_tensor: a 0-dim host tensor inside the CPU attention)
FUSED = {"_fused_rms_norm"}


def count(arch: str, kw: dict, temperature: float, steps: int) -> dict:
    model = build(tiny(arch, **kw))
    eng = Engine(model, cpu_kernels=False, cuda_graphs=False, max_batch=8, block_size=4)
    eng.runner.graphs = G.DecodeGraphs(eng.runner, capture=False)
    run = G.DecodeGraphs._run

    def marked(self, phase, fn, host_ints, host_blocks):
        def inside(ints, blocks):
            with record_function("fixed-shape call"):
                return fn(ints, blocks)
        return run(self, phase, inside, host_ints, host_blocks)

    for p in prompts((3, 5, 7, 2, 4, 6, 3, 5)):
        eng.add_request(p, SamplingParams(max_tokens=60, temperature=temperature, ignore_eos=True))
    G.DecodeGraphs._run = marked
    try:
        for _ in range(8):  # prefill and warm-up
            eng.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                eng.step()
    finally:
        G.DecodeGraphs._run = run
    counts = {"inside": collections.Counter(), "outside": collections.Counter()}

    def visit(e, where: str) -> bool:  # counts the deepest data ops of e's subtree; whether it counted any
        if e.name == "fixed-shape call":
            where = "inside"
        name = e.name[6:] if e.name.startswith("aten::") else None
        if name in FUSED:
            counts[where][name] += 1
            return True
        below = False
        for c in e.cpu_children:
            below |= visit(c, where)
        if below or name is None or name in METADATA:
            return below
        counts[where][name] += 1
        return True

    for e in prof.events():
        if e.cpu_parent is None:
            visit(e, "outside")
    return {k: {n: v / steps for n, v in c.most_common()} for k, c in counts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    result = {}
    for name, arch, kw, temp in [("vanilla-8L", "vanilla", {}, 1.0), ("MoR-4", "mor", dict(num_recursions=4), 1.0),
                                 ("MoR-4 greedy", "mor", dict(num_recursions=4), 0.0)]:
        c = count(arch, kw, temp, args.steps)
        result[name] = c
        print(f"{name:<13} inside {sum(c['inside'].values()):6.1f}   outside {sum(c['outside'].values()):5.1f}: "
              + ", ".join(f"{n} {v:.1f}" for n, v in c["outside"].items()))
    print(json.dumps({k: {"inside": sum(v["inside"].values()), "outside": sum(v["outside"].values()),
                          "outside_ops": v["outside"]} for k, v in result.items()}))


if __name__ == "__main__":
    main()
