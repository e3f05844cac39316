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
import torch.nn.functional as F

from . import routing as R
from .config import ModelConfig

ROUTING_MODES = ("topk", "threshold")


# ---------------------------------------------------------------------- building blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


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
        out = F.scaled_dot_product_attention(
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
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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


# ---------------------------------------------------------------------- outputs
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


def _gather(h: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    if idx is None:
        return h
    return h.gather(1, idx[..., None].expand(-1, -1, h.size(-1)))


def _scatter(h: torch.Tensor, idx: torch.Tensor | None, src: torch.Tensor) -> torch.Tensor:
    if idx is None:
        return src if src.size(1) == h.size(1) else torch.cat([src, h[:, src.size(1):]], dim=1)
    return h.scatter(1, idx[..., None].expand(-1, -1, h.size(-1)), src)


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
                self.routers = nn.ModuleList(Router_(cfg, 1) for _ in range(nr))
                if cfg.use_aux_router:
                    self.aux_routers = nn.ModuleList(Router_(cfg, 1) for _ in range(nr))
            else:
                self.router = Router_(cfg, nr)
                # loss-free balancing bias (used only in the argmax) and the load it is updated from
                self.register_buffer("balance_bias", torch.zeros(nr))
                self.register_buffer("balance_load", torch.zeros(nr))
        self.step = 0  # optimizer step, set by the trainer (capacity warm-up)

    # .................................................................. helpers
    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        c = self.config
        return rope_cos_sin(positions, c.head_dim, c.rope_theta, dtype)

    def _run_chunk(self, r: int, x: torch.Tensor, pos: torch.Tensor | None, shared_kv: list, T: int):
        """Run recursion r's layers on x (B, K, d) whose tokens sit at positions ``pos`` (B, K)
        (None: all T positions in order)."""
        c = self.config
        cos, sin = self._rope(pos if pos is not None else torch.arange(T, device=x.device), x.dtype)
        share = c.kv_mode == "shared" and r > 0
        mask = None
        if share and pos is not None:
            mask = torch.arange(T, device=x.device)[None, None, None, :] <= pos[:, None, :, None]
        for j, u in enumerate(self.chunks[r]):
            x, kv = self.layers[u](x, cos, sin, kv=shared_kv[j] if share else None, attn_mask=mask)
            if c.kv_mode == "shared" and r == 0:
                shared_kv.append(kv)
        return x

    def _combine(self, x, y, g):
        return y if self.config.gate_combine == "pass_through" else x + g * y

    # .................................................................. forward
    def forward(self, input_ids: torch.Tensor, routing: str = "topk", max_depth: int | None = None,
                records: list | None = None):
        """Final-normed hidden states and the routing record. ``max_depth`` caps (or, past N_r,
        extends) the recursions at test time and ``records`` collects one
        :class:`mor.routing.RouterRecord` per recursion; both are for analysis
        (:func:`mor.eval.depth.forward_depth` documents their semantics)."""
        c = self.config
        depth_cap = c.num_recursions if max_depth is None else max_depth
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing={routing!r}; choose one of: {', '.join(ROUTING_MODES)}")
        B, T = input_ids.shape
        if T > c.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings={c.max_position_embeddings}")
        h = self.embed_tokens(input_ids)
        full_pos = torch.arange(T, device=h.device)
        cos, sin = self._rope(full_pos, h.dtype)
        for u in self.prefix:
            h, _ = self.layers[u](h, cos, sin)
        aux: dict = {"losses": {}, "stats": {}, "depth": None, "selected": None}
        if self.chunks:
            if c.architecture == "recursive":
                shared_kv: list = []
                for r in range(depth_cap):  # past N_r: the last recursion's block again
                    h = self._run_chunk(min(r, c.num_recursions - 1), h, None, shared_kv, T)
            elif c.router_type == "expert":
                h = self._expert_choice(h, routing, aux, depth_cap, records)
            else:
                h = self._token_choice(h, aux, depth_cap, records)
        for u in self.suffix:
            h, _ = self.layers[u](h, cos, sin)
        return self.norm(h), aux

    def _expert_choice(self, h: torch.Tensor, routing: str, aux: dict, max_depth: int,
                       records: list | None) -> torch.Tensor:
        c = self.config
        B, T, _ = h.shape
        nr = c.num_recursions
        padded = routing == "threshold"
        if padded:  # a dummy row at index T receives the padding of variable-length rows
            h = F.pad(h, (0, 0, 0, 1))
        depth = torch.zeros(B, T + 1, dtype=torch.long, device=h.device)
        cand_idx, cand_valid = None, None
        shared_kv: list = []
        bce, zl, stats = [], [], {}
        frac, acc, ent, selected_all = [], [], [], []
        completed = 0
        for r in range(min(nr, max_depth)):
            cap = c.resolved_capacities()[r]
            # the warm-up applies to training-time top-k only (the causal rule uses the final
            # capacities); read the step only when needed (torch.compile guards on it)
            if c.capacity_warmup_steps > 0 and routing == "topk":
                cap = R.warmup_capacity(cap, self.step, c.capacity_warmup_steps)
            x_c = _gather(h[:, :T] if cand_idx is None else h, cand_idx)  # candidates (B, Kc, d)
            logits = self.routers[r](x_c).squeeze(-1).float()  # (B, Kc)
            dec_logits = (self.aux_routers[r](x_c.detach()).squeeze(-1).float()
                          if c.use_aux_router else logits)
            if routing == "topk":
                k = R.num_selected(cap, T)
                if cand_idx is None and k == T:
                    top, sel_idx = None, None
                    sel_c = torch.ones_like(logits, dtype=torch.bool)
                else:
                    top = torch.topk(logits, k, dim=1, sorted=False).indices.sort(dim=1).values
                    sel_idx = top if cand_idx is None else cand_idx.gather(1, top)
                    sel_c = torch.zeros_like(logits, dtype=torch.bool).scatter(1, top, True)
                sel_valid = None
                bce.append(R.bce_selection_loss(dec_logits, sel_c))
                acc.append(((dec_logits > 0) == sel_c).float().mean())
            else:
                cv = cand_valid if cand_valid is not None else torch.ones_like(logits, dtype=torch.bool)
                sel_c = cv & (dec_logits > 0) if cap < 1.0 else cv
                if cand_idx is None and cap >= 1.0:
                    top, sel_idx, sel_valid = None, None, None
                else:
                    top, sel_valid = R.pack_mask(sel_c, pad_index=0)
                    base = cand_idx if cand_idx is not None else torch.arange(T, device=h.device).expand(B, T)
                    sel_idx = torch.where(sel_valid, base.gather(1, top), T)
            if records is not None:
                records.append(R.RouterRecord(
                    recursion=r + 1,
                    positions=(torch.arange(T, device=h.device).expand(B, T) if cand_idx is None else cand_idx),
                    scores=torch.sigmoid(dec_logits), selected=sel_c,
                    valid=cand_valid if cand_valid is not None else torch.ones_like(sel_c)))
            if c.z_loss_coeff > 0:
                zl.append(R.z_loss(logits[..., None], cand_valid))
            ent.append(R.binary_entropy(logits).mean() if cand_valid is None
                       else (R.binary_entropy(logits) * cand_valid).sum() / cand_valid.sum().clamp_min(1))
            g = R.gate_scores(logits if top is None else logits.gather(1, top), c.router_func, c.router_alpha)
            x = _gather(h[:, :T] if sel_idx is None else h, sel_idx)
            if x.size(1) == 0:  # no token continues (threshold mode)
                frac.append(torch.zeros((), device=h.device))
                break
            y = self._run_chunk(r, x, sel_idx, shared_kv, T)
            h = _scatter(h, sel_idx, self._combine(x, y, g[..., None].to(y.dtype)))
            if sel_idx is None:
                depth[:, :T] += 1
                frac.append(torch.ones((), device=h.device))
            else:
                ones = sel_valid.long() if sel_valid is not None else torch.ones_like(sel_idx)
                depth.scatter_add_(1, sel_idx, ones)
                frac.append(ones.sum() / (B * T))
            selected_all.append(sel_idx)
            cand_idx, cand_valid = sel_idx, sel_valid
            completed = r + 1
        if completed == nr:  # test-time extra passes of the last recursion for the tokens that reached it
            for _ in range(max_depth - nr):
                x = _gather(h[:, :T] if cand_idx is None else h, cand_idx)
                g = R.gate_scores(self.routers[nr - 1](x).squeeze(-1).float(), c.router_func, c.router_alpha)
                y = self._run_chunk(nr - 1, x, cand_idx, shared_kv, T)
                h = _scatter(h, cand_idx, self._combine(x, y, g[..., None].to(y.dtype)))
                if cand_idx is None:
                    depth[:, :T] += 1
                else:
                    depth.scatter_add_(1, cand_idx, cand_valid.long() if cand_valid is not None
                                       else torch.ones_like(cand_idx))
        depth = depth[:, :T]
        if bce:
            key = "aux_router_bce" if c.use_aux_router else "router_bce"
            aux["losses"][key] = c.aux_loss_coeff * torch.stack(bce).sum()
        if zl:
            aux["losses"]["z_loss"] = c.z_loss_coeff * torch.stack(zl).sum()
        stats["selected_fraction"] = torch.stack(frac + [torch.zeros((), device=h.device)] * (nr - len(frac))).detach()
        stats["router_entropy"] = torch.stack(ent).detach()
        if acc:
            stats["sampling_accuracy"] = torch.stack(acc).detach()
        # positions never selected at the last recursion by any sequence of the batch
        stats["dead_token_ratio"] = 1.0 - (depth == nr).any(dim=0).float().mean()
        aux["stats"], aux["depth"], aux["selected"] = stats, depth, selected_all
        return h[:, :T]

    def _token_choice(self, h: torch.Tensor, aux: dict, max_depth: int, records: list | None) -> torch.Tensor:
        c = self.config
        B, T, _ = h.shape
        nr = c.num_recursions
        logits = self.router(h).float()  # (B, T, N_r) on H^1
        probs = R.router_probs(logits, c.router_func)
        gates = R.gate_scores(logits, c.router_func, c.router_alpha)
        choice = torch.argmax(probs + self.balance_bias, dim=-1)  # bias only in the argmax
        depth = (choice + 1).clamp(max=max_depth)  # test-time cap: the final combination at the capped depth
        if records is not None:  # probability of depth r+1 vs. whether the token was assigned it
            pos = torch.arange(T, device=h.device).expand(B, T)
            for r in range(nr):
                records.append(R.RouterRecord(recursion=r + 1, positions=pos, scores=probs[..., r],
                                              selected=choice == r, valid=torch.ones_like(choice, dtype=torch.bool)))
        g = gates.gather(-1, choice[..., None]).to(h.dtype)  # (B, T, 1)
        load = torch.bincount(choice.reshape(-1), minlength=nr).float()
        if self.training and c.balancing == "loss_free":
            self.balance_load += load
        h1 = h
        h = F.pad(h, (0, 0, 0, 1))
        g_ext = F.pad(g, (0, 0, 0, 1))
        h1_ext = F.pad(h1, (0, 0, 0, 1))
        depth_ext = F.pad(depth, (0, 1))
        shared_kv: list = []
        frac, selected_all = [], []
        for r in range(min(nr, max_depth)):
            if r == 0:  # every token runs recursion 1
                idx = None
            else:
                idx, _valid = R.pack_mask(depth >= r + 1, pad_index=T)
                if idx.size(1) == 0:
                    frac.append(torch.zeros((), device=h.device))
                    continue
            x = _gather(h[:, :T] if idx is None else h, idx)
            y = self._run_chunk(r, x, idx, shared_kv, T)
            if c.gate_combine == "pass_through":
                new = y
            else:
                gs = _gather(g_ext[:, :T] if idx is None else g_ext, idx)
                last = (_gather(depth_ext[:, :T, None] if idx is None else depth_ext[..., None], idx) == r + 1)
                final = _gather(h1_ext[:, :T] if idx is None else h1_ext, idx) + gs * y
                cont = x + gs * y if c.gate_every_recursion else y
                new = torch.where(last, final, cont)
            h = _scatter(h, idx, new)
            frac.append((depth >= r + 1).float().mean())
            selected_all.append(idx)
        if c.balancing == "loss":
            aux["losses"]["balance"] = c.balance_coeff * R.balancing_loss(probs, choice, nr)
        if c.z_loss_coeff > 0:
            aux["losses"]["z_loss"] = c.z_loss_coeff * R.z_loss(logits)
        aux["stats"] = {
            "selected_fraction": torch.stack(frac).detach(),
            "max_violation": R.max_violation(load).detach(),
            "router_entropy": R.categorical_entropy(torch.softmax(logits, -1) if c.router_func == "softmax"
                                                    else probs / probs.sum(-1, keepdim=True)).mean().detach(),
            "depth_load": load.detach(),
        }
        aux["depth"], aux["selected"] = depth, selected_all
        return h[:, :T]


def Router_(cfg: ModelConfig, out: int) -> R.Router:
    return R.Router(cfg.hidden_size, out, cfg.router_arch)


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
        losses = aux["losses"]
        aux_loss = torch.stack(list(losses.values())).sum() if losses else torch.zeros((), device=logits.device)
        out = MoROutput(logits=logits, aux_loss=aux_loss, aux_losses=losses, router_stats=aux["stats"],
                        depth=aux["depth"], selected=aux["selected"])
        if labels is not None:
            out.lm_loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1),
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
        self.model.step = int(step)

    @torch.no_grad()
    def update_balance_bias(self) -> torch.Tensor | None:
        """Loss-free balancing: after an optimizer step, b_i += rate * sign(mean load - load_i)
        using the load accumulated since the last update (all-reduce ``model.balance_load``
        across ranks before calling this in data-parallel runs). Returns the load used."""
        c = self.config
        if not (c.architecture == "mor" and c.router_type == "token" and c.balancing == "loss_free"):
            return None
        m = self.model
        load = m.balance_load.clone()
        if load.sum() > 0:
            m.balance_bias += c.balance_bias_rate * torch.sign(load.mean() - load)
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
