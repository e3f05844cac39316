"""Opt-in low-precision decode (mor.engine.quant, ``Engine(decode_precision=...)``): int8
weight-only layers against their dequantised weights, accuracy of the quantised model
against fp32 (bounded logit error, greedy agreement on most positions), the engine's
default staying exact and the caller's model untouched."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from helpers import V, build, tiny
from mor import preset
from mor.engine import Engine, SamplingParams
from mor.engine.quant import Int8Linear, decode_accuracy, low_precision_copy


def test_int8_linear_is_its_dequantised_weight_within_rounding():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48, bias=False)
    q = Int8Linear.from_linear(lin)
    assert q.weight_q.dtype == torch.int8 and int(q.weight_q.abs().max()) == 127
    # the quantisation error of each weight is at most half a step of its row's scale
    assert bool(((q.dequantized() - lin.weight).abs() <= q.scale[:, None] / 2 + 1e-7).all())
    x = torch.randn(5, 3, 64)
    torch.testing.assert_close(q(x), functional.linear(x, q.dequantized()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels_on", [True, False])
def test_int8_linear_on_cpu_runs_on_the_kernels_or_on_torch(kernels_on, monkeypatch):
    """fp32 activations on CPU: the compiled kernels' int8 product (prefill-sized inputs too),
    or ``torch._weight_int8pack_mm`` when the kernels are unavailable; both the dequantised
    matmul within rounding."""
    from mor.engine import kernels

    if kernels_on and kernels.load() is None:
        pytest.skip(f"CPU kernels unavailable: {kernels.unavailable_reason()}")
    calls = []
    if kernels_on:
        fn = kernels.linear
        monkeypatch.setattr(kernels, "linear", lambda *a, **k: calls.append(1) or fn(*a, **k))
    else:
        monkeypatch.setattr(kernels, "load", lambda: None)
    torch.manual_seed(1)
    q = Int8Linear.from_linear(torch.nn.Linear(96, 40, bias=False))
    x = torch.randn(3, 70, 96)
    torch.testing.assert_close(q(x), functional.linear(x, q.dequantized()), rtol=1e-5, atol=1e-5)
    assert bool(calls) is kernels_on
    n = len(calls)
    assert q(x.requires_grad_()).requires_grad and len(calls) == n  # autograd: PyTorch ops
    q.use_kernels = False  # what low_precision_copy(..., cpu_kernels=False) sets
    with torch.no_grad():
        q(x)
    assert len(calls) == n


@pytest.mark.parametrize("arch", ["vanilla", "mor"])
@pytest.mark.parametrize("precision,max_err,min_agree", [("int8", 0.05, 0.9), ("bf16", 0.05, 0.9),
                                                         ("bf16-weights", 0.05, 0.9)])
def test_low_precision_model_tracks_fp32(arch, precision, max_err, min_agree):
    cfg = (tiny("vanilla", num_hidden_layers=4) if arch == "vanilla"
           else preset("tiny", "mor", 2, vocab_size=V, num_hidden_layers=4))
    model = build(cfg)
    low = low_precision_copy(model, precision)
    if precision == "int8":
        assert sum(isinstance(m, Int8Linear) for m in low.modules()) == 7 * len(low.model.layers)
    ids = torch.randint(0, V, (4, 48), generator=torch.Generator().manual_seed(1))
    acc = decode_accuracy(model, low, ids)
    assert acc["max_logit_error"] < max_err
    assert acc["greedy_agreement"] >= min_agree
    assert abs(acc["nll_low"] - acc["nll"]) < 0.05 * acc["nll"]
    # and a broken quantisation is caught: a sign flip of every weight moves far away
    bad = low_precision_copy(model, precision)
    with torch.no_grad():
        for m in bad.modules():
            if isinstance(m, Int8Linear):
                m.weight_q.neg_()
            elif isinstance(m, torch.nn.Linear) and m is not bad.lm_head:
                m.weight.neg_()
    assert decode_accuracy(model, bad, ids)["max_logit_error"] > max_err


def test_engine_decode_precision_int8_generates_close_to_fp32_and_leaves_the_model():
    model = build(tiny("vanilla", num_hidden_layers=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def greedy(**kw):
        eng = Engine(model, max_batch=2, max_model_len=64, seed=0, record_logits=True, **kw)
        for p in ([1, 2, 3], [4, 5]):
            eng.add_request(p, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
        return eng, eng.run_until_done()

    eng, outs = greedy(decode_precision="int8")
    assert any(isinstance(m, Int8Linear) for m in eng.model.modules())
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    _, ref = greedy()
    # first token: same prompt, so its logits are directly comparable
    for o, r in zip(outs, ref):
        err = (o.logits[0] - r.logits[0]).abs().max() / r.logits[0].abs().max()
        assert float(err) < 0.05
    agree = sum(a == b for o, r in zip(outs, ref) for a, b in zip(o.token_ids, r.token_ids))
    assert agree >= 0.5 * sum(len(r.token_ids) for r in ref)


def test_engine_rejects_unknown_decode_precision():
    with pytest.raises(ValueError, match="int4.*bf16, fp16, int8, bf16-weights"):
        Engine(build(tiny("vanilla", num_hidden_layers=2)), max_batch=1, decode_precision="int4")


def test_bench_infer_decode_precision_reports_accuracy(capsys):
    import json

    from mor.cli import main

    rc = main(["bench", "infer", "--preset", "tiny", "--recursions", "2", "--mean-len", "6", "--batch", "2",
               "--skip-max", "--hf", "none", "--calib-seqs", "2", "--threads", "1", "--decode-precision", "int8"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    s = json.loads(out[-1])
    assert s["decode_precision"] == "int8" and set(s["decode_accuracy"]) == {"vanilla-8L", "MoR-2"}
    for a in s["decode_accuracy"].values():
        assert a["greedy_agreement"] > 0.8 and a["max_logit_error"] < 0.1
    assert all(r["tokens"] > 0 for r in s["rows"])


def test_bf16_weights_copy_rounds_matrices_only():
    """``bf16-weights``: every decoder projection and the LM head hold bf16 values (fp32
    tensors), everything else (norms, routers, embedding when untied) is untouched."""
    model = build(preset("tiny", "mor", 2, vocab_size=V, num_hidden_layers=4, tie_word_embeddings=False))
    low = low_precision_copy(model, "bf16-weights")
    assert low.decode_precision == "bf16-weights" and not hasattr(model, "decode_precision")
    mats = {n for n, m in low.named_modules() if isinstance(m, torch.nn.Linear)
            and (n == "lm_head" or ".self_attn." in n or ".mlp." in n)}
    assert len(mats) == 7 * len(low.model.layers) + 1
    orig = dict(model.named_parameters())
    for n, p in low.named_parameters():
        assert p.dtype == torch.float32
        if n.rsplit(".", 1)[0] in mats:
            assert torch.equal(p, p.to(torch.bfloat16).float()) and not torch.equal(p, orig[n])
        else:
            assert torch.equal(p, orig[n]), n


@pytest.mark.parametrize("arch", ["vanilla", "mor"])
def test_engine_bf16_weights_kernels_equal_the_rounded_model(arch):
    """With the CPU kernels, ``decode_precision="bf16-weights"`` reads bf16 copies of the
    rounded weights (half the bytes) and computes exactly what PyTorch computes on the rounded
    fp32 copy (same tokens, logits within fp32 rounding)."""
    from mor.engine import kernels

    if not kernels.available():
        pytest.skip(f"CPU kernels unavailable: {kernels.unavailable_reason()}")
    cfg = (tiny("vanilla", num_hidden_layers=4) if arch == "vanilla"
           else preset("tiny", "mor", 2, vocab_size=V, num_hidden_layers=4))
    model = build(cfg)

    def greedy(**kw):
        eng = Engine(model, max_batch=2, max_model_len=64, seed=0, record_logits=True,
                     decode_precision="bf16-weights", **kw)
        for p in ([1, 2, 3], [4]):
            eng.add_request(p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        return eng, eng.run_until_done()

    eng, outs = greedy(cpu_kernels=True)
    assert eng.runner._klayers[0].wbf == 1 and eng.runner._lm_head.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in eng.runner._klayers[0].tensors[2:])
    _, ref = greedy(cpu_kernels=False)
    for o, r in zip(outs, ref):
        assert o.token_ids == r.token_ids and o.depths == r.depths
        torch.testing.assert_close(o.logits, r.logits, atol=2e-5, rtol=1e-4)
