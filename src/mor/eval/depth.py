"""A forward pass that caps or extends the recursion depth and records router decisions.

:func:`forward_depth` runs a ``MoRForCausalLM`` exactly as
``MoRModel.forward`` does - it is that forward, called with two analysis options used by
``mor analyze`` and ``mor experiment``:

* ``max_depth`` - the maximum number of recursions a token may run (test-time depth
  scaling). With ``max_depth = N_r`` (the default) the result equals the model's own
  forward (a test checks logits and depths). Precisely:

  - **expert-choice** (both routing rules): recursions ``1..min(max_depth, N_r)`` run as
    in the model, choosing tokens by the same rule; deeper recursions are skipped, so a
    token's depth is ``min(its depth, max_depth)``. For ``max_depth > N_r`` the tokens
    that ran the last recursion run ``max_depth - N_r`` **extra passes** of the last
    recursion's shared block: each pass is exactly another recursion ``N_r`` on those same
    tokens - the last router recomputes the weight ``g`` on the current hidden state, the
    block runs on the compacted tokens with RoPE at their original positions and causal
    attention among them, and ``H <- H + g * block(H)``. No further filtering happens.
  - **token-choice**: a token assigned depth ``i`` runs ``min(i, max_depth)`` recursions and
    ends with the model's final combination ``H^1 + g * block(H^i')`` at its capped depth
    ``i'`` (same ``g``). ``max_depth > N_r`` is not defined (the final combination leaves
    the recursion's residual stream) and raises ``ValueError``.
  - **recursive**: every token runs ``max_depth`` recursions; past ``N_r`` the last
    recursion's block is applied again (``H <- block(H)``).
  - **vanilla**: no recursions; only ``max_depth = 1`` is accepted.

* ``record=True`` - return, per recursion, the router score of every candidate token, the
  candidate positions and which candidates were selected (:class:`RouterRecord`; the data
  behind the router histograms).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..routing import RouterRecord

__all__ = ["DepthOutput", "RouterRecord", "forward_depth"]


@dataclass
class DepthOutput:
    logits: torch.Tensor  # (B, T, V)
    depth: torch.Tensor | None  # (B, T) recursions run per token (None for vanilla)
    records: list[RouterRecord] = field(default_factory=list)


@torch.no_grad()
def forward_depth(model, input_ids: torch.Tensor, *, routing: str = "topk", max_depth: int | None = None,
                  record: bool = False) -> DepthOutput:
    """Forward ``input_ids`` (B, T) with at most ``max_depth`` recursions (module doc)."""
    if routing not in ("topk", "threshold"):
        raise ValueError(f"routing={routing!r}; choose one of: topk, threshold")
    cfg = model.config
    nr = cfg.num_recursions
    max_depth = nr if max_depth is None else int(max_depth)
    if max_depth < 1:
        raise ValueError(f"max_depth={max_depth} must be >= 1")
    if cfg.architecture == "vanilla" and max_depth != 1:
        raise ValueError("a vanilla model has no recursions; only max_depth=1 is defined")
    if cfg.architecture == "mor" and cfg.router_type == "token" and max_depth > nr:
        raise ValueError(f"max_depth={max_depth} > N_r={nr} is not defined for token-choice routing")
    records: list[RouterRecord] = []
    h, aux = model.model(input_ids, routing=routing, max_depth=max_depth if cfg.architecture != "vanilla" else None,
                         records=records if record else None)
    depth = aux.depth
    if cfg.architecture == "recursive":
        depth = torch.full(input_ids.shape, max_depth, dtype=torch.long, device=h.device)
    return DepthOutput(logits=model.lm_head(h), depth=depth, records=records)
