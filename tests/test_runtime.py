"""mor.runtime (devices, dtypes, atomic writes, JSON, end-of-text token) and mor.recipe overrides."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mor.config import ConfigError
from mor.recipe import apply_overrides, parse_value
from mor.runtime import (atomic_directory, autocast_for, find_eos, jsonable, read_json, resolve_device, resolve_dtype,
                         write_atomic, write_json)


def test_override_values_and_the_number_rule():
    assert parse_value("1e-3") == 1e-3 and isinstance(parse_value("2e15"), float)  # YAML 1.1 leaves these strings
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("-1.5e2") == -150.0
    assert parse_value("true") is True and parse_value("") is None and parse_value("[0.9, 0.95]") == [0.9, 0.95]
    assert parse_value("cuda") == "cuda" and parse_value("1e-3x") == "1e-3x" and parse_value("nan") == "nan"
    recipe = {"model": {"preset": "tiny"}}
    apply_overrides(recipe, ["lr=1e-3", "model.num_recursions=2", "model.router.kind=x", "data="])
    assert recipe == {"model": {"preset": "tiny", "num_recursions": 2, "router": {"kind": "x"}}, "lr": 1e-3,
                      "data": None}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["lr"])
    with pytest.raises(ConfigError, match="lr is not a section"):
        apply_overrides({"lr": 1.0}, ["lr.x=1"])


def test_devices_and_dtypes():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="choose auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype(None) == torch.float32
    assert resolve_dtype("bf16") == resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ConfigError, match="fp32"):
        resolve_dtype("int8")
    with autocast_for("cpu", "auto")():  # fp32 on CPU unless asked
        assert not torch.is_autocast_enabled("cpu")
    with autocast_for("cpu", "bf16")():
        assert torch.is_autocast_enabled("cpu")


def test_write_atomic_replaces_whole_files_with_normal_permissions(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    write_atomic(path, "old")
    mask = os.umask(0)
    os.umask(mask)
    assert path.read_text() == "old" and (path.stat().st_mode & 0o777) == 0o666 & ~mask
    write_atomic(path, b"new bytes")
    assert path.read_bytes() == b"new bytes"

    def crash(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_atomic(path, "half")
    monkeypatch.undo()
    assert path.read_bytes() == b"new bytes" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_atomic_directory_keeps_the_old_one_on_error(tmp_path):
    target = tmp_path / "ck"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("crash mid-write")
    assert (target / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["ck"]
    with atomic_directory(target) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_json_of_results(tmp_path):
    obj = {"t": torch.tensor([1.5, 2.0]), "n": np.float32(0.25), "i": np.int64(3), "p": Path("a/b"), "s": {1, 2}}
    write_json(tmp_path / "sub" / "r.json", obj)
    back = read_json(tmp_path / "sub" / "r.json")
    assert back == {"t": [1.5, 2.0], "n": 0.25, "i": 3, "p": "a/b", "s": repr({1, 2})}
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{")
    assert read_json(tmp_path / "bad.json") is None
    assert json.loads(json.dumps(torch.tensor(2), default=jsonable)) == 2


def test_end_of_text_token_lookup():
    from tokenizers import Tokenizer, models

    def tok(vocab):
        return Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))

    assert find_eos(tok({"[UNK]": 0, "<|endoftext|>": 5, "</s>": 6})) == (5, "<|endoftext|>")
    assert find_eos(tok({"[UNK]": 0, "</s>": 2})) == (2, "</s>")
    assert find_eos(tok({"[UNK]": 0})) is None
