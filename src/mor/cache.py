"""Recursion-aware KV caches: a preallocated, paged key/value pool (SPEC.md section 5).

Cache groups
------------
A model's decoder layers fall into *cache groups*: sets of layers that always see the same
tokens, so that one token count and one block list per sequence describe all of them.

* ``full``: the unique prefix and suffix layers (Middle-* sharing) - or every layer of a
  vanilla model. Every token writes K/V here; the cache index of a token is its position.
* ``rec0 .. rec{N_r-1}`` (``kv_mode="recursion_wise"``): the B layers of recursion r.
  Only tokens that *enter* recursion r write K/V into these slots, in sequence order, and a
  query at recursion r attends to exactly the cached keys of recursion r - the attention
  pattern of the model's compacted forward (causal attention among the kept tokens).
* ``rec0`` only (``kv_mode="shared"``): every token passes recursion 1 and caches its K/V
  there; deeper recursions compute queries only and read recursion 1's K/V (all tokens at
  positions <= the query's; the cache index of a token in ``rec0`` is its position).

Paging
------
The pool is one preallocated tensor per K and V of ``num_blocks`` blocks, each holding
``block_size`` tokens of ONE layer. A sequence's group ``g`` owns a list of *logical*
blocks, each backed by ``layers(g)`` physical blocks (one per layer of the group). Blocks
are taken from one free list shared by all groups, so memory follows the real number of
tokens at each depth, and every block of a sequence returns to the free list when the
sequence finishes. Physical block 0 is never handed out: unused table entries point at
it and writes of padding tokens land in it, so reads of padding are always finite (they
are masked out of attention).

All bookkeeping (free list, block tables, token counts) is host-side NumPy in
:class:`KVPool` and changes only through its methods (the scheduler reserves, the engine
records what a step wrote); the K/V tensors are a separate :class:`KVCache` owned by the
runner, which turns the rows it needs into index tensors once per step.

Memory per token (bytes), with e = element size, kv = num_key_value_heads * head_dim,
F = layers in the full group, B = layers per recursion, f_r = fraction of tokens that
enter recursion r:

    vanilla / full group:       2 * kv * e * F
    recursion-wise:             2 * kv * e * (F + B * sum_r f_r)
    recursive sharing:          2 * kv * e * (F + B)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig


class PoolExhausted(RuntimeError):
    """The KV pool has too few free blocks for an allocation (the caller may preempt)."""


# ---------------------------------------------------------------------- layout
@dataclass(frozen=True)
class CacheLayout:
    """Cache groups of a model: their names, layer counts and the recursion -> group maps.

    ``layer_slot[u_position]`` is not needed: layers are addressed as (group, j) where j is
    the layer's index within its group (prefix layers first, then suffix layers, in the
    ``full`` group; position within the recursion chunk in a ``rec`` group)."""

    names: tuple[str, ...]
    layers: tuple[int, ...]
    full: int | None  # index of the full group (None when the model has no prefix/suffix)
    rec_write: tuple[int | None, ...]  # group recursion r writes into (None: reads only)
    rec_read: tuple[int, ...]  # group recursion r attends to
    num_prefix: int  # layers of the full group that belong to the prefix

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> "CacheLayout":
        prefix, chunks, suffix = cfg.structure()
        names, layers = [], []
        full = None
        if prefix or suffix:
            full = 0
            names.append("full")
            layers.append(len(prefix) + len(suffix))
        rec_write: list[int | None] = []
        rec_read: list[int] = []
        if chunks:
            B = len(chunks[0])
            if cfg.kv_mode == "shared":
                names.append("rec0")
                layers.append(B)
                g0 = len(names) - 1
                rec_write = [g0] + [None] * (len(chunks) - 1)
                rec_read = [g0] * len(chunks)
            else:
                for r in range(len(chunks)):
                    names.append(f"rec{r}")
                    layers.append(B)
                    rec_write.append(len(names) - 1)
                    rec_read.append(len(names) - 1)
        return cls(tuple(names), tuple(layers), full, tuple(rec_write), tuple(rec_read), len(prefix))

    @property
    def num_groups(self) -> int:
        return len(self.names)

    @property
    def total_layers(self) -> int:
        return sum(self.layers)


def kv_bytes_per_token_layer(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of K plus V for one token in one layer."""
    elt = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_key_value_heads * cfg.head_dim * elt


def expected_kv_layers_per_token(cfg: ModelConfig, enter_fractions: list[float] | None = None) -> float:
    """Layer-slots of KV one token occupies on average (SPEC.md section 5 memory formulas).

    ``enter_fractions[r]`` is the fraction of tokens that enter recursion r; by default
    ``cfg.enter_fractions()``."""
    layout = CacheLayout.for_config(cfg)
    full = layout.layers[layout.full] if layout.full is not None else 0
    if not layout.rec_read:
        return float(full)
    B = cfg.layers_per_recursion
    if cfg.kv_mode == "shared":
        return float(full + B)
    if enter_fractions is None:
        enter_fractions = cfg.enter_fractions()
    return float(full + B * sum(enter_fractions))


# ---------------------------------------------------------------------- pool
class KVPool:
    """The bookkeeping of a paged K/V memory: the free list, per-sequence per-group block
    tables and token counts. Host-side NumPy only; the K/V tensors are a :class:`KVCache`
    owned by the runner. Every change goes through a method (``ensure``, ``add_tokens``,
    ``add_written``, ``trim``, ``free_seq``).

    ``max_seqs`` sequence slots, each able to hold ``max_len`` tokens in every group;
    ``num_blocks`` physical blocks of ``block_size`` tokens (block 0 is reserved)."""

    def __init__(self, layout: CacheLayout, *, num_blocks: int, block_size: int, max_seqs: int, max_len: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        if block_size <= 0 or num_blocks < 2 or max_seqs <= 0 or max_len <= 0:
            raise ValueError(f"invalid pool size: num_blocks={num_blocks} (need >= 2), block_size={block_size}, "
                             f"max_seqs={max_seqs}, max_len={max_len}")
        self.layout = layout
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_seqs = max_seqs
        self.max_len = max_len
        self.max_blocks = math.ceil(max_len / block_size)
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.block_bytes = 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
        self._free = np.arange(num_blocks - 1, 0, -1, dtype=np.int64)  # a stack; block 0 reserved
        self._nfree = num_blocks - 1
        G = layout.num_groups
        # one (groups, seqs, blocks, most layers) array, so that rows of different groups can be
        # addressed in one NumPy operation; tables[g] is group g's view (its own layer count)
        self._table = np.zeros((G, max_seqs, self.max_blocks, max(layout.layers, default=1)), dtype=np.int64)
        self.tables = [self._table[g, :, :, :n] for g, n in enumerate(layout.layers)]
        self.nblocks = np.zeros((G, max_seqs), dtype=np.int64)  # logical blocks owned
        self.lens = np.zeros((G, max_seqs), dtype=np.int64)  # tokens written (read-only outside the pool)
        self.peak_used = 0
        self.group_peak = [0] * G

    # .................................................................. accounting
    @property
    def table_array(self) -> np.ndarray:
        """Every group's block tables in one (groups, seqs, blocks per seq, most layers) int64
        array (``tables[g]`` are views of it; it lives as long as the pool): read-only outside."""
        return self._table

    @property
    def free_blocks(self) -> int:
        return self._nfree

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - 1 - self._nfree

    @property
    def capacity_bytes(self) -> int:
        return (self.num_blocks - 1) * self.block_bytes

    @property
    def used_bytes(self) -> int:
        return self.used_blocks * self.block_bytes

    def group_used_blocks(self) -> list[int]:
        return [int(self.nblocks[g].sum()) * n for g, n in enumerate(self.layout.layers)]

    def blocks_for(self, tokens_per_group: list[int]) -> int:
        """Physical blocks needed to hold ``tokens_per_group[g]`` tokens in each group."""
        return sum(math.ceil(t / self.block_size) * n for t, n in zip(tokens_per_group, self.layout.layers))

    def worst_case_blocks(self, tokens: int) -> int:
        """Blocks a sequence of ``tokens`` tokens needs if every token enters every recursion."""
        return self.blocks_for([tokens] * self.layout.num_groups)

    def num_tokens(self, group, seqs: np.ndarray) -> np.ndarray:
        """Tokens written so far in ``group`` (one group, or one per sequence) by each sequence
        (the cache index of the next)."""
        return self.lens[group, np.asarray(seqs, dtype=np.int64)]

    def restart_peaks(self) -> None:
        """Let the peak statistics restart from the current use."""
        self.peak_used = self.used_blocks
        self.group_peak = self.group_used_blocks()

    # .................................................................. allocation
    def ensure(self, group: int, seqs: np.ndarray, new_lens: np.ndarray) -> None:
        """Give each sequence in ``seqs`` room for ``new_lens`` tokens in ``group``.

        All or nothing: raises PoolExhausted (allocating nothing) when the free list is short."""
        seqs = np.asarray(seqs, dtype=np.int64)
        new_lens = np.asarray(new_lens, dtype=np.int64)
        if seqs.size == 0:
            return
        if int(new_lens.max()) > self.max_len:
            raise ValueError(f"a sequence needs {int(new_lens.max())} cache entries but max_len={self.max_len}")
        want = -(-new_lens // self.block_size)
        need = want - self.nblocks[group, seqs]
        rows = np.nonzero(need > 0)[0]
        if rows.size == 0:
            return
        n_layers = self.layout.layers[group]
        total = int(need[rows].sum()) * n_layers
        if total > self._nfree:
            raise PoolExhausted(f"KV pool needs {total} more blocks but {self._nfree} are free")
        ids = self._free[self._nfree - total:self._nfree][::-1].copy()
        self._nfree -= total
        table, o = self.tables[group], 0
        for i in rows:
            s, k, have = int(seqs[i]), int(need[i]), int(self.nblocks[group, seqs[i]])
            table[s, have:have + k] = ids[o:o + k * n_layers].reshape(k, n_layers)
            o += k * n_layers
            self.nblocks[group, s] = have + k
        self.peak_used = max(self.peak_used, self.used_blocks)
        self.group_peak[group] = max(self.group_peak[group], int(self.nblocks[group].sum()) * n_layers)

    def ensure_one_more(self, group: int, seqs: np.ndarray) -> None:
        """Room for one more token in ``group`` for each sequence (see ``ensure``)."""
        seqs = np.asarray(seqs, dtype=np.int64)
        self.ensure_one_more_each(np.full(seqs.shape, group, dtype=np.int64), seqs)

    def ensure_one_more_each(self, groups: np.ndarray, seqs: np.ndarray) -> None:
        """Room for one more token in group ``groups[i]`` for sequence ``seqs[i]`` (distinct
        pairs): one array check, then ``ensure`` group by group in increasing order for the
        pairs that need a new block (none in most decode steps)."""
        groups = np.asarray(groups, dtype=np.int64)
        seqs = np.asarray(seqs, dtype=np.int64)
        if not groups.size:
            return
        new_lens = self.lens[groups, seqs] + 1
        short = np.flatnonzero(new_lens > self.nblocks[groups, seqs] * self.block_size)
        if not short.size:
            return
        short = short[np.argsort(groups[short], kind="stable")]  # group by group, as ``ensure`` would
        groups, seqs, new_lens = groups[short], seqs[short], new_lens[short]  # each needs one more block
        layers = self.layout.layers
        gl, sl = groups.tolist(), seqs.tolist()
        total = sum(layers[g] for g in gl)
        if total > self._nfree or new_lens.max() > self.max_len:  # let ``ensure`` allocate what fits and raise
            for g in dict.fromkeys(gl):
                mine = groups == g
                self.ensure(g, seqs[mine], new_lens[mine])
            return
        ids = self._free[self._nfree - total:self._nfree][::-1].copy()
        self._nfree -= total
        o = 0
        for g, s in zip(gl, sl):
            n, have = layers[g], int(self.nblocks[g, s])
            self._table[g, s, have, :n] = ids[o:o + n]
            self.nblocks[g, s] = have + 1
            o += n
        self.peak_used = max(self.peak_used, self.used_blocks)
        for g in dict.fromkeys(gl):
            self.group_peak[g] = max(self.group_peak[g], int(self.nblocks[g].sum()) * layers[g])

    def add_tokens(self, group: int, seqs: np.ndarray, count: np.ndarray | int = 1) -> None:
        """Record that each sequence wrote ``count`` more tokens into ``group`` (within the
        room ``ensure`` gave)."""
        seqs = np.asarray(seqs, dtype=np.int64)
        new = self.lens[group, seqs] + count
        if np.any(-(-new // self.block_size) > self.nblocks[group, seqs]):
            raise RuntimeError("KV tokens recorded beyond the blocks a sequence owns (ensure() was not called)")
        self.lens[group, seqs] = new

    def add_written(self, written: np.ndarray) -> None:
        """Record ``written[g, s]`` new tokens in group g for every sequence slot s."""
        new = self.lens + written
        if (new > self.nblocks * self.block_size).any():  # more entries than the blocks hold
            raise RuntimeError("KV tokens recorded beyond the blocks a sequence owns (ensure() was not called)")
        self.lens[:] = new

    def _release(self, ids: np.ndarray) -> None:
        ids = ids.reshape(-1)
        self._free[self._nfree:self._nfree + ids.size] = ids
        self._nfree += ids.size

    def trim(self, seq: int) -> None:
        """Return blocks a sequence owns beyond what its token counts need (after a prefill
        reserved the worst case)."""
        for g in range(self.layout.num_groups):
            keep = -(-int(self.lens[g, seq]) // self.block_size)
            have = int(self.nblocks[g, seq])
            if have > keep:
                self._release(self.tables[g][seq, keep:have])
                self.tables[g][seq, keep:have] = 0
                self.nblocks[g, seq] = keep

    def free_seq(self, seq: int) -> None:
        """Return every block of a sequence slot and reset its counts."""
        for g in range(self.layout.num_groups):
            have = int(self.nblocks[g, seq])
            if have:
                self._release(self.tables[g][seq, :have])
                self.tables[g][seq, :have] = 0
            self.nblocks[g, seq] = 0
            self.lens[g, seq] = 0

    # .................................................................. addressing
    def row_index(self, group, seqs: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Physical row (block * block_size + offset) of cache entry ``idx`` of each sequence,
        for every layer: shape idx.shape + (layers,). ``group``: one group (its layer count), or
        one group per sequence (an (n,) array: the most layers of any group; columns past a
        row's own group count are not meaningful). Negative ``idx`` (padding) maps to row 0 of
        the reserved block."""
        per_row = np.ndim(group) > 0
        groups = np.asarray(group, dtype=np.int64)
        if groups.size and groups.min() < 0:
            raise ValueError("row_index: a row without a cache group (group < 0)")
        seqs = np.asarray(seqs, dtype=np.int64)
        idx = np.asarray(idx, dtype=np.int64)
        extra = (1,) * (idx.ndim - seqs.ndim)
        seq_idx = seqs.reshape(seqs.shape + extra)
        group_idx = groups.reshape(groups.shape + extra) if per_row else groups
        padded = idx.size and idx.min() < 0
        safe = np.where(idx < 0, 0, idx) if padded else idx
        blocks = safe // self.block_size
        beyond = blocks >= self.nblocks[group_idx, seq_idx]
        if padded:
            beyond &= idx >= 0
        if beyond.any():
            raise RuntimeError("KV write outside the blocks a sequence owns (ensure() was not called)")
        rows = self._table[group_idx, seq_idx, blocks] * self.block_size + (safe % self.block_size)[..., None]
        if padded:
            rows[idx < 0] = 0
        return rows if per_row else rows[..., :self.layout.layers[group]]

    def block_table(self, group, seqs: np.ndarray, num_blocks: int) -> np.ndarray:
        """(len(seqs), num_blocks, layers) physical block ids (0 beyond a sequence's blocks);
        ``group`` one group or one per sequence (as in ``row_index``)."""
        seqs = np.asarray(seqs, dtype=np.int64)
        if np.ndim(group) == 0:
            return self.tables[group][seqs, :num_blocks]
        return self._table[np.asarray(group, dtype=np.int64)[:, None], seqs[:, None], np.arange(num_blocks)[None, :]]

    def stats(self) -> dict:
        return {
            "kv_pool_bytes": self.capacity_bytes,
            "kv_used_bytes": self.used_bytes,
            "kv_peak_bytes": self.peak_used * self.block_bytes,
            "kv_block_bytes": self.block_bytes,
            "kv_group_peak_bytes": {n: p * self.block_bytes for n, p in zip(self.layout.names, self.group_peak)},
            "kv_group_used_bytes": {n: u * self.block_bytes for n, u in zip(self.layout.names, self.group_used_blocks())},
        }


# ---------------------------------------------------------------------- device tensors
class KVCache:
    """The K/V tensors a :class:`KVPool` describes: ``num_blocks`` blocks of ``block_size``
    rows, each row one token of one layer. Zero-initialised: padding reads must be finite
    (0 * NaN would poison attention)."""

    def __init__(self, pool: KVPool, device: torch.device | str):
        self.device = torch.device(device)
        self.num_blocks, self.block_size = pool.num_blocks, pool.block_size
        shape = (pool.num_blocks, pool.block_size, pool.num_kv_heads, pool.head_dim)
        self.k = torch.zeros(shape, dtype=pool.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=pool.dtype, device=self.device)
        self.k_rows = self.k.view(pool.num_blocks * pool.block_size, pool.num_kv_heads, pool.head_dim)
        self.v_rows = self.v.view(pool.num_blocks * pool.block_size, pool.num_kv_heads, pool.head_dim)

    def write(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V (N, kv_heads, head_dim) at physical rows (N,)."""
        self.k_rows.index_copy_(0, rows, k.to(self.k.dtype))
        self.v_rows.index_copy_(0, rows, v.to(self.v.dtype))

    def gather(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of blocks (N, nb) as (N, kv_heads, nb * block_size, head_dim) views for attention."""
        N, nb = blocks.shape
        flat = blocks.reshape(-1)
        # index_select on whole-block rows is a plain row copy (much faster than advanced indexing)
        k = self.k.view(self.num_blocks, -1).index_select(0, flat)
        v = self.v.view(self.num_blocks, -1).index_select(0, flat)
        shape = (N, nb * self.block_size) + tuple(self.k.shape[2:])
        return k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)


def worst_case_bytes(cfg: ModelConfig, *, max_seqs: int, max_len: int, dtype: torch.dtype, block_size: int = 16) -> int:
    """KV bytes for ``max_seqs`` sequences of ``max_len`` tokens with every token in every recursion."""
    layout = CacheLayout.for_config(cfg)
    per_seq = sum(math.ceil(max_len / block_size) * n for n in layout.layers) * block_size
    return max_seqs * per_seq * kv_bytes_per_token_layer(cfg, dtype)


def make_pool(cfg: ModelConfig, *, max_seqs: int, max_len: int, dtype: torch.dtype,
              block_size: int = 16, num_blocks: int | None = None, memory_bytes: int | None = None) -> KVPool:
    """A pool for ``cfg``. Size: ``num_blocks``, or ``memory_bytes`` of K/V, or by default
    enough for ``max_seqs`` sequences of ``max_len`` tokens in the worst case (every token
    in every recursion) - which never needs preemption."""
    layout = CacheLayout.for_config(cfg)
    block_bytes = block_size * kv_bytes_per_token_layer(cfg, dtype)
    if num_blocks is None:
        if memory_bytes is not None:
            num_blocks = int(memory_bytes // block_bytes) + 1
        else:
            # the engine admits a request when its worst case plus one block per layer of
            # slack fits (Engine._add): size the default pool for exactly that
            per_seq = sum(math.ceil(max_len / block_size) * n for n in layout.layers) + layout.total_layers
            num_blocks = max_seqs * per_seq + 1
    return KVPool(layout, num_blocks=max(int(num_blocks), 2), block_size=block_size, max_seqs=max_seqs,
                  max_len=max_len, num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, dtype=dtype)
