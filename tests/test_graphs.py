"""Fixed-shape decode calls (``mor.engine.graphs``): the padded formulation that CUDA graphs
record, run eagerly here, against the uncached forward; the bucketing; padding rows that
leave no trace. The CUDA capture itself is checked in tests/test_devices.py."""

from __future__ import annotations

import pytest
import torch

from mor.engine import Engine, SamplingParams
from mor.engine.graphs import DecodeGraphs, bucket, buckets

from helpers import build
from test_engine import CASES, _id, check_greedy_against_uncached, prompts, reference_greedy, tiny


def static_engine(model, **kw) -> Engine:
    """An engine whose decode calls run the fixed-shape functions eagerly (PyTorch ops)."""
    eng = Engine(model, cpu_kernels=False, cuda_graphs=False, **kw)
    eng.runner.graphs = DecodeGraphs(eng.runner, capture=False)
    return eng


def test_buckets():
    assert buckets(1) == [1]
    assert buckets(5) == [1, 2, 4, 5]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(30) == [1, 2, 4, 8, 16, 24, 30]
    assert buckets(300) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 300]
    for n in range(32, 1000):  # from 32 rows up, padding stays under a quarter
        assert bucket(n, buckets(1000)) < 1.25 * n
    assert [bucket(n, buckets(30)) for n in (1, 3, 8, 9, 25, 30)] == [1, 4, 8, 16, 30, 30]
    with pytest.raises(ValueError, match="exceed"):
        bucket(31, buckets(30))


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("schedule", ["depth", "sequence"])
def test_fixed_shape_decode_equals_uncached_forward(case, schedule):
    arch, kw, kv = case
    model = build(tiny(arch, kv_mode=kv, **kw))
    eng = static_engine(model, max_batch=5, schedule=schedule, record_logits=True, block_size=4)
    check_greedy_against_uncached(model, eng)
    g = eng.runner.graphs
    assert g.static_block == (kw.get("sharing") != "middle_sequence" and arch != "vanilla")
    assert {k[0] for k in g._calls} >= {"enter", "finish"}
    assert all(k[1] in g.batch_sizes and k[2] in g.block_counts for k in g._calls)


def test_padding_rows_leave_no_trace():
    """Padding rows touch only the scratch slot (zero after every call) and cache row 0 of the
    reserved block; sequences' results do not depend on how many rows were padding."""
    model = build(tiny("mor", router_type="token"), seed=1)
    eng = static_engine(model, max_batch=7, block_size=4, record_logits=True)  # buckets 1, 2, 4, 7
    ps = prompts((2, 5, 3), seed=4)
    for p in ps:
        eng.add_request(p, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    k0 = eng.runner.cache.k[0].clone()
    outs = eng.run_until_done()
    r = eng.runner
    assert r.h[r.max_seqs].abs().max() == 0 and r.h_first[r.max_seqs].abs().max() == 0
    assert torch.equal(eng.runner.cache.k[0, 1:], k0[1:])  # only row 0 of block 0 takes padding writes
    assert any(k[1] > 3 for k in r.graphs._calls), "some call should have been padded"
    for p, o in zip(ps, outs):
        toks, logits, _ = reference_greedy(model, p, 6)
        assert o.token_ids == toks
        torch.testing.assert_close(o.logits, logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [{}, dict(use_aux_router=True), dict(router_arch="mlp", capacities=[0.7, 0.5, 0.3]),
                                dict(kv_mode="shared", capacities=[1.0, 0.8, 0.4])], ids=str)
def test_fixed_shape_calls_make_the_routing_decisions(kw, monkeypatch):
    """Expert-choice: ``enter`` / ``recurse`` compute the decision logits of their rows' next
    recursion, so ``decide`` runs no router of its own (on CUDA: no eager launches, one copy to
    the host); tokens, logits and depths still equal the uncached forward."""
    def run(keep: bool) -> int:
        model = build(tiny("mor", **kw))
        eng = static_engine(model, max_batch=4, record_logits=True, block_size=4)
        eager = []
        route = eng.runner._router_logits
        monkeypatch.setattr(eng.runner, "_router_logits", lambda *a: eager.append(len(a[1])) or route(*a))
        if not keep:  # the control: decisions not handed over, decide routes eagerly
            monkeypatch.setattr(eng.runner.graphs, "take_decision", lambda *a: None)
        check_greedy_against_uncached(model, eng)
        return len(eager)

    assert run(keep=True) == 0
    assert run(keep=False) > 0


@pytest.mark.parametrize("arch", ["vanilla", "mor"])
@pytest.mark.parametrize("mix", ["temperature", "temperatures", "greedy", "greedy+temperature", "top_p", "seeded"])
def test_fixed_shape_finish_samples_as_sample_does(arch, mix, monkeypatch):
    """``finish`` draws the tokens inside the fixed-shape call when every row is greedy or at a
    plain temperature (no filter, no generator of its own): the same tokens as ``sample`` after
    the call, which still runs for the other mixes."""
    from mor.engine import graphs as graphs_mod
    from mor.engine import runner as runner_mod

    kinds = {"temperature": [dict(temperature=1.0)], "temperatures": [dict(temperature=0.7), dict(temperature=1.6)],
             "greedy": [dict(temperature=0)], "greedy+temperature": [dict(temperature=0), dict(temperature=1.0)],
             "top_p": [dict(temperature=1.0), dict(temperature=1.0, top_p=0.8)],
             "seeded": [dict(temperature=1.0), dict(temperature=1.0, seed=7)]}[mix]
    model = build(tiny(arch), seed=3)

    def run(in_call: bool):
        eng = static_engine(model, max_batch=4, block_size=4, seed=5)
        eager = []
        monkeypatch.setattr(runner_mod, "sample", lambda *a: eager.append(1) or sample(*a))
        monkeypatch.setattr(graphs_mod, "fixed_shape_rule", rule if in_call else lambda *a: None)
        for i, p in enumerate(prompts((3, 6, 2, 5, 4), seed=8)):
            eng.add_request(p, SamplingParams(max_tokens=7, ignore_eos=True, **kinds[i % len(kinds)]))
        return [o.token_ids for o in eng.run_until_done()], len(eager)

    from mor.engine.sampling import fixed_shape_rule as rule, sample
    drawn, eager_in = run(True)
    expected, eager_out = run(False)
    assert drawn == expected
    assert eager_out > 0
    assert (eager_in == 0) == (mix in ("temperature", "temperatures", "greedy"))


def test_record_all_covers_every_shape_a_step_can_take():
    """``record_all`` makes every (phase, rows, blocks) call in advance; a run afterwards adds none."""
    model = build(tiny("mor"), seed=1)
    eng = static_engine(model, max_batch=6, block_size=4, max_model_len=40)  # rows 1,2,4,6; blocks 1,2,4,8,10
    g = eng.runner.graphs
    assert g.record_all(max_len=40) == 3 * 4 * 5
    assert g.record_all(max_len=40) == 0
    vanilla = static_engine(build(tiny("vanilla")), max_batch=6, block_size=4, max_model_len=40)
    assert vanilla.runner.graphs.record_all() == 4 * 5 + 4  # enter: all layers; finish: norm + head only
    for p in prompts((3, 9, 1, 5), seed=2):
        eng.add_request(p, SamplingParams(max_tokens=25, temperature=0, ignore_eos=True))
    eng.run_until_done()
    assert len(g._calls) == 60


def test_capture_needs_cuda():
    eng = Engine(build(tiny("mor")), max_batch=2, cuda_graphs=False)
    assert not eng.cuda_graphs and eng.runner.graphs is None
    with pytest.raises(ValueError, match="CUDA"):
        DecodeGraphs(eng.runner, capture=True)
    with pytest.raises(ValueError, match="CUDA"):
        Engine(build(tiny("mor")), max_batch=2, cuda_graphs=True)


class _NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on the ops a CUDA graph cannot record: reading a value back to the host
    (``.item()``, ``.tolist()``, Python control flow on a tensor) or an output whose shape
    depends on the data (``nonzero``, boolean masking, ``unique``)."""

    BANNED = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique2", "unique_consecutive"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.BANNED:
            raise AssertionError(f"{name} inside a fixed-shape decode call")
        if name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            raise AssertionError(f"boolean-mask {name} inside a fixed-shape decode call")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch,kw", [("vanilla", {}), ("mor", {}), ("mor", dict(kv_mode="shared", use_aux_router=True)),
                                     ("mor", dict(router_type="token")), ("mor", dict(router_arch="mlp")),
                                     ("recursive", {})])
def test_fixed_shape_calls_never_read_back_to_the_host(arch, kw):
    """What CUDA graphs record must not sync with the host: every phase function runs here
    under a dispatch mode that fails on value read-backs and data-dependent shapes."""
    model = build(tiny(arch, **kw), seed=1)
    eng = static_engine(model, max_batch=4, block_size=4)
    for p in prompts((3, 7), seed=5):
        eng.add_request(p, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    eng.step()  # prefill and a first decode step: real cache contents
    g = eng.runner.graphs
    with torch.no_grad():
        for phase, (fn, layers) in g.phases().items():
            call = g._call(phase, fn, 4, 2, layers)
            with _NoHostSync():
                fn(call.ints, call.blocks)
    assert set(g.phases()) == ({"enter", "finish"} if arch == "vanilla" else {"enter", "recurse", "finish"})


def test_dropping_the_engine_frees_its_cache_without_the_garbage_collector():
    """The fixed-shape calls hold their runner weakly: no reference cycle keeps the KV cache
    (and on CUDA the graphs' memory) alive after the engine is dropped."""
    import gc
    import weakref

    eng = static_engine(build(tiny("mor")), max_batch=2, block_size=4)
    cache = weakref.ref(eng.runner.cache.k)
    gc.disable()
    try:
        del eng
        assert cache() is None
    finally:
        gc.enable()
