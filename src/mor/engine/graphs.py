"""Decode steps as fixed-shape calls, captured as CUDA graphs.

A decode step (``ModelRunner.execute`` without prefill) is three calls, each on one token
per sequence slot: ``enter`` (embedding + prefix layers), ``recurse`` (one recursion of the
shared block for tokens at mixed depths) and ``finish`` (suffix layers, final norm, LM
head). On a GPU a small model's step is a few hundred small kernels, and launching them
from Python costs more than running them. Here each call becomes a function of two
integer tensors of a fixed shape, which a CUDA graph records once per shape and replays:

* ``ints`` (B, columns): per row its slot, token / recursion, position, cache index of its
  query (``qidx``) and the physical cache row of its new K/V in each layer;
* ``blocks`` (B, nb, layers): the block table each row's attention reads.

B is the number of rows rounded up to a bucket (1, 2, 4, 8, 16, ..., 64, 80, ..., 128, 160,
... up to the engine's max_batch: from 32 rows up, padding under a quarter) and nb the
blocks read rounded up likewise, so a few hundred graphs at most cover every step. The
padding rows are harmless by construction: they read and write the scratch slot (row ``max_seqs`` of the runner's per-slot state, set back to zero at the end
of every call), write their K/V to row 0 of the reserved block 0, and attend only to it.
Rows that store no K/V (recursive KV sharing) write there too, so every row runs the same
ops. The model's arithmetic is the runner's own (``ModelRunner._layer``, the routers,
``mor.routing.combine``); the host side - which rows, which cache entries, the bookkeeping
of what was written - is the same as the eager calls'.

``capture=False`` runs the same fixed-shape functions eagerly (on any device): the tests use
it to check the padded formulation on the CPU against the eager runner.
"""

from __future__ import annotations

import weakref
from bisect import bisect_right
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..routing import combine, gate_scores, token_choice
from .sampling import draw, fixed_shape_rule

# columns of ``ints`` for each phase (followed by one physical row per layer of the call)
SLOT, TOKEN, REC, POS, QIDX = 0, 1, 1, 2, 3
HEAD = 4  # leading columns: slot, token-or-recursion, position, qidx


def buckets(limit: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 up to 64, of 16 up to 128, of 32 up to 256, and so on
    (from 32 up, padding stays under a quarter), the last one ``limit``."""
    out = [b for b in (1, 2, 4) if b < limit]
    b = 8
    while b < limit:
        out.append(b)
        b += max(8, 1 << (b.bit_length() - 3))
    return out + [limit]


def bucket(n: int, sizes: list[int]) -> int:
    """The smallest size >= n."""
    i = int(np.searchsorted(sizes, n))
    if i == len(sizes):
        raise ValueError(f"{n} rows exceed the largest bucket {sizes[-1]}")
    return sizes[i]


@dataclass
class _Call:
    """One fixed shape of one phase: its input buffers, and its graph and outputs once captured."""

    ints: torch.Tensor
    blocks: torch.Tensor
    graph: "torch.cuda.CUDAGraph | None" = None
    out: dict | None = None
    # host staging (pinned on CUDA: the copies run asynchronously) and the event after the last
    # copy out of it, waited on before the staging is written again
    host_ints: torch.Tensor | None = None
    host_blocks: torch.Tensor | None = None
    copied: "torch.cuda.Event | None" = None


class DecodeGraphs:
    """Fixed-shape ``enter`` / ``recurse`` / ``finish`` for a :class:`ModelRunner`, replayed
    from CUDA graphs (``capture=True``, CUDA only) or run eagerly on padded inputs."""

    def __init__(self, runner, capture: bool = True):
        # a weak reference: the runner owns this object, and a cycle would keep the KV cache and
        # the graphs' memory alive after the engine is dropped, until the garbage collector runs
        self._runner = weakref.ref(runner)
        r = runner
        if capture and r.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device (the model is on {r.device})")
        self.capture = capture
        self.scratch = r.max_seqs  # the padding rows' slot
        self.batch_sizes = buckets(r.max_seqs)
        self.block_counts = buckets(r.pool.max_blocks)
        self._calls: dict[tuple, _Call] = {}
        self._mempool = torch.cuda.graph_pool_handle() if capture else None
        self.captured = 0  # graphs recorded so far
        # expert-choice: the routing decision logits that the last ``enter`` / ``recurse`` computed
        # for its rows' next recursion, on their way to the host (``take_decision``)
        self._decision: tuple | None = None
        # sampling inside ``finish`` (``finish_and_sample``): per row its temperature and uniform
        # number, read by every finish call (rows [0, B)); padding rows draw at temperature 1
        self.temperatures = torch.ones(r.max_seqs, dtype=torch.float32, device=r.device)
        self.uniforms = torch.zeros(r.max_seqs, dtype=torch.float32, device=r.device)

    @property
    def r(self):
        """The runner these calls belong to."""
        return self._runner()

    @property
    def static_block(self) -> bool:
        """Whether ``recurse`` is a fixed-shape call (``ModelRunner.static_block``: the same layers
        in every recursion); otherwise it runs eagerly."""
        return self.r.static_block

    # .................................................................. shapes and replay
    def phases(self) -> dict[str, tuple[Callable, int]]:
        """Each fixed-shape phase: its function and the number of layers (write-row columns)."""
        r = self.r
        out = {"enter": (self._enter_fn, len(r.prefix)), "finish": (self._finish_fn, len(r.suffix))}
        if self.static_block:
            out["recurse"] = (self._recurse_fn, len(r.chunks[0]))
        return out

    def record_all(self, max_rows: int | None = None, max_len: int | None = None) -> int:
        """Record every graph that steps of up to ``max_rows`` rows (default max_batch) with
        contexts of up to ``max_len`` tokens (default the pool's) can replay; returns how many
        were new. Without it graphs are recorded on first use."""
        r = self.r
        rows = self.batch_sizes[:bisect_right(self.batch_sizes, bucket(max_rows or r.max_seqs, self.batch_sizes))]
        nb = -(-(max_len or r.pool.max_len) // r.pool.block_size)
        counts = self.block_counts[:bisect_right(self.block_counts, bucket(nb, self.block_counts))]
        before = len(self._calls)
        for phase, (fn, layers) in self.phases().items():
            for B in reversed(rows):  # largest first: later graphs reuse its memory
                for NB in reversed(counts if layers else [1]):
                    self._call(phase, fn, B, NB, layers)
        return len(self._calls) - before

    def _call(self, phase: str, fn: Callable, B: int, NB: int, layers: int) -> _Call:
        """The fixed-shape call (phase, B, NB), made (and recorded) on first use."""
        key = (phase, B, NB)
        call = self._calls.get(key)
        if call is None:
            r = self.r
            ints = torch.zeros(B, HEAD + layers, dtype=torch.long, device=r.device)  # the padding rows (no blocking copy)
            ints[:, SLOT] = self.scratch
            blocks = torch.zeros(B, NB, layers, dtype=torch.long, device=r.device)
            pin = r.device.type == "cuda"
            call = self._calls[key] = _Call(ints, blocks, host_ints=torch.empty(B, HEAD + layers, dtype=torch.long,
                                                                                pin_memory=pin),
                                            host_blocks=torch.zeros(B, NB, layers, dtype=torch.long, pin_memory=pin))
            if self.capture:
                self._record(call, fn)
        return call

    def _run(self, phase: str, fn: Callable, host_ints: np.ndarray, host_blocks: np.ndarray) -> dict:
        """Run ``fn`` on n rows (``host_ints`` (n, HEAD + layers), ``host_blocks`` (n, nb,
        layers)) padded to a bucket with padding rows (``_pad``)."""
        r = self.r
        n, nb, layers = host_blocks.shape
        B, NB = bucket(n, self.batch_sizes), bucket(max(nb, 1), self.block_counts)
        call = self._call(phase, fn, B, NB, layers)
        if call.copied is not None:
            call.copied.synchronize()  # the previous copy out of the staging has finished
        full, table = call.host_ints.numpy(), call.host_blocks.numpy()
        full[:n] = host_ints
        full[n:] = self._pad(layers)
        table[:n, :nb] = host_blocks
        table[:n, nb:] = 0
        table[n:] = 0
        cuda = r.device.type == "cuda"
        call.ints.copy_(call.host_ints, non_blocking=cuda)
        call.blocks.copy_(call.host_blocks, non_blocking=cuda)
        if cuda:
            call.copied = call.copied or torch.cuda.Event()
            call.copied.record(torch.cuda.current_stream(r.device))
        if call.graph is None:
            return fn(call.ints, call.blocks)
        call.graph.replay()
        # the outputs live in the pool all graphs share: the caller copies what it needs before
        # the next replay (enter: the depths to the host; finish: a clone of the logits)
        return call.out

    def _record(self, call: _Call, fn: Callable) -> None:
        """Warm up on a side stream (with the padding inputs: only scratch rows change), then
        record ``fn`` into a graph whose memory comes from the shared pool."""
        stream = torch.cuda.Stream(self.r.device)
        stream.wait_stream(torch.cuda.current_stream(self.r.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn(call.ints, call.blocks)
        torch.cuda.current_stream(self.r.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            call.out = fn(call.ints, call.blocks)
        call.graph = graph
        self.captured += 1

    # .................................................................. shared pieces
    def _pad(self, layers: int) -> np.ndarray:
        row = np.zeros(HEAD + layers, dtype=np.int64)
        row[SLOT] = self.scratch
        return row

    def _rope(self, pos: torch.Tensor):
        r = self.r
        B = pos.shape[0]
        return (r._cos.index_select(0, pos).view(B, 1, 1, r.hd), r._sin_signed.index_select(0, pos).view(B, 1, 1, r.hd))

    def _stack(self, us: list[int], x: torch.Tensor, cos, sin, ints: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Layers ``us`` in turn on x (B, 1, d): in layer i every row writes its K/V at
        ``ints[:, HEAD + i]`` and attends to its blocks ``blocks[..., i]`` up to ``ints[:, QIDX]``."""
        from .runner import AttentionSegment
        r = self.r
        B, nb = blocks.shape[0], blocks.shape[1]
        qidx = ints[:, QIDX:QIDX + 1]
        keys = torch.arange(nb * r.pool.block_size, device=x.device)
        seg = AttentionSegment(0, B, blocks, keys[None, None, None, :] <= qidx[:, None, :, None], qidx)
        for i, u in enumerate(us):
            x = r._layer(u, x, cos, sin, B, ints[:, HEAD + i], [seg], i)
        return x

    def _clear_scratch(self) -> None:
        r = self.r
        r.h[self.scratch].zero_()
        if r.kind == "token":
            r.h_first[self.scratch].zero_()

    # .................................................................. routing decisions
    def _decides(self, rec: int) -> bool:
        """Whether tokens about to run recursion ``rec`` need an expert-choice decision (its
        capacity is below 1) that the fixed-shape calls compute: when ``recurse`` is one of them
        (``static_block``), since it also computes the gate that ``decide`` would otherwise set."""
        r = self.r
        return (r.kind == "expert" and self.static_block and rec < r.num_recursions
                and bool(r.needs_decision[rec]))

    def _decision_logits(self, h: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """The decision logits (fp32, per row) of recursion ``rec`` on hidden states ``h``: the
        auxiliary routers' with ``use_aux_router``, else the main routers' (``decide``'s rule)."""
        r = self.r
        routers = r.core.aux_routers if r.config.use_aux_router else r.core.routers
        return r._router_logits_at(routers, h, rec)

    def _keep_decision(self, out: dict, slots: np.ndarray, recs: np.ndarray) -> None:
        """Start copying the call's decision logits (if it made them) to the host, without
        blocking, for the ``decide`` that follows on the same rows (``take_decision``)."""
        self._decision = None
        logits = out.get("decision")
        if logits is None:
            return
        n = len(slots)
        cuda = self.r.device.type == "cuda"
        host = torch.empty(n, dtype=torch.float32, pin_memory=cuda)
        host.copy_(logits[:n], non_blocking=cuda)
        done = None
        if cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.r.device))
        self._decision = (slots.copy(), recs.copy(), host, done)

    def take_decision(self, slots: np.ndarray, recs: np.ndarray) -> np.ndarray | None:
        """The decision logits of recursions ``recs`` for ``slots`` (fp32 NumPy) when the last
        ``enter`` / ``recurse`` computed them for exactly these rows (waiting for their copy to
        the host, as the eager routers' read-back did); None otherwise. Either way they are
        used up."""
        kept, self._decision = self._decision, None
        if kept is None:
            return None
        s, rc, host, done = kept
        if not (np.array_equal(s, slots) and np.array_equal(rc, recs)):
            return None
        if done is not None:
            done.synchronize()
        return host.numpy()

    def _full_group_call(self, phase: str, fn: Callable, slots: np.ndarray, tokens: np.ndarray | int,
                         positions: np.ndarray, lo: int, hi: int) -> dict:
        """``fn`` on layers lo..hi-1 of the ``full`` cache group (the prefix or suffix layers),
        where a token's cache index is its position."""
        r = self.r
        host = np.empty((len(slots), HEAD + hi - lo), dtype=np.int64)
        host[:, SLOT], host[:, TOKEN], host[:, POS], host[:, QIDX] = slots, tokens, positions, positions
        blocks = np.zeros((len(slots), 1, 0), dtype=np.int64)
        if hi > lo:
            g = r.layout.full
            host[:, HEAD:] = r.pool.row_index(g, slots, positions)[:, lo:hi]
            nb = int(positions.max()) // r.pool.block_size + 1
            blocks = r.pool.block_table(g, slots, nb)[:, :, lo:hi]
        return self._run(phase, fn, host, blocks)

    # .................................................................. enter
    def enter(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> None:
        """``ModelRunner.enter`` as a fixed-shape call."""
        r = self.r
        out = self._full_group_call("enter", self._enter_fn, slots, tokens, positions, 0, len(r.prefix))
        if r.layout.full is not None:
            r.written[r.layout.full, slots] += 1
        self._keep_decision(out, slots, np.zeros(len(slots), dtype=np.int64))
        if r.kind == "token":
            r.token_depth_host[slots] = out["depth"][:len(slots)].cpu().numpy()

    def _enter_fn(self, ints: torch.Tensor, blocks: torch.Tensor) -> dict:
        r = self.r
        slot = ints[:, SLOT]
        x = r.core.embed_tokens(ints[:, TOKEN])[:, None, :]
        if r.prefix:
            cos, sin = self._rope(ints[:, POS])
            x = self._stack(r.prefix, x, cos, sin, ints, blocks)
        r.h.index_copy_(0, slot, x[:, 0])
        out = {}
        if r.kind == "token":
            cfg = r.config
            _, choice, gate = token_choice(r.core.router(x[:, 0]).float(), cfg.router_func, cfg.router_alpha,
                                           r.core.balance_bias)
            r.h_first.index_copy_(0, slot, x[:, 0])
            r.token_gate.index_copy_(0, slot, gate.to(r.dtype))
            r.token_depth.index_copy_(0, slot, choice + 1)
            out["depth"] = choice + 1
        if self._decides(0):
            out["decision"] = self._decision_logits(x[:, 0], torch.zeros_like(slot))
        self._clear_scratch()
        return out

    # .................................................................. recurse
    def recurse(self, slots: np.ndarray, recs: np.ndarray, positions: np.ndarray) -> None:
        """``ModelRunner.recurse`` as a fixed-shape call (needs ``static_block``)."""
        r = self.r
        L = len(r.chunks[0])
        write_group, read_group = r._rec_write[recs], r._rec_read[recs]
        writes = write_group >= 0
        cidx = np.full(len(slots), -1, dtype=np.int64)
        qidx = positions.copy()
        if writes.any():
            cidx[writes] = r._cache_index(write_group[writes], slots[writes])
            qidx[writes] = cidx[writes]
        host = np.empty((len(slots), HEAD + L), dtype=np.int64)
        host[:, SLOT], host[:, REC], host[:, POS], host[:, QIDX] = slots, recs, positions, qidx
        # rows without a write group: write to the reserved row (cidx -1), read their own group
        rows = r.pool.row_index(np.where(writes, write_group, read_group), slots, cidx)[:, :L]
        nb = int(qidx.max()) // r.pool.block_size + 1
        host[:, HEAD:] = rows
        blocks = r.pool.block_table(read_group, slots, nb)[:, :, :L]
        out = self._run("recurse", self._recurse_fn, host, blocks)
        if writes.any():
            r.written[write_group[writes], slots[writes]] += 1
        self._keep_decision(out, slots, recs + 1)

    def _recurse_fn(self, ints: torch.Tensor, blocks: torch.Tensor) -> dict:
        r = self.r
        cfg = r.config
        slot, rec = ints[:, SLOT], ints[:, REC]
        x_in = r.h.index_select(0, slot)
        cos, sin = self._rope(ints[:, POS])
        y = self._stack(r.chunks[0], x_in[:, None, :], cos, sin, ints, blocks)[:, 0]
        gate = is_last = first = None
        if r.kind == "expert" and cfg.gate_combine != "pass_through":
            gate = gate_scores(r._router_logits_at(r.core.routers, x_in, rec), cfg.router_func,
                               cfg.router_alpha)[:, None].to(y.dtype)
        elif r.kind == "token":
            gate = r.token_gate.index_select(0, slot)
            is_last = (r.token_depth.index_select(0, slot) == rec + 1)[:, None]
            first = r.h_first.index_select(0, slot)
        h = combine(cfg, x_in, y, gate, is_last, first)
        r.h.index_copy_(0, slot, h)
        out = {}
        if any(self._decides(k) for k in range(1, r.num_recursions)):
            out["decision"] = self._decision_logits(h, (rec + 1).clamp(max=r.num_recursions - 1))
        self._clear_scratch()
        return out

    # .................................................................. finish
    def finish(self, slots: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """``ModelRunner.finish`` as a fixed-shape call: (n, V) fp32 logits (a copy)."""
        return self.finish_and_sample(slots, positions, None)[0]

    def finish_and_sample(self, slots: np.ndarray, positions: np.ndarray, params: list | None,
                          generators: list | None = None, default_generator: torch.Generator | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``finish``, and the tokens of the rows (``params[i]`` / ``generators[i]`` for row i)
        drawn inside the same call where ``sampling.fixed_shape_rule`` allows (every row greedy,
        or every row at a plain temperature with no generator of its own: one uniform number per
        row from ``default_generator``, drawn before the call, as ``sample`` draws them): (logits
        (n, V) fp32 copy, tokens (n,) or None when ``sample`` must run)."""
        r = self.r
        n = len(slots)
        rule = None if params is None else fixed_shape_rule(params, generators or [None] * n)
        if rule == "draw":  # (the buffer only ever holds temperatures > 0: padding rows draw at 1)
            temps = torch.ones(len(self.temperatures), dtype=torch.float32)
            temps[:n] = torch.tensor([p.temperature for p in params], dtype=torch.float32)
            cuda = r.device.type == "cuda"
            self.temperatures.copy_(temps.pin_memory() if cuda else temps, non_blocking=cuda)
            self.uniforms[:n].uniform_(generator=default_generator)
        lo = r.layout.num_prefix
        out = self._full_group_call("finish", self._finish_fn, slots, 0, positions, lo, lo + len(r.suffix))
        tokens = None if rule is None else out["greedy" if rule == "greedy" else "drawn"][:n].clone()
        return out["logits"][:n].clone(), tokens

    def _finish_fn(self, ints: torch.Tensor, blocks: torch.Tensor) -> dict:
        r = self.r
        x = r.h.index_select(0, ints[:, SLOT])[:, None, :]
        if r.suffix:
            cos, sin = self._rope(ints[:, POS])
            x = self._stack(r.suffix, x, cos, sin, ints, blocks)
        logits = r.model.lm_head(r.core.norm(x[:, 0])).float()
        B = logits.shape[0]
        return {"logits": logits, "greedy": logits.argmax(dim=-1),
                "drawn": draw(logits, self.temperatures[:B], self.uniforms[:B])}
