"""Stage 3 of the data pipeline: a prepared directory -> token streams and training batches.

:func:`load_meta` reads and checks ``meta.json``; :func:`read_split` returns a whole split as
one token stream (the one reader of a prepared split); :class:`TokenLoader` yields training
batches from memory-mapped shards.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .. import validate
from .sources import DataError

#: Version of the prepared-directory layout written to ``meta.json``.
FORMAT_VERSION = 1


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


def read_split(data_dir: str | os.PathLike, split: str = "val", max_tokens: int | None = None) -> np.ndarray:
    """The ``split`` of a prepared directory as one int64 token stream (all its shards in
    order), cut to its first ``max_tokens`` tokens when given."""
    directory = Path(data_dir).expanduser()
    meta = load_meta(directory)
    if split not in meta["splits"]:
        raise DataError(f"{directory} has no {split!r} split (splits: {', '.join(meta['splits'])})")
    stream = _ShardedStream(directory, meta["splits"][split]["shards"], np.dtype(meta["dtype"]))
    n = stream.num_tokens if max_tokens is None else max(0, min(stream.num_tokens, int(max_tokens)))
    out = np.empty(n, dtype=np.int64)
    if n:
        stream.read(0, n, out)
    return out


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
