"""Compiled CPU decode kernels (mor.engine.kernels, issue 17): each kernel against PyTorch /
the model's own modules, the bit-exactness they promise (a row's result does not depend on
the batch it runs in nor on the thread count), the engine running on them against the
engine on PyTorch ops, the fallback when they are unavailable, and the build cache."""

from __future__ import annotations

import os

import pytest
import torch
from torch.nn import functional as F

from mor.engine import kernels

if kernels.load() is None:
    pytest.skip(f"CPU kernels unavailable: {kernels.unavailable_reason()}", allow_module_level=True)

from helpers import V, build  # noqa: E402
from helpers import tiny as tiny_config  # noqa: E402
from mor.engine import Engine, SamplingParams  # noqa: E402
from mor.model import RMSNorm, apply_rope, rope_cos_sin  # noqa: E402

torch.set_default_dtype(torch.float32)

ROWS = (1, 2, 3, 4, 5, 8, 33)
SHAPES = [(7, 20), (257, 100), (64, 64), (16, 15), (33, 1), (192, 64), (9, 47)]  # (O, I): I % 16 != 0 too


def gen(seed):
    return torch.Generator().manual_seed(seed)


def weights(O, I, seed):
    """(O, I) weights scaled so that outputs are O(1)."""
    return torch.randn(O, I, generator=gen(seed)) * I ** -0.5


class threads:
    """``torch.set_num_threads(n)`` inside the block, the previous count restored after."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


# ------------------------------------------------------------------ linear algebra kernels
@pytest.mark.parametrize("O,I", SHAPES)
def test_linear_matches_torch(O, I):
    """``linear`` (with and without the residual) equals F.linear in fp32 for every batch size,
    including sizes that are not multiples of the 4-row tile or of the 16-wide vector."""
    w = weights(O, I, 1)
    for M in ROWS:
        x = torch.randn(M, I, generator=gen(M))
        r = torch.randn(M, O, generator=gen(100 + M))
        ref = F.linear(x, w)
        torch.testing.assert_close(kernels.linear(x, w), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kernels.linear(x, w, residual=r), r + ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("O,I", SHAPES)
def test_linear_silu_mul_matches_torch(O, I):
    """``linear_silu_mul`` equals silu(F.linear(x, g)) * F.linear(x, u)."""
    g, u = weights(O, I, 2), weights(O, I, 3)
    for M in ROWS:
        x = torch.randn(M, I, generator=gen(M))
        ref = F.silu(F.linear(x, g)) * F.linear(x, u)
        torch.testing.assert_close(kernels.linear_silu_mul(x, g, u), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("O,I", [(7, 20), (257, 100), (192, 64), (9, 47)])
def test_linear_rows_are_bit_exact_whatever_the_batch_and_threads(O, I):
    """Each output row of ``linear`` / ``linear_silu_mul`` is bit-identical (torch.equal) whether
    the row is computed alone, in any batch (any tile position) or with 1 or 2 threads."""
    w, g, u = weights(O, I, 4), weights(O, I, 5), weights(O, I, 6)
    r = torch.randn(33, O, generator=gen(7))
    x = torch.randn(33, I, generator=gen(8))
    with threads(1):
        full = kernels.linear(x, w, r)
        full_su = kernels.linear_silu_mul(x, g, u)
    for i in range(33):
        assert torch.equal(kernels.linear(x[i:i + 1].contiguous(), w, r[i:i + 1].contiguous())[0], full[i]), i
        assert torch.equal(kernels.linear_silu_mul(x[i:i + 1].contiguous(), g, u)[0], full_su[i]), i
    for a, b in [(0, 2), (1, 3), (5, 10), (30, 33)]:  # batches of 2, 2, 5 and 3 rows
        assert torch.equal(kernels.linear(x[a:b].contiguous(), w, r[a:b].contiguous()), full[a:b])
        assert torch.equal(kernels.linear_silu_mul(x[a:b].contiguous(), g, u), full_su[a:b])
    with threads(2):
        assert torch.get_num_threads() == 2
        assert torch.equal(kernels.linear(x, w, r), full)
        assert torch.equal(kernels.linear_silu_mul(x, g, u), full_su)
        assert torch.equal(kernels.linear(x[:1].contiguous(), w, r[:1].contiguous())[0], full[0])
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("D", [64, 20, 7, 1])
def test_rms_norm_matches_the_model_rmsnorm(D):
    """``rms_norm`` equals mor.model.RMSNorm (random weight, eps 1e-5 and 1e-6), row by row."""
    for eps in (1e-5, 1e-6):
        norm = RMSNorm(D, eps=eps)
        with torch.no_grad():
            norm.weight.normal_(generator=gen(D))
        for M in (1, 3, 8):
            x = torch.randn(M, D, generator=gen(M)) * 3
            torch.testing.assert_close(kernels.rms_norm(x, norm.weight.detach(), eps), norm(x).detach(),
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads,hd", [(4, 16), (2, 128), (3, 24)])
def test_rope_matches_apply_rope_in_place(heads, hd):
    """``rope_`` rotates x in place exactly as apply_rope with the rope_cos_sin tables, each row
    at its own position."""
    M = 6
    pos = torch.tensor([0, 1, 7, 31, 100, 255])
    cos, sin = rope_cos_sin(pos, hd, 10000.0, torch.float32)  # (1, 1, M, hd)
    cos, sin = cos.reshape(M, hd).contiguous(), sin.reshape(M, hd).contiguous()
    x = torch.randn(M, heads * hd, generator=gen(hd))
    ref = apply_rope(x.view(M, heads, hd), cos[:, None], sin[:, None]).reshape(M, heads * hd)
    y = kernels.rope_(x, heads, cos, sin)
    assert y.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)
    assert not torch.equal(x, torch.randn(M, heads * hd, generator=gen(hd)))  # really rotated


def test_kv_write_stores_rows_like_index_copy():
    """``kv_write`` puts K/V rows at the given physical cache rows, exactly as index_copy_ on
    the (rows, kv_heads, hd) view, and touches nothing else."""
    KV, hd, bs, nblocks = 2, 24, 4, 6
    g = gen(5)
    kc, vc = torch.randn(nblocks, bs, KV, hd, generator=g), torch.randn(nblocks, bs, KV, hd, generator=g)
    k, v = torch.randn(5, KV * hd, generator=g), torch.randn(5, KV * hd, generator=g)
    rows = torch.tensor([0, 23, 5, 6, 12], dtype=torch.int64)
    kr, vr = kc.clone(), vc.clone()
    kr.view(-1, KV, hd).index_copy_(0, rows, k.view(5, KV, hd))
    vr.view(-1, KV, hd).index_copy_(0, rows, v.view(5, KV, hd))
    kernels.kv_write(k, v, rows, kc, vc)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


# ------------------------------------------------------------------ paged attention
def paged_reference(q, H, KV, kc, vc, blocks, layer, qidx):
    """SDPA of each row's query over its keys 0..qidx gathered from the block table."""
    M, bs, hd = q.shape[0], kc.shape[1], kc.shape[3]
    outs = []
    for m in range(M):
        n = int(qidx[m]) + 1
        t = torch.arange(n)
        blk = blocks[m, t // bs, layer]
        k = kc[blk, t % bs].transpose(0, 1)  # (KV, n, hd)
        v = vc[blk, t % bs].transpose(0, 1)
        k, v = k.repeat_interleave(H // KV, 0), v.repeat_interleave(H // KV, 0)
        o = F.scaled_dot_product_attention(q[m].view(H, 1, hd), k, v)
        outs.append(o.reshape(H * hd))
    return torch.stack(outs)


def paged_case(H, KV, hd, bs, nb, layers, M, seed):
    g = gen(seed)
    num_blocks = M * nb * layers + 3
    kc = torch.randn(num_blocks, bs, KV, hd, generator=g)
    vc = torch.randn(num_blocks, bs, KV, hd, generator=g)
    blocks = torch.randperm(num_blocks, generator=g)[:M * nb * layers].view(M, nb, layers).contiguous()
    q = torch.randn(M, H * hd, generator=g) * 2
    n = nb * bs
    picks = [0, n - 1, bs // 2, min(n - 1, bs + bs // 2), min(n - 1, bs), n // 2 + 1]  # mid-block, last key
    qidx = torch.tensor([picks[m % len(picks)] for m in range(M)], dtype=torch.int64)
    return q, kc, vc, blocks, qidx


@pytest.mark.parametrize("H,KV,hd", [(4, 2, 128), (8, 2, 80), (4, 2, 24), (4, 1, 16), (4, 4, 8), (2, 1, 512)])
@pytest.mark.parametrize("bs,nb", [(1, 9), (4, 5), (16, 3), (32, 4), (256, 3)])
def test_paged_attention_matches_sdpa_on_gathered_blocks(H, KV, hd, bs, nb):
    """``paged_attention`` reading the paged cache through ``blocks[:, :, layer]`` equals SDPA on
    K/V gathered from the same block table (GQA, keys up to mid-block and the last key), for
    every layer of a (rows, nb, layers) table; 1 and 2 threads give identical results."""
    M, layers = 7, 3
    q, kc, vc, blocks, qidx = paged_case(H, KV, hd, bs, nb, layers, M, seed=hd + bs)
    results = []
    for layer in range(layers):
        out = torch.full((M, H * hd), float("nan"))
        kernels.paged_attention(q, H, KV, kc, vc, blocks, layer, qidx, out)
        ref = paged_reference(q, H, KV, kc, vc, blocks, layer, qidx)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
        results.append(out)
    assert not torch.allclose(results[0], results[1])  # the layers really read different blocks
    with threads(2):
        out = torch.empty(M, H * hd)
        kernels.paged_attention(q, H, KV, kc, vc, blocks, 1, qidx, out)
    assert torch.equal(out, results[1])
    one = torch.empty(1, H * hd)  # one row alone: bit-identical to its row in the batch
    kernels.paged_attention(q[3:4].contiguous(), H, KV, kc, vc, blocks[3:4].contiguous(), 1, qidx[3:4].clone(), one)
    assert torch.equal(one[0], results[1][3])


# ------------------------------------------------------------------ sampling
def torch_inverse_cdf(logits, temps, u):
    """The PyTorch sampler's rule (mor.engine.sampling): softmax(x / T), cumulative sum,
    right bisection at u * total."""
    cdf = torch.softmax(logits / temps[:, None], dim=-1).cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1).clamp(max=logits.size(1) - 1)


@pytest.mark.parametrize("V", [5, 16, 37, 1000, 8192])
def test_sample_greedy_is_the_first_argmax_and_draws_follow_the_inverse_cdf(V):
    g = gen(V)
    x = torch.randn(300, V, generator=g) * 3
    x[0, 1:3] = x[0].max() + 1  # a tie: the first index wins, as torch.argmax
    u = torch.rand(300, generator=g)
    greedy = kernels.sample(x, torch.zeros(300), u)
    assert torch.equal(greedy, x.argmax(-1)) and greedy[0] == 1
    for T in (1.0, 0.7, 2.5):
        temps = torch.full((300,), T)
        drawn = kernels.sample(x, temps, u)
        ref = torch_inverse_cdf(x, temps, u)
        # the same rule with the same numbers: equal but where u falls within rounding of a boundary
        assert (drawn == ref).float().mean() >= 0.99, (T, (drawn != ref).sum())


def test_sample_frequencies_follow_the_distribution_and_never_draw_masked_tokens():
    probs = torch.tensor([0.05, 0.45, 0.3, 0.0, 0.2] + [0.0] * 20)
    n = 40000
    logits = probs.log().expand(n, -1).contiguous()  # zero-probability tokens are -inf
    u = torch.rand(n, generator=gen(0))
    u[:50] = 1.0 - 2.0 ** -24  # the largest float below 1: the last possible token, never a masked one
    tok = kernels.sample(logits, torch.ones(n), u)
    freq = torch.bincount(tok, minlength=25).float() / n
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    assert set(tok[:50].tolist()) == {4}
    assert (probs[tok] > 0).all()
    hot = kernels.sample(logits, torch.full((n,), 0.5), u)  # temperature 0.5 squares and renormalises
    sq = probs ** 2 / (probs ** 2).sum()
    torch.testing.assert_close(torch.bincount(hot, minlength=25).float() / n, sq, atol=0.01, rtol=0)


def test_sample_rows_do_not_depend_on_the_batch_or_threads_and_nan_rows_are_skipped():
    x = torch.randn(33, 1000, generator=gen(3)) * 4
    temps = torch.rand(33, generator=gen(4)) + 0.2
    temps[5] = 0.0
    u = torch.rand(33, generator=gen(5))
    with threads(2):
        batch = kernels.sample(x, temps, u)
    with threads(1):
        alone = torch.cat([kernels.sample(x[i:i + 1].contiguous(), temps[i:i + 1], u[i:i + 1]) for i in range(33)])
    assert torch.equal(batch, alone)
    temps[7] = float("nan")
    out = kernels.sample(x, temps, u)
    assert out[7] == -1 and torch.equal(out[:7], batch[:7]) and torch.equal(out[8:], batch[8:])


def test_sample_never_fails_a_row_nan_tiny_temperatures_and_out_of_range_u():
    """Every row that is not skipped gets a token in [0, V): a NaN logit gives the first NaN
    (as torch.argmax); a temperature so small that x / T would overflow draws among the largest
    logits; u outside [0, 1) is clamped (u >= 1: the last possible token, never a masked one)."""
    x = torch.randn(4, 40, generator=gen(20))
    x[1, 7] = x[1, 30] = float("nan")
    x[2, 5] = x[2, 9] = 50.0  # two tied maxima
    x[3, 33:] = float("-inf")
    for T in (1.0, 1e-39, 0.0):
        out = kernels.sample(x, torch.full((4,), T), torch.tensor([0.3, 0.5, 0.99, 1.0]))
        assert out[1] == 7 and out[2] in (5, 9) and 0 <= out[0] < 40 and 0 <= out[3] < 33, (T, out)
    for u in (1.0, 1.5, 1e9, -0.5, float("nan")):
        out = kernels.sample(x[3:].contiguous(), torch.ones(1), torch.tensor([u]))
        assert 0 <= out[0] < 33, (u, out)
    assert kernels.sample(x[3:].contiguous(), torch.ones(1), torch.tensor([1.0]))[0] == 32
    with pytest.raises(ValueError, match="shape"):
        kernels.sample(x, torch.ones(3), torch.ones(4))


def test_sample_on_a_large_vocabulary_follows_the_exact_inverse_cdf():
    """V = 131072 (Llama-3 sized), flat and peaked rows, against the inverse CDF computed in
    float64: the same token in at least 99% of draws, and only ever a neighbour otherwise."""
    g = gen(21)
    x = torch.cat([torch.randn(100, 131072, generator=g) * 0.1, torch.randn(100, 131072, generator=g) * 4])
    u = torch.rand(200, generator=g)
    for T in (1.0, 50.0):
        p = torch.softmax(x.double() / T, dim=-1).cumsum(-1)
        ref = torch.searchsorted(p, (u.double() * p[:, -1])[:, None], right=True).squeeze(1).clamp(max=131071)
        got = kernels.sample(x, torch.full((200,), T), u)
        assert (got == ref).float().mean() >= 0.99, (T, int((got != ref).sum()))
        assert ((got - ref).abs() <= 1).float().mean() >= 0.995


def test_engine_sampling_on_kernels_follows_the_torch_rule():
    """``mor.engine.sampling.sample`` with the kernels: greedy, temperature and top-k / top-p rows
    in one batch, the same uniform numbers as the PyTorch sampler (same generator states)."""
    from mor.engine.sampling import sample

    x = torch.randn(64, 300, generator=gen(6)) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8),
              SamplingParams(temperature=1.2, top_k=5), SamplingParams(temperature=1.0, top_p=0.5)] * 16
    gens = [None] * 64
    a = sample(x, params, gens, gen(7))
    b = sample(x, params, gens, gen(7), kernels)
    assert (a == b).float().mean() >= 0.97
    assert torch.equal(a[0::4], x[0::4].argmax(-1)) and torch.equal(b[0::4], a[0::4])
    top5 = x[2::4].topk(5).indices
    assert all(int(t) in top5[i].tolist() for i, t in enumerate(b[2::4]))
    # per-request generators: each row draws from its own, so its token does not depend on the batch
    own = [torch.Generator().manual_seed(100 + i) for i in range(64)]
    c = sample(x, params, own, gen(8), kernels)
    one = sample(x[9:10], params[9:10], [torch.Generator().manual_seed(109)], gen(9), kernels)
    assert c[9] == one[0]


# ------------------------------------------------------------------ one whole decoder layer
@torch.no_grad()
def layer_reference(L, cfg, x, cos, sin, n_write, rows, kc, vc, blocks, j, qidx):
    """The model's decoder-layer modules on one token per row (x (M, D)), K/V of the first
    ``n_write`` rows stored at cache ``rows`` of kc / vc (in place), attention through
    ``paged_reference`` at layer ``j`` of ``blocks`` up to ``qidx``: the layer's output."""
    at = L.self_attn
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    M = x.shape[0]
    a = L.input_layernorm(x)
    q = apply_rope(at.q_proj(a).view(M, H, hd), cos[:, None], sin[:, None]).reshape(M, H * hd)
    if n_write:
        k = apply_rope(at.k_proj(a[:n_write]).view(n_write, KV, hd), cos[:n_write, None], sin[:n_write, None])
        kc.view(-1, KV, hd)[rows] = k
        vc.view(-1, KV, hd)[rows] = at.v_proj(a[:n_write]).view(n_write, KV, hd)
    o = paged_reference(q, H, KV, kc, vc, blocks, j, qidx[:, 0])
    h = x + at.o_proj(o)
    return h + L.mlp(L.post_attention_layernorm(h))


@pytest.mark.parametrize("nl", [0, 1, 3])
def test_decode_rows_gathers_addresses_and_updates_like_the_layers(nl):
    """``decode_rows`` (the engine's decode calls): each token's input gathered from the state
    rows of its slot, from the embedding of its token, or given; RoPE looked up by position; its
    K/V stored at its own group's entry and its attention reading its own group's blocks (groups
    differ per row) - equal to the model's layer modules on the gathered inputs; "store" and
    "gated" write the slot's state (h + g[slot] * y) and touch no other row; a subset of the
    tokens gives bit-identical rows (batch independence)."""
    import numpy as np

    cfg = tiny_config("vanilla", num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    model = build(cfg, seed=7)
    KV, hd, D = cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    G, S, MB, ML, bs, j0 = 2, 6, 3, 4, 4, 4 - max(nl, 1)
    g = gen(21)
    num_blocks = 1 + G * S * MB * ML
    table = (1 + torch.randperm(num_blocks - 1, generator=g)).view(G, S, MB, ML).numpy().copy()
    kc0, vc0 = torch.randn(num_blocks, bs, KV, hd, generator=g), torch.randn(num_blocks, bs, KV, hd, generator=g)
    state0 = torch.randn(S + 1, D, generator=g)
    embed = torch.randn(V, D, generator=g)
    cos_tab, sin_tab = (t.reshape(-1, hd).contiguous() for t in rope_cos_sin(torch.arange(MB * bs), hd, cfg.rope_theta,
                                                                               torch.float32))
    M, n_write = 5, 3
    slots = np.array([4, 0, 5, 2, 1])
    ints = np.zeros((len(kernels.ROW_FIELDS), M), dtype=np.int64)
    ints[0] = slots
    ints[1] = [9, 3, 11, 6, 0]  # positions
    ints[2, :n_write] = [1, 0, 1]  # write groups
    ints[3, :n_write] = [7, 2, 10]  # write entries
    ints[4] = [1, 0, 1, 0, 1]  # read groups
    ints[5] = [7, 2, 10, 5, 4]  # query indices (a writer reads up to its new entry)
    ints[6] = [3, 17, 8, 1, 30]  # tokens
    layers = [kernels.DecodeLayer(model.model.layers[u], cfg) for u in range(j0, j0 + nl)]
    ltable = torch.tensor([layer.row for layer in layers], dtype=torch.int64).reshape(nl, kernels.LAYER_ROW)
    dims = kernels.DecodeLayer(model.model.layers[0], cfg).dims
    work = torch.empty(dims.rows_work_floats(M, nl))
    gate = torch.rand(S + 1, generator=g)

    def reference(x):
        kr, vr = kc0.clone(), vc0.clone()
        pos = torch.as_tensor(ints[1])
        cos, sin = cos_tab[pos], sin_tab[pos]
        blocks = torch.as_tensor(table[ints[4], slots])  # (M, MB, ML): each row's own group
        qidx = torch.as_tensor(ints[5])[:, None]
        for i, u in enumerate(range(j0, j0 + nl)):
            w = table[ints[2, :n_write], slots[:n_write], ints[3, :n_write] // bs, j0 + i]
            rows = torch.as_tensor(w * bs + ints[3, :n_write] % bs)
            x = layer_reference(model.model.layers[u], cfg, x, cos, sin, n_write, rows, kr, vr, blocks, j0 + i, qidx)
        return x, kr, vr

    def run(mode, a=0, b=M, **kw):
        kc, vc, state = kc0.clone(), vc0.clone(), state0.clone()
        out = kernels.decode_rows(ltable, dims, ints, a, b, max(0, min(b, n_write) - a), state, cos_tab, sin_tab,
                                  table, kc, vc, j0, work, mode, **kw)
        return out, state, kc, vc

    x_state = state0[torch.as_tensor(slots)]
    ref, kr, vr = reference(x_state)
    out, state, kc, vc = run("out")
    torch.testing.assert_close(out, ref, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(kc, kr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vc, vr, atol=1e-5, rtol=1e-5)
    assert torch.equal(state, state0)  # "out" leaves the states alone
    assert torch.equal(kc, kc0) == (nl == 0 or n_write == 0)
    # inputs from the embedding, or given
    ref_e, _, _ = reference(embed[torch.as_tensor(ints[6])])
    torch.testing.assert_close(run("out", embed=embed)[0], ref_e, atol=5e-5, rtol=1e-4)
    given = torch.randn(M, D, generator=g)
    torch.testing.assert_close(run("out", x=given)[0], reference(given)[0], atol=5e-5, rtol=1e-4)
    # the slot's state: stored, or updated with the slot's gate; other rows untouched
    untouched = [s for s in range(S + 1) if s not in slots.tolist()]
    _, stored, _, _ = run("store")
    assert torch.equal(stored[torch.as_tensor(slots)], out) and torch.equal(stored[untouched], state0[untouched])
    _, gated, _, _ = run("gated", gate=gate)
    g_rows = gate[torch.as_tensor(slots)][:, None]
    torch.testing.assert_close(gated[torch.as_tensor(slots)], x_state + g_rows * out, atol=1e-6, rtol=1e-6)
    assert torch.equal(gated[untouched], state0[untouched])
    # a subset of the tokens: bit for bit the same rows (and any thread count)
    for nt in (1, 2):
        with threads(nt):
            part = run("out", 1, 4)[0]
        assert torch.equal(part, out[1:4])
    # the stack in one call: bit for bit its layers called one by one (outputs and K/V)
    if nl > 1:
        kc1, vc1, y = kc0.clone(), vc0.clone(), None
        for i, layer in enumerate(layers):
            one = torch.tensor([layer.row], dtype=torch.int64)
            y = kernels.decode_rows(one, dims, ints, 0, M, n_write, state0.clone(), cos_tab, sin_tab, table, kc1, vc1,
                                    j0 + i, work, "out", x=y)
        assert torch.equal(y, out) and torch.equal(kc1, kc) and torch.equal(vc1, vc)
    # no K/V writes (a recursion reading another's cache)
    kc2, vc2 = kc0.clone(), vc0.clone()
    out0 = kernels.decode_rows(ltable, dims, ints, 0, M, 0, state0.clone(), cos_tab, sin_tab, table, kc2, vc2, j0,
                               work, "out")
    assert torch.equal(kc2, kc0) and torch.equal(vc2, vc0)
    if nl == 0:
        assert torch.equal(out0, x_state)
    with pytest.raises(ValueError, match="mode"):
        run("gated")
    # every index is checked before anything is written
    for row, value, error, match in [(0, S, ValueError, "slot"), (1, MB * bs, ValueError, "position"),
                                     (6, V, ValueError, "token"), (2, G, ValueError, "write group"),
                                     (3, MB * bs, ValueError, "write group or entry"),
                                     (4, -1, ValueError, "read group"), (5, MB * bs, ValueError, "query index")]:
        if nl == 0 and row in (2, 3, 4, 5):
            continue
        bad = ints.copy()
        bad[row, 0] = value
        kc, vc, state = kc0.clone(), vc0.clone(), state0.clone()
        with pytest.raises(error, match=match):
            kernels.decode_rows(ltable, dims, bad, 0, M, n_write, state, cos_tab, sin_tab, table, kc, vc, j0, work,
                                "store", embed=embed if row == 6 else None)
        assert torch.equal(kc, kc0) and torch.equal(state, state0)
    if nl:
        unowned = table.copy()
        unowned[ints[2, 1], slots[1], ints[3, 1] // bs, j0] = 0  # the block row 1 writes into is not the sequence's
        with pytest.raises(RuntimeError, match="blocks a sequence owns"):
            kernels.decode_rows(ltable, dims, ints, 0, M, n_write, state0.clone(), cos_tab, sin_tab, unowned, kc0.clone(),
                                vc0.clone(), j0, work, "out")
    with pytest.raises(ValueError, match="work holds"):
        kernels.decode_rows(ltable, dims, ints, 0, M, n_write, state0.clone(), cos_tab, sin_tab, table, kc0.clone(),
                            vc0.clone(), j0, torch.empty(10), "out")
    with pytest.raises(ValueError, match="C-contiguous int64"):
        kernels.decode_rows(ltable, dims, ints[:, ::2], 0, 2, 0, state0.clone(), cos_tab, sin_tab, table,
                            kc0.clone(), vc0.clone(), j0, work, "out")
    # the engine's form: the fixed operands bound once (DecodeRows), then many calls - the same
    # results as the one-shot function, reading the bound tensors' current contents
    kc, vc, state = kc0.clone(), vc0.clone(), state0.clone()
    bound = kernels.DecodeRows(dims, state, cos_tab, sin_tab, table, kc, vc, embed=embed, gate=gate)
    assert torch.equal(bound(ltable, ints, 0, M, n_write, j0, "out"), out)
    assert torch.equal(kc, run("out")[2])
    from_embed = kernels.decode_rows(ltable, dims, ints, 1, 4, 0, state0, cos_tab, sin_tab, table, kc.clone(),
                                     vc.clone(), j0, work, "out", embed=embed)
    assert torch.equal(bound(ltable, ints, 1, 4, 0, j0, "out", embed=True), from_embed)
    state.mul_(2.0)  # an in-place update of a bound tensor is seen by the next call
    doubled = kernels.decode_rows(ltable, dims, ints, 0, M, 0, state0 * 2, cos_tab, sin_tab, table, kc.clone(),
                                  vc.clone(), j0, work, "out")
    assert torch.equal(bound(ltable, ints, 0, M, 0, j0, "out"), doubled)
    bound(ltable, ints, 0, M, 0, j0, "gated")
    torch.testing.assert_close(state[torch.as_tensor(slots)], 2 * x_state + g_rows * doubled, atol=1e-6, rtol=1e-6)
    plain = kernels.DecodeRows(dims, state0.clone(), cos_tab, sin_tab, table, kc0.clone(), vc0.clone())
    for kw, match in [(dict(mode="gated"), "needs a gate"), (dict(mode="out", embed=True), "embedding"),
                      (dict(mode="both"), "one of"), (dict(mode="out", j0=ML + 1), "within")]:
        with pytest.raises(ValueError, match=match):
            plain(ltable, ints, 0, M, 0, kw.pop("j0", j0), kw.pop("mode"), **kw)
    with pytest.raises(ValueError, match="x must be"):
        plain(ltable, ints, 0, M, 0, j0, "out", x=torch.zeros(M + 1, D))
    with pytest.raises(ValueError, match="state needs"):
        kernels.DecodeRows(dims, state0[:S].clone(), cos_tab, sin_tab, table, kc0, vc0)
    with pytest.raises(ValueError, match="k_cache"):
        kernels.DecodeRows(dims, state0.clone(), cos_tab, sin_tab, table, kc0.double(), vc0)


@pytest.mark.parametrize("func", ["sigmoid", "tanh", "softmax"])
def test_route_rows_equals_the_routers_and_gate(func):
    """``route_rows``: the decision logit of router ``dec_idx[m]`` and the gate
    alpha * act(logit of router ``gate_idx[m]``) written at the row's slot, for linear routers
    with and without a bias, equal to the routers' modules and ``routing.gate_scores``; a
    token's values do not depend on the other rows."""
    import numpy as np

    from mor.routing import Router, gate_scores

    D, S, alpha = 40, 7, 0.5
    torch.manual_seed(0)
    routers = [Router(D, 1) for _ in range(4)]
    for i, r in enumerate(routers):
        if i % 2:
            r.net = torch.nn.Linear(D, 1, bias=True)
    table, held = kernels.router_table([r.net for r in routers])
    state = torch.randn(S + 1, D, generator=gen(3))
    slots = np.array([6, 1, 3, 0, 2])
    gate_idx, dec_idx = np.array([0, 1, 2, 3, 1]), np.array([2, 3, 2, 1, 0])
    gate = torch.zeros(S + 1)
    decision = kernels.route_rows(state, slots, table, dec_idx, gate_idx, func, alpha, gate)
    with torch.no_grad():
        logits = torch.cat([r(state) for r in routers], dim=1)  # (S + 1, routers)
    st = torch.as_tensor(slots)
    torch.testing.assert_close(torch.as_tensor(decision), logits[st, torch.as_tensor(dec_idx)], atol=1e-5, rtol=1e-5)
    want = gate_scores(logits[st, torch.as_tensor(gate_idx)][:, None], func, alpha)[:, 0]
    torch.testing.assert_close(gate[st], want, atol=1e-6, rtol=1e-5)
    assert int((gate != 0).sum()) == len(slots)  # only the rows' slots
    alone = torch.zeros(S + 1)
    one = kernels.route_rows(state, slots[2:3], table, dec_idx[2:3], gate_idx[2:3], func, alpha, alone)
    assert one[0] == decision[2] and alone[slots[2]] == gate[slots[2]]
    no_gate = torch.zeros(S + 1)
    kernels.route_rows(state, slots, table, dec_idx, gate_idx, None, alpha, no_gate)
    assert not no_gate.any()
    # bad indices: a clear error before anything is written
    before = gate.clone()
    for bad_slots, bad_dec, match in [(np.array([0, S + 1]), dec_idx[:2], "slot"), (np.array([0, -1]), dec_idx[:2], "slot"),
                                      (slots[:2], np.array([0, 4]), "router index")]:
        with pytest.raises(ValueError, match=match):
            kernels.route_rows(state, bad_slots, table, bad_dec, gate_idx[:2], func, alpha, gate)
    assert torch.equal(gate, before)
    narrow, held2 = kernels.router_table([torch.nn.Linear(D - 1, 1)])
    with pytest.raises(ValueError, match="width"):
        kernels.route_rows(state, slots[:1], narrow, np.array([0]), np.array([0]), func, alpha, gate)
    with pytest.raises(ValueError, match="one-output"):
        kernels.router_table([torch.nn.Linear(D, 2)])
    with pytest.raises(ValueError, match="func"):
        kernels.route_rows(state, slots, table, dec_idx, gate_idx, "relu", alpha, gate)
    # bound once (RouteRows, the engine's form): repeated calls give the one-shot results, and
    # lists are taken as index arrays
    bound_gate = torch.zeros(S + 1)
    bound = kernels.RouteRows(state, table, func, alpha, bound_gate)
    for _ in range(2):
        assert np.array_equal(bound(slots, dec_idx, gate_idx), decision) and torch.equal(bound_gate, gate)
    assert np.array_equal(bound(slots.tolist(), dec_idx.tolist(), gate_idx.tolist()), decision)
    with pytest.raises(ValueError, match="decision and"):
        bound(slots, dec_idx[:2], gate_idx)
    with pytest.raises(ValueError, match="gate tensor"):
        kernels.RouteRows(state, table, func, alpha, None)
    del held, held2


# ------------------------------------------------------------------ the engine on the kernels
def tiny(arch="mor", **kw):
    """Untied embeddings: random models do not just repeat their input."""
    kw.setdefault("tie_word_embeddings", False)
    return tiny_config(arch, **kw)


def prompts(lengths, seed=3):
    g = gen(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


def count_kernel_layers(eng, monkeypatch):
    """A list that grows by one per decoder layer run on the kernels by a decode call (and by
    one per whole decode step run there)."""
    calls, fn, step = [], eng.runner._decode_rows, eng.runner.step_kernel
    monkeypatch.setattr(eng.runner, "_decode_rows", lambda us, *a, **kw: calls.extend([1] * len(us)) or fn(us, *a, **kw))
    if step is not None:
        monkeypatch.setattr(eng.runner, "step_kernel", lambda *a: calls.append(1) or step(*a))
    return calls


ENGINE_CASES = [
    ("vanilla", {}, "sequence"),
    ("recursive", {}, "depth"),
    ("mor", {}, "depth"),  # expert-choice
    ("mor", {}, "sequence"),
    ("mor", dict(router_type="token"), "depth"),
    ("mor", dict(kv_mode="shared"), "depth"),
    ("mor", dict(router_type="token", kv_mode="shared"), "sequence"),
    # Middle-Sequence sharing: a step's shared-block call splits into one run per unique layer
    ("mor", dict(sharing="middle_sequence", num_hidden_layers=8), "depth"),
    ("mor", dict(sharing="middle_sequence", num_hidden_layers=8, router_type="token", router_arch="mlp"), "depth"),
]


@pytest.mark.parametrize("arch,kw,schedule", ENGINE_CASES,
                         ids=["-".join([a, s] + [f"{k}={v}" for k, v in kw.items()]) for a, kw, s in ENGINE_CASES])
def test_engine_on_kernels_equals_engine_on_torch(arch, kw, schedule, monkeypatch):
    """Greedy decoding with ``cpu_kernels=True`` gives the same tokens and depths as with
    ``cpu_kernels=False`` (PyTorch ops), and logits within fp32 rounding; the kernels really
    ran decoder layers (and PyTorch ran none on the kernels). Prompts of 1, 6 and 13 tokens,
    and a batch of 2-, 1- and 2-token prompts (a one-token prefill with a padding row runs on
    the kernels too)."""
    model = build(tiny(arch, **kw), seed=1)
    params = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    depths = []
    for ps in (prompts((1, 6, 13)), prompts((2, 1, 2), seed=4)):
        outs = {}
        for on in (True, False):
            eng = Engine(model, max_batch=4, block_size=4, schedule=schedule, record_logits=True, cpu_kernels=on)
            assert eng.cpu_kernels is on
            calls = count_kernel_layers(eng, monkeypatch)
            for p in ps:
                eng.add_request(p, params)
            outs[on] = eng.run_until_done()
            assert (len(calls) > 0) is on
        for k, t in zip(outs[True], outs[False]):
            assert k.token_ids == t.token_ids and k.depths == t.depths
            torch.testing.assert_close(k.logits, t.logits, atol=2e-5, rtol=1e-4)
            depths += k.depths
    if arch == "mor":
        assert len(set(depths)) > 1, "routing should vary for this test to mean something"


STEP_CASES = [
    ("vanilla", {}, "sequence"),
    ("vanilla", {}, "depth"),
    ("recursive", {}, "depth"),
    ("recursive", {}, "sequence"),
    ("mor", {}, "depth"),  # expert-choice, recursion-wise caching
    ("mor", {}, "sequence"),
    ("mor", dict(kv_mode="shared"), "depth"),  # recursive KV sharing: only recursion 0 writes
    ("mor", dict(use_aux_router=True), "depth"),
    ("mor", dict(gate_combine="pass_through"), "depth"),
    ("mor", dict(sharing="cycle"), "depth"),  # no unique layers: no full cache group
    ("recursive", dict(sharing="cycle"), "sequence"),
    ("mor", dict(capacities=[0.5, 0.5, 0.25]), "depth"),  # recursion 0 decides: tokens leave at depth 0
    ("mor", dict(router_func="tanh", use_aux_router=True), "sequence"),
]


@pytest.mark.parametrize("arch,kw,schedule", STEP_CASES,
                         ids=["-".join([a, s] + [f"{k}={v}" for k, v in kw.items()]) for a, kw, s in STEP_CASES])
def test_step_kernel_equals_the_step_run_from_python(arch, kw, schedule):
    """The whole decode step as one kernels call (``kernels.DecodeStep``) is the runner's step
    run from Python (enter / decide / recurse / decide / finish on the same kernels), bit for
    bit: the same sampled tokens (temperature 1, seeded: the rows leave in the same order), the
    same depths, identical logits, the same K/V cache contents and the same statistics, with
    more requests than slots (slots are refilled mid-run)."""
    model = build(tiny(arch, **kw), seed=1)
    runs = {}
    for fused in (True, False):
        eng = Engine(model, max_batch=4, block_size=4, schedule=schedule, record_logits=True, seed=0)
        step, calls = eng.runner.step_kernel, []
        assert step is not None
        eng.runner.step_kernel = (lambda *a: calls.append(1) or step(*a)) if fused else None
        for p in prompts((1, 6, 13, 1, 3, 1), seed=5):
            eng.add_request(p, SamplingParams(max_tokens=9, temperature=1.0, ignore_eos=True))
        outs = eng.run_until_done()
        assert (len(calls) == eng.stats.steps) is fused  # every step ran as one call
        runs[fused] = (outs, eng.stats, eng.runner.cache.k.clone(), eng.runner.cache.v.clone())
    (a, sa, ka, va), (b, sb, kb, vb) = runs[True], runs[False]
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and x.depths == y.depths
        assert torch.equal(x.logits, y.logits)
    assert torch.equal(ka, kb) and torch.equal(va, vb)
    for field in ("steps", "generated_tokens", "recursion_tokens", "exit_counts", "block_calls", "block_tokens"):
        assert getattr(sa, field) == getattr(sb, field), field
    if arch == "mor":
        assert len({d for x in a for d in x.depths}) > 1, "routing should vary for this test to mean something"


@pytest.mark.parametrize("arch,kw", [("mor", dict(router_type="token")), ("mor", dict(sharing="middle_sequence",
                                                                                         num_hidden_layers=8)),
                                     ("mor", dict(router_arch="mlp"))])
def test_step_kernel_only_where_it_applies(arch, kw):
    """Token-choice routing, Sequence sharing (a different layer per recursion) and MLP routers
    run their decode step from Python (still on the kernels' decode calls)."""
    eng = Engine(build(tiny(arch, **kw), seed=1), max_batch=2, block_size=4)
    assert eng.cpu_kernels and eng.runner.step_kernel is None and eng.step_kernel is False


def test_step_kernel_rejects_bad_slots_before_writing():
    """A slot outside the state or a running recursion outside the model's: ValueError, with no
    count, state or cache entry changed."""
    import numpy as np

    eng = Engine(build(tiny("mor"), seed=1), max_batch=4, block_size=4)
    for p in prompts((1, 1, 1)):
        eng.add_request(p, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    eng.step()
    r = eng.runner
    state, written, k = r.h.clone(), r.written.copy(), r.cache.k.clone()
    sched = eng.scheduler
    one = np.array([0], dtype=np.int64)
    for enter, run, recs in [(np.array([4], dtype=np.int64), one[:0], one[:0]),
                             (one[:0], np.array([-1], dtype=np.int64), np.array([1], dtype=np.int64)),
                             (one[:0], one, np.array([r.num_recursions], dtype=np.int64))]:
        with pytest.raises(ValueError, match="slot outside"):
            r.step_kernel(enter, run, recs, sched.token, sched.position)
        assert torch.equal(r.h, state) and np.array_equal(r.written, written) and torch.equal(r.cache.k, k)
    with pytest.raises(ValueError, match="1-D int64"):
        r.step_kernel(one.astype(np.int32), one[:0], one[:0], sched.token, sched.position)
    with pytest.raises(ValueError, match="capacity"):
        r.step_kernel(np.arange(5, dtype=np.int64) % 4, one[:0], one[:0], sched.token, sched.position)
    with pytest.raises(ValueError, match="phases"):
        r.step_kernel(one, one[:0], one[:0], sched.token, sched.position, False, np.zeros(3)[::-1])
    assert torch.equal(r.h, state) and np.array_equal(r.written, written) and torch.equal(r.cache.k, k)
    # layers outside the block tables: refused when the step is built (and by the decode call)
    ML = r.pool.table_array.shape[3]
    args = (r._kcall, r._kroute, r._table(r.prefix), r._table(r.chunks[0]), r._table(r.suffix))
    rest = (r._rec_write, r._rec_read, r.needs_decision, r.layout.full, "gated", 0, r.pool.lens, r.written,
            r._embed, r.gate, r.core.norm.weight.detach(), r.core.norm.eps, r._lm_head, r.max_seqs)
    kernels.DecodeStep(*args, r.layout.num_prefix, *rest)
    with pytest.raises(ValueError, match="outside the block tables"):
        kernels.DecodeStep(*args, ML, *rest)
    work = torch.empty(r._kdims.rows_work_floats(1, 1))
    ints = r._token_ints(one, sched.position[one])
    # the C check behind the Python ones: layer ML of a group has no block table column
    err = kernels._library().mor_decode_rows(
        r._table([0]).data_ptr(), 1, None, None, ints.ctypes.data + 48, 0, r.h.data_ptr(), ints.ctypes.data, 1,
        *r._kdims, r._cos.data_ptr(), r._sin.data_ptr(), r._cos.shape[0], ints.ctypes.data + 8,
        r.pool.table_array.ctypes.data, *r.pool.table_array.shape, ints.ctypes.data + 16, ints.ctypes.data + 24, 0,
        ints.ctypes.data + 32, ints.ctypes.data + 40, ML, r.cache.k.data_ptr(), r.cache.v.data_ptr(),
        r.cache.k.shape[1], 0, None, work.data_ptr(), work.data_ptr(), 1)
    assert err == 7 and "layers" in kernels.DECODE_ROWS_ERRORS[err]


def test_step_kernel_failure_keeps_the_per_call_kernels():
    """A step kernel that cannot be built (here: a runner with more slots than its pool) leaves
    the per-call kernels running the step, saying why."""
    from mor.cache import make_pool
    from mor.engine.runner import ModelRunner

    cfg = tiny("mor")
    pool = make_pool(cfg, max_seqs=2, max_len=64, dtype=torch.float32, block_size=4)
    r = ModelRunner(build(cfg, seed=1), pool, 3)
    assert r.kernels is kernels and r.step_kernel is None and "gate" in r.step_kernel_obstacle


def test_engine_uses_kernels_by_default_on_cpu_fp32():
    """``cpu_kernels=None`` (default) picks the kernels for an fp32 CPU model."""
    eng = Engine(build(tiny("vanilla")), max_batch=2)
    assert eng.cpu_kernels is True and eng.runner.kernels is kernels and eng.step_kernel is True
    assert Engine(build(tiny("vanilla")), max_batch=2, cpu_kernels=False).step_kernel is False


BATCH_CASES = [  # (arch, config, schedule, max_batch, requests)
    ("vanilla", {}, "sequence", 3, 5),
    ("mor", {}, "depth", 3, 5),  # routers run on the kernels too: their decisions are batch-independent
    # more than 32 rows: PyTorch's vectorised sigmoid / GELU would round a tensor's tail
    # differently from its body (the runner pads the routing activations' rows)
    ("mor", {}, "depth", 40, 40),
    ("mor", dict(router_type="token", router_func="sigmoid", router_arch="mlp"), "depth", 40, 40),
]


@pytest.mark.parametrize("arch,kw,schedule,max_batch,n", BATCH_CASES,
                         ids=["vanilla", "mor", "mor-40", "mor-token-sigmoid-mlp-40"])
def test_kernels_batch_equals_alone_bit_exact(arch, kw, schedule, max_batch, n, monkeypatch):
    """With the kernels, a request's logits inside a mixed batch (requests at different
    positions, depths, and batch sizes that change as requests finish) are bit-identical
    (torch.equal) to the same request run alone. One-token prompts: every step runs on the
    kernels (multi-token prefill is PyTorch, batched with padding)."""
    model = build(tiny(arch, **kw), seed=1)
    ps = prompts((1,) * n, seed=11)
    lens = [3 + (5 * i) % 7 for i in range(n)]
    params = [SamplingParams(max_tokens=k, temperature=0, ignore_eos=True) for k in lens]

    def engine(max_batch):
        return Engine(model, max_batch=max_batch, schedule=schedule, block_size=4, record_logits=True,
                      cpu_kernels=True)

    eng = engine(max_batch)
    calls = count_kernel_layers(eng, monkeypatch)
    for p, sp in zip(ps, params):
        eng.add_request(p, sp)
    together = eng.run_until_done()
    assert calls and eng.stats.mean_running > min(1.5, 0.5 * max_batch)
    depths = []
    for i, (p, sp, o) in enumerate(zip(ps, params, together)):
        alone = engine(1)
        alone.add_request(p, sp)
        a = alone.run_until_done()[0]
        assert o.token_ids == a.token_ids and o.depths == a.depths, i
        diff = (o.logits - a.logits).abs().max(dim=-1).values
        assert torch.equal(o.logits, a.logits), f"request {i}: max |diff| per step {diff.tolist()}"
        depths += o.depths
    if arch == "mor":
        assert len(set(depths)) > 1


# ------------------------------------------------------------------ fallback and errors
def test_unavailable_kernels_fall_back_to_torch(monkeypatch):
    """When the kernels could not be built, ``Engine(model)`` runs on PyTorch and still
    generates the same tokens; ``cpu_kernels=True`` raises ValueError naming the reason."""
    model = build(tiny("mor"), seed=2)
    ps = prompts((1, 5))
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    ref = Engine(model, max_batch=2, block_size=4, cpu_kernels=False)
    for p in ps:
        ref.add_request(p, params)
    expected = [o.token_ids for o in ref.run_until_done()]
    monkeypatch.setattr(kernels, "_tried", True)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_reason", "no compiler on this test machine")
    assert not kernels.available() and kernels.unavailable_reason() == "no compiler on this test machine"
    eng = Engine(model, max_batch=2, block_size=4)
    assert eng.cpu_kernels is False and eng.runner.kernels is None
    for p in ps:
        eng.add_request(p, params)
    assert [o.token_ids for o in eng.run_until_done()] == expected
    with pytest.raises(ValueError, match="no compiler on this test machine"):
        Engine(model, max_batch=2, cpu_kernels=True)


def test_mor_cpu_kernels_env_disables_them(monkeypatch):
    """``MOR_CPU_KERNELS=0`` makes a fresh ``load()`` return None with that reason; the module
    state is restored afterwards (monkeypatch)."""
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_reason", None)
    monkeypatch.setenv("MOR_CPU_KERNELS", "0")
    assert kernels.load() is None
    assert "MOR_CPU_KERNELS" in kernels.unavailable_reason()
    assert Engine(build(tiny("vanilla")), max_batch=1).cpu_kernels is False


@pytest.mark.parametrize("how", ["bf16-model", "decode_precision=bf16", "block_size=512"])
def test_unsupported_engines_do_not_use_kernels(how):
    """A bf16 model, a bf16 decode copy or blocks larger than the attention kernel's buffers
    run on PyTorch automatically; ``cpu_kernels=True`` raises ValueError saying why."""
    model = build(tiny("vanilla", num_hidden_layers=2))
    kw, why = {}, {"bf16-model": "fp32", "decode_precision=bf16": "fp32", "block_size=512": "block_size"}[how]
    if how == "bf16-model":
        model = model.to(torch.bfloat16)
    elif how == "block_size=512":
        kw = dict(block_size=512)
    else:
        kw = dict(decode_precision=how.split("=")[1])
    eng = Engine(model, max_batch=1, **kw)
    assert eng.cpu_kernels is False
    eng.add_request([1, 2], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    assert len(eng.run_until_done()[0].token_ids) == 2
    with pytest.raises(ValueError, match=why):
        Engine(model, max_batch=1, cpu_kernels=True, **kw)


# ------------------------------------------------------------------ the build cache
def test_build_is_cached_and_not_recompiled(tmp_path, monkeypatch):
    """``build()`` compiles into ``$MOR_KERNEL_CACHE``; a second call returns the same file
    without running the compiler again (mtime unchanged, no compiler call); the library loads
    and has the kernels; no temporary files are left."""
    monkeypatch.setenv("MOR_KERNEL_CACHE", str(tmp_path / "cache"))
    path = kernels.build()
    assert path.parent == tmp_path / "cache" and path.suffix == ".so" and path.is_file()
    mtime = path.stat().st_mtime_ns

    def no_compiler(*a, **k):
        raise AssertionError("recompiled")

    monkeypatch.setattr(kernels.subprocess, "run", no_compiler)
    assert kernels.build() == path and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    import ctypes
    lib = ctypes.CDLL(str(path))
    assert all(hasattr(lib, name) for name in kernels.SIGNATURES)


def test_broken_compiler_raises_naming_it(tmp_path, monkeypatch):
    """A compiler that fails every flag set gives RuntimeError naming it (and no file in the
    cache); ``load()`` then returns None with that reason."""
    monkeypatch.setenv("MOR_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    with pytest.raises(RuntimeError, match="/bin/false could not build cpu_kernels.c"):
        kernels.build()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_reason", None)
    assert kernels.load() is None and "/bin/false" in kernels.unavailable_reason()


def test_missing_compiler(tmp_path, monkeypatch):
    """$CC naming no program is an error naming it (not a silent fallback); with no $CC and no
    compiler on the PATH ``build`` raises RuntimeError saying so."""
    monkeypatch.setenv("MOR_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no-such-cc"):
        kernels.build()
    monkeypatch.delenv("CC")
    monkeypatch.setattr(kernels.shutil, "which", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="no C compiler found"):
        kernels.build()
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("M", [1, 3, 7])
def test_linear_reads_bf16_weights_exactly_widened(M):
    """bf16 weights: the same products as fp32 weights holding the same (bf16) values, bit for
    bit (the widening is exact and the arithmetic is the same), for linear and silu_mul."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, 100, generator=g)
    w = torch.randn(37, 100, generator=g).to(torch.bfloat16)
    u = torch.randn(37, 100, generator=g).to(torch.bfloat16)
    assert torch.equal(kernels.linear(x, w), kernels.linear(x, w.float()))
    assert torch.equal(kernels.linear_silu_mul(x, w, u), kernels.linear_silu_mul(x, w.float(), u.float()))
    torch.testing.assert_close(kernels.linear(x, w), F.linear(x, w.float()), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="float16"):
        kernels.linear(x, w.to(torch.float16))


@pytest.mark.parametrize("M", [1, 5])
def test_linear_int8_weights_with_scales(M):
    """int8 weights: ``scale[o] * <x, q_o>`` (against PyTorch on the widened weights), the same
    row alone and in a batch bit for bit; a missing or misshaped scale is an error."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(M, 96, generator=g)
    q = torch.randint(-127, 128, (33, 96), generator=g).to(torch.int8)
    scale = torch.rand(33, generator=g) / 100
    ref = F.linear(x, q.float()) * scale
    torch.testing.assert_close(kernels.linear(x, q, scale=scale), ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(kernels.linear(x, q, scale=scale)[-1], kernels.linear(x[-1:].contiguous(), q, scale=scale)[0])
    u = torch.randint(-127, 128, (33, 96), generator=g).to(torch.int8)
    torch.testing.assert_close(kernels.linear_silu_mul(x, q, u, scale, scale),
                               F.silu(ref) * (F.linear(x, u.float()) * scale), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="scale"):
        kernels.linear(x, q)
    with pytest.raises(ValueError, match="scale"):
        kernels.linear(x, q, scale=scale[:5])


@pytest.mark.parametrize("arch", ["vanilla", "mor"])
def test_engine_int8_decode_on_kernels_equals_pytorch_int8(arch):
    """``decode_precision="int8"`` runs its weight-only int8 layers on the kernels (1 byte per
    weight) and generates what the PyTorch int8 path generates (same tokens, close logits)."""
    model = build(tiny(arch), seed=5)

    def run(kernels_on):
        eng = Engine(model, max_batch=3, block_size=4, record_logits=True, decode_precision="int8",
                     cpu_kernels=kernels_on)
        for p in prompts((1, 6, 3), seed=2):
            eng.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
        return eng, eng.run_until_done()

    eng, got = run(True)
    assert eng.cpu_kernels and eng.runner._klayers[0].wbf == 2 and eng.runner._klayers[0].tensors[2].dtype == torch.int8
    calls, fn = [], kernels.linear
    kernels.linear = lambda *a, **k: calls.append(1) or fn(*a, **k)
    try:
        ref_eng, ref = run(False)  # PyTorch int8 only: cpu_kernels=False reaches the Int8Linear layers too
    finally:
        kernels.linear = fn
    assert not ref_eng.cpu_kernels and not calls
    for a, b in zip(got, ref):
        assert a.token_ids == b.token_ids and a.depths == b.depths
        torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)


def test_mixed_or_odd_layers_fall_back_or_say_why():
    """A layer mixing int8 and fp32 projections, or RMSNorms with two epsilons, is not for the
    kernels: the default engine falls back to PyTorch (and still generates), ``cpu_kernels=True``
    raises naming the reason."""
    from mor.engine.quant import Int8Linear

    for change, why in ((lambda m: setattr(m.model.layers[0].self_attn, "q_proj",
                                           Int8Linear.from_linear(m.model.layers[0].self_attn.q_proj)),
                         "Int8Linear"),
                        (lambda m: setattr(m.model.layers[1].post_attention_layernorm, "eps", 1e-3), "epsilon")):
        model = build(tiny("mor"), seed=3)
        change(model)
        eng = Engine(model, max_batch=2)
        assert eng.cpu_kernels is False and why in eng.runner.kernel_obstacle
        eng.add_request([1, 2], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        assert len(eng.run_until_done()[0].token_ids) == 3
        with pytest.raises(ValueError, match=why):
            Engine(model, max_batch=2, cpu_kernels=True)


def test_cc_may_carry_arguments(tmp_path, monkeypatch):
    """``$CC`` is split like a shell command ("ccache gcc", "gcc -DX"); the whole command,
    flags included, is part of the cache key."""
    import shutil

    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no gcc")
    monkeypatch.setenv("MOR_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", f"{gcc} -DMOR_TEST_DEFINE=1")
    a = kernels.build()
    monkeypatch.setenv("CC", gcc)
    b = kernels.build()
    assert a != b and a.is_file() and b.is_file()


def test_llm_passes_cpu_kernels_and_decode_precision_to_its_engine():
    from mor.engine import LLM

    model = build(tiny("vanilla", num_hidden_layers=2))
    assert LLM(model, max_batch=2).engine.cpu_kernels is True
    assert LLM(model, max_batch=2, cpu_kernels=False).engine.cpu_kernels is False
    eng = LLM(model, max_batch=2, decode_precision="bf16-weights").engine
    assert eng.decode_precision == "bf16-weights" and eng.runner._klayers[0].wbf == 1


def test_a_damaged_cached_library_is_rebuilt(tmp_path, monkeypatch):
    """A cached library that cannot be opened (truncated, or missing a kernel) is compiled
    again once, instead of turning the kernels off for every later process."""
    monkeypatch.setenv("MOR_KERNEL_CACHE", str(tmp_path))
    path = kernels.build()
    path.write_bytes(b"\x7fELF truncated")
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_reason", None)
    assert kernels.load() is not None, kernels.unavailable_reason()
    assert path.stat().st_size > 1000


@pytest.mark.parametrize("on", [True, False], ids=["kernels", "torch"])
def test_engine_sees_in_place_router_updates(on):
    """In-place updates of the router parameters are seen: the same engine then routes like a
    fresh one (the kernels' routing reads the parameters' memory, as the decode layers do; the
    PyTorch path stacks the routers' weights at every call)."""
    model = build(tiny("mor"), seed=1)

    def run(eng):
        eng.add_request([5], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        return eng.run_until_done()[0].depths

    eng = Engine(model, max_batch=2, block_size=4, cpu_kernels=on)
    before = run(eng)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.mul_(-50.0)
    after = run(eng)
    assert after == run(Engine(model, max_batch=2, block_size=4, cpu_kernels=on)) and after != before
    for name, p in model.named_parameters():  # through .data: no version bump, still seen
        if "router" in name:
            p.data.mul_(-0.02)
    again = run(eng)
    assert again == run(Engine(model, max_batch=2, block_size=4, cpu_kernels=on)) == before
