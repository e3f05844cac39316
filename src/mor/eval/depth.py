"""A forward pass that caps or extends the recursion depth and records router decisions.

:func:`forward_depth` runs a ``MoRForCausalLM`` from its own submodules (embedding, unique
layers, routers, shared recursion chunks, final norm, LM head) exactly as
``MoRModel.forward`` does, with two additions used by ``mor analyze``:

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
import torch.nn.functional as F

from .. import routing as R


@dataclass
class RouterRecord:
    """One recursion's routing: per batch row, candidate positions, their router scores and
    which of them were selected (all (B, K) tensors; padding entries are False in ``valid``).

    ``scores``: expert-choice - sigmoid of the decision router's logit (the probability the
    BCE trains; the threshold rule selects scores > 0.5); token-choice - the router's
    probability of depth ``recursion``, and ``selected`` marks the tokens assigned that depth."""
    recursion: int  # 1-based
    positions: torch.Tensor
    scores: torch.Tensor
    selected: torch.Tensor
    valid: torch.Tensor


@dataclass
class DepthOutput:
    logits: torch.Tensor  # (B, T, V)
    depth: torch.Tensor | None  # (B, T) recursions run per token (None for vanilla)
    records: list[RouterRecord] = field(default_factory=list)


def _gather(h: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return h if idx is None else h.gather(1, idx[..., None].expand(-1, -1, h.size(-1)))


def _scatter(h: torch.Tensor, idx: torch.Tensor | None, src: torch.Tensor) -> torch.Tensor:
    if idx is None:
        return src if src.size(1) == h.size(1) else torch.cat([src, h[:, src.size(1):]], dim=1)
    return h.scatter(1, idx[..., None].expand(-1, -1, h.size(-1)), src)


@torch.no_grad()
def forward_depth(model, input_ids: torch.Tensor, *, routing: str = "topk", max_depth: int | None = None,
                  record: bool = False) -> DepthOutput:
    """Forward ``input_ids`` (B, T) with at most ``max_depth`` recursions (module doc)."""
    if routing not in ("topk", "threshold"):
        raise ValueError(f"routing={routing!r}; choose one of: topk, threshold")
    m, c = model.model, model.config
    nr = c.num_recursions
    max_depth = nr if max_depth is None else int(max_depth)
    if max_depth < 1:
        raise ValueError(f"max_depth={max_depth} must be >= 1")
    B, T = input_ids.shape
    if T > c.max_position_embeddings:
        raise ValueError(f"sequence length {T} exceeds max_position_embeddings={c.max_position_embeddings}")
    h = m.embed_tokens(input_ids)
    cos, sin = m._rope(torch.arange(T, device=h.device), h.dtype)
    for u in m.prefix:
        h, _ = m.layers[u](h, cos, sin)
    records: list[RouterRecord] = []
    depth = None
    if c.architecture == "vanilla":
        if max_depth != 1:
            raise ValueError("a vanilla model has no recursions; only max_depth=1 is defined")
    elif c.architecture == "recursive":
        shared_kv: list = []
        for r in range(max_depth):
            h = m._run_chunk(min(r, nr - 1), h, None, shared_kv, T)
        depth = torch.full((B, T), max_depth, dtype=torch.long, device=h.device)
    elif c.router_type == "expert":
        h, depth = _expert(m, h, routing, max_depth, records if record else None)
    else:
        if max_depth > nr:
            raise ValueError(f"max_depth={max_depth} > N_r={nr} is not defined for token-choice routing")
        h, depth = _token(m, h, max_depth, records if record else None)
    for u in m.suffix:
        h, _ = m.layers[u](h, cos, sin)
    logits = model.lm_head(m.norm(h))
    return DepthOutput(logits=logits, depth=depth, records=records)


def _expert(m, h, routing, max_depth, records):
    c = m.config
    B, T, _ = h.shape
    nr = c.num_recursions
    if routing == "threshold":  # a dummy row at index T receives the padding of packed rows
        h = F.pad(h, (0, 0, 0, 1))
    depth = torch.zeros(B, T + 1, dtype=torch.long, device=h.device)
    all_pos = torch.arange(T, device=h.device).expand(B, T)
    cand_idx, cand_valid = None, None
    shared_kv: list = []
    completed = 0
    for r in range(min(max_depth, nr)):
        cap = R.warmup_capacity(c.resolved_capacities()[r], m.step, c.capacity_warmup_steps)
        x_c = _gather(h[:, :T] if cand_idx is None else h, cand_idx)
        logits = m.routers[r](x_c).squeeze(-1).float()
        dec = m.aux_routers[r](x_c).squeeze(-1).float() if c.use_aux_router else logits
        if routing == "topk":
            k = R.num_selected(cap, T)
            if cand_idx is None and k == T:
                top, sel_idx, sel_valid = None, None, None
                sel_c = torch.ones_like(logits, dtype=torch.bool)
            else:
                top = torch.topk(logits, k, dim=1, sorted=False).indices.sort(dim=1).values
                sel_idx = top if cand_idx is None else cand_idx.gather(1, top)
                sel_c = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True)
                sel_valid = None
        else:
            cv = cand_valid if cand_valid is not None else torch.ones_like(logits, dtype=torch.bool)
            sel_c = cv & (dec > 0) if cap < 1.0 else cv
            if cand_idx is None and cap >= 1.0:
                top, sel_idx, sel_valid = None, None, None
            else:
                top, sel_valid = R.pack_mask(sel_c, pad_index=0)
                base = cand_idx if cand_idx is not None else all_pos
                sel_idx = torch.where(sel_valid, base.gather(1, top), T)
        if records is not None:
            records.append(RouterRecord(
                recursion=r + 1,
                positions=(all_pos if cand_idx is None else cand_idx).clone(),
                scores=torch.sigmoid(dec), selected=sel_c.clone(),
                valid=(cand_valid if cand_valid is not None else torch.ones_like(sel_c)).clone()))
        g = R.gate_scores(logits if top is None else logits.gather(1, top), c.router_func, c.router_alpha)
        x = _gather(h[:, :T] if sel_idx is None else h, sel_idx)
        if x.size(1) == 0:  # no token continues (threshold rule)
            break
        y = m._run_chunk(r, x, sel_idx, shared_kv, T)
        h = _scatter(h, sel_idx, m._combine(x, y, g[..., None].to(y.dtype)))
        if sel_idx is None:
            depth[:, :T] += 1
        else:
            ones = sel_valid.long() if sel_valid is not None else torch.ones_like(sel_idx)
            depth.scatter_add_(1, sel_idx, ones)
        cand_idx, cand_valid = sel_idx, sel_valid
        completed = r + 1
    if completed == nr:  # extra passes of the last recursion for the tokens that reached it
        for _ in range(max_depth - nr):
            x = _gather(h[:, :T] if cand_idx is None else h, cand_idx)
            g = R.gate_scores(m.routers[nr - 1](x).squeeze(-1).float(), c.router_func, c.router_alpha)
            y = m._run_chunk(nr - 1, x, cand_idx, shared_kv, T)
            h = _scatter(h, cand_idx, m._combine(x, y, g[..., None].to(y.dtype)))
            if cand_idx is None:
                depth[:, :T] += 1
            else:
                ones = cand_valid.long() if cand_valid is not None else torch.ones_like(cand_idx)
                depth.scatter_add_(1, cand_idx, ones)
    return h[:, :T], depth[:, :T]


def _token(m, h, max_depth, records):
    c = m.config
    B, T, _ = h.shape
    nr = c.num_recursions
    logits = m.router(h).float()
    probs = R.router_probs(logits, c.router_func)
    gates = R.gate_scores(logits, c.router_func, c.router_alpha)
    choice = torch.argmax(probs + m.balance_bias, dim=-1)
    g = gates.gather(-1, choice[..., None]).to(h.dtype)
    depth = (choice + 1).clamp(max=max_depth)
    if records is not None:
        pos = torch.arange(T, device=h.device).expand(B, T)
        for r in range(nr):  # probability of depth r+1 vs. whether the token was assigned it
            records.append(RouterRecord(recursion=r + 1, positions=pos.clone(), scores=probs[..., r].clone(),
                                        selected=choice == r, valid=torch.ones_like(choice, dtype=torch.bool)))
    h1 = h
    h = F.pad(h, (0, 0, 0, 1))
    g_ext, h1_ext, depth_ext = F.pad(g, (0, 0, 0, 1)), F.pad(h1, (0, 0, 0, 1)), F.pad(depth, (0, 1))
    shared_kv: list = []
    for r in range(max_depth):
        if r == 0:
            idx = None
        else:
            idx, _ = R.pack_mask(depth >= r + 1, pad_index=T)
            if idx.size(1) == 0:
                continue
        x = _gather(h[:, :T] if idx is None else h, idx)
        y = m._run_chunk(r, x, idx, shared_kv, T)
        if c.gate_combine == "pass_through":
            new = y
        else:
            gs = _gather(g_ext[:, :T] if idx is None else g_ext, idx)
            last = _gather(depth_ext[:, :T, None] if idx is None else depth_ext[..., None], idx) == r + 1
            final = _gather(h1_ext[:, :T] if idx is None else h1_ext, idx) + gs * y
            cont = x + gs * y if c.gate_every_recursion else y
            new = torch.where(last, final, cont)
        h = _scatter(h, idx, new)
    return h[:, :T], depth
