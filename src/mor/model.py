"""Vanilla, recursive and Mixture-of-Recursions Llama decoders in one class.

The unique layers are stored once in ``model.layers`` and looped over according to the
sharing scheme (``ModelConfig.structure()``): a prefix of unique layers, N_r recursion
chunks, a suffix. A vanilla model has only a prefix. Module names follow Hugging Face's
``LlamaForCausalLM`` so a vanilla model loads Llama weights directly.

MoR routing (SPEC.md sections 3-5):

* expert-choice, ``routing="topk"`` (training, the paper's evaluation): recursion r keeps
  the top-k_r of the tokens kept at r-1, runs the shared chunk on the compacted
  ``[batch, k_r, d]`` tensor with RoPE at the original positions, scatters back;
* expert-choice, ``routing="threshold"``: a token continues iff its (auxiliary) router
  logit > 0 - causal, used for generation;
* token-choice: one router on the first recursion's input assigns every token a depth.

A token's hidden state after a recursion is ``mor.routing.combine`` (also used by the
inference runner).

``kv_mode="recursion_wise"``: attention only among the tokens active at that recursion.
``kv_mode="shared"``: recursion 1 runs on every token and its K/V are reused by all deeper
recursions, which compute queries only and skip their K/V projections.

``labels`` are next-token targets aligned with ``input_ids`` (``labels[:, t]`` is the
token that should follow position t; -100 is ignored), as produced by ``mor.data``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn import functional

from .config import ModelConfig
from .routing import (Router, RouterRecord, balancing_loss, bce_selection_loss, binary_entropy, categorical_entropy,
                      combine, continues, gate_scores, max_violation, num_selected, pack_mask, token_choice,
                      warmup_capacity, z_loss)

ROUTING_MODES = ("topk", "threshold")


# ---------------------------------------------------------------------- building blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """weight * (x * rsqrt(mean(x^2) + eps)), normalised in fp32 and rounded to x's dtype
        before the weight (Llama's order). ``functional.rms_norm`` without a weight is that normalisation:
        on the CPU the same ops (bit-identical, gradients too), on CUDA (PyTorch >= 2.8) one fused kernel
        instead of five (a decode step on a GPU is bound by its kernel count)."""
        dtype = x.dtype
        return self.weight * functional.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin for positions of shape (T,) -> (1, 1, T, hd) or (B, K) -> (B, 1, K, hd)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                                / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    if positions.dim() == 1:
        return cos[None, None], sin[None, None]
    return cos[:, None], sin[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated, for ``apply_rope_signed``."""
    h = sin.shape[-1] // 2
    return torch.cat((-sin[..., :h], sin[..., h:]), dim=-1)


def apply_rope_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``apply_rope(x, cos, sin)`` given ``signed_sin(sin)``, bit for bit: rotate_half(x) * sin
    = (-x2 * s, x1 * s) = (x2 * -s, x1 * s), the halves of x swapped (one ``flip``) times the
    signed table. Four kernels instead of five; the engine applies it to q and k at once."""
    return x * cos + x.unflatten(-1, (2, -1)).flip(-2).flatten(-2) * sin_signed


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=False)

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, kv=None, attn_mask=None):
        """Causal attention. With ``kv`` given (recursive KV sharing) only queries are computed
        from ``x`` and ``attn_mask`` (B, 1, K, T) says which keys each query may see; without
        a mask the keys are aligned with the queries and a causal mask is used."""
        B, K, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, K, self.n_heads, self.hd).transpose(1, 2), cos, sin)
        own_kv = kv is None
        k, v = self.kv(x, cos, sin) if own_kv else kv
        out = functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
            enable_gqa=self.n_kv != self.n_heads,
        )
        out = self.o_proj(out.transpose(1, 2).reshape(B, K, self.n_heads * self.hd))
        return out, ((k, v) if own_kv else None)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv=None, attn_mask=None):
        a, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, kv=kv, attn_mask=attn_mask)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), new_kv


# ---------------------------------------------------------------------- routers
def make_router(cfg: ModelConfig, out_features: int) -> Router:
    """A router of ``cfg.router_arch`` from the hidden size to ``out_features`` scores."""
    return Router(cfg.hidden_size, out_features, cfg.router_arch)


# ---------------------------------------------------------------------- outputs
@dataclass
class RoutingAux:
    """What the recursions report besides the hidden states.

    ``losses``: weighted auxiliary losses by name (router BCE, balancing, z-loss).
    ``stats``: detached diagnostics by name. ``depth`` (B, T): recursions run per token
    (None without routing). ``selected``: per recursion run, the (B, K) positions that ran it
    (padding = T), or None when every position did."""

    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    depth: torch.Tensor | None = None
    selected: list[torch.Tensor | None] | None = None


@dataclass
class MoROutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # lm_loss + aux_loss
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # weighted sum of aux_losses
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted components
    router_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached diagnostics
    depth: torch.Tensor | None = None  # (B, T) recursions executed per token (None for vanilla)
    selected: list[torch.Tensor] | None = None  # per recursion: (B, K) positions (pad = T), or None = all


# ---------------------------------------------------------------------- compaction
def gather_tokens(h: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Rows ``idx`` (B, K) of h (B, T, d); None: all of h."""
    if idx is None:
        return h
    return h.gather(1, idx[..., None].expand(-1, -1, h.size(-1)))


def scatter_tokens(h: torch.Tensor, idx: torch.Tensor | None, src: torch.Tensor) -> torch.Tensor:
    """h with rows ``idx`` (B, K) replaced by src (B, K, d); None: the first K rows."""
    if idx is None:
        return src if src.size(1) == h.size(1) else torch.cat([src, h[:, src.size(1):]], dim=1)
    return h.scatter(1, idx[..., None].expand(-1, -1, h.size(-1)), src)


@dataclass
class ExpertSelection:
    """One expert-choice recursion's routing over its candidates (B, Kc).

    ``logits``: the main router's (weights g); ``decision``: the logits that decide (the
    auxiliary router's with ``use_aux_router``); ``chosen`` (B, Kc): candidates that run the
    recursion; ``top`` (B, K): their indices among the candidates (None: all); ``idx`` /
    ``valid`` (B, K): their positions in the sequence (None: all) and which are real (None:
    all; threshold rows are padded with position T)."""

    logits: torch.Tensor
    decision: torch.Tensor
    chosen: torch.Tensor
    top: torch.Tensor | None
    idx: torch.Tensor | None
    valid: torch.Tensor | None


# ---------------------------------------------------------------------- the model
class MoRModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_unique_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.prefix, self.chunks, self.suffix = cfg.structure()
        if cfg.architecture == "mor":
            nr = cfg.num_recursions
            if cfg.router_type == "expert":
                self.routers = nn.ModuleList(make_router(cfg, 1) for _ in range(nr))
                if cfg.use_aux_router:
                    self.aux_routers = nn.ModuleList(make_router(cfg, 1) for _ in range(nr))
            else:
                self.router = make_router(cfg, nr)
                # loss-free balancing bias (used only in the argmax) and the load it is updated from
                self.register_buffer("balance_bias", torch.zeros(nr))
                self.register_buffer("balance_load", torch.zeros(nr))
        # The optimizer step, for the capacity warm-up of training-time top-k only. The trainer
        # sets it (MoRForCausalLM.set_step) before each step; it lives here rather than in
        # forward's arguments so that the forward keeps the signature DDP / FSDP / compile
        # wrappers call, and it is not saved (a resumed trainer sets it again).
        self.optimizer_step = 0

    # .................................................................. forward
    def forward(self, input_ids: torch.Tensor, routing: str = "topk", max_depth: int | None = None,
                records: list | None = None) -> tuple[torch.Tensor, RoutingAux]:
        """Final-normed hidden states and the routing auxiliaries. ``max_depth`` caps (or, past
        N_r, extends) the recursions at test time and ``records`` collects one
        :class:`mor.routing.RouterRecord` per recursion; both are for analysis
        (:func:`mor.eval.depth.forward_depth` documents their semantics)."""
        cfg = self.config
        depth_cap = cfg.num_recursions if max_depth is None else max_depth
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing={routing!r}; choose one of: {', '.join(ROUTING_MODES)}")
        B, T = input_ids.shape
        if T > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        h = self.embed_tokens(input_ids)
        cos, sin = self._rope(torch.arange(T, device=h.device), h.dtype)
        for u in self.prefix:
            h, _ = self.layers[u](h, cos, sin)
        aux = RoutingAux()
        if self.chunks:
            if cfg.architecture == "recursive":
                shared_kv: list = []
                for r in range(depth_cap):  # past N_r: the last recursion's block again
                    h = self._run_recursion(min(r, cfg.num_recursions - 1), h, None, shared_kv, T)
            elif cfg.router_type == "expert":
                h, aux = self._expert_choice(h, routing, depth_cap, records)
            else:
                h, aux = self._token_choice(h, depth_cap, records)
        for u in self.suffix:
            h, _ = self.layers[u](h, cos, sin)
        return self.norm(h), aux

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)

    def _run_recursion(self, r: int, x: torch.Tensor, pos: torch.Tensor | None, shared_kv: list, T: int):
        """Recursion r's shared layers on x (B, K, d) whose tokens sit at positions ``pos``
        (B, K) (None: all T positions in order). With ``kv_mode="shared"`` recursion 0 appends
        each layer's K/V to ``shared_kv`` and deeper recursions attend to them."""
        cfg = self.config
        cos, sin = self._rope(pos if pos is not None else torch.arange(T, device=x.device), x.dtype)
        share = cfg.kv_mode == "shared" and r > 0
        mask = None
        if share and pos is not None:
            mask = torch.arange(T, device=x.device)[None, None, None, :] <= pos[:, None, :, None]
        for j, u in enumerate(self.chunks[r]):
            x, kv = self.layers[u](x, cos, sin, kv=shared_kv[j] if share else None, attn_mask=mask)
            if cfg.kv_mode == "shared" and r == 0:
                shared_kv.append(kv)
        return x

    # .................................................................. expert-choice
    def _expert_capacity(self, r: int, routing: str) -> float:
        cfg = self.config
        cap = cfg.resolved_capacities()[r]
        # the warm-up applies to training-time top-k only (the causal rule uses the final
        # capacities); read the step only when needed (torch.compile guards on it)
        if cfg.capacity_warmup_steps > 0 and routing == "topk":
            cap = warmup_capacity(cap, self.optimizer_step, cfg.capacity_warmup_steps)
        return cap

    def _select_expert(self, r: int, x_c: torch.Tensor, cand_idx: torch.Tensor | None,
                       cand_valid: torch.Tensor | None, routing: str, T: int) -> ExpertSelection:
        """Which candidates x_c (B, Kc, d) at positions ``cand_idx`` run recursion r: the
        top-k_r by router score ("topk") or the causal threshold rule ("threshold")."""
        cfg = self.config
        B = x_c.size(0)
        cap = self._expert_capacity(r, routing)
        logits = self.routers[r](x_c).squeeze(-1).float()  # (B, Kc)
        decision = self.aux_routers[r](x_c.detach()).squeeze(-1).float() if cfg.use_aux_router else logits
        if routing == "topk":
            k = num_selected(cap, T)
            if cand_idx is None and k == T:
                return ExpertSelection(logits, decision, torch.ones_like(logits, dtype=torch.bool), None, None, None)
            top = torch.topk(logits, k, dim=1, sorted=False).indices.sort(dim=1).values
            idx = top if cand_idx is None else cand_idx.gather(1, top)
            chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True)
            return ExpertSelection(logits, decision, chosen, top, idx, None)
        valid_c = cand_valid if cand_valid is not None else torch.ones_like(logits, dtype=torch.bool)
        chosen = valid_c & continues(decision, cap)
        if cand_idx is None and cap >= 1.0:
            return ExpertSelection(logits, decision, chosen, None, None, None)
        top, valid = pack_mask(chosen, pad_index=0)
        base = cand_idx if cand_idx is not None else torch.arange(T, device=x_c.device).expand(B, T)
        return ExpertSelection(logits, decision, chosen, top, torch.where(valid, base.gather(1, top), T), valid)

    def _expert_choice(self, h: torch.Tensor, routing: str, max_depth: int,
                       records: list | None) -> tuple[torch.Tensor, RoutingAux]:
        """Expert-choice recursions (SPEC section 3): per recursion select -> run the shared
        block on the compacted selected tokens -> combine; then the losses and statistics."""
        cfg = self.config
        B, T, _ = h.shape
        nr = cfg.num_recursions
        if routing == "threshold":  # a dummy row at index T receives the padding of variable-length rows
            h = functional.pad(h, (0, 0, 0, 1))
        depth = torch.zeros(B, T + 1, dtype=torch.long, device=h.device)
        cand_idx, cand_valid = None, None
        shared_kv: list = []
        bce, z, accuracy, entropy, fraction, selected = [], [], [], [], [], []
        completed = 0
        for r in range(min(nr, max_depth)):
            x_c = gather_tokens(h[:, :T] if cand_idx is None else h, cand_idx)  # candidates (B, Kc, d)
            sel = self._select_expert(r, x_c, cand_idx, cand_valid, routing, T)
            logits = sel.logits
            if routing == "topk":
                bce.append(bce_selection_loss(sel.decision, sel.chosen))
                accuracy.append(((sel.decision > 0) == sel.chosen).float().mean())
            if records is not None:
                records.append(RouterRecord(
                    recursion=r + 1,
                    positions=(torch.arange(T, device=h.device).expand(B, T) if cand_idx is None else cand_idx),
                    scores=torch.sigmoid(sel.decision), selected=sel.chosen,
                    valid=cand_valid if cand_valid is not None else torch.ones_like(sel.chosen)))
            if cfg.z_loss_coeff > 0:
                z.append(z_loss(logits[..., None], cand_valid))
            entropy.append(binary_entropy(logits).mean() if cand_valid is None
                           else (binary_entropy(logits) * cand_valid).sum() / cand_valid.sum().clamp_min(1))
            g = gate_scores(logits if sel.top is None else logits.gather(1, sel.top), cfg.router_func, cfg.router_alpha)
            x = gather_tokens(h[:, :T] if sel.idx is None else h, sel.idx)
            if x.size(1) == 0:  # no token continues (threshold mode)
                fraction.append(torch.zeros((), device=h.device))
                break
            y = self._run_recursion(r, x, sel.idx, shared_kv, T)
            h = scatter_tokens(h, sel.idx, combine(cfg, x, y, g[..., None].to(y.dtype)))
            fraction.append(self._count_depth(depth, sel.idx, sel.valid, T) / (B * T))
            selected.append(sel.idx)
            cand_idx, cand_valid = sel.idx, sel.valid
            completed = r + 1
        if completed == nr and max_depth > nr:
            h = self._extra_passes(h, depth, cand_idx, cand_valid, shared_kv, max_depth - nr)
        aux = self._expert_losses_and_stats(depth[:, :T], selected, bce, z, accuracy, entropy, fraction)
        return h[:, :T], aux

    def _expert_losses_and_stats(self, depth: torch.Tensor, selected: list, bce: list, z: list, accuracy: list,
                                 entropy: list, fraction: list) -> RoutingAux:
        """The weighted auxiliary losses and the diagnostics from per-recursion pieces."""
        cfg = self.config
        nr = cfg.num_recursions
        aux = RoutingAux(depth=depth, selected=selected)
        if bce:
            key = "aux_router_bce" if cfg.use_aux_router else "router_bce"
            aux.losses[key] = cfg.aux_loss_coeff * torch.stack(bce).sum()
        if z:
            aux.losses["z_loss"] = cfg.z_loss_coeff * torch.stack(z).sum()
        stats = aux.stats
        stats["selected_fraction"] = torch.stack(
            fraction + [torch.zeros((), device=depth.device)] * (nr - len(fraction))).detach()
        stats["router_entropy"] = torch.stack(entropy).detach()
        if accuracy:
            stats["sampling_accuracy"] = torch.stack(accuracy).detach()
        # positions never selected at the last recursion by any sequence of the batch
        stats["dead_token_ratio"] = 1.0 - (depth == nr).any(dim=0).float().mean()
        return aux

    @staticmethod
    def _count_depth(depth: torch.Tensor, idx: torch.Tensor | None, valid: torch.Tensor | None,
                     T: int) -> torch.Tensor:
        """Add one recursion to the depth of the tokens at ``idx``; returns how many ran it."""
        if idx is None:
            depth[:, :T] += 1
            return torch.full((), depth.size(0) * T, device=depth.device)
        ones = valid.long() if valid is not None else torch.ones_like(idx)
        depth.scatter_add_(1, idx, ones)
        return ones.sum()

    def _extra_passes(self, h: torch.Tensor, depth: torch.Tensor, idx: torch.Tensor | None,
                      valid: torch.Tensor | None, shared_kv: list, passes: int) -> torch.Tensor:
        """Test-time depth extrapolation (analysis only): the tokens that ran the last
        recursion run its block ``passes`` more times, weighted by its router."""
        cfg = self.config
        nr, T = cfg.num_recursions, depth.size(1) - 1
        for _ in range(passes):
            x = gather_tokens(h[:, :T] if idx is None else h, idx)
            g = gate_scores(self.routers[nr - 1](x).squeeze(-1).float(), cfg.router_func, cfg.router_alpha)
            y = self._run_recursion(nr - 1, x, idx, shared_kv, T)
            h = scatter_tokens(h, idx, combine(cfg, x, y, g[..., None].to(y.dtype)))
            self._count_depth(depth, idx, valid, T)
        return h

    # .................................................................. token-choice
    def _token_choice(self, h: torch.Tensor, max_depth: int, records: list | None) -> tuple[torch.Tensor, RoutingAux]:
        """Token-choice recursions (SPEC section 4): one router on H^1 assigns each token its
        depth; recursion r runs on the tokens assigned a depth > r."""
        cfg = self.config
        B, T, _ = h.shape
        nr = cfg.num_recursions
        logits = self.router(h).float()  # (B, T, N_r) on H^1
        probs, choice, g = token_choice(logits, cfg.router_func, cfg.router_alpha, self.balance_bias)
        depth = (choice + 1).clamp(max=max_depth)  # test-time cap: the final combination at the capped depth
        if records is not None:  # probability of depth r+1 vs. whether the token was assigned it
            pos = torch.arange(T, device=h.device).expand(B, T)
            for r in range(nr):
                records.append(RouterRecord(recursion=r + 1, positions=pos, scores=probs[..., r],
                                            selected=choice == r, valid=torch.ones_like(choice, dtype=torch.bool)))
        load = torch.bincount(choice.reshape(-1), minlength=nr).float()
        if self.training and cfg.balancing == "loss_free":
            self.balance_load += load
        # row T of the padded tensors receives the padding of variable-length rows
        h_first = functional.pad(h, (0, 0, 0, 1))
        gate = functional.pad(g.to(h.dtype), (0, 0, 0, 1))
        assigned = functional.pad(depth, (0, 1))[..., None]
        h = h_first
        shared_kv: list = []
        fraction, selected = [], []
        for r in range(min(nr, max_depth)):
            if r == 0:  # every token runs recursion 1
                idx = None
            else:
                idx, _ = pack_mask(depth >= r + 1, pad_index=T)
                if idx.size(1) == 0:
                    fraction.append(torch.zeros((), device=h.device))
                    continue
            x = gather_tokens(h[:, :T] if idx is None else h, idx)
            y = self._run_recursion(r, x, idx, shared_kv, T)

            def rows(t: torch.Tensor, idx=idx) -> torch.Tensor:
                return gather_tokens(t[:, :T] if idx is None else t, idx)

            new = combine(cfg, x, y, rows(gate), rows(assigned) == r + 1, rows(h_first))
            h = scatter_tokens(h, idx, new)
            fraction.append((depth >= r + 1).float().mean())
            selected.append(idx)
        aux = RoutingAux(depth=depth, selected=selected)
        if cfg.balancing == "loss":
            aux.losses["balance"] = cfg.balance_coeff * balancing_loss(probs, choice, nr)
        if cfg.z_loss_coeff > 0:
            aux.losses["z_loss"] = cfg.z_loss_coeff * z_loss(logits)
        aux.stats = {
            "selected_fraction": torch.stack(fraction).detach(),
            "max_violation": max_violation(load).detach(),
            "router_entropy": categorical_entropy(torch.softmax(logits, -1) if cfg.router_func == "softmax"
                                                  else probs / probs.sum(-1, keepdim=True)).mean().detach(),
            "depth_load": load.detach(),
        }
        return h[:, :T], aux


class MoRForCausalLM(nn.Module):
    """Vanilla, recursive or MoR causal LM, chosen by ``config.architecture``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = MoRModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.initializer_range)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, routing: str = "topk") -> MoROutput:
        h, aux = self.model(input_ids, routing=routing)
        logits = self.lm_head(h)
        losses = aux.losses
        aux_loss = torch.stack(list(losses.values())).sum() if losses else torch.zeros((), device=logits.device)
        out = MoROutput(logits=logits, aux_loss=aux_loss, aux_losses=losses, router_stats=aux.stats,
                        depth=aux.depth, selected=aux.selected)
        if labels is not None:
            out.lm_loss = functional.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1),
                                          ignore_index=-100)
            out.loss = out.lm_loss + aux_loss
        return out

    @classmethod
    def from_hf(cls, path, device="cpu", dtype=torch.float32) -> "MoRForCausalLM":
        """A vanilla model with the weights of a Hugging Face transformers Llama directory
        (safetensors or ``pytorch_model.bin``, sharded or not), or the model of a ``mor export``
        directory; see ``mor.interop.hf_llama``."""
        from .interop.hf_llama import load_llama

        return load_llama(path, device=device, dtype=dtype)[0]

    # .................................................................. utilities
    def set_step(self, step: int) -> None:
        """Tell the model the current optimizer step (capacity warm-up)."""
        self.model.optimizer_step = int(step)

    @torch.no_grad()
    def update_balance_bias(self) -> torch.Tensor | None:
        """Loss-free balancing: after an optimizer step, b_i += rate * sign(mean load - load_i)
        using the load accumulated since the last update (all-reduce ``model.balance_load``
        across ranks before calling this in data-parallel runs). Returns the load used."""
        cfg = self.config
        if not (cfg.architecture == "mor" and cfg.router_type == "token" and cfg.balancing == "loss_free"):
            return None
        m = self.model
        load = m.balance_load.clone()
        if load.sum() > 0:
            m.balance_bias += cfg.balance_bias_rate * torch.sign(load.mean() - load)
        m.balance_load.zero_()
        return load

    def num_parameters(self, non_embedding: bool = True, include_routers: bool = False) -> int:
        """Unique parameters (each shared tensor counted once). ``non_embedding`` drops the
        embedding (and an untied LM head), as the paper reports."""
        seen, n = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if non_embedding and (name.startswith("model.embed_tokens") or name.startswith("lm_head")):
                continue
            if not include_routers and name.startswith(_ROUTER_PREFIXES):
                continue
            n += p.numel()
        return n

    def router_parameters(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if n.startswith(_ROUTER_PREFIXES))


_ROUTER_PREFIXES = ("model.routers.", "model.router.", "model.aux_routers.")
