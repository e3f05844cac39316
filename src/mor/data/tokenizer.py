"""Tokenizers of prepared data: a byte-level BPE trained on the documents, or a given one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..runtime import EOS_CANDIDATES, EOS_TOKEN, find_eos
from .sources import DataError


def train_tokenizer(documents: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer on ``documents``.

    The tokenizer uses the GPT-2 style ``ByteLevel`` pre-tokenizer and decoder
    (lossless on any text), starts from the 256 byte symbols and reserves
    ``<|endoftext|>`` at id 0 as the end-of-document token. Training is
    deterministic for the same documents and settings. On a small corpus the
    vocabulary can end up smaller than ``vocab_size`` (no pair left to merge with
    ``min_frequency`` occurrences).

    Returns:
        a ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise DataError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least 257 "
            "(256 bytes + the end-of-text token)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def load_tokenizer(path_or_dir: str | os.PathLike):
    """Load a ``tokenizer.json`` file, or the ``tokenizer.json`` inside a directory."""
    from tokenizers import Tokenizer

    path = Path(path_or_dir).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise DataError(f"not a valid tokenizer.json: {path} ({e})") from None


def _find_eos(tokenizer) -> tuple[int, str]:
    """The (id, text) of the tokenizer's end-of-document token."""
    found = find_eos(tokenizer)
    if found is None:
        raise DataError(f"the tokenizer has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")
    return found
