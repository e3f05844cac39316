"""Helpers shared by ``mor eval`` and ``mor analyze``: loading, routing modes, results.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_model, load_tokenizer, resolve_checkpoint
from ..config import ConfigError, ModelConfig
from ..runtime import EOS_CANDIDATES, find_eos, json_safe, resolve_device, resolve_dtype, to_json, write_atomic

RESULTS_FILE = "results.json"


def load_for_eval(checkpoint: str | os.PathLike, device: str | torch.device = "auto",
                  dtype: str | torch.dtype | None = None, need_tokenizer: bool = True):
    """(model in eval mode, tokenizer or None, checkpoint directory).

    ``checkpoint`` is a checkpoint directory or a run directory (its latest checkpoint)."""
    ckpt_dir = resolve_checkpoint(checkpoint)
    try:
        dev = resolve_device(device)
        weights = resolve_dtype(dtype or "fp32", dev)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    model = load_model(ckpt_dir, device=dev, dtype=weights)
    tok = load_tokenizer(ckpt_dir, vocab_size=model.config.vocab_size)
    if tok is None and need_tokenizer:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no tokenizer.json; evaluation needs the tokenizer "
                              "the model was trained with")
    return model, tok, ckpt_dir


def eos_id(tokenizer) -> int:
    """Id of the tokenizer's end-of-document token (appended after every document in training)."""
    found = find_eos(tokenizer)
    if found is None:
        raise CheckpointError(f"the tokenizer has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")
    return found[0]


def is_expert_choice(cfg: ModelConfig) -> bool:
    return cfg.architecture == "mor" and cfg.router_type == "expert"


def routing_modes(cfg: ModelConfig) -> list[str]:
    """Routing modes that give different results for this model: both expert-choice rules,
    otherwise one (vanilla, recursive and token-choice models ignore ``routing``)."""
    return ["topk", "threshold"] if is_expert_choice(cfg) else ["default"]


def model_routing(mode: str) -> str:
    """The ``routing=`` argument of ``MoRForCausalLM.forward`` for a mode name."""
    return "topk" if mode == "default" else mode


def describe(cfg: ModelConfig) -> str:
    if cfg.architecture == "vanilla":
        return f"vanilla ({cfg.num_hidden_layers} layers)"
    if cfg.architecture == "recursive":
        return f"recursive (N_r={cfg.num_recursions}, {cfg.sharing})"
    return f"MoR {cfg.router_type}-choice (N_r={cfg.num_recursions}, {cfg.sharing}, kv={cfg.kv_mode})"


# ---------------------------------------------------------------------- results.json
def _deep_merge(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def update_results(ckpt_dir: str | os.PathLike, updates: dict[str, Any]) -> Path:
    """Merge ``updates`` into ``<ckpt_dir>/results.json`` (nested dicts merged key by key,
    other values replaced) and write it atomically. A lock file serialises concurrent
    writers (``mor eval`` and ``mor analyze`` running at once). Returns the file's path."""
    path = Path(ckpt_dir) / RESULTS_FILE
    lock = Path(ckpt_dir) / f".{RESULTS_FILE}.lock"
    with open(lock, "a") as lf:
        try:
            import fcntl

            fcntl.flock(lf.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        current: dict = {}
        if path.exists():
            try:
                current = json.loads(path.read_text())
            except json.JSONDecodeError:
                bad = path.with_suffix(".json.corrupt")
                os.replace(path, bad)  # keep the unreadable file for inspection, start afresh
                current = {}
            if not isinstance(current, dict):
                current = {}
        _deep_merge(current, json_safe(updates))
        write_atomic(path, to_json(current, sort_keys=True))
    return path
