"""FLOPs: SPEC.md section 6 checks, and executed FLOPs against FlopCounterMode."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mor import MoRForCausalLM, preset
from mor.flops import executed_flops_per_token, paper_flops_per_token, tokens_for_budget


def test_paper_checks():
    v = preset("smollm-360m", "vanilla")
    assert paper_flops_per_token(v, 2048) / 1e6 == pytest.approx(833.6, abs=0.05)
    assert tokens_for_budget(v, 16.5e18, 2048) / 1e9 == pytest.approx(19.79, abs=0.01)
    m3, m2 = preset("smollm-360m", "mor", 3), preset("smollm-360m", "mor", 2)
    assert paper_flops_per_token(v) / paper_flops_per_token(m3) == pytest.approx(1.500, abs=5e-4)
    assert paper_flops_per_token(v) / paper_flops_per_token(m2) == pytest.approx(1.337, abs=5e-4)
    # recursive models run every layer on every token: same FLOPs as vanilla
    assert paper_flops_per_token(preset("smollm-360m", "recursive", 3)) == paper_flops_per_token(v)


def test_kv_sharing_formula_by_hand():
    c = preset("smollm-360m", "mor", 3, kv_mode="shared")
    d, f, N = 960, 2560, 2048
    full, nokv = 2 * (4 * d * d + 3 * d * f), 2 * (2 * d * d + 3 * d * f)
    want = 2 * (full + 2 * N * d) + 10 * (full + 2 * N * d)
    want += 10 * ((2 / 3) * nokv + (2 / 3) * 2 * N * d) + 10 * ((1 / 3) * nokv + (1 / 3) * 2 * N * d)
    assert paper_flops_per_token(c) == pytest.approx(want, rel=1e-12)


KINDS = [("vanilla", {}), ("recursive", {}), ("recursive", dict(kv_mode="shared")), ("mor", {}),
         ("mor", dict(kv_mode="shared")), ("mor", dict(router_type="token")),
         ("mor", dict(router_type="token", kv_mode="shared")),
         ("mor", dict(router_arch="wide_mlp", use_aux_router=True)), ("mor", dict(router_arch="mlp", num_recursions=2))]


@pytest.mark.parametrize("arch,kw", KINDS)
def test_executed_flops_match_flop_counter(arch, kw):
    cfg = preset("tiny", arch, **kw)
    torch.manual_seed(0)
    m = MoRForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2 and p.shape[0] < 8:  # decisive routers
                p.normal_(0, 0.5)
    T = 64
    x = torch.randint(0, cfg.vocab_size, (1, T))
    # the math backend decomposes attention into counted matmuls (the CPU flash kernel is not counted)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        out = m(x)
    counts = None
    if out.depth is not None:
        counts = [int((out.depth >= r + 1).sum()) for r in range(cfg.num_recursions)]
    ours = executed_flops_per_token(cfg, T, counts) * T
    assert ours == pytest.approx(fc.get_total_flops(), rel=0.05)
    if arch == "mor" and cfg.router_type == "expert":  # default counts are the capacities
        assert executed_flops_per_token(cfg, T) * T == pytest.approx(fc.get_total_flops(), rel=1e-9)
