"""Model behaviour against independent references (issue: the MoR model family)."""

from __future__ import annotations


import pytest
import torch

from mor import MoRForCausalLM, preset
from mor.config import ModelConfig
from helpers import build, tiny
from reference import reference_forward

torch.set_default_dtype(torch.float32)
TOL = dict(atol=2e-5, rtol=1e-4)


def ids(B=3, T=24, V=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


MOR_VARIANTS = [
    dict(),
    dict(kv_mode="shared"),
    dict(sharing="cycle", num_hidden_layers=9),
    dict(sharing="sequence", num_hidden_layers=9),
    dict(sharing="middle_sequence"),
    dict(router_arch="mlp", router_func="tanh"),
    dict(num_recursions=2, capacities=[1.0, 0.4]),
    dict(num_recursions=4, num_hidden_layers=10, capacities=[0.9, 0.7, 0.5, 0.2]),
    dict(use_aux_router=True),
    dict(router_type="token"),
    dict(router_type="token", kv_mode="shared", router_func="softmax"),
    dict(router_type="token", gate_every_recursion=True),
    dict(router_type="token", sharing="cycle", num_hidden_layers=9, balancing="loss_free"),
]


@pytest.mark.parametrize("kw", MOR_VARIANTS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_compacted_equals_full_length_reference(kw):
    cfg = tiny("mor", **kw)
    m = build(cfg, router_std=0.5)
    if cfg.router_type == "token":
        m.model.balance_bias.copy_(torch.linspace(-0.05, 0.05, cfg.num_recursions))
    x = ids()
    modes = ["topk", "threshold"] if cfg.router_type == "expert" else ["topk"]
    for mode in modes:
        with torch.no_grad():
            out = m(x, routing=mode)
            ref_logits, ref_depth = reference_forward(m, x, routing=mode)
        assert torch.equal(out.depth, ref_depth), mode
        torch.testing.assert_close(out.logits, ref_logits, **TOL)


@pytest.mark.parametrize("kw", [dict(), dict(kv_mode="shared")])
def test_recursive_matches_reference_and_unrolled_vanilla(kw):
    cfg = tiny("recursive", **kw)
    m = build(cfg, router_std=None)
    x = ids()
    with torch.no_grad():
        out = m(x).logits
        ref, _ = reference_forward(m, x)
    torch.testing.assert_close(out, ref, **TOL)
    if cfg.kv_mode == "recursion_wise":
        # vanilla model whose L layers are copies of the unique layer each unrolled layer uses
        van = build(tiny("vanilla", num_hidden_layers=cfg.num_hidden_layers), router_std=None)
        sd = {k: v for k, v in m.state_dict().items() if not k.startswith("model.layers.")}
        for l, u in enumerate(cfg.layer_map()):
            for k, v in m.model.layers[u].state_dict().items():
                sd[f"model.layers.{l}.{k}"] = v
        van.load_state_dict(sd)
        with torch.no_grad():
            torch.testing.assert_close(van(x).logits, out, **TOL)


@pytest.mark.parametrize("sharing", ["middle_cycle", "cycle", "sequence", "middle_sequence"])
@pytest.mark.parametrize("kv_mode", ["recursion_wise", "shared"])
def test_full_capacity_pass_through_mor_equals_recursive(sharing, kv_mode):
    L = 8 if sharing.startswith("middle") else 9
    rec = build(tiny("recursive", sharing=sharing, num_hidden_layers=L, kv_mode=kv_mode), router_std=None)
    mor = build(tiny("mor", sharing=sharing, num_hidden_layers=L, kv_mode=kv_mode,
                     capacities=[1.0, 1.0, 1.0], gate_combine="pass_through"), seed=5, router_std=None)
    missing, unexpected = mor.load_state_dict(rec.state_dict(), strict=False)
    assert unexpected == [] and all("router" in k for k in missing)
    x = ids()
    with torch.no_grad():
        for mode in ("topk", "threshold"):
            torch.testing.assert_close(mor(x, routing=mode).logits, rec(x).logits, **TOL)


def test_expert_choice_keeps_exactly_k_nested_sorted():
    cfg = tiny("mor", num_recursions=4, num_hidden_layers=10)
    m = build(cfg, router_std=0.5)
    B, T = 4, 37
    x = ids(B, T)
    out = m(x)
    caps = cfg.resolved_capacities()
    prev = None
    for r, sel in enumerate(out.selected):
        k = max(1, int(caps[r] * T))
        if sel is None:
            assert k == T
            sel = torch.arange(T).expand(B, T)
        assert sel.shape == (B, k)
        assert torch.all(sel[:, 1:] > sel[:, :-1]), "indices must be sorted and unique"
        if prev is not None:
            for b in range(B):
                assert set(sel[b].tolist()) <= set(prev[b].tolist()), "hierarchical filtering"
        prev = sel
    for r in range(cfg.num_recursions):
        assert torch.all((out.depth >= r + 1).sum(1) == max(1, int(caps[r] * T)))
    frac = out.router_stats["selected_fraction"]
    torch.testing.assert_close(frac, torch.tensor([max(1, int(c * T)) / T for c in caps]))


def test_token_choice_depth_is_router_argmax():
    cfg = tiny("mor", router_type="token", router_func="softmax")
    m = build(cfg, router_std=0.5)
    m.model.balance_bias.copy_(torch.tensor([0.0, 0.3, -0.2]))
    x = ids(4, 30)
    with torch.no_grad():
        out = m(x)
        # independent: hidden state entering recursion 1 = embedding through the first unique layer
        h = m.model.embed_tokens(x)
        from reference import layer as ref_layer
        causal = torch.ones(30, 30, dtype=torch.bool).tril()[None].expand(4, 30, 30)
        h1, _ = ref_layer(cfg, m.model.layers[0], h, causal, torch.ones(4, 30, dtype=torch.bool))
        probs = torch.softmax(m.model.router(h1), -1)
        want = (probs + m.model.balance_bias).argmax(-1) + 1
    assert torch.equal(out.depth, want)
    load = torch.bincount(want.flatten() - 1, minlength=3).float()
    torch.testing.assert_close(out.router_stats["depth_load"], load)
    torch.testing.assert_close(out.router_stats["max_violation"], (load.max() - load.mean()) / load.mean())


CAUSAL_VARIANTS = [
    ("mor", dict(router_type="token"), "topk"),
    ("mor", dict(router_type="token", kv_mode="shared"), "topk"),
    ("mor", dict(), "threshold"),
    ("mor", dict(kv_mode="shared"), "threshold"),
    ("mor", dict(use_aux_router=True), "threshold"),
    ("recursive", dict(), "topk"),
    ("vanilla", dict(), "topk"),
]


@pytest.mark.parametrize("arch,kw,mode", CAUSAL_VARIANTS)
def test_causality(arch, kw, mode):
    m = build(tiny(arch, **kw), router_std=0.5)
    x = ids(2, 32)
    y = x.clone()
    t = 17
    y[:, t + 1:] = (y[:, t + 1:] + 7) % 97
    with torch.no_grad():
        a, b = m(x, routing=mode), m(y, routing=mode)
    torch.testing.assert_close(a.logits[:, : t + 1], b.logits[:, : t + 1], atol=1e-6, rtol=1e-6)
    if a.depth is not None:
        assert torch.equal(a.depth[:, : t + 1], b.depth[:, : t + 1])


def test_topk_routing_is_not_causal():
    """The reason the threshold rule exists: top-k over the sequence leaks the future."""
    m = build(tiny("mor"), router_std=1.0)
    x = ids(1, 32)
    changed = 0
    for s in range(5):
        y = x.clone()
        y[:, 20:] = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(s))
        with torch.no_grad():
            changed += int(not torch.equal(m(x).depth[:, :20], m(y).depth[:, :20]))
    assert changed > 0


def _grads(m, loss):
    m.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("kw", [dict(), dict(kv_mode="shared"), dict(router_type="token"),
                                dict(router_type="token", balancing="loss_free", router_func="softmax"),
                                dict(router_arch="wide_mlp")])
def test_gradients_reach_every_parameter(kw):
    cfg = tiny("mor", **kw)
    m = build(cfg, router_std=None).train()
    x = ids(2, 24)
    out = m(x, labels=torch.roll(x, -1, 1))
    grads = _grads(m, out.loss)
    for n, g in grads.items():
        assert g is not None and g.abs().sum() > 0, f"no gradient for {n}"


def test_aux_router_learns_only_through_its_own_loss():
    cfg = tiny("mor", use_aux_router=True)
    m = build(cfg, router_std=None).train()
    x = ids(2, 24)
    out = m(x, labels=torch.roll(x, -1, 1))
    g_lm = _grads(m, out.lm_loss)
    for n, g in g_lm.items():
        if "aux_routers" in n:
            assert g is None or g.abs().sum() == 0, n
        else:
            assert g is not None and g.abs().sum() > 0, n
    g_aux = _grads(m, out.aux_losses["aux_router_bce"])
    for n, g in g_aux.items():
        if "aux_routers" in n:
            assert g is not None and g.abs().sum() > 0, n
        else:
            assert g is None or g.abs().sum() == 0, n
    assert "router_bce" not in out.aux_losses


def test_aux_losses_match_definitions():
    cfg = tiny("mor", z_loss_coeff=1e-3)
    m = build(cfg, router_std=0.3)
    x = ids(2, 20)
    out = m(x)
    # BCE recomputed from the reference routing: the selected set at r is depth >= r+1 and
    # the candidates at r are depth >= r; the router logits are captured with hooks
    _, depth = reference_forward(m, x)
    with torch.no_grad():
        total_bce, total_z = 0.0, 0.0
        entered = []
        hooks = [r.register_forward_hook(lambda mod, inp, o: entered.append(o.squeeze(-1)))
                 for r in m.model.routers]
        m(x)
        for hk in hooks:
            hk.remove()
        for r, lg in enumerate(entered):
            target = (depth >= r + 1)
            cand = (depth >= r) if r > 0 else torch.ones_like(target)
            tgt = target[cand].view(2, -1).float()
            total_bce += torch.nn.functional.binary_cross_entropy_with_logits(lg, tgt)
            total_z += (lg ** 2).mean()
    torch.testing.assert_close(out.aux_losses["router_bce"], 1e-3 * total_bce)
    torch.testing.assert_close(out.aux_losses["z_loss"], 1e-3 * total_z)


def test_loss_free_bias_update():
    cfg = tiny("mor", router_type="token", balancing="loss_free")
    m = build(cfg, router_std=0.5).train()
    x = ids(4, 24)
    out = m(x)
    load = out.router_stats["depth_load"].clone()
    assert torch.equal(m.model.balance_load, load)
    used = m.update_balance_bias()
    assert torch.equal(used, load)
    want = 0.001 * torch.sign(load.mean() - load)
    torch.testing.assert_close(m.model.balance_bias, want)
    assert m.model.balance_load.sum() == 0
    assert "balance" not in out.aux_losses


def test_shared_layers_exist_once():
    cfg = tiny("mor", num_recursions=3)  # 8 layers, middle-cycle: 1 + 2 + 1 unique
    m = build(cfg, router_std=None)
    assert len(m.model.layers) == cfg.num_unique_layers == 4
    ptrs = [p.data_ptr() for p in m.parameters()]
    assert len(ptrs) == len(set(ptrs))
    keys = [k for k in m.state_dict() if k.startswith("model.layers.")]
    assert {int(k.split(".")[2]) for k in keys} == {0, 1, 2, 3}
    assert cfg.layer_map() == [0, 1, 2, 1, 2, 1, 2, 3]
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("arch,nr,want", [("vanilla", 1, 315), ("mor", 2, 167), ("mor", 3, 118), ("mor", 4, 98),
                                          ("recursive", 3, 118)])
def test_paper_parameter_counts(arch, nr, want):
    cfg = preset("smollm-360m", arch, nr)
    if nr == 4:
        assert cfg.num_hidden_layers == 34
    with torch.device("meta"):
        m = MoRForCausalLM(cfg)
    assert round(m.num_parameters() / 1e6) == want
    if arch == "mor":
        assert m.router_parameters() == nr * 960
        assert m.num_parameters(include_routers=True) == m.num_parameters() + nr * 960


def test_paper_135m_vanilla_count():
    with torch.device("meta"):
        m = MoRForCausalLM(preset("smollm-135m", "vanilla"))
    assert round(m.num_parameters() / 1e6) == 106


def test_layer_maps_match_spec():
    def cfg(sharing, L=9, nr=3):
        return ModelConfig(architecture="recursive", sharing=sharing, num_hidden_layers=L, num_recursions=nr,
                           hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)
    assert cfg("cycle").layer_map() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert cfg("sequence").layer_map() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert cfg("middle_cycle", 8, 3).layer_map() == [0, 1, 2, 1, 2, 1, 2, 3]
    assert cfg("middle_sequence", 8, 3).layer_map() == [0, 1, 1, 1, 2, 2, 2, 3]
    assert cfg("middle_cycle", 32, 3).num_unique_layers == 12


def test_training_output_fields():
    m = build(tiny("mor"), router_std=None).train()
    x = ids(2, 16)
    out = m(x, labels=torch.roll(x, -1, 1))
    assert out.logits.shape == (2, 16, 97)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    for k in ("selected_fraction", "dead_token_ratio", "sampling_accuracy", "router_entropy"):
        assert k in out.router_stats
    assert out.loss.isfinite()


def test_capacity_warmup_follows_optimizer_step():
    cfg = tiny("mor", capacity_warmup_steps=10)
    m = build(cfg, router_std=0.5)
    x = ids(2, 30)
    m.set_step(0)
    assert torch.all(m(x).depth == 3)  # warm-up starts at capacity 1
    m.set_step(5)
    want = [max(1, int(c * 30)) for c in [1.0, 2 / 3 + (1 / 3) * 0.5, 1 / 3 + (2 / 3) * 0.5]]
    assert [int((m(x).depth[0] >= r + 1).sum()) for r in range(3)] == want
    m.set_step(10)
    assert [int((m(x).depth[0] >= r + 1).sum()) for r in range(3)] == [30, 20, 10]


def test_threshold_routing_ignores_capacity_warmup():
    """A checkpoint trained with warm-up is loaded at step 0; its causal rule must use the final
    capacities, not route every token through every recursion."""
    warm = build(tiny("mor", capacity_warmup_steps=10), router_std=0.5)
    plain = build(tiny("mor"), router_std=0.5)
    x = ids(2, 30)
    warm.set_step(0)
    with torch.no_grad():
        torch.testing.assert_close(warm(x, routing="threshold").logits, plain(x, routing="threshold").logits)
