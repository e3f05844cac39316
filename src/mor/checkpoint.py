"""Checkpoints are directories:

    config.json          model configuration (``ModelConfig``)
    model.safetensors    weights, each unique tensor once (shared layers and tied heads once)
    tokenizer.json       the tokenizer the model was trained with (optional)
    train_state.pt       optimizer, scheduler, data position, RNG, counters (optional)
    meta.json            step, tokens, time, library version

A checkpoint is written to a temporary directory next to its final place and renamed into
place, so a crash never leaves a half-written checkpoint and never damages an older one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig
from .model import MoRForCausalLM
from . import runlock, validate
from .runtime import atomic_directory

STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not fit the model."""


def save_checkpoint(path: str | os.PathLike, model: MoRForCausalLM, *, tokenizer: Any = None,
                    train_state: dict | None = None, meta: dict | None = None) -> Path:
    """Write a checkpoint directory atomically at ``path`` (replacing one already there).

    ``tokenizer``: a ``tokenizers.Tokenizer`` or the path of a tokenizer.json."""
    path = Path(path)
    try:
        with atomic_directory(path) as tmp:
            try:
                model.config.save(tmp / "config.json")
                save_file(unique_state_dict(model), str(tmp / "model.safetensors"))
                if tokenizer is not None:
                    if isinstance(tokenizer, (str, os.PathLike)):
                        shutil.copyfile(tokenizer, tmp / "tokenizer.json")
                    else:
                        tokenizer.save(str(tmp / "tokenizer.json"))
                if train_state is not None:
                    torch.save(train_state, tmp / "train_state.pt")
                from . import __version__
                info = {"format": 1, "mor_version": __version__, "saved_at": time.time(), **(meta or {})}
                if (tmp / "tokenizer.json").exists():  # its identity, checked when the checkpoint is loaded
                    info["tokenizer_sha256"] = validate.tokenizer_fingerprint(tmp / "tokenizer.json")
                (tmp / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
            except BaseException as e:
                if runlock.is_disk_full(e, path.parent):  # checked before the partial files free the space
                    raise CheckpointError(runlock.disk_full_message(path)) from None
                raise
            runlock.pause_for_tests("checkpoint")  # test hook: widens the half-written window
    except OSError as e:  # syncing or renaming the finished directory
        if runlock.is_disk_full(e):
            raise CheckpointError(runlock.disk_full_message(path)) from None
        raise
    return path


def unique_state_dict(model: MoRForCausalLM) -> dict[str, torch.Tensor]:
    """The state dict with each tensor once: a tied LM head is dropped (it is the embedding)."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous()
    return out


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """``step_N`` checkpoint directories of a run, oldest first (temporary ones ignored)."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ck = list_checkpoints(run_dir)
    return ck[-1] if ck else None


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for p in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if (p / "config.json").exists() or (p / "model.safetensors").exists():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"{p} is neither a checkpoint directory (config.json + model.safetensors) "
                              f"nor a run directory with checkpoints/step_N")
    return latest


def load_config(path: str | os.PathLike) -> ModelConfig:
    p = resolve_checkpoint(path)
    f = p / "config.json"
    if not f.exists():
        raise CheckpointError(f"checkpoint {p} has no config.json")
    try:
        cfg = ModelConfig.load(f)
    except ConfigError as e:
        raise CheckpointError(f"bad config in {f}: {e}" + validate.previous_checkpoint_hint(p)) from None
    validate.check_loaded_config(cfg, f)
    return cfg


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> MoRForCausalLM:
    """Build the model from a checkpoint and load its weights (strictly)."""
    p = resolve_checkpoint(path)
    cfg = load_config(p)
    f = p / "model.safetensors"
    if not f.exists():
        raise CheckpointError(f"checkpoint {p} has no model.safetensors")
    try:
        state = load_file(str(f), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {f} (truncated or corrupted?): {e}"
                              + validate.previous_checkpoint_hint(p)) from None
    with torch.device(device):
        model = MoRForCausalLM(cfg)
    expected = model.state_dict()
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{f} does not fit config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise CheckpointError(f"{f}: tensor {k} has shape {tuple(v.shape)}, config.json implies "
                                  f"{tuple(expected[k].shape)}")
    validate.check_finite_state(state, f)
    model.load_state_dict(state, strict=False)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None):
    """The checkpoint's tokenizer (``tokenizers.Tokenizer``), or None if it has none."""
    from tokenizers import Tokenizer

    p = resolve_checkpoint(path)
    f = p / "tokenizer.json"
    if not f.exists():
        return None
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises a plain Exception
        raise CheckpointError(f"cannot read {f}: {e}") from None
    if vocab_size is not None and tok.get_vocab_size() > vocab_size:
        raise CheckpointError(f"{f} has {tok.get_vocab_size()} tokens but the model's vocab_size is {vocab_size}")
    want = load_meta(p).get("tokenizer_sha256")
    if want and validate.tokenizer_fingerprint(tok) != want:
        raise CheckpointError(f"{f} is not the tokenizer this model was trained with (its fingerprint differs from "
                              f"tokenizer_sha256 in {p / 'meta.json'}); restore the original tokenizer.json")
    return tok


def load_train_state(path: str | os.PathLike) -> dict:
    p = resolve_checkpoint(path)
    f = p / "train_state.pt"
    if not f.exists():
        raise CheckpointError(f"checkpoint {p} has no train_state.pt (it holds weights only; "
                              "start from its weights with --init-from instead of --resume)")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {f} (truncated or corrupted?): {e}"
                              + validate.previous_checkpoint_hint(p)) from None


def load_meta(path: str | os.PathLike) -> dict:
    p = resolve_checkpoint(path)
    f = p / "meta.json"
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None
