"""Batched token sampling: greedy, temperature, top-k, top-p, per-request generators."""

from __future__ import annotations

import numpy as np
import torch

from ..runtime import to_device
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
           default_generator: torch.Generator | None = None, kernels=None) -> torch.Tensor:
    """One token per row of ``logits`` (N, V) following ``params[i]``; returns (N,) long.

    Rows whose request has its own generator draw one uniform number from it per token, so
    a seeded request samples the same tokens whatever else is in the batch. With ``kernels``
    (``mor.engine.kernels``, loaded; CPU logits) the draw runs there: the same inverse-CDF rule
    with the same uniform numbers, summed in a different order, so a draw can differ from the
    PyTorch one where ``u`` falls within rounding of a boundary between two tokens."""
    logits = logits.float()
    if kernels is not None and logits.device.type == "cpu":
        return _sample_kernels(kernels, logits.contiguous(), params, generators, default_generator)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return logits.argmax(dim=-1)
    dev = logits.device
    # the per-row operands are copied to the device without blocking (``to_device``): the only
    # host sync of a sampling call is the caller reading the tokens
    every = len(rows) == len(params)  # the common case: no greedy row, no gather or scatter
    idx = None if every else to_device(torch.tensor(rows), dev)
    x = logits if every else logits.index_select(0, idx)
    temps = to_device(torch.tensor([params[i].temperature for i in rows], dtype=torch.float32), dev)
    if _filtered(params, rows):
        x = filter_logits(x / temps[:, None], to_device(torch.tensor([params[i].top_k for i in rows]), dev),
                          to_device(torch.tensor([float(params[i].top_p) for i in rows]), dev))
        temps = torch.ones_like(temps)
    # inverse-CDF sampling: one uniform number per row (cheaper than torch.multinomial on CPU)
    drawn = draw(x, temps, _uniforms(rows, generators, default_generator, dev))
    if every:
        return drawn
    out = logits.argmax(dim=-1)
    out[idx] = drawn
    return out


def fixed_shape_rule(params: list[SamplingParams], generators: list[torch.Generator | None]) -> str | None:
    """How a fixed-shape call (``mor.engine.graphs``) can sample these rows exactly as ``sample``
    does: ``"greedy"`` (every row greedy: the argmax), ``"draw"`` (every row at a temperature,
    none filtered by top-k / top-p, none with a generator of its own: one uniform number per row
    from the engine's generator), else None (``sample`` runs)."""
    if all(p.greedy for p in params):
        return "greedy"
    if all(not p.greedy and p.top_k == 0 and p.top_p >= 1.0 for p in params) and all(g is None for g in generators):
        return "draw"
    return None


def draw(logits: torch.Tensor, temperatures: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws, one per row: ``logits`` (N, V) fp32 at ``temperatures`` (N,), with
    uniform numbers ``u`` (N,) in [0, 1); right-bisection never lands on a zero-probability
    token. ``sample``'s rule, shared with the fixed-shape calls."""
    cdf = torch.softmax(logits / temperatures[:, None], dim=-1).cumsum(dim=-1)
    return torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True).squeeze(1).clamp_(max=logits.size(-1) - 1)


def _filtered(params: list[SamplingParams], rows: list[int]) -> list[int]:
    """The rows among ``rows`` with a top-k or top-p filter."""
    return [i for i in rows if params[i].top_k > 0 or params[i].top_p < 1.0]


def _uniforms(rows: list[int], generators: list[torch.Generator | None],
              default_generator: torch.Generator | None, device) -> torch.Tensor:
    """One uniform number in [0, 1) per row in ``rows`` (fp32), from the row's own generator
    where it has one, else from ``default_generator`` (one call for the whole batch)."""
    u = torch.empty(len(rows), dtype=torch.float32, device=device)
    if all(generators[i] is None for i in rows):
        u.uniform_(generator=default_generator)
    else:
        for j, i in enumerate(rows):
            u[j] = torch.rand(1, generator=generators[i] or default_generator, device=device, dtype=u.dtype)
    return u


def _sample_kernels(kernels, logits: torch.Tensor, params: list[SamplingParams],
                    generators: list[torch.Generator | None],
                    default_generator: torch.Generator | None) -> torch.Tensor:
    """``sample`` on the CPU kernels (``kernels.sample``): temperature rows and greedy rows in
    one call; rows with top-k / top-p are filtered with ``filter_logits`` and drawn in a second."""
    n = logits.size(0)
    temp_list = [float(p.temperature) for p in params]  # greedy: 0
    rows = [i for i, t in enumerate(temp_list) if t != 0]
    temps = torch.from_numpy(np.array(temp_list, dtype=np.float32))
    if len(rows) == n:
        u = _uniforms(rows, generators, default_generator, "cpu")
    else:
        u = torch.zeros(n, dtype=torch.float32)
        if rows:
            u[torch.tensor(rows)] = _uniforms(rows, generators, default_generator, "cpu")
    filt = _filtered(params, rows)
    if filt:
        temps[filt] = float("nan")  # skipped by the first call
    out = kernels.sample(logits, temps, u)
    if filt:
        idx = torch.tensor(filt)
        x = filter_logits(logits.index_select(0, idx) / temps.new_tensor([params[i].temperature for i in filt])[:, None],
                          torch.tensor([params[i].top_k for i in filt]),
                          torch.tensor([float(params[i].top_p) for i in filt]))
        out[idx] = kernels.sample(x.contiguous(), torch.ones(len(filt)), u[idx])
    return out
