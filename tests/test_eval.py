"""`mor eval --data`: validation NLL against an independent computation, router diagnostics,
prepared data dirs, results.json, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional

from mor import checkpoint as ckpt
from helpers import make_checkpoint, random_docs, run_cli
from reference import reference_nll

@pytest.fixture(scope="module")
def mor_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "mor")


def test_windows_score_every_target_once_with_full_windows():
    from mor.eval.nll import nll_windows

    for n, seq in [(2, 8), (9, 8), (17, 8), (20, 8), (100, 7), (5, 64)]:
        wins = nll_windows(n, seq)
        targets = [t for start, length, k in wins for t in range(start + 1 + length - k, start + 1 + length)]
        assert sorted(targets) == list(range(1, n)), (n, seq)
        assert all(length == min(seq, n - 1) for _, length, _ in wins)  # every window has the full length
        assert all(start + length <= n - 1 for start, length, _ in wins)
    assert nll_windows(20, 8) == [(0, 8, 8), (8, 8, 8), (11, 8, 3)]  # the tail keeps 5 tokens of context
    assert nll_windows(1, 8) == []


def test_nll_matches_independent_computation(mor_ckpt, tmp_path, capsys):
    docs = random_docs(3, 70, 7)
    src = tmp_path / "held_out.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    rc, res, out = run_cli(["eval", str(mor_ckpt), "--data", str(src), "--seq-len", "32", "--batch-size", "3"],
                           capsys)
    assert rc == 0 and res["status"] == "ok"
    (key, r), = res["nll"].items()
    model = ckpt.load_model(mor_ckpt)
    tok = ckpt.load_tokenizer(mor_ckpt)
    eos = tok.token_to_id("<|endoftext|>")
    stream = [t for d in docs for t in tok.encode(d).ids + [eos]]
    assert r["tokens"] == len(stream)
    assert set(r["routing"]) == {"topk", "threshold"}
    for mode in ("topk", "threshold"):
        nll, n, stats = reference_nll(model, stream, 32, mode)
        m = r["routing"][mode]
        assert m["tokens"] == n == len(stream) - 1
        assert m["nll"] == pytest.approx(nll, abs=1e-5)
        assert m["ppl"] == pytest.approx(np.exp(nll), rel=1e-5)
        # dead-token ratio: the model's per-batch value; with one window per batch it is per window
        # (batch 3 here, so compare against the token-weighted per-window mean only loosely)
        assert 0.0 <= m["dead_token_ratio"] <= 1.0
        depth_hist = m["depth_histogram"]
        assert sum(depth_hist) == n and len(depth_hist) == 4
    # topk: sampling accuracy is the model's router stat, averaged over windows
    _, n, stats = reference_nll(model, stream, 32, "topk")
    per = sum(k * s["sampling_accuracy"].double() for k, s in stats) / n
    assert r["routing"]["topk"]["sampling_accuracy_per_recursion"] == pytest.approx(per.tolist(), abs=1e-6)
    assert r["routing"]["topk"]["sampling_accuracy"] == pytest.approx(per[1:].mean().item(), abs=1e-6)
    assert "sampling_accuracy" not in r["routing"]["threshold"]
    assert r["nll"] == r["routing"]["topk"]["nll"]  # the headline number is the paper's (top-k)
    # both routing rules are printed, and results.json holds the same numbers
    assert "topk: NLL" in out and "threshold: NLL" in out and "dead tokens" in out
    saved = json.loads((Path(mor_ckpt) / "results.json").read_text())
    assert saved["nll"][key]["routing"]["threshold"]["nll"] == r["routing"]["threshold"]["nll"]


def test_dead_token_ratio_with_one_window_per_batch(mor_ckpt):
    from mor.eval.nll import evaluate_nll

    model = ckpt.load_model(mor_ckpt)
    stream = np.array(ckpt.load_tokenizer(mor_ckpt).encode(" ".join(random_docs(1, 200, 3))).ids, dtype=np.int64)
    r = evaluate_nll(model, stream, seq_len=16, routing="threshold", batch_size=1)
    _, n, stats = reference_nll(model, stream.tolist(), 16, "threshold")
    dead = sum(k * float(s["dead_token_ratio"]) for k, s in stats) / n
    frac = sum(k * s["selected_fraction"].double() for k, s in stats) / n
    assert r["dead_token_ratio"] == pytest.approx(dead, abs=1e-9)
    assert r["selected_fraction"] == pytest.approx(frac.tolist(), abs=1e-9)


def test_nll_on_prepared_dir_uses_val_split(mor_ckpt, tmp_path, capsys):
    from mor.data import prepare

    src = tmp_path / "corpus"
    src.mkdir()
    for i, d in enumerate(random_docs(6, 120, 11)):
        (src / f"d{i}.txt").write_text(d)
    out = tmp_path / "prepared"
    prepare([str(src)], str(out), tokenizer=str(Path(mor_ckpt) / "tokenizer.json"), val_fraction=0.3)
    meta = json.loads((out / "meta.json").read_text())
    val = np.fromfile(out / meta["splits"]["val"]["shards"][0]["file"], dtype=meta["dtype"]).astype(np.int64)
    rc, res, _ = run_cli(["eval", str(mor_ckpt), "--data", str(out), "--routing", "threshold", "--seq-len", "20",
                          "--no-save"], capsys)
    assert rc == 0
    (key, r), = res["nll"].items()
    assert key.endswith("[val]@seq20") and r["kind"] == "prepared" and r["tokens"] == len(val)
    assert list(r["routing"]) == ["threshold"]
    nll, _, _ = reference_nll(ckpt.load_model(mor_ckpt), val.tolist(), 20, "threshold")
    assert r["nll"] == pytest.approx(nll, abs=1e-5)
    assert not (Path(mor_ckpt) / "results.json").exists() or key not in json.loads(
        (Path(mor_ckpt) / "results.json").read_text()).get("nll", {})


def test_prepared_dir_with_other_tokenizer_is_refused(mor_ckpt, tmp_path, capsys):
    from mor.data import prepare

    src = tmp_path / "c.txt"
    src.write_text(" ".join(random_docs(1, 3000, 5)) + " zebra xylophone")
    prepare([str(src)], str(tmp_path / "p"), vocab_size=280, val_fraction=0.5)
    rc, res, _ = run_cli(["eval", str(mor_ckpt), "--data", str(tmp_path / "p")], capsys)
    assert rc == 2 and "different tokenizer" in res["error"]


def test_vanilla_checkpoint_gives_one_number(tmp_path, capsys):
    ck = make_checkpoint(tmp_path / "van", "vanilla")
    src = tmp_path / "t.txt"
    src.write_text(" ".join(random_docs(1, 150, 2)))
    rc, res, out = run_cli(["eval", str(ck), "--data", str(src), "--seq-len", "64"], capsys)
    assert rc == 0
    (_, r), = res["nll"].items()
    assert list(r["routing"]) == ["default"]
    tok = ckpt.load_tokenizer(ck)
    stream = tok.encode(src.read_text()).ids + [tok.token_to_id("<|endoftext|>")]
    nll, _, _ = reference_nll(ckpt.load_model(ck), stream, 64, "topk")
    assert r["nll"] == pytest.approx(nll, abs=1e-5)
    assert "dead_token_ratio" not in r["routing"]["default"]


def test_results_json_merges_atomically(tmp_path):
    from mor.eval.common import update_results

    update_results(tmp_path, {"nll": {"a": {"nll": 1.0}}, "model": "x"})
    update_results(tmp_path, {"nll": {"b": {"nll": 2.0}}, "fewshot": {"topk": {"table": {"PIQA": 50.0}}}})
    update_results(tmp_path, {"nll": {"a": {"ppl": 3.0}}})
    d = json.loads((tmp_path / "results.json").read_text())
    assert d == {"model": "x", "nll": {"a": {"nll": 1.0, "ppl": 3.0}, "b": {"nll": 2.0}},
                 "fewshot": {"topk": {"table": {"PIQA": 50.0}}}}
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".results.json.lock")) == \
        ["results.json"]  # no temp files left behind
    (tmp_path / "results.json").write_text("{broken")
    update_results(tmp_path, {"x": 1})
    assert json.loads((tmp_path / "results.json").read_text()) == {"x": 1}
    assert (tmp_path / "results.json.corrupt").exists()


def test_eval_errors(mor_ckpt, tmp_path, capsys):
    rc, res, _ = run_cli(["eval", str(mor_ckpt)], capsys)
    assert rc == 2 and "--data" in res["error"] and "--tasks" in res["error"]
    rc, res, _ = run_cli(["eval", str(mor_ckpt), "--data", str(tmp_path / "missing.txt")], capsys)
    assert rc == 2 and "not found" in res["error"]
    rc, res, _ = run_cli(["eval", str(tmp_path / "nope"), "--data", "shakespeare"], capsys)
    assert rc == 2 and "checkpoint not found" in res["error"]
    rc, res, _ = run_cli(["eval", str(mor_ckpt), "--tasks", "squad"], capsys)
    assert rc == 2 and "unknown task" in res["error"]
