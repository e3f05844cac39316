"""Value checks shared by the verbs: every bad number is refused where it enters, with a
message naming the value, instead of being accepted and doing nothing (or something wrong).

* argparse ``type=`` functions (:func:`positive_int`, :func:`nonneg_int`, ...) for CLI flags;
* :func:`check_train_config` for the numeric fields of a training recipe;
* load-time checks of checkpoints (:func:`check_finite_state`, :func:`check_loaded_config`)
  and prepared data (:func:`check_shard_file`, :func:`check_token_ids`);
* :func:`tokenizer_fingerprint`, the identity of a tokenizer (vocabulary, merges, special
  tokens, pre-tokenizer), stored in checkpoints and compared where two tokenizers meet;
* (strict JSON output lives in :func:`mor.runtime.json_safe` / :func:`mor.runtime.to_json`)
  with a strict parser.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

#: The longest context a checkpoint may declare. RoPE has no position weights, so the
#: weights bound nothing here; a KV cache for one sequence of this length already takes
#: gigabytes for the smallest model.
MAX_POSITION_EMBEDDINGS = 1 << 20


# ---------------------------------------------------------------------- argparse types
def _number(text: str, kind: type, what: str):
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if kind is int:
        if not v.is_integer():
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        try:
            return int(text)
        except ValueError:
            return int(v)  # "1e3"
    return v


def _bounded(name: str, kind: type, what: str, ok, rule: str):
    """An argparse ``type``: a number of ``kind`` for which ``ok(value)`` holds ("must be ``rule``")."""
    def check(text: str):
        v = _number(text, kind, what)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"{text!r} must be {rule}")
        return v

    check.__name__ = name
    return check


positive_int = _bounded("positive_int", int, "an integer", lambda v: v >= 1, "an integer >= 1")
nonneg_int = _bounded("nonneg_int", int, "an integer", lambda v: v >= 0, "an integer >= 0")
positive_float = _bounded("positive_float", float, "a number", lambda v: v > 0, "a number > 0")
nonneg_float = _bounded("nonneg_float", float, "a number", lambda v: v >= 0, "a number >= 0")
probability = _bounded("probability", float, "a number", lambda v: 0 < v <= 1, "in (0, 1]")
unit_fraction = _bounded("unit_fraction", float, "a number", lambda v: 0 <= v < 1, "in [0, 1)")  # [0, 1)


def limit_value(text: str) -> float:
    """``--limit``: a count >= 1 (integer) or a fraction in (0, 1)."""
    v = _number(text, float, "a number")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a document count >= 1 or a fraction in (0, 1)")
    if v >= 1 and not v.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r}: a count of documents must be a whole number")
    return v


def text_arg(text: str) -> str:
    """A string that can be encoded as UTF-8 (a prompt, a text): refuses lone surrogates,
    which is what a terminal's undecodable bytes become in ``sys.argv``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise argparse.ArgumentTypeError(
            f"contains a character that is not valid Unicode text ({text[e.start:e.end]!r} at position "
            f"{e.start}; undecodable bytes on the command line?)") from None
    return text


# ---------------------------------------------------------------------- recipes
_POS_INT = ("seq_len", "batch_size", "grad_accum", "max_steps", "max_tokens", "eval_batches", "log_every",
            "sample_tokens")
_NONNEG_INT = ("seed", "eval_every", "ckpt_every", "keep_last", "num_samples", "sample_top_k", "warmup_steps")
_BOOLS = ("tensorboard", "progress", "compile", "overwrite")


def check_train_config(cfg: Any) -> None:
    """Refuse nonsense in a ``TrainConfig`` (ConfigError naming the field and the value)."""
    from .config import ConfigError

    def bad(name, why):
        raise ConfigError(f"{name}={getattr(cfg, name)!r} {why}")

    for name in _POS_INT + _NONNEG_INT:
        v = getattr(cfg, name)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool):
            bad(name, "must be a whole number")
        if name in _POS_INT and v < 1:
            bad(name, "must be >= 1")
        if name in _NONNEG_INT and v < 0:
            bad(name, "must be >= 0")
    for name in ("lr", "flops_budget", "dist_timeout"):
        v = getattr(cfg, name)
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            bad(name, "must be a finite number > 0")
    for name in ("weight_decay", "grad_clip", "sample_temperature"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            bad(name, "must be a finite number >= 0")
    for name in ("min_lr_ratio", "warmup_frac", "decay_frac"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and 0 <= v <= 1):
            bad(name, "must be in [0, 1]")
    b = cfg.betas
    if (not isinstance(b, (tuple, list)) or len(b) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in b)):
        bad("betas", "must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    cfg.betas = (float(b[0]), float(b[1]))
    for name in _BOOLS:
        if not isinstance(getattr(cfg, name), bool):
            bad(name, "must be true or false")
    for name in ("data", "out_dir", "sample_prompt", "device"):
        if not isinstance(getattr(cfg, name), str):
            bad(name, "must be a string")
    if not cfg.out_dir.strip():
        bad("out_dir", "must name a directory")


# ---------------------------------------------------------------------- checkpoints
def check_finite_state(state: dict, source: str | os.PathLike) -> None:
    """Refuse a state dict with NaN or infinite values, naming the first bad tensor."""
    from .checkpoint import CheckpointError
    import torch

    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{source}: tensor {name} has {n_bad} non-finite value(s) (NaN or inf); "
                                  "refusing unusable weights" + previous_checkpoint_hint(Path(source).parent))


def check_loaded_config(cfg: Any, source: str | os.PathLike) -> None:
    from .checkpoint import CheckpointError

    if cfg.max_position_embeddings > MAX_POSITION_EMBEDDINGS:
        raise CheckpointError(
            f"{source}: max_position_embeddings={cfg.max_position_embeddings} is beyond the "
            f"{MAX_POSITION_EMBEDDINGS:,} this library supports (RoPE weights do not limit it, but a KV cache "
            "that long cannot be allocated); fix config.json")


def previous_checkpoint_hint(ckpt_dir: str | os.PathLike) -> str:
    """For an unreadable ``RUN/checkpoints/step_N``: which earlier checkpoint is intact and
    how to resume from it (empty when ``ckpt_dir`` is not a run's checkpoint)."""
    import re

    p = Path(ckpt_dir)
    m = re.fullmatch(r"step_(\d+)", p.name)
    if not m or p.parent.name != "checkpoints":
        return ""
    older = sorted((int(q.name[5:]), q) for q in p.parent.iterdir()
                   if re.fullmatch(r"step_\d+", q.name) and int(q.name[5:]) < int(m.group(1)) and q.is_dir())
    if not older:
        return "; no earlier checkpoint exists in this run"
    prev = older[-1][1]
    return (f"; the previous checkpoint {prev} is intact: move the damaged one aside "
            f"(mv {p} {p.parent / ('corrupt-' + p.name)}) and run --resume again to continue from {prev.name}")


# ---------------------------------------------------------------------- data
def check_shard_file(directory: Path, name: Any, meta_path: Path) -> Path:
    """The path of a shard listed in meta.json, refused unless it is a plain file name inside
    the dataset directory (no ``..``, no absolute path, no link out of it)."""
    from .data import DataError

    if not isinstance(name, str) or not name or os.path.isabs(name) or Path(name).name != name:
        raise DataError(f"{meta_path}: shard file {name!r} must be a file name inside {directory}")
    p = directory / name
    try:
        inside = p.resolve().is_relative_to(directory.resolve())
    except OSError:
        inside = False
    if not inside:
        raise DataError(f"{meta_path}: shard {name!r} points outside {directory}")
    return p


def check_token_ids(directory: Path, meta: dict, vocab_size: int, chunk: int = 1 << 22) -> None:
    """Refuse a prepared dataset holding token ids >= ``vocab_size`` (the model's), naming
    the shard; reads the memory-mapped shards in chunks."""
    import numpy as np

    from .data import DataError

    if int(meta.get("vocab_size", 0)) > vocab_size:
        raise DataError(f"{directory}: the data's tokenizer has {meta['vocab_size']} tokens but the model's "
                        f"vocab_size is {vocab_size}")
    dtype = np.dtype(meta["dtype"])
    for split, info in meta["splits"].items():
        for shard in info["shards"]:
            if not shard["tokens"]:
                continue
            arr = np.memmap(directory / shard["file"], dtype=dtype, mode="r")
            for i in range(0, len(arr), chunk):
                top = int(arr[i:i + chunk].max())
                if top >= vocab_size:
                    raise DataError(f"shard {directory / shard['file']} ({split}) holds token id {top}, but the "
                                    f"model's vocab_size is {vocab_size}; re-run `mor prepare` with the model's "
                                    "tokenizer")
            del arr


# ---------------------------------------------------------------------- tokenizers
def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 of what decides a tokenizer's ids: vocabulary, merges, added tokens,
    normalizer and pre-tokenizer (a ``tokenizers.Tokenizer`` or the path of a tokenizer.json)."""
    if isinstance(tok, (str, os.PathLike)):
        d = json.loads(Path(tok).read_text(encoding="utf-8"))
    else:
        d = json.loads(tok.to_str())
    model = d.get("model") or {}
    key = {"model": {k: model.get(k) for k in ("type", "vocab", "merges", "unk_token", "byte_fallback")},
           "added": sorted((a.get("id"), a.get("content")) for a in d.get("added_tokens") or []),
           "normalizer": d.get("normalizer"), "pre_tokenizer": d.get("pre_tokenizer")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------- JSON lines
def os_error_message(e: OSError) -> str:
    """One line for an OSError: what failed and on which path."""
    what = e.strerror or type(e).__name__
    if e.errno is not None and e.errno in (28, 122):  # ENOSPC, EDQUOT
        what = "no space left on device"
    path = f": {e.filename}" if e.filename else ""
    if e.filename2:
        path += f" -> {e.filename2}"
    return f"{what}{path}" if e.strerror or path else str(e)
