"""Decode speed and accuracy of fp32 vs bf16 vs int8 weight-only decode (``Engine(decode_precision=...)``).

Issue 17, recorded in docs/benchmarks.md. Same process, interleaved, best of 3; the CPU
profile shape (hidden 512, FFN 1536, 14 layers, vocab 8192), vanilla and MoR-2.

    PYTHONPATH=src python scripts/decode_precision_ab.py [threads]
"""

from __future__ import annotations

import sys

import torch

from mor.bench.infer import _build, mor_config
from mor.config import preset
from mor.engine import Engine, SamplingParams
from mor.engine.quant import decode_accuracy, low_precision_copy


def tokens_per_s(model, batch: int, precision: str | None) -> float:
    eng = Engine(model, max_batch=batch, max_model_len=256, seed=0, decode_precision=precision)
    for _ in range(batch):
        eng.add_request([0] * 8, SamplingParams(max_tokens=200, temperature=1.0, ignore_eos=True))
    for _ in range(20):  # admit, prefill, warm up
        eng.step()
    eng.reset_stats()
    for _ in range(30):
        eng.step()
    return eng.stats.tokens_per_s


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    kw = dict(hidden_size=512, intermediate_size=1536)
    models = {"vanilla": _build(preset("small", "vanilla", **kw).replace(num_hidden_layers=14), "cpu", torch.float32, 0),
              "MoR-2": _build(mor_config("small", 2, 14, "recursion_wise", **kw), "cpu", torch.float32, 0)}
    ids = torch.randint(0, 8192, (4, 128), generator=torch.Generator().manual_seed(1))
    for name, m in models.items():
        for p in ("bf16", "int8"):
            acc = decode_accuracy(m, low_precision_copy(m, p), ids)
            print(name, p, {k: round(v, 4) for k, v in acc.items()})
        for batch in (1, 32):
            best: dict = {}
            for _ in range(3):
                for p in (None, "bf16", "int8"):
                    best[p] = max(best.get(p, 0.0), tokens_per_s(m, batch, p))
            f = best[None]
            print(name, "batch", batch, f"fp32 {f:.1f} tok/s",
                  " ".join(f"{p} {v:.1f} ({v / f:.2f}x)" for p, v in best.items() if p))


if __name__ == "__main__":
    main()
