"""Decode speed of the engine's paths side by side, and the accuracy of low-precision decode.

Issue 17, recorded in docs/benchmarks.md. One process, the contenders interleaved, best of
``--rounds``; steady decode (``--warmup`` steps, then ``--steps`` timed steps) of the CPU
profile shape (hidden 512, FFN 1536, 14 layers, vocab 8192): vanilla and expert-choice
MoR-2/3/4 (routers calibrated as in ``mor bench infer``), at batch 1 and 32.

Contenders: fp32 on PyTorch ops (``cpu_kernels=False``), fp32 on the CPU kernels (the
default), and the opt-in ``decode_precision`` copies: bf16 (PyTorch), bf16-weights and int8
(CPU kernels). Accuracy of each low precision: ``mor.engine.quant.decode_accuracy`` on
random sequences (random-init model: the NLL change is what matters).

    PYTHONPATH=src python scripts/decode_ab.py [--threads 2] [--rounds 3] [--models vanilla MoR-4]
"""

from __future__ import annotations

import argparse
import json

import torch

from mor.bench.infer import _build, calibrate_expert_routers, mor_config
from mor.config import preset
from mor.engine import Engine, SamplingParams
from mor.engine.quant import decode_accuracy, low_precision_copy

CONTENDERS = {  # name -> Engine keyword arguments
    "fp32-torch": dict(cpu_kernels=False),
    "fp32-kernels": dict(cpu_kernels=True),
    "bf16-torch": dict(decode_precision="bf16"),
    "bf16-weights-kernels": dict(decode_precision="bf16-weights", cpu_kernels=True),
    "int8-kernels": dict(decode_precision="int8", cpu_kernels=True),
}


def tokens_per_s(model, batch: int, kw: dict, warmup: int, steps: int) -> float:
    eng = Engine(model, max_batch=batch, max_model_len=256, seed=0, **kw)
    for _ in range(batch):
        eng.add_request([0] * 8, SamplingParams(max_tokens=200, temperature=1.0, ignore_eos=True))
    for _ in range(warmup):  # admit, prefill, warm up
        eng.step()
    eng.reset_stats()
    for _ in range(steps):
        eng.step()
    return eng.stats.tokens_per_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--models", nargs="+", default=["vanilla", "MoR-2", "MoR-3", "MoR-4"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    kw = dict(hidden_size=512, intermediate_size=1536)
    models = {}
    for name in a.models:
        if name == "vanilla":
            models[name] = _build(preset("small", "vanilla", **kw).replace(num_hidden_layers=14), "cpu", torch.float32, 0)
        else:
            m = _build(mor_config("small", int(name.split("-")[1]), 14, "recursion_wise", **kw), "cpu", torch.float32, 0)
            calibrate_expert_routers(m)
            models[name] = m
    ids = torch.randint(0, 8192, (4, 128), generator=torch.Generator().manual_seed(1))
    results: dict = {"threads": a.threads, "speed": {}, "accuracy": {}}
    for name, m in models.items():
        for prec in ("bf16", "bf16-weights", "int8"):
            acc = decode_accuracy(m, low_precision_copy(m, prec), ids)
            results["accuracy"][f"{name} {prec}"] = acc
            print(f"{name:8} {prec:13} NLL {acc['nll']:.4f} -> {acc['nll_low']:.4f}, greedy agreement "
                  f"{acc['greedy_agreement']:.3f}, max logit error {acc['max_logit_error']:.4f}", flush=True)
    for name, m in models.items():
        for batch in a.batches:
            best: dict[str, float] = {}
            for _ in range(a.rounds):
                for c, ekw in CONTENDERS.items():
                    best[c] = max(best.get(c, 0.0), tokens_per_s(m, batch, ekw, a.warmup, a.steps))
            results["speed"][f"{name} batch {batch}"] = best
            base = best["fp32-torch"]
            print(f"{name:8} batch {batch:3}: " + ", ".join(f"{c} {v:.1f} ({v / base:.2f}x)" for c, v in best.items()),
                  flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
