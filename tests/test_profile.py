"""Decode-step profiling (mor.engine.profile, `mor bench infer --profile`): the phases and
op kinds account for the step time, the op classification counts the model's real matmuls,
and profiling does not change what the engine generates. No wall-clock assertions."""

from __future__ import annotations

import pytest
import torch

from helpers import V, build, tiny
from mor import preset
from mor.engine import Engine, SamplingParams
from mor.engine.profile import OP_KINDS, PHASES, TOP_OPS, op_kind, profile_engine


def _engine(model, batch=3, max_tokens=40, temperature=0.0, seed=0, cpu_kernels=None):
    eng = Engine(model, max_batch=batch, max_model_len=64, seed=seed, cpu_kernels=cpu_kernels)
    for i in range(batch):
        eng.add_request([1 + i, 2, 3], SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                      ignore_eos=True))
    return eng


def test_op_kind_classification():
    assert op_kind("aten::mm") == op_kind("aten::addmm") == op_kind("aten::_weight_int8pack_mm") == "matmul"
    assert op_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert op_kind("aten::index_select") == op_kind("aten::index_copy_") == "kv_copy"
    assert op_kind("aten::mul") == op_kind("aten::rsqrt") == "other_ops"
    assert op_kind("ampere_sgemm_128x64_tn") == "matmul"


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "cpu-kernels"])
@pytest.mark.parametrize("arch", ["vanilla", "mor"])
def test_profile_phases_and_ops_sum_to_step_time(arch, kernels):
    model = build(tiny(arch, num_hidden_layers=4) if arch == "vanilla" else preset("tiny", arch, 2, vocab_size=V, num_hidden_layers=4))
    eng = _engine(model, cpu_kernels=kernels)
    for _ in range(4):  # admit and prefill: steady decode afterwards
        eng.step()
    p = profile_engine(eng, steps=6)
    assert set(p.phases_s) == set(PHASES) and set(p.ops_s) == set(OP_KINDS)
    assert sum(p.phases_s.values()) == pytest.approx(p.step_s, rel=1e-9)
    assert sum(p.ops_s.values()) == pytest.approx(p.profiled_step_s, rel=1e-9)
    assert all(v >= 0 for k, v in p.phases_s.items() if k != "other")
    assert p.phases_s["other"] > -1e-4 and all(v >= 0 for k, v in p.ops_s.items() if k != "host")
    assert p.phases_s["prefill"] == 0.0  # steady decode: no prompt in the profiled steps
    if arch == "vanilla":
        assert p.phases_s["block"] == 0.0 and p.phases_s["enter"] > 0
        assert p.tokens_per_step == 3  # every sequence emits a token every step
    else:
        assert p.phases_s["block"] > 0
    assert p.ops_s["matmul"] > 0 and p.ops_s["attention"] > 0 and p.ops_s["kv_copy"] > 0
    assert sum(p.shares("phases").values()) == pytest.approx(1.0)
    times = [t for _, t in p.top_ops.values()]  # the most expensive ops, named
    assert 0 < len(times) <= TOP_OPS and times == sorted(times, reverse=True) and sum(times) <= p.profiled_step_s
    assert all(n > 0 for n, _ in p.top_ops.values())
    if not kernels:
        assert any(op_kind(name) == "matmul" for name in p.top_ops)
    if kernels:  # the compiled layers' own clocks fill the kinds; their sum is inside the step
        from mor.engine.kernels import PROFILE_PHASES

        assert set(p.kernel_phases_s) == set(PROFILE_PHASES)
        assert all(p.kernel_phases_s[k] > 0 for k in ("qkv", "attention", "gate_up", "down", "linear"))
        assert sum(p.kernel_phases_s.values()) < p.profiled_step_s
    else:
        assert p.kernel_phases_s == {}


def test_profile_counts_the_model_matmuls_and_attention_calls():
    """A vanilla decode step runs 7 projections per layer plus the LM head as matmuls and one
    attention call per layer: the profile's op counts must say exactly that."""
    L = 3
    model = build(tiny("vanilla", num_hidden_layers=L, tie_word_embeddings=False))
    eng = _engine(model, batch=2, cpu_kernels=False)  # PyTorch ops (the kernels are not aten ops)
    for _ in range(3):
        eng.step()
    p = profile_engine(eng, steps=4)
    assert p.op_calls["matmul"] == 7 * L + 1
    assert p.op_calls["attention"] == L


@pytest.mark.parametrize("arch", ["vanilla", "mor"])
def test_profiling_does_not_change_generation(arch):
    cfg = tiny(arch, num_hidden_layers=4) if arch == "vanilla" else preset("tiny", arch, 3, vocab_size=V, num_hidden_layers=5)
    model = build(cfg)

    def run(profiled: bool) -> list[list[int]]:
        eng = _engine(model, max_tokens=12, temperature=1.0, seed=5)
        if profiled:
            profile_engine(eng, steps=3)  # 6 steps: no request finishes inside
        return [o.token_ids for o in eng.run_until_done()]

    assert run(True) == run(False)


def test_bench_infer_profile_reports_phases_and_roofline(capsys):
    from mor.cli import main
    import json

    rc = main(["bench", "infer", "--preset", "tiny", "--recursions", "2", "--mean-len", "6", "--batch", "2",
               "--skip-max", "--hf", "none", "--calib-seqs", "2", "--threads", "1", "--profile",
               "--profile-steps", "3"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    s = json.loads(out[-1])
    prof = s["profile"]
    assert prof["peak_gflops_per_s"] > 0 and prof["bandwidth_gb_per_s"] > 0
    rows = {(r["model"], r["setting"]): r for r in prof["rows"]}
    assert set(rows) == {("vanilla-8L", "1"), ("MoR-2", "1"), ("vanilla-8L", "batch"), ("MoR-2", "batch")}
    for r in rows.values():
        assert sum(r["phase_shares"].values()) == pytest.approx(1.0)
        assert sum(r["op_shares"].values()) == pytest.approx(1.0)
        assert r["tokens_per_s"] > 0 and 0 < r["of_roofline"]
    m = rows[("MoR-2", "batch")]
    assert m["flop_ratio"] > 1 and m["kv_ratio"] > 1 and m["roofline_speedup"] > 0
    # the speed-up is against the vanilla run paired (interleaved) with this MoR run
    assert m["speedup"] == pytest.approx(m["tokens_per_s"] / m["vs_tokens_per_s"]) and m["vs_tokens_per_s"] > 0
    assert any("profile: matmul peak" in line for line in out[:-1])


def test_profile_engines_interleaves_windows_and_keeps_each_fastest(monkeypatch):
    """Side-by-side profiling: one timed window per engine per round, in turn; each engine's
    fastest window counts; the profiler view only where asked."""
    from types import SimpleNamespace

    from mor.engine import profile as prof_mod

    def fake(name):
        return SimpleNamespace(name=name, device=torch.device("cpu"))

    ea, eb, ec = fake("a"), fake("b"), fake("c")
    order, walls = [], {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 6.0, 4.0])}

    def fake_time_phases(engine, steps, host=None):
        order.append(engine.name)
        return {"schedule": 0.0}, next(walls[engine.name]), 2, 4

    ops_for = []
    monkeypatch.setattr(prof_mod, "time_phases", fake_time_phases)
    monkeypatch.setattr(prof_mod, "profile_ops", lambda e, s, top=None: ops_for.append(e.name) or ({}, {}, 1.0, 1, {}))
    a, b = prof_mod.profile_engines([ea, eb], steps=2, ops=[False, True], repeats=3)
    assert order == ["a", "b"] * 3
    assert a.step_s == pytest.approx(0.5) and b.step_s == pytest.approx(2.0) and a.tokens_per_step == 2
    assert ops_for == ["b"]
    assert a.syncs_per_step is None and a.host_phases_s == {}  # CUDA only
    # "fastest" = most tokens per second: MoR's short steps may be the ones that make few tokens
    windows = iter([(1.0, 1), (2.0, 6), (1.5, 2)])
    monkeypatch.setattr(prof_mod, "time_phases",
                        lambda e, s, host=None: (lambda w, t: ({"schedule": 0.0}, w, 2, t))(*next(windows)))
    (c,) = prof_mod.profile_engines([ec], steps=2, ops=False, repeats=3)
    assert c.tokens_per_step == 3 and c.step_s == pytest.approx(1.0)
