"""What every verb needs: devices and dtypes, atomic writes, JSON conversion, the end-of-text token.

* **Devices** (:func:`resolve_device`): ``auto`` (every verb's default) is CUDA when
  available, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` are checked.
* **Dtypes** (:func:`resolve_dtype`, :func:`autocast_for`): weights in ``fp32``, ``bf16`` or
  ``fp16`` (``auto``: bf16 on CUDA, fp32 elsewhere); training and evaluation keep fp32
  weights and run under bf16 autocast on CUDA (``auto``) or when asked (``bf16``).
* **Atomic writes** (:func:`write_atomic`, :func:`atomic_directory`): a file or a directory
  is written under a temporary name next to its final place, synced, and renamed into
  place, so a crash never leaves a half-written file and never damages the previous one.
  Files get the usual permissions (0666 minus the umask).
* **JSON** (:func:`jsonable`, :func:`write_json`, :func:`read_json`): results may hold
  tensors, numpy numbers and paths.
* **End-of-text token** (:func:`find_eos`): the token appended after every document.

This module imports torch only where a function needs it (``mor prepare`` does not).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

#: The end-of-text token of trained tokenizers (id 0), then other names recognised in given ones.
EOS_TOKEN = "<|endoftext|>"
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
DTYPE_NAMES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")


# ---------------------------------------------------------------------- devices and dtypes
def resolve_device(name: Any = "auto"):
    """``auto`` (or None) -> cuda when available, else cpu; otherwise the named device (checked)."""
    import torch

    from .config import ConfigError

    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={name!r} is not a device; choose auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available; choose cpu or auto")
    return dev


def resolve_dtype(name: Any, device=None):
    """A weight dtype from its name (``fp32``/``float32``, ``bf16``/``bfloat16``, ``fp16``/``float16``);
    ``auto`` or None: bf16 on a CUDA ``device``, fp32 otherwise."""
    import torch

    from .config import ConfigError

    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        cuda = device is not None and torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ConfigError(f"dtype={name!r} is not valid; choose one of: {', '.join(DTYPE_NAMES)}")
    return table[name]


def autocast_for(device, dtype: str = "auto") -> Callable[[], Any]:
    """A context factory for mixed precision of fp32 weights: bf16 autocast when ``dtype`` is
    ``bf16``, or ``auto`` on CUDA; otherwise no autocast (fp32)."""
    import torch

    device = torch.device(device)
    if dtype in ("bf16", "bfloat16") or (dtype == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext


# ---------------------------------------------------------------------- atomic writes
def to_device(t, device):
    """A host tensor on ``device``: itself on the CPU; on CUDA copied from pinned memory without
    blocking the host. A copy from pageable memory first waits for every kernel queued before
    it - a hidden host sync in a decode step; PyTorch's caching host allocator keeps the pinned
    block until the copy has run."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Persist renames in ``directory`` (a no-op where directories cannot be opened)."""
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


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temp_file(directory: str | os.PathLike, name: str) -> Path:
    """An empty hidden temporary file in ``directory`` destined for ``name``, with the usual
    permissions (mkstemp alone would make it private)."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, _default_mode())
    return Path(tmp)


def stage_file(directory: str | os.PathLike, name: str, data: str | bytes) -> Path:
    """Write ``data`` to a synced temporary file destined for ``directory/name``; return its path
    (rename it into place, e.g. with ``os.replace``, when everything it belongs with is ready)."""
    tmp = temp_file(directory, name)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Replace the file ``path`` with ``data`` (text as UTF-8) atomically."""
    path = Path(path)
    tmp = stage_file(path.parent, path.name, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory atomically: yields an empty temporary directory next to ``path``; when
    the block ends without error, its files are synced and it replaces ``path`` (an older
    directory there is removed only after the new one is in place). On error nothing changes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.parent / f".old-{path.name}-{os.getpid()}-{time.time_ns()}"
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------- JSON
def jsonable(o: Any) -> Any:
    """``json.dumps(default=...)`` for results: tensors as lists, numpy numbers as numbers,
    paths as strings, anything else as its repr."""
    if hasattr(o, "__fspath__"):
        return os.fspath(o)
    if hasattr(o, "tolist"):  # torch tensors, numpy arrays and numpy numbers
        return o.tolist()
    return repr(o)


def json_safe(obj: Any) -> Any:
    """``obj`` converted for strict JSON: values ``jsonable`` converts, and every NaN / infinite
    float replaced by None (strict parsers reject NaN)."""
    def finite(o: Any) -> Any:
        if isinstance(o, float):
            return o if math.isfinite(o) else None
        if isinstance(o, dict):
            return {k: finite(v) for k, v in o.items()}
        if isinstance(o, list):
            return [finite(v) for v in o]
        return o

    return finite(json.loads(json.dumps(obj, default=jsonable)))


def to_json(obj: Any, indent: int | None = 2, sort_keys: bool = False) -> str:
    """Strict JSON text of ``obj`` (see ``json_safe``), with a final newline."""
    return json.dumps(json_safe(obj), indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """``obj`` as JSON, written atomically (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, to_json(obj, indent=indent, sort_keys=sort_keys))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or None when the file is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------- tokenizers
def find_eos(tokenizer) -> tuple[int, str] | None:
    """(id, text) of the tokenizer's end-of-document token (the first of ``EOS_CANDIDATES`` it
    has), or None."""
    for token in EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return int(token_id), token
    return None
