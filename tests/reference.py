"""A slow, obvious reference implementation of the MoR forward for tests.

Every recursion runs on the FULL sequence with explicit boolean attention masks (which
query may see which key) and hand-written RMSNorm / RoPE / attention / SwiGLU math; tokens
that are not active keep their hidden state. Nothing is gathered or compacted, so it shares
no code path with ``mor.model`` except reading the weights (and calling the router
modules, which are plain linear maps / MLPs).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, theta):
    # x (B, H, T, hd), positions 0..T-1
    T, hd = x.shape[-2], x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def layer(cfg, L, x, allowed, active, kv=None):
    """One decoder layer on the full sequence. allowed: (B, T, T) query->key mask.
    Rows of inactive tokens are zeroed. Returns (out, (k, v))."""
    B, T, d = x.shape
    H, Hk, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    a = rms(x, L.input_layernorm.weight, cfg.rms_norm_eps)
    q = (a @ L.self_attn.q_proj.weight.T).view(B, T, H, hd).transpose(1, 2)
    q = rope(q, cfg.rope_theta)
    if kv is None:
        k = rope((a @ L.self_attn.k_proj.weight.T).view(B, T, Hk, hd).transpose(1, 2), cfg.rope_theta)
        v = (a @ L.self_attn.v_proj.weight.T).view(B, T, Hk, hd).transpose(1, 2)
    else:
        k, v = kv
    kr, vr = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
    s = (q @ kr.transpose(-1, -2)) / math.sqrt(hd)
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    o = (p @ vr).transpose(1, 2).reshape(B, T, H * hd) @ L.self_attn.o_proj.weight.T
    h = x + o
    m = rms(h, L.post_attention_layernorm.weight, cfg.rms_norm_eps)
    mlp = (functional.silu(m @ L.mlp.gate_proj.weight.T) * (m @ L.mlp.up_proj.weight.T)) @ L.mlp.down_proj.weight.T
    out = torch.where(active[..., None], h + mlp, torch.zeros_like(h))
    return out, (k, v)


def reference_forward(model, ids, routing="topk"):
    """Logits (B, T, V) and per-token depth (B, T) of the reference computation."""
    cfg = model.config
    m = model.model
    B, T = ids.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(B, T, T)
    everyone = torch.ones(B, T, dtype=torch.bool)
    h = m.embed_tokens.weight[ids]
    prefix, chunks, suffix = cfg.structure()
    for u in prefix:
        h, _ = layer(cfg, m.layers[u], h, causal, everyone)
    depth = torch.zeros(B, T, dtype=torch.long)
    shared = cfg.kv_mode == "shared"
    store = []
    if chunks and cfg.architecture == "mor" and cfg.router_type == "token":
        logits = m.router(h)
        if cfg.router_func == "softmax":
            probs = torch.softmax(logits, -1)
        else:
            probs = torch.sigmoid(logits)
        choice = (probs + m.balance_bias).argmax(-1)
        tok_depth = choice + 1
        g = (cfg.router_alpha * probs).gather(-1, choice[..., None])
        h1 = h
    cand = everyone
    for r in range(len(chunks)):
        if cfg.architecture == "recursive":
            sel = everyone
        elif cfg.router_type == "token":
            sel = tok_depth >= r + 1
        else:
            logits_r = m.routers[r](h).squeeze(-1)
            dec = m.aux_routers[r](h).squeeze(-1) if cfg.use_aux_router else logits_r
            cap = cfg.resolved_capacities()[r]
            if routing == "topk":
                k = max(1, int(cap * T))
                idx = logits_r.masked_fill(~cand, float("-inf")).topk(k, dim=1).indices
                sel = torch.zeros(B, T, dtype=torch.bool).scatter(1, idx, True)
            else:
                sel = cand & (dec > 0) if cap < 1.0 else cand
            gate = cfg.router_alpha * (torch.sigmoid(logits_r) if cfg.router_func == "sigmoid" else torch.tanh(logits_r))
        if shared and r > 0:
            allowed = sel[:, :, None] & causal
        else:
            allowed = sel[:, :, None] & sel[:, None, :] & causal
        x = h
        for j, u in enumerate(chunks[r]):
            x, kv = layer(cfg, m.layers[u], x, allowed, sel, kv=store[j] if (shared and r > 0) else None)
            if shared and r == 0:
                store.append(kv)
        # The update, written from the paper (section 2.2) with f(H^r) = x, the shared block's
        # output (which includes the block's own residual stream, as in the released code).
        if cfg.architecture == "recursive" or cfg.gate_combine == "pass_through":
            new = x  # H^{r+1} = f(H^r)
        elif cfg.router_type == "expert":
            new = gate[..., None] * x + h  # eq. 2.1: H^{r+1} = g^r f(H^r) + H^r (selected tokens)
        else:
            # eq. 2.2: H^{r+1} = g f(H^r) + H^1 at the assigned depth (r = i), g f(H^r) before
            # it; the released code (the default) continues with f(H^r) before it
            at_assigned_depth = (tok_depth == r + 1)[..., None]
            before = g * x if cfg.gate_every_recursion else x
            new = torch.where(at_assigned_depth, g * x + h1, before)
        h = torch.where(sel[..., None], new, h)
        depth += sel.long()
        cand = sel
    for u in suffix:
        h, _ = layer(cfg, m.layers[u], h, causal, everyone)
    h = rms(h, m.norm.weight, cfg.rms_norm_eps)
    return h @ model.lm_head.weight.T, depth
