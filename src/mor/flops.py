"""FLOPs accounting.

* ``paper_flops_per_token``: the paper's analytic forward FLOPs (SPEC.md section 6, App. D):
  per unrolled layer with active fraction f and context N,
  recursion-wise ``f * 2(4d^2 + 3 d d_ff) + f^2 * 2 N d``; KV-shared deeper recursions
  ``f * 2(2d^2 + 3 d d_ff) + f * 2 N d``. GQA ignored, embeddings and LM head excluded.
  Compute budgets (2e18, 5e18, 16.5e18) are counted in these units:
  ``tokens = budget / paper_flops_per_token``.
* ``executed_flops_per_token``: the matmul FLOPs the model really executes in a forward
  (GQA-exact projections, routers, LM head, attention over the full query x key
  rectangle as ``scaled_dot_product_attention`` computes it); training = 3x forward.
  Used for MFU.
"""

from __future__ import annotations

import time

import torch

from .config import ModelConfig
from .routing import num_selected


def active_fractions(cfg: ModelConfig) -> list[float]:
    """Expected share of tokens entering each recursion (``ModelConfig.enter_fractions``)."""
    return cfg.enter_fractions()


def paper_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Analytic forward FLOPs per token of SPEC.md section 6."""
    N = seq_len or cfg.max_position_embeddings
    d, dff = cfg.hidden_size, cfg.intermediate_size
    full = 2 * (4 * d * d + 3 * d * dff)
    no_kv = 2 * (2 * d * d + 3 * d * dff)
    prefix, chunks, suffix = cfg.structure()
    total = (len(prefix) + len(suffix)) * (full + 2 * N * d)
    for r, (chunk, f) in enumerate(zip(chunks, active_fractions(cfg))):
        per_layer = (f * no_kv + f * 2 * N * d) if (cfg.kv_mode == "shared" and r > 0) else (f * full + f * f * 2 * N * d)
        total += len(chunk) * per_layer
    return float(total)


def tokens_for_budget(cfg: ModelConfig, budget_flops: float, seq_len: int | None = None) -> int:
    """Training tokens that a FLOPs budget buys (paper counting: budget / forward FLOPs per token)."""
    return int(budget_flops / paper_flops_per_token(cfg, seq_len))


def steps_for_budget(budget_flops: float, flops_per_token: float, tokens_per_step: int) -> int:
    """Optimizer steps of a FLOPs-budget run (the trainer's ``flops_budget`` and the experiment's
    plan): the budget over the FLOPs of one step (paper FLOPs per token x tokens per step),
    rounded to the nearest whole step, at least one."""
    return max(1, round(float(budget_flops) / (flops_per_token * tokens_per_step)))


def _router_flops(cfg: ModelConfig, n: int, out: int) -> int:
    d = cfg.hidden_size
    if cfg.router_arch == "linear":
        return 2 * n * d * out
    h = 2 * d * (4 if cfg.router_arch == "wide_mlp" else 1)
    return 2 * n * (d * h + h * out)


def executed_flops_per_token(cfg: ModelConfig, seq_len: int, counts: list[int] | None = None) -> float:
    """Forward matmul FLOPs per token actually executed on a sequence of ``seq_len`` tokens.

    ``counts``: tokens entering each recursion (default: k_r for expert-choice, the balanced
    expectation for token-choice). Multiply by 3 for a training step (forward + backward)."""
    T = seq_len
    d, dff, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim

    def layer(nq: int, n_kv_proj: int, n_keys: int) -> int:
        return (2 * nq * d * qd + 2 * n_kv_proj * d * 2 * kvd + 2 * nq * qd * d
                + 2 * nq * 3 * d * dff + 4 * nq * n_keys * qd)

    prefix, chunks, suffix = cfg.structure()
    total = (len(prefix) + len(suffix)) * layer(T, T, T)
    if counts is None:
        fr = active_fractions(cfg)
        if cfg.architecture == "mor" and cfg.router_type == "expert":
            counts = [num_selected(c, T) for c in fr]
        else:
            counts = [round(f * T) for f in fr]
    shared = cfg.kv_mode == "shared"
    for r, chunk in enumerate(chunks):
        n = int(counts[r])
        per = layer(n, 0, T) if (shared and r > 0) else layer(n, n, n)
        total += len(chunk) * per
    if cfg.architecture == "mor":
        if cfg.router_type == "expert":
            cands = [T] + [int(c) for c in counts[:-1]]
            total += sum(_router_flops(cfg, n, 1) for n in cands) * (2 if cfg.use_aux_router else 1)
        else:
            total += _router_flops(cfg, T, cfg.num_recursions)
    total += 2 * T * d * V
    return total / T


def measure_matmul_peak(device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                        n: int | None = None, seconds: float = 1.0, repeats: int = 3) -> float:
    """Measured dense matmul throughput (FLOP/s) of this device: the MFU denominator.

    The best of ``repeats`` windows of ``seconds / repeats`` each, so that a moment of
    contention from other processes does not lower the peak (which would inflate MFU)."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        a @ b
    sync()
    best = 0.0
    for _ in range(max(1, repeats)):
        iters, t0 = 0, time.perf_counter()
        while True:
            a @ b
            iters += 1
            if iters % 2 == 0:
                sync()
                if time.perf_counter() - t0 >= seconds / max(1, repeats):
                    break
        best = max(best, 2 * n ** 3 * iters / (time.perf_counter() - t0))
    return best


def measure_memory_bandwidth(device: str | torch.device = "cpu", nbytes: int | None = None,
                             seconds: float = 1.0, repeats: int = 3) -> float:
    """Measured read bandwidth (bytes/s) of this device's main memory: the time of a full
    reduction (``sum``) over an fp32 tensor far larger than the caches, best of ``repeats``
    windows. The bandwidth limit of a memory-bound decode step (weights + KV read per token)."""
    device = torch.device(device)
    nbytes = nbytes or (2 << 30 if device.type == "cuda" else 256 << 20)
    x = torch.ones(nbytes // 4, device=device, dtype=torch.float32)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    x.sum()
    sync()
    best = 0.0
    for _ in range(max(1, repeats)):
        iters, t0 = 0, time.perf_counter()
        while True:
            x.sum()
            iters += 1
            sync()
            if time.perf_counter() - t0 >= seconds / max(1, repeats):
                break
        best = max(best, x.numel() * 4 * iters / (time.perf_counter() - t0))
    return best
