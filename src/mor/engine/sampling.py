"""Batched token sampling: greedy, temperature, top-k, top-p, per-request generators."""

from __future__ import annotations

import torch

from .request import SamplingParams


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) the tokens outside each row's top-k and top-p (nucleus) sets.

    logits (N, V) float; top_k (N,) long, 0 = off; top_p (N,) float, 1 = off. The most
    likely token always survives. Ties at the k-th value are broken by sort order."""
    V = logits.size(-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))
    drop = rank >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability mass of the more likely tokens
    drop |= before >= top_p[:, None]
    drop[:, 0] = False
    return logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           default_generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` (N, V) following ``params[i]``; returns (N,) long.

    Rows whose request has its own generator draw one uniform number from it per token, so
    a seeded request samples the same tokens whatever else is in the batch."""
    logits = logits.float()
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    dev = logits.device
    idx = torch.tensor(rows, device=dev)
    x = logits.index_select(0, idx) / torch.tensor([params[i].temperature for i in rows], device=dev)[:, None]
    if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in rows):
        x = filter_logits(x, torch.tensor([params[i].top_k for i in rows], device=dev),
                          torch.tensor([float(params[i].top_p) for i in rows], device=dev))
    # inverse-CDF sampling: one uniform number per row (cheaper than torch.multinomial on CPU);
    # right-bisection never lands on a zero-probability token
    cdf = torch.softmax(x, dim=-1).cumsum(dim=-1)
    u = torch.empty(len(rows), 1, dtype=cdf.dtype, device=dev)
    if all(generators[i] is None for i in rows):
        u.uniform_(generator=default_generator)
    else:
        for j, i in enumerate(rows):
            u[j] = torch.rand(1, generator=generators[i] or default_generator, device=dev, dtype=cdf.dtype)
    drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_(max=x.size(-1) - 1)
    out[idx] = drawn
    return out
