"""`mor bench infer` plumbing on tiny shapes (no wall-clock assertions)."""

from __future__ import annotations

import json

import pytest
import torch

from mor import MoRForCausalLM, preset
from mor.bench.infer import calibrate_expert_routers, hf_llama



def test_router_calibration_matches_capacities():
    cfg = preset("tiny", "mor", 4, vocab_size=97, num_hidden_layers=10)
    torch.manual_seed(0)
    model = MoRForCausalLM(cfg).eval()
    with torch.no_grad():  # start far from the capacities: routers that let almost everyone continue
        for r in model.model.routers:
            r.net.weight.normal_(0, 0.5)
    measured = calibrate_expert_routers(model, num_seqs=8, seq_len=64, seed=1)
    assert measured == pytest.approx([1.0, 0.75, 0.5, 0.25], abs=0.03)
    ids = torch.randint(0, 97, (8, 64), generator=torch.Generator().manual_seed(7))  # fresh data
    with torch.no_grad():
        depth = model(ids, routing="threshold").depth
    fresh = [float((depth > r).float().mean()) for r in range(4)]
    assert fresh == pytest.approx([1.0, 0.75, 0.5, 0.25], abs=0.08)


@pytest.mark.parametrize("kv_heads,tie", [(2, True), (4, False)])
def test_vanilla_model_equals_hf_llama_with_its_weights(kv_heads, tie):
    """A vanilla model is Hugging Face LlamaForCausalLM (fp32) holding the same weights, which is
    what the benchmark's transformers baseline (hf_llama) runs."""
    pytest.importorskip("transformers")
    cfg = preset("tiny", "vanilla", num_hidden_layers=3, num_key_value_heads=kv_heads, vocab_size=101,
                 tie_word_embeddings=tie, rope_theta=500.0)
    torch.manual_seed(0)
    m = MoRForCausalLM(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf_llama(m)(x).logits, m(x).logits, atol=1e-5, rtol=1e-5)


def test_bench_infer_cli_reports_rows_and_json(capsys):
    pytest.importorskip("transformers")
    from mor.cli import main

    rc = main(["bench", "infer", "--preset", "tiny", "--recursions", "2", "--mean-len", "10", "--batch", "4",
               "--vanilla-max-batch", "6", "--requests-per-slot", "1.5", "--calib-seqs", "4", "--threads", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    s = json.loads(out[-1])
    assert s["status"] == "ok" and s["bench"] == "infer"
    assert any("tok/s" in line for line in out[:-1])  # the human table came first
    rows = {(r["model"], r["setting"]): r for r in s["rows"]}
    assert set(rows) == {("vanilla-8L", "batch"), ("MoR-2", "batch"), ("vanilla-8L", "max"), ("MoR-2", "max")}
    v, m = rows[("vanilla-8L", "max")], rows[("MoR-2", "max")]
    assert v["batch"] == 6 and m["batch"] > v["batch"]  # smaller KV per sequence -> larger batch
    assert m["kv_pool_mb"] == pytest.approx(v["kv_pool_mb"], rel=0.02)  # same memory budget
    assert m["kv_bytes_per_token"] < v["kv_bytes_per_token"]
    assert rows[("MoR-2", "batch")]["schedule"] == "depth" and v["schedule"] == "sequence"
    for r in s["rows"]:
        assert r["tokens"] == r["workload_tokens"] > 0  # every request ran to its drawn length
        assert r["tokens_per_s"] > 0
    assert sum(m["occupancy"]) == pytest.approx(1.0) and len(m["occupancy"]) == 2
    assert m["calibrated_enter_fractions"] == pytest.approx([1.0, 0.5], abs=0.05)
    assert {c["setting"] for c in s["comparisons"]} == {"batch", "max"}
    assert all(c["speedup"] > 0 for c in s["comparisons"])
    assert s["hf"] and s["hf"][0]["hf_tokens_per_s"] > 0 and s["hf"][0]["ratio"] > 0
    assert s["cuda_graphs"] is False and all(r["graphs_recorded"] == 0 for r in s["rows"])  # CPU: eager


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_bench_infer_refuses_cuda_graphs_without_cuda(capsys):
    from mor.cli import main

    rc = main(["bench", "infer", "--preset", "tiny", "--device", "cpu", "--cuda-graphs", "on", "--hf", "none"])
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc != 0 and s["status"] == "error" and "--cuda-graphs on needs a CUDA device" in s["error"]


def test_bench_infer_repeats_run_in_rounds_over_every_configuration(capsys, monkeypatch):
    """``--repeats N``: every configuration once per round, N rounds (a machine whose speed
    drifts slows all of them alike), the fastest run of each reported."""
    from mor.bench import infer as infer_mod
    from mor.cli import main

    calls, real = [], infer_mod.run_engine

    def counting(model, *a, **kw):
        calls.append((model.config.architecture, kw["batch"]))
        return real(model, *a, **kw)

    monkeypatch.setattr(infer_mod, "run_engine", counting)
    rc = main(["bench", "infer", "--preset", "tiny", "--recursions", "2", "--mean-len", "6", "--batch", "3",
               "--skip-max", "--hf", "none", "--calib-seqs", "2", "--threads", "1", "--repeats", "3"])
    assert rc == 0
    assert calls == [("vanilla", 3), ("mor", 3)] * 3
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = next(r for r in s["rows"] if r["model"] == "MoR-2")
    v = next(r for r in s["rows"] if r["kind"] == "vanilla")
    assert m["speedup"] == pytest.approx(m["tokens_per_s"] / v["tokens_per_s"])


def test_bench_infer_runs_every_checkpoint_even_with_the_same_name(tmp_path, capsys, monkeypatch):
    """Two MoR checkpoints with the same N_r (both named MoR-2 in the table) are both run and
    compared; their vanilla partner runs once per round."""
    from helpers import build
    from mor.bench import infer as infer_mod
    from mor.checkpoint import save_checkpoint
    from mor.cli import main

    kw = dict(vocab_size=97, max_position_embeddings=128)
    a = build(preset("tiny", "mor", num_recursions=2, router_type="expert", **kw), seed=1)
    b = build(preset("tiny", "mor", num_recursions=2, router_type="token", **kw), seed=2)
    v = build(preset("tiny", "vanilla", num_hidden_layers=a.config.num_hidden_layers, **kw), seed=3)
    for name, m in (("a", a), ("b", b), ("v", v)):
        save_checkpoint(tmp_path / name, m)
    calls, real = [], infer_mod.run_engine
    monkeypatch.setattr(infer_mod, "run_engine", lambda model, *x, **k: calls.append(
        model.config.router_type if model.config.architecture == "mor" else "vanilla") or real(model, *x, **k))
    rc = main(["bench", "infer", "--mor-checkpoint", str(tmp_path / "a"), "--mor-checkpoint", str(tmp_path / "b"),
               "--vanilla-checkpoint", str(tmp_path / "v"), "--mean-len", "6", "--batch", "2", "--skip-max",
               "--hf", "none", "--threads", "1"])
    assert rc == 0 and calls == ["vanilla", "expert", "token"]
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["kind"] for r in s["rows"]] == ["vanilla", "mor", "mor"] and len(s["comparisons"]) == 2
