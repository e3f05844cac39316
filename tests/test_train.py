"""The trainer: recipes, schedule, accumulation, exact resume, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mor import checkpoint as ckpt
from mor.config import ConfigError
from mor.train import TrainConfig, TrainError, load_recipe, lr_multiplier, train

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = dict(preset="tiny", architecture="mor", num_recursions=3, max_position_embeddings=64)


def cfg(data_dir, out_dir, **kw):
    base = dict(model=dict(TINY_MODEL), data=data_dir, out_dir=str(out_dir), seq_len=32, batch_size=4,
                max_steps=6, lr=3e-3, eval_every=0, eval_batches=2, log_every=1, tensorboard=False,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def losses(out_dir) -> dict[int, dict]:
    recs = [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "loss" in r}


def test_every_recipe_parses():
    recipes = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(recipes) >= 20
    for p in recipes:
        config = load_recipe(str(p))
        m = config.model_config(vocab_size=8192)
        assert m.vocab_size == 8192
        assert m.architecture in ("vanilla", "recursive", "mor")


def test_recipe_errors(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("model: {preset: tiny}\nmax_steps: 3\nlearning_rate: 1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_recipe(str(p))
    p.write_text("model: {preset: tiny, num_layerz: 3}\nmax_steps: 3\n")
    with pytest.raises(ConfigError, match="num_layerz"):
        load_recipe(str(p)).model_config(100)
    with pytest.raises(ConfigError, match="exactly one run length"):
        load_recipe(None, ["max_steps=3", "max_tokens=100"])
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe(None, ["max_steps"])
    with pytest.raises(ConfigError, match="schedule"):
        load_recipe(None, ["max_steps=3", "schedule=linear"])
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(str(tmp_path / "missing.yaml"))
    config = load_recipe(None, ["max_steps=3", "model.preset=tiny", "model.num_recursions=2", "lr=1e-3"])
    assert config.lr == 1e-3 and config.model_config(100).num_recursions == 2


def test_wsd_and_cosine_schedules():
    config = TrainConfig(max_steps=100, warmup_steps=10, decay_frac=0.2, schedule="wsd")
    m = [lr_multiplier(s, 100, config) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in m[10:80])
    assert m[80] == pytest.approx(1.0) and m[81] == pytest.approx(19 / 20) and m[99] == pytest.approx(1 / 20)
    assert lr_multiplier(100, 100, config) >= 0.0
    assert all(a >= b for a, b in zip(m[80:], m[81:]))
    config = TrainConfig(max_steps=100, warmup_steps=0, schedule="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, 100, config) == pytest.approx(1.0)
    assert lr_multiplier(50, 100, config) == pytest.approx(0.1 + 0.9 * 0.5)


def test_training_reduces_loss_and_logs(data_dir, tmp_path):
    s = train(cfg(data_dir, tmp_path / "run", max_steps=30, lr=1e-2, eval_every=10))
    recs = losses(tmp_path / "run")
    assert recs[30]["loss"] < recs[1]["loss"] - 0.5
    assert s["steps"] == 30 and s["tokens"] == 30 * 4 * 32
    assert math.isfinite(s["val_loss"]) and s["val_ppl"] == pytest.approx(math.exp(s["val_loss"]))
    assert "router/selected_fraction/3" in recs[30] and 0 < recs[30]["mfu"]
    # the checkpoint holds everything to continue and to serve
    p = ckpt.latest_checkpoint(tmp_path / "run")
    assert p.name == "step_000030"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "train_state.pt", "meta.json"):
        assert (p / f).exists(), f
    model = ckpt.load_model(p)
    assert model.config.vocab_size == 300


def test_mfu_never_reads_above_one_when_the_peak_was_underestimated(data_dir, tmp_path, monkeypatch):
    """A start-up peak measured under contention (here: absurdly low) is measured again."""
    import mor.train as T

    calls = []
    real = T.measure_matmul_peak

    def peak(device, seconds=1.0):
        calls.append(seconds)
        return 1.0 if len(calls) == 1 else real(device, seconds=seconds)

    monkeypatch.setattr(T, "measure_matmul_peak", peak)
    train(cfg(data_dir, tmp_path / "run", max_steps=4, log_every=1))
    mfus = [r["mfu"] for r in losses(tmp_path / "run").values()]
    assert len(calls) >= 2 and all(0 < m <= 1.0 for m in mfus), mfus


def test_lr_schedule_advances_per_optimizer_step(data_dir, tmp_path):
    config = cfg(data_dir, tmp_path / "r", max_steps=8, grad_accum=3, warmup_steps=2, decay_frac=0.5)
    train(config)
    recs = losses(tmp_path / "r")
    for step in range(1, 9):
        # the lr logged for optimizer step k (1-based) is the one it used: multiplier of k-1
        assert recs[step]["lr"] == pytest.approx(config.lr * lr_multiplier(step - 1, 8, config)), step
        assert recs[step]["tokens"] == step * 3 * 4 * 32


def test_gradient_accumulation_matches_large_batch(data_dir, tmp_path):
    train(cfg(data_dir, tmp_path / "a", batch_size=4, grad_accum=1))
    train(cfg(data_dir, tmp_path / "b", batch_size=2, grad_accum=2))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    for step in range(1, 7):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-4, abs=1e-5), step
        assert a[step]["aux_loss"] == pytest.approx(b[step]["aux_loss"], rel=1e-3, abs=1e-7), step


@pytest.mark.parametrize("model", [TINY_MODEL, dict(TINY_MODEL, router_type="token", balancing="loss_free")])
def test_resume_is_bit_exact(data_dir, tmp_path, model):
    full = tmp_path / "full"
    train(cfg(data_dir, full, model=dict(model), max_steps=8, ckpt_every=4, keep_last=5))
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_000004", part / "checkpoints" / "step_000004")
    s = train(cfg(data_dir, part, model=dict(model), max_steps=8, ckpt_every=4, keep_last=5), resume=True)
    a, b = losses(full), losses(part)
    assert sorted(b) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert a[step]["loss"] == b[step]["loss"], step  # bit for bit
    ma = ckpt.load_model(full / "checkpoints" / "step_000008")
    mb = ckpt.load_model(part / "checkpoints" / "step_000008")
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k
    assert s["steps"] == 8


def test_init_from_checkpoint_starts_fresh(data_dir, tmp_path):
    train(cfg(data_dir, tmp_path / "a", max_steps=3))
    s = train(cfg(data_dir, tmp_path / "b", max_steps=2), init_from=str(tmp_path / "a"))
    assert s["steps"] == 2 and sorted(losses(tmp_path / "b")) == [1, 2]
    with pytest.raises(TrainError, match="no checkpoint"):
        train(cfg(data_dir, tmp_path / "c", max_steps=2), resume=True)


def test_flops_budget_sets_run_length(data_dir, tmp_path):
    from mor.flops import paper_flops_per_token

    config = cfg(data_dir, tmp_path / "f", max_steps=None, flops_budget=2e9)
    fpt = paper_flops_per_token(config.model_config(300), 32)
    s = train(config)
    assert s["steps"] == round(2e9 / (fpt * 128)) and s["steps"] > 3
    assert s["flops"] == pytest.approx(2e9, rel=0.1)


def test_fresh_run_does_not_clobber_checkpoints(data_dir, tmp_path):
    out = tmp_path / "keep"
    train(cfg(data_dir, out, max_steps=2))
    with pytest.raises(TrainError, match="already holds checkpoints"):
        train(cfg(data_dir, out, max_steps=2))
    assert ckpt.latest_checkpoint(out).name == "step_000002"
    train(cfg(data_dir, out, max_steps=3, overwrite=True))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_000003"]
    assert sorted(losses(out)) == [1, 2, 3]


def test_bad_inputs(data_dir, tmp_path):
    from mor.data import DataError

    with pytest.raises(DataError):
        train(cfg(str(tmp_path / "nowhere"), tmp_path / "x"))
    with pytest.raises(TrainError, match="vocab_size=100"):
        train(cfg(data_dir, tmp_path / "x", model=dict(TINY_MODEL, vocab_size=100)))
    with pytest.raises(TrainError, match="seq_len=128"):
        train(cfg(data_dir, tmp_path / "x", seq_len=128))


def test_nonfinite_loss_stops_and_keeps_checkpoints(data_dir, tmp_path):
    out = tmp_path / "nan"
    train(cfg(data_dir, out, max_steps=2))
    before = (ckpt.latest_checkpoint(out) / "model.safetensors").read_bytes()
    config = cfg(data_dir, out, max_steps=6, lr=1e30, warmup_steps=0, grad_clip=0.0, overwrite=True)
    with pytest.raises(TrainError, match="non-finite loss"):
        train(config, init_from=str(out))
    assert ckpt.latest_checkpoint(out).name == "step_000002"
    assert (ckpt.latest_checkpoint(out) / "model.safetensors").read_bytes() == before


def test_corrupted_checkpoint_is_reported(data_dir, tmp_path):
    out = tmp_path / "c"
    train(cfg(data_dir, out, max_steps=2))
    p = ckpt.latest_checkpoint(out)
    f = p / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.load_model(p)
    (p / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="train_state.pt"):
        ckpt.load_train_state(p)
    (p / "config.json").unlink()
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_model(p)


def test_validation_loss_is_the_documented_nll(data_dir, tmp_path):
    """The trainer's val loss is the NLL of docs/evaluation.md (every target of the capped val
    split once, the last partial window included), checked against the slow reference."""
    from mor.data import read_split
    from reference import reference_nll

    s = train(cfg(data_dir, tmp_path / "v", max_steps=2, eval_batches=1000))  # the whole val split
    stream = read_split(data_dir, "val")
    assert (len(stream) - 1) % 32 != 0  # the split ends in a partial window
    model = ckpt.load_model(s["checkpoint"])
    nll, n, _ = reference_nll(model, stream.tolist(), 32, "topk")
    assert n == len(stream) - 1 and s["val_loss"] == pytest.approx(nll, rel=1e-5)
    # with the default cap: the first eval_batches x batch_size windows
    s = train(cfg(data_dir, tmp_path / "w", max_steps=2, eval_batches=2))
    capped = read_split(data_dir, "val", 2 * 4 * 32 + 1)
    nll, n, _ = reference_nll(ckpt.load_model(s["checkpoint"]), capped.tolist(), 32, "topk")
    assert n == 2 * 4 * 32 and s["val_loss"] == pytest.approx(nll, rel=1e-5)
