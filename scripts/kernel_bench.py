"""The CPU decode kernels' parts against the machine's limits, one shape at a time.

What the engine's step profile (``mor bench infer --profile``) cannot separate: how fast the
kernels' matrix products run at a given (rows, in, out) shape, with the weights hot in the
caches or streamed from memory (``--cold``: the product cycles over enough copies of the
weights to overflow the last-level cache, as a decode step does with a model's layers), next
to PyTorch's ``F.linear`` on the same operands and the fp32 matmul peak measured in the same
run; and the paged decode attention's time per (key, head) at a few context lengths.

    PYTHONPATH=src python scripts/kernel_bench.py [--threads 2] [--rows 1 13 32] [--cold]

The last line is the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mor import validate
from mor.engine import kernels
from mor.flops import measure_matmul_peak

SHAPES = [(256, 768), (768, 256), (512, 1536), (1536, 512), (256, 8192), (512, 8192)]  # (in, out)


def best_time(fn, window: float = 0.05, repeats: int = 5) -> float:
    """Seconds per call: the best of ``repeats`` windows of ``window`` seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < window:
            fn()
            n += 1
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def products(rows: list[int], cold: bool, peak: float) -> list[dict]:
    out = []
    for I, O in SHAPES:
        copies = max(1, (64 << 20) // (I * O * 4)) if cold else 1  # > the last-level cache in all
        ws = [torch.randn(O, I) / I ** 0.5 for _ in range(copies)]
        for M in rows:
            x = torch.randn(M, I)
            tk = best_time(lambda: [kernels.linear(x, w) for w in ws]) / copies
            tt = best_time(lambda: [torch.nn.functional.linear(x, w) for w in ws]) / copies
            flops = 2 * M * I * O
            r = {"in": I, "out": O, "rows": M, "cold": cold, "kernel_gflops": flops / tk / 1e9,
                 "torch_gflops": flops / tt / 1e9, "of_peak": flops / tk / peak,
                 "weight_gb_per_s": I * O * 4 / tk / 1e9}
            out.append(r)
            print(f"in {I:5d} out {O:5d} rows {M:3d}{' cold' if cold else ''}: kernels {r['kernel_gflops']:6.1f} "
                  f"GFLOP/s ({r['of_peak']:.2f} of peak, {r['weight_gb_per_s']:5.1f} GB/s of weights), "
                  f"F.linear {r['torch_gflops']:6.1f}")
    return out


def attention(rows: int = 32, heads: int = 4, kv_heads: int = 2, hd: int = 64, bs: int = 16) -> list[dict]:
    out = []
    for ctx in (16, 64, 256):
        nb = (ctx + bs - 1) // bs
        kc, vc = torch.randn(rows * nb + 1, bs, kv_heads, hd), torch.randn(rows * nb + 1, bs, kv_heads, hd)
        blocks = (1 + torch.randperm(rows * nb)).view(rows, nb, 1).contiguous()  # scattered, as in a pool
        q, o = torch.randn(rows, heads * hd), torch.empty(rows, heads * hd)
        qidx = torch.full((rows,), ctx - 1, dtype=torch.int64)
        t = best_time(lambda: kernels.paged_attention(q, heads, kv_heads, kc, vc, blocks, 0, qidx, o))
        r = {"context": ctx, "rows": rows, "heads": heads, "us_per_call": t * 1e6,
             "ns_per_key_head": t / (rows * heads * ctx) * 1e9}
        out.append(r)
        print(f"attention {rows} rows x {heads} heads (hd {hd}, {kv_heads} KV heads), context {ctx}: "
              f"{r['us_per_call']:.1f} us, {r['ns_per_key_head']:.2f} ns per key and head")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=validate.positive_int, default=2)
    p.add_argument("--rows", type=validate.positive_int, nargs="+", default=[1, 13, 32])
    p.add_argument("--cold", action="store_true", help="also stream the weights from memory")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if kernels.load() is None:
        raise SystemExit(f"kernel_bench: the CPU kernels are unavailable: {kernels.unavailable_reason()}")
    peak = measure_matmul_peak("cpu")
    print(f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (torch, 1024^3), {a.threads} threads")
    rows = products(a.rows, False, peak) + (products(a.rows, True, peak) if a.cold else [])
    print(json.dumps({"threads": a.threads, "peak_gflops": peak / 1e9, "products": rows, "attention": attention()}))


if __name__ == "__main__":
    main()
