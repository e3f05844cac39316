"""Stage 2 of the data pipeline: documents -> a prepared directory (:func:`prepare`), and
the ``mor prepare`` command.

Every file is written atomically, and ``meta.json`` is removed before any listed file is
replaced, so a reader never sees a ``meta.json`` that points at a half-written shard; a
``prepare`` that fails leaves a previously prepared directory untouched.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .. import runlock, textchunks, validate
from ..runtime import fsync_dir, stage_file, temp_file, write_atomic
from .loader import FORMAT_VERSION
from .sources import SHAKESPEARE, SOURCES_HELP, DataError, iter_documents
from .tokenizer import _find_eos, load_tokenizer, train_tokenizer

_SHARD_RE = re.compile(r"^(train|val)_\d{6}\.bin$")


class _ShardWriter:
    """Writes one split's token stream into temp files of at most ``shard_tokens`` tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []  # {"file", "tokens", "tmp"}
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        """Append ``tokens``, starting new shards whenever the current one is full."""
        while len(tokens):
            if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            piece, tokens = tokens[:room], tokens[room:]
            self._file.write(np.ascontiguousarray(piece, dtype=self.dtype).tobytes())
            self.shards[-1]["tokens"] += len(piece)

    def _open_next(self) -> None:
        self._close_current()
        name = f"{self.split}_{len(self.shards):06d}.bin"
        tmp = temp_file(self.directory, name)
        self.shards.append({"file": name, "tokens": 0, "tmp": tmp})
        self._file = open(tmp, "wb")

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> list[dict[str, Any]]:
        """Close and sync the last shard; return the shard list (with temp paths)."""
        self._close_current()
        return self.shards

    def discard(self) -> None:
        """Close and delete every temp file written so far."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for shard in self.shards:
            shard["tmp"].unlink(missing_ok=True)


def _tokenize_to_stream(
    tokenizer, documents: Iterator[str], stream_path: Path, dtype: np.dtype, eos_id: int,
    progress: bool,
) -> np.ndarray:
    """Tokenize ``documents`` into one EOS-separated stream file; return per-document lengths.

    Documents are encoded in batches with ``encode_batch`` (parallel in Rust). A
    literal ``<|endoftext|>`` inside a document is encoded as ordinary text, so
    the stream holds exactly one EOS per document.
    """
    from tqdm import tqdm

    lengths: list[int] = []
    saved_flag = getattr(tokenizer, "encode_special_tokens", None)  # tokenizers >= 0.19
    if saved_flag is not None:
        tokenizer.encode_special_tokens = True
    bar = tqdm(desc="tokenizing", unit="doc", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    total_tokens = 0

    chunkable = textchunks.is_chunkable(tokenizer)
    doc_tokens = 0  # tokens so far of the document whose pieces are being encoded

    def flush(batch: list[tuple[str, bool]], out) -> None:
        # a long document arrives as several pieces (bounded memory, same ids: mor.textchunks);
        # the EOS follows its last piece
        nonlocal total_tokens, doc_tokens
        encodings = tokenizer.encode_batch([t for t, _ in batch], add_special_tokens=False)
        sizes = [len(e.ids) + last for e, (_, last) in zip(encodings, batch)]
        flat = np.empty(sum(sizes), dtype=dtype)
        pos = 0
        for enc, size, (_, last) in zip(encodings, sizes, batch):
            flat[pos:pos + len(enc.ids)] = enc.ids
            doc_tokens += size
            if last:
                flat[pos + size - 1] = eos_id
                lengths.append(doc_tokens)
                doc_tokens = 0
            pos += size
        del encodings
        out.write(flat.tobytes())
        total_tokens += len(flat)
        bar.update(sum(last for _, last in batch))
        bar.set_postfix(tokens=f"{total_tokens:,}", refresh=False)

    try:
        with open(stream_path, "wb") as out:
            batch: list[tuple[str, bool]] = []
            chars = 0
            for doc in documents:
                for part, last in textchunks.with_last(textchunks.pieces(doc) if chunkable else [doc]):
                    batch.append((part, last))
                    chars += len(part)
                    if len(batch) >= 256 or chars >= 2_000_000:
                        flush(batch, out)
                        batch, chars = [], 0
            if batch:
                flush(batch, out)
    finally:
        if saved_flag is not None:
            tokenizer.encode_special_tokens = saved_flag
        bar.close()
    if not lengths:
        raise DataError("the data sources yielded no documents")
    return np.asarray(lengths, dtype=np.int64)


def _split_documents(
    lengths: np.ndarray, val_fraction: float, seed: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int, int]:
    """Choose the validation hold-out.

    Returns ``(train_ranges, val_ranges, train_docs, val_docs)``: half-open token
    ranges into the packed stream, in stream order, and the number of complete
    documents (EOS tokens) in each split.

    With two or more documents, the document order is shuffled with ``seed`` and
    whole documents go to validation until it holds at least ``val_fraction`` of
    all tokens (at least one document, never all of them). A single document is
    split by tokens instead: its last ``ceil(val_fraction * tokens)`` go to val.
    """
    n_docs, total = len(lengths), int(lengths.sum())
    if val_fraction <= 0:
        return [(0, total)], [], n_docs, 0
    if n_docs == 1:
        n_val = min(max(1, math.ceil(val_fraction * total)), total - 1)
        return [(0, total - n_val)], [(total - n_val, total)], 0, 1
    order = np.random.default_rng(seed).permutation(n_docs)
    held = np.cumsum(lengths[order])
    # the shortest prefix of the shuffled order holding >= val_fraction of the tokens,
    # at least one document and never all of them
    n_val = min(int(np.searchsorted(held, val_fraction * total, side="left")) + 1, n_docs - 1)
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[order[:n_val]] = True
    offsets = np.concatenate([[0], np.cumsum(lengths)])

    def ranges(mask: np.ndarray) -> list[tuple[int, int]]:
        """Token ranges of the runs of consecutive documents selected by ``mask``."""
        edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        return [(int(offsets[a]), int(offsets[b])) for a, b in zip(starts, ends)]

    return ranges(~is_val), ranges(is_val), n_docs - n_val, n_val


def prepare(
    sources: list[str] | str,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    vocab_size: int = 8192,
    val_fraction: float = 0.005,
    seed: int = 0,
    text_field: str = "text",
    shard_tokens: int = 50_000_000,
    progress: bool = False,
) -> dict[str, Any]:
    """Tokenize ``sources`` into a prepared directory for :class:`TokenLoader`.

    Args:
        sources: source specifications (see :func:`iter_documents`).
        out_dir: output directory (created if needed). A dataset already there
            is replaced; if this call fails, the old one is left intact.
        tokenizer: path to an existing ``tokenizer.json`` (or a folder holding
            one); if None, a byte-level BPE of ``vocab_size`` is trained on the sources.
        vocab_size: vocabulary size of the trained tokenizer (ignored with ``tokenizer``).
        val_fraction: share of tokens held out for validation (0 for none).
        seed: seed of the validation hold-out choice.
        text_field: JSON field / column holding the text.
        shard_tokens: maximum number of tokens per ``.bin`` shard.
        progress: show a tqdm progress bar on stderr while tokenizing.

    Returns:
        the contents of ``meta.json`` plus ``out_dir`` and ``seconds`` (wall time).
    """
    start_time = time.perf_counter()
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [os.fspath(s) for s in sources]
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    iter_documents(sources, text_field)  # validate every source before any work
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    if tokenizer is None:  # words never cross piece boundaries, so the counts (and merges) are the same
        tok = train_tokenizer((p for d in iter_documents(sources, text_field) for p in textchunks.pieces(d)),
                              vocab_size)
    else:
        tok = load_tokenizer(tokenizer)
    eos_id, eos_token = _find_eos(tok)
    actual_vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if actual_vocab <= 65536 else np.uint32)

    writers: list[_ShardWriter] = []
    staged: list[Path] = []
    stream_path = temp_file(out, "stream")
    try:
        lengths = _tokenize_to_stream(
            tok, iter_documents(sources, text_field), stream_path, dtype, eos_id, progress
        )
        train_ranges, val_ranges, train_docs, val_docs = _split_documents(lengths, val_fraction, seed)
        stream = np.memmap(stream_path, dtype=dtype, mode="r")
        splits: dict[str, dict[str, Any]] = {}
        for split, ranges, n_docs in (("train", train_ranges, train_docs), ("val", val_ranges, val_docs)):
            writer = _ShardWriter(out, split, dtype, shard_tokens)
            writers.append(writer)
            for begin, end in ranges:
                for chunk_start in range(begin, end, 1 << 24):
                    writer.write(stream[chunk_start:min(end, chunk_start + (1 << 24))])
            shards = writer.finish()
            splits[split] = {
                "tokens": sum(s["tokens"] for s in shards),
                "documents": n_docs,
                "shards": [{"file": s["file"], "tokens": s["tokens"]} for s in shards],
            }
        del stream
        meta = {
            "format": "mor-tokens",
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": actual_vocab,
            "eos_id": eos_id,
            "eos_token": eos_token,
            "tokenizer_file": "tokenizer.json",
            "num_documents": int(len(lengths)),
            "train_tokens": splits["train"]["tokens"],
            "val_tokens": splits["val"]["tokens"],
            "splits": splits,
            "sources": sources,
            "text_field": text_field,
            "seed": seed,
            "val_fraction": val_fraction,
            "shard_tokens": shard_tokens,
        }
        tokenizer_tmp = stage_file(out, "tokenizer.json", tok.to_str(pretty=True).encode("utf-8"))
        staged.append(tokenizer_tmp)
        _commit(out, writers, tokenizer_tmp, meta)
        staged.clear()
    finally:
        stream_path.unlink(missing_ok=True)
        for writer in writers:
            writer.discard()  # no-op for shards already renamed into place
        for tmp in staged:
            tmp.unlink(missing_ok=True)
    return {**meta, "out_dir": str(out), "seconds": round(time.perf_counter() - start_time, 3)}


def _commit(out: Path, writers: list[_ShardWriter], tokenizer_tmp: Path, meta: dict) -> None:
    """Move the staged files into place: meta.json is removed first and written last."""
    meta_path = out / "meta.json"
    meta_path.unlink(missing_ok=True)
    fsync_dir(out)
    keep = {"tokenizer.json", "meta.json"}
    for writer in writers:
        for shard in writer.shards:
            os.replace(shard["tmp"], out / shard["file"])
            keep.add(shard["file"])
    os.replace(tokenizer_tmp, out / "tokenizer.json")
    fsync_dir(out)
    write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
    for path in out.iterdir():  # shards of an earlier, larger dataset
        if _SHARD_RE.match(path.name) and path.name not in keep:
            path.unlink(missing_ok=True)


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``mor prepare`` arguments to ``parser`` and return it."""
    parser.add_argument(
        "sources", nargs="*", default=[SHAKESPEARE], metavar="SOURCE",
        help=f"text sources: {SOURCES_HELP}. Default: shakespeare",
    )
    parser.add_argument("--out", required=True, help="output directory for shards, tokenizer.json, meta.json")
    parser.add_argument(
        "--tokenizer", default=None,
        help="existing tokenizer.json (or a folder holding one) instead of training a BPE",
    )
    parser.add_argument("--vocab-size", type=validate.positive_int, default=8192, help="BPE vocabulary size to train (default 8192)")
    parser.add_argument(
        "--val-fraction", type=validate.unit_fraction, default=0.005,
        help="share of tokens held out as whole documents for validation (default 0.005)",
    )
    parser.add_argument("--seed", type=validate.nonneg_int, default=0, help="seed of the validation hold-out (default 0)")
    parser.add_argument("--text-field", default="text", help="JSON field / parquet column with the text (default text)")
    parser.add_argument(
        "--shard-tokens", type=validate.positive_int, default=50_000_000,
        help="maximum tokens per .bin shard (default 50,000,000)",
    )
    return parser


def run_prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`prepare` from parsed ``mor prepare`` arguments.

    Shows a progress bar on stderr while tokenizing and prints a short
    human-readable summary on stdout (the ``mor`` CLI then prints the returned
    dict as one JSON line). Returns the JSON-serializable summary: the
    ``meta.json`` contents plus ``out_dir`` and ``seconds``.
    """
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is an existing file; give a directory (new or a prepared one)")
    with runlock.RunLock(out, "mor prepare"):  # one writer; then clear what a killed one left
        runlock.remove_stale_temporaries(out)
        summary = prepare(
            args.sources or [SHAKESPEARE],
            args.out,
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            val_fraction=args.val_fraction,
            seed=args.seed,
            text_field=args.text_field,
            shard_tokens=getattr(args, "shard_tokens", 50_000_000),
            progress=True,
        )
    train, val = summary["splits"]["train"], summary["splits"]["val"]
    print(f"prepared {summary['out_dir']}: {summary['num_documents']:,} documents from "
          f"{', '.join(summary['sources'])} in {summary['seconds']:.1f} s")
    print(f"  train: {train['tokens']:,} tokens in {len(train['shards'])} shard(s); "
          f"val: {val['tokens']:,} tokens ({val['documents']} documents)")
    print(f"  tokenizer.json: vocab {summary['vocab_size']:,}, eos id {summary['eos_id']} "
          f"({summary['eos_token']}), shards {summary['dtype']}")
    return summary
