"""The runner: builds batch tensors and runs the model's modules against the KV pool.

It never calls ``MoRForCausalLM.forward``; it calls the model's submodules (embedding,
decoder layers' norms / projections / MLPs, routers, final norm, LM head) and
``mor.model.apply_rope_signed`` (``apply_rope`` bit for bit) / ``rope_cos_sin``, so the math is
the model's own. Routing follows the causal rule of ``model(ids, routing="threshold")``
(SPEC.md sections 3-5):

* expert-choice: a token runs recursion r iff it ran r-1 (all tokens at r=0) and either
  the capacity c_r is 1 or its router logit (auxiliary router's with ``use_aux_router``)
  is > 0; a selected token becomes H + g * block(H), g = alpha * act(main router logit);
* token-choice: the router on the first recursion's input fixes the depth (argmax of
  probabilities + loss-free bias); the last recursion ends with H^1 + g * block(H);
* recursive: every recursion; vanilla: no recursions.

The routing decisions and the update of a token's hidden state are ``mor.routing``'s
``token_choice`` / ``continues`` / ``combine``, the model's own definitions; on the CPU
kernels the expert-choice gate g and the update h + g * block(h) are computed in C
(``kernels.RouteRows`` / ``DecodeRows``, tested against ``gate_scores`` and the layers).

``execute(plan)`` runs one engine step (:class:`mor.engine.scheduler.StepPlan`) and returns
a :class:`StepOutput`: prefill the admitted prompts, enter the new tokens, decide, run the
shared block (once, on tokens at mixed depths; or until every token left, for the
sequence schedule), decide again, and finish + sample the tokens that leave. It is built
from these calls, each on a batch of sequence slots:

* ``prefill``  - prompt tokens (all but the last) through the whole model at once, the
  compacted computation of the model's forward, writing every cache it touches;
* ``enter``    - the newest token of each slot: embedding + prefix layers (+ token-choice
  routing); its hidden state stays in ``self.h`` between steps;
* ``recurse``  - ONE recursion for tokens that sit at different depths (the shared block
  runs once on the whole batch when the sharing scheme is Cycle / Middle-Cycle);
* ``finish``   - suffix layers, final norm and LM head for tokens that leave the recursions.

Calls with one token per row (the whole decode step) run on the compiled CPU kernels when
they apply (``mor.engine.kernels``; ``cpu_kernels``): ``_decode_rows`` runs a call's layers
with its gathers, cache addressing and state update in one C call, ``decide`` routes there
(``kernels.RouteRows``), and the LM head and sampling run there too, so that a token's
result does not depend on its batch. Where it applies (vanilla, recursive and expert-choice
models with one shared block and linear routers), the decode part of ``execute`` is one call
(``step_kernel``, a ``kernels.DecodeStep``): the same calls on the same rows in the same
order, with the host work between them in C. Multi-token prefill and every other device run
PyTorch ops.

Attention always reads the cache: K/V of the new tokens are written first, then each
query attends to the cache entries of its group with index <= its own (``qidx``), which
is causal attention among the tokens present at that depth. The runner owns the K/V
tensors (:class:`mor.cache.KVCache`) and only reads the pool's bookkeeping: it counts the
entries it wrote in ``written`` (group x slot) and the engine records them in the pool.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional

from ..cache import KVCache, KVPool
from ..model import MoRForCausalLM, apply_rope_signed, gather_tokens, rope_cos_sin, scatter_tokens, signed_sin
from ..routing import combine, continues, gate_scores, pack_mask, token_choice
from ..runtime import to_device
from . import kernels
from .graphs import DecodeGraphs
from .quant import Int8Linear
from .request import Request
from .sampling import sample
from .scheduler import StepPlan


@dataclass
class StepOutput:
    """What ``ModelRunner.execute`` did.

    ``exits``: requests whose token left the recursions, in sampling order, with the sampled
    ``tokens``, the depth of the producing position ``exit_depths`` and the ``logits`` (N, V).
    ``run_slots`` / ``run_recs``: in-flight tokens that continue, and the recursion each runs
    next. ``prefill_depths``: per prefilled
    request, the depth of each prompt token. ``block_recs``: for each shared-block call, the
    recursion index of each row. ``written``: (groups, slots) cache entries written."""

    exits: list[Request] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    exit_depths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    logits: torch.Tensor | None = None
    run_slots: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    run_recs: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    prefill_depths: list[np.ndarray] = field(default_factory=list)
    block_recs: list[np.ndarray] = field(default_factory=list)
    written: np.ndarray | None = None


@dataclass
class AttentionSegment:
    """Rows [a, b) of a batch that attend to the same cache group."""

    a: int
    b: int
    blocks: torch.Tensor  # (b - a, nb, layers) physical block ids
    mask: torch.Tensor  # (b - a, 1, Q, nb * block_size): key index <= the query's cache index
    qidx: torch.Tensor  # (b - a, Q) the queries' cache indices (each attends to keys 0..qidx)


def kernel_obstacle(model: MoRForCausalLM, pool: KVPool) -> str | None:
    """Why the CPU kernels cannot run ``model`` with ``pool`` (None: they can): CPU, fp32
    activations, norms, routers and cache; bias-free ``nn.Linear`` projections with contiguous
    weights (or the weight-only int8 ``Int8Linear`` of ``decode_precision="int8"``, all seven of
    a layer); one RMSNorm epsilon per layer; a compiler that built them."""
    p = model.model.embed_tokens.weight
    if p.device.type != "cpu" or p.dtype != torch.float32 or pool.dtype != torch.float32:
        return f"they run fp32 on CPU (this model: {p.dtype} on {p.device.type})"
    if pool.block_size > kernels.MAX_BLOCK_SIZE or model.config.head_dim > kernels.MAX_HEAD_DIM:
        return (f"block_size <= {kernels.MAX_BLOCK_SIZE} and head_dim <= {kernels.MAX_HEAD_DIM} "
                f"(here {pool.block_size}, {model.config.head_dim})")

    def plain(m: nn.Module) -> bool:
        return (type(m) is nn.Linear and m.bias is None and m.weight.dtype == torch.float32
                and m.weight.is_contiguous())

    if not p.is_contiguous():
        return "the embedding weight must be contiguous"
    if not plain(model.lm_head):
        return f"the LM head must be a bias-free fp32 nn.Linear (here {type(model.lm_head).__name__})"
    core = model.model
    norms = [core.norm] + [n for layer in core.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    if any(n.weight.dtype != torch.float32 or not n.weight.is_contiguous() for n in norms):
        return "RMSNorm weights must be contiguous fp32"
    for layer in core.layers:
        if layer.input_layernorm.eps != layer.post_attention_layernorm.eps:
            return "a layer's two RMSNorms must share one epsilon"
        mods = kernels.projections(layer)
        if all(type(m) is Int8Linear for m in mods):  # weight-only int8 decode
            if not all(m.weight_q.is_contiguous() and m.scale.dtype == torch.float32 and m.scale.is_contiguous()
                       for m in mods):
                return "Int8Linear layers need contiguous int8 weights and fp32 scales"
        elif not all(plain(m) for m in mods):
            kinds = sorted({type(m).__name__ for m in mods})
            return (f"a layer's projections must all be bias-free fp32 nn.Linear or all Int8Linear "
                    f"(here {', '.join(kinds)})")
    routers = [m for name in ("routers", "aux_routers", "router") if hasattr(core, name)
               for m in getattr(core, name).modules() if isinstance(m, nn.Linear)]
    if any(m.weight.dtype != torch.float32 or not m.weight.is_contiguous() for m in routers):
        return "router weights must be contiguous fp32"
    if not kernels.available():
        return f"not built: {kernels.unavailable_reason()}"
    return None


class ModelRunner:
    """Executes prefill / enter / recurse / finish for one model and one KV pool."""

    def __init__(self, model: MoRForCausalLM, pool: KVPool, max_seqs: int, merge_ratio: float = 1.5,
                 generator: torch.Generator | None = None, cpu_kernels: bool | None = None,
                 kernel_weights: torch.dtype = torch.float32, cuda_graphs: bool | None = None):
        self.model = model
        self.config = cfg = model.config
        self.core = model.model
        self.pool = pool  # read only: block tables and token counts
        self.layout = pool.layout
        self.generator = generator  # for sampling rows whose request has no generator of its own
        p = model.model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        self.cache = KVCache(pool, self.device)
        self.max_seqs = max_seqs
        self.written = np.zeros((self.layout.num_groups, max_seqs), dtype=np.int64)
        self.prefix, self.chunks, self.suffix = cfg.structure()
        self.num_recursions = len(self.chunks)
        # recursion -> the cache group it writes (-1: none) / reads, as arrays for whole batches
        self._rec_write = np.array([-1 if g is None else g for g in self.layout.rec_write], dtype=np.int64)
        self._rec_read = np.array(self.layout.rec_read, dtype=np.int64)
        self.merge_ratio = merge_ratio
        if cfg.architecture == "vanilla":
            self.kind = "vanilla"
        elif cfg.architecture == "recursive":
            self.kind = "recursive"
        else:
            self.kind = cfg.router_type  # "expert" | "token"
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        cos, sin = rope_cos_sin(torch.arange(pool.max_len + 1, device=self.device), self.hd, cfg.rope_theta,
                                self.dtype)
        self._cos, self._sin = cos[0, 0].contiguous(), sin[0, 0].contiguous()  # (max_len + 1, head_dim)
        self._sin_signed = signed_sin(self._sin)  # what the PyTorch layers read (``apply_rope_signed``)
        d = cfg.hidden_size
        # per slot (plus one scratch row, slot max_seqs, for the padding rows of fixed-shape calls)
        self.h = torch.zeros(max_seqs + 1, d, dtype=self.dtype, device=self.device)  # in-flight residual stream
        # expert-choice: the main router's weight g of each slot's next recursion (set by ``decide``)
        self.gate = torch.zeros(max_seqs + 1, dtype=torch.float32, device=self.device)
        # one shared block for every recursion (Cycle / Middle-Cycle sharing): a recursion is one
        # fixed sequence of layers whatever depths its rows sit at
        self.static_block = bool(self.chunks) and all(c == self.chunks[0] for c in self.chunks)
        if self.kind == "token":  # per slot: the first recursion's input, the gate and the depth
            self.h_first = torch.zeros(max_seqs + 1, d, dtype=self.dtype, device=self.device)
            self.token_gate = torch.zeros(max_seqs + 1, 1, dtype=self.dtype, device=self.device)
            self.token_depth = torch.zeros(max_seqs + 1, dtype=torch.long, device=self.device)
            self.token_depth_host = np.zeros(max_seqs, dtype=np.int64)

        # capacities as the model's threshold forward sees them (the final ones: the training-time
        # warm-up does not apply to the causal rule); whether recursion r needs a router decision
        self.capacities = cfg.resolved_capacities() if self.kind == "expert" else []
        needs = [cap < 1.0 for cap in self.capacities]
        self.needs_decision = np.array(needs + [False] * (self.num_recursions + 1 - len(needs)))
        # seconds per phase of ``execute`` (prefill / enter / block / finish / sample), accumulated
        # while a profiler sets it to a dict (mor.engine.profile); None: no clocks read, no syncs
        self.timing: dict[str, float] | None = None
        self.host_timing: dict[str, float] | None = None  # CUDA: the host's part of each phase
        self._mark = 0.0
        # decode (one token per row) on the CPU kernels: None = when they apply, True = required.
        # The kernels read the weights as they are now (a snapshot of the parameter tensors:
        # in-place updates are seen, replaced parameters are not; build a new engine then).
        self.kernels = None
        # the whole decode step in one call of the kernels (kernels.DecodeStep), where it applies
        # (see ``_step_kernel``); None: the step runs as the calls below, from Python
        self.step_kernel: kernels.DecodeStep | None = None
        self.step_kernel_obstacle: str | None = None  # why a step kernel that applies could not be built
        self._step_phases = np.zeros(3, dtype=np.float64)
        # expert-choice with linear routers: ``kernels.RouteRows`` bound to the routers' table
        self._kroute: kernels.RouteRows | None = None
        self._router_params: list[torch.Tensor] = []  # the tensors whose addresses the routers' table holds
        self.kernel_obstacle = why = kernel_obstacle(model, pool) if cpu_kernels is not False else "off"
        if why is None:
            try:  # matrix weights as the kernels read them (bf16 copies for decode_precision="bf16-weights")
                self._klayers = [kernels.DecodeLayer(layer, cfg, kernel_weights) for layer in self.core.layers]
                self._kdims = self._klayers[0].dims
                self._ktables: dict[tuple, torch.Tensor] = {}  # layer run -> its weights table
                self._lm_head = kernels.weight_copy(model.lm_head.weight, kernel_weights)
                self._embed = model.model.embed_tokens.weight.detach()
                # the decode calls' fixed operands (state, RoPE tables, block tables, K/V, embedding,
                # gate), bound and checked once: the runner owns them for the engine's life
                self._kcall = kernels.DecodeRows(self._kdims, self.h, self._cos, self._sin, pool.table_array,
                                                 self.cache.k, self.cache.v, embed=self._embed, gate=self.gate)
                table, self._router_params = self._router_table()
                if table is not None:
                    self._kroute = kernels.RouteRows(self.h, table, cfg.router_func if cfg.gate_combine != "pass_through"
                                                     else None, cfg.router_alpha, self.gate)
                self.kernels = kernels
            except ValueError as e:
                self.kernel_obstacle = why = str(e)
            if self.kernels is not None:
                try:
                    self.step_kernel = self._step_kernel()
                except ValueError as e:  # the per-call kernels still run the step
                    self.step_kernel_obstacle = str(e)
        if cpu_kernels and why:
            raise ValueError(f"cpu_kernels=True, but the CPU kernels cannot run this engine: {why}")
        # decode calls replayed from CUDA graphs (mor.engine.graphs): None = on CUDA, True = required
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs:
            self.graphs = DecodeGraphs(self, capture=True)

    def _step_kernel(self) -> "kernels.DecodeStep | None":
        """The whole decode step as one kernels call (``kernels.DecodeStep``: the same calls as
        ``enter`` / ``decide`` / ``recurse`` / ``finish`` on the kernels, the host work between
        them in C), for vanilla, recursive and expert-choice models whose recursions all run one
        shared block (Cycle / Middle-Cycle) with linear routers; None otherwise (token-choice,
        Sequence sharing, MLP routers: the step runs from Python)."""
        cfg = self.config
        if self.kind == "token" or (self.num_recursions and not self.static_block):
            return None
        if self.kind == "expert" and self._kroute is None:
            return None
        gated = self.kind == "expert" and cfg.gate_combine != "pass_through"
        full = self.layout.full
        norm = self.core.norm
        return kernels.DecodeStep(
            self._kcall, self._kroute, self._table(self.prefix), self._table(self.chunks[0] if self.chunks else []),
            self._table(self.suffix), self.layout.num_prefix, self._rec_write, self._rec_read, self.needs_decision,
            -1 if full is None else full, "gated" if gated else "store",
            self.num_recursions if cfg.use_aux_router else 0, self.pool.lens, self.written, self._embed,
            self.gate, norm.weight.detach(), norm.eps, self._lm_head, self.max_seqs)

    def _router_table(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """The expert-choice routers as ``kernels.RouteRows`` reads them (the main routers, then
        the auxiliary ones; ``kernels.router_table``), or (None, []) when they are not all
        one-output linear routers with contiguous fp32 parameters (then they run as PyTorch
        modules)."""
        if self.kind != "expert":
            return None, []
        nets = [r.net for r in self.core.routers]
        if self.config.use_aux_router:
            nets += [r.net for r in self.core.aux_routers]
        if not all(type(n) is nn.Linear for n in nets):
            return None, []
        try:
            return kernels.router_table(nets)
        except ValueError:  # not one-output fp32 layers with contiguous parameters
            return None, []

    def _tick(self, phase: str) -> None:
        """Charge the time since the last tick to ``phase`` (when timing). On CUDA it first
        charges the host's part - until its last launch returned - to ``host_timing`` (when
        set), then waits for the device."""
        if self.timing is None:
            return
        if self.device.type == "cuda":
            if self.host_timing is not None:
                self.host_timing[phase] = self.host_timing.get(phase, 0.0) + time.perf_counter() - self._mark
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timing[phase] = self.timing.get(phase, 0.0) + now - self._mark
        self._mark = now

    # .................................................................. small helpers

    def _long(self, a) -> torch.Tensor:
        """Host integers as an int64 tensor on the runner's device. On CUDA the copy goes
        through pinned memory without blocking: a copy from pageable memory would wait for every
        kernel queued before it, a hidden host sync (the caching host allocator keeps the pinned
        block until the copy has run)."""
        t = torch.from_numpy(np.array(a, dtype=np.int64))
        return to_device(t, self.device)

    def _rope(self, positions: np.ndarray):
        """cos and signed sin (``signed_sin``) (n, 1, Q, head_dim) for positions (n, Q), looked
        up in tables computed once with the model's ``rope_cos_sin``."""
        n, Q = positions.shape
        p = self._long(positions).reshape(-1)
        return (self._cos.index_select(0, p).view(n, 1, Q, self.hd),
                self._sin_signed.index_select(0, p).view(n, 1, Q, self.hd))

    def _segment(self, group: int, slots: np.ndarray, qidx: np.ndarray, a: int, b: int) -> AttentionSegment:
        qidx = np.asarray(qidx, dtype=np.int64).reshape(len(slots), -1)
        nb = int(qidx.max()) // self.pool.block_size + 1
        return self._make_segment(self.pool.block_table(group, slots, nb), qidx, a, b)

    def _make_segment(self, blocks: np.ndarray, qidx: np.ndarray, a: int, b: int) -> AttentionSegment:
        nb = blocks.shape[1]
        q = self._long(qidx)
        keys = torch.arange(nb * self.pool.block_size, device=self.device)
        mask = keys[None, None, None, :] <= q[:, None, :, None]
        return AttentionSegment(a, b, self._long(blocks), mask, q)

    @staticmethod
    def _clip(segs: list[AttentionSegment], a: int, b: int) -> list[AttentionSegment]:
        out = []
        for s in segs:
            lo, hi = max(s.a, a), min(s.b, b)
            if lo < hi:
                out.append(AttentionSegment(lo - a, hi - a, s.blocks[lo - s.a:hi - s.a],
                                            s.mask[lo - s.a:hi - s.a],
                                            s.qidx[lo - s.a:hi - s.a]))
        return out

    # .................................................................. one layer
    def _cache_index(self, group, slots: np.ndarray) -> np.ndarray:
        """Index of the next entry of each slot in ``group`` (one group, or one per slot):
        recorded plus written this step."""
        return self.pool.num_tokens(group, slots) + self.written[group, slots]

    def _attend(self, q: torch.Tensor, seg: AttentionSegment, j: int) -> torch.Tensor:
        k, v = self.cache.gather(seg.blocks[..., j])
        return functional.scaled_dot_product_attention(q, k, v, attn_mask=seg.mask, enable_gqa=self.n_kv != self.n_heads)

    def _layer(self, u: int, x: torch.Tensor, cos, sin, n_write: int, rows: torch.Tensor | None,
               segs: list[AttentionSegment], j: int) -> torch.Tensor:
        """Decoder layer ``u`` on x (n, Q, d). The first ``n_write`` rows compute K/V and store
        them at physical ``rows`` (n_write * Q,); every row attends through ``segs``; ``j`` is
        the layer's index within its cache group. ``cos`` / ``sin``: ``_rope``'s tables (the
        sin signed: ``apply_rope_signed``, the model's RoPE bit for bit; q and k rotated in one
        go when every row writes, as in the fixed-shape calls: fewer kernels on a GPU)."""
        L = self.core.layers[u]
        at = L.self_attn
        n, Q, _ = x.shape
        H = self.n_heads
        a = L.input_layernorm(x)
        q = at.q_proj(a).view(n, Q, H, self.hd)
        if n_write == n:
            qk = apply_rope_signed(torch.cat([q, at.k_proj(a).view(n, Q, self.n_kv, self.hd)], dim=2).transpose(1, 2),
                                   cos, sin)
            q, k = qk[:, :H], qk[:, H:]
        else:
            q = apply_rope_signed(q.transpose(1, 2), cos, sin)
            if n_write:
                k = apply_rope_signed(at.k_proj(a[:n_write]).view(n_write, Q, self.n_kv, self.hd).transpose(1, 2),
                                      cos[:n_write], sin[:n_write])
        if n_write:
            aw = a[:n_write]
            v = at.v_proj(aw).view(n_write * Q, self.n_kv, self.hd)
            self.cache.write(rows, k.transpose(1, 2).reshape(n_write * Q, self.n_kv, self.hd), v)
        outs = [self._attend(q[s.a:s.b], s, j) for s in segs]
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        hh = x + at.o_proj(o.transpose(1, 2).reshape(n, Q, self.n_heads * self.hd))
        return hh + L.mlp(L.post_attention_layernorm(hh))

    def _layers(self, us: list[int], j0: int, x: torch.Tensor, cos, sin, n_write: int, rows: torch.Tensor | None,
                segs: list[AttentionSegment]) -> torch.Tensor:
        """Decoder layers ``us`` in turn on x (n, Q, d), at positions j0, j0 + 1, ... of their
        cache group; ``rows`` (n_write * Q, len(us)): the physical cache row of each new K/V for
        each layer (or None). PyTorch ops (the CPU kernels' decode calls: ``_decode_rows``)."""
        for i, u in enumerate(us):
            x = self._layer(u, x, cos, sin, n_write, None if rows is None else rows[:, i], segs, j0 + i)
        return x

    def _decode_rows(self, us: list[int], j0: int, ints: np.ndarray, a: int, b: int, n_write: int, mode: str,
                     x: torch.Tensor | None = None, embed: bool = False) -> torch.Tensor | None:
        """Decoder layers ``us`` (layer j0 + i of their cache group) on tokens a..b-1 of ``ints``
        (``kernels.ROW_FIELDS`` x tokens) in one call of the CPU kernels (``kernels.DecodeRows``:
        gathers, cache addressing and the residual update in C, attention reading the paged
        cache in place); input ``x``, else the tokens' embeddings (``embed``), else ``self.h``."""
        return self._kcall(self._table(us), ints, a, b, n_write, j0, mode, x=x, embed=embed)

    def _table(self, us: list[int]) -> torch.Tensor:
        """The kernels' weights table of decoder layers ``us`` ((layers, LAYER_ROW) int64, cached)."""
        key = tuple(us)
        table = self._ktables.get(key)
        if table is None:
            table = self._ktables[key] = torch.tensor([self._klayers[u].row for u in us],
                                                      dtype=torch.int64).reshape(len(us), kernels.LAYER_ROW)
        return table

    def _token_ints(self, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """``kernels.ROW_FIELDS`` x tokens for calls of the unique layers (cache group ``full``,
        entry = position); the token row is left for the caller."""
        ints = np.empty((len(kernels.ROW_FIELDS), len(slots)), dtype=np.int64)
        ints[0], ints[1] = slots, positions
        ints[2] = ints[4] = self.layout.full if self.layout.full is not None else 0
        ints[3] = ints[5] = positions
        return ints

    def _full_layers(self, layers: list[int], j0: int, x: torch.Tensor, slots: np.ndarray,
                     positions: np.ndarray, valid: np.ndarray | None = None) -> torch.Tensor:
        """Unique prefix/suffix layers (cache group ``full``, layer index j0 + i) on x (n, Q, d)
        whose tokens sit at ``positions`` (n, Q); the cache index of a token is its position."""
        if not layers:
            return x
        g = self.layout.full
        n, Q = positions.shape
        widx = positions if valid is None else np.where(valid, positions, -1)
        rows = self._long(self.pool.row_index(g, slots, widx))  # (n, Q, layers)
        qidx = positions if valid is None else np.where(valid, positions, 0)
        seg = self._segment(g, slots, qidx, 0, n)
        cos, sin = self._rope(positions)
        return self._layers(layers, j0, x, cos, sin, n, rows.reshape(n * Q, -1)[:, j0:j0 + len(layers)], [seg])

    # .................................................................. one step
    @torch.no_grad()
    def execute(self, plan: StepPlan) -> StepOutput:
        """Run one planned step: prefill, enter, decide, the shared block (once, or until every
        token left with the sequence schedule), decide, finish and sample the leaving tokens."""
        out = StepOutput()
        self._mark = time.perf_counter()
        if plan.prefill:
            depths = self.prefill([r.slot for r in plan.prefill], [r.all_ids[:-1] for r in plan.prefill])
            out.prefill_depths = [depths[i, :len(r.all_ids) - 1] for i, r in enumerate(plan.prefill)]
            self._tick("prefill")
        if (self.step_kernel is not None and self.graphs is None and plan.positions is not None
                and not (plan.run.size and plan.run_recs[0] == 0)):
            return self._execute_step_kernel(plan, out)
        positions = plan.positions
        slots, recs = plan.run, plan.run_recs  # the shared block's rows, sorted by (recursion, slot)
        leaving, leaving_recs = [], []
        if plan.enter.size:
            enter = plan.enter
            self.enter(enter, plan.tokens[enter], positions[enter])
            go = self.decide(enter, np.zeros(len(enter), dtype=np.int64)) if self.num_recursions else \
                np.zeros(len(enter), dtype=bool)
            leaving.append(enter[~go])
            leaving_recs.append(np.zeros(len(leaving[-1]), dtype=np.int64))
            if go.any():  # they join the block at recursion 0, ahead of the rows that ran more
                joining = enter[go]
                slots = np.concatenate([joining, slots])
                recs = np.concatenate([np.zeros(len(joining), dtype=np.int64), recs])
                if plan.run.size and plan.run_recs[0] == 0:  # (never with the engine's plans: they run >= 1)
                    order = np.lexsort((slots, recs))
                    slots, recs = slots[order], recs[order]
            self._tick("enter")
        while slots.size:  # one shared-block call per pass
            self.recurse(slots, recs, positions[slots])
            out.block_recs.append(recs)
            recs = recs + 1
            go = self.decide(slots, recs)
            leaving.append(slots[~go])
            leaving_recs.append(recs[~go])
            slots, recs = slots[go], recs[go]
            self._tick("block")
            if plan.schedule == "depth":
                break
        out.run_slots, out.run_recs = slots, recs
        if leaving:
            ls, lr = np.concatenate(leaving), np.concatenate(leaving_recs)
            if ls.size:
                order = np.lexsort((ls, lr))
                ls, lr = ls[order], lr[order]
                out.exits = [plan.requests[s] for s in ls.tolist()]
                out.exit_depths = lr
                params, gens = [r.params for r in out.exits], [r.generator for r in out.exits]
                tokens = None
                if self.graphs is not None:  # the fixed-shape call samples where it can
                    out.logits, tokens = self.graphs.finish_and_sample(ls, positions[ls], params, gens, self.generator)
                else:
                    out.logits = self.finish(ls, positions[ls])
                self._tick("finish")
                if tokens is None:
                    tokens = sample(out.logits, params, gens, self.generator, self.kernels)
                out.tokens = tokens.tolist()
                self._tick("sample")
        out.written = self.take_written()
        return out

    def _execute_step_kernel(self, plan: StepPlan, out: StepOutput) -> StepOutput:
        """``execute``'s decode part as one ``kernels.DecodeStep`` call, then sampling. With the
        profiler on, the call's enter / block / finish seconds are measured in C (the host work
        around the call is charged to enter)."""
        phases = None if self.timing is None else self._step_phases
        if phases is not None:
            phases[:] = 0.0
        ls, lr, logits, out.run_slots, out.run_recs, out.block_recs = self.step_kernel(
            plan.enter, plan.run, plan.run_recs, plan.tokens, plan.positions, plan.schedule == "sequence", phases)
        if phases is not None:
            now = time.perf_counter()
            enter, block, finish = phases.tolist()
            self.timing["enter"] = self.timing.get("enter", 0.0) + now - self._mark - block - finish
            self.timing["block"] = self.timing.get("block", 0.0) + block
            self.timing["finish"] = self.timing.get("finish", 0.0) + finish
            self._mark = now
        if ls.size:
            out.exits = [plan.requests[s] for s in ls.tolist()]
            out.exit_depths = lr
            out.logits = logits
            out.tokens = sample(logits, [r.params for r in out.exits], [r.generator for r in out.exits],
                                self.generator, self.kernels).tolist()
            self._tick("sample")
        out.written = self.take_written()
        return out

    def take_written(self) -> np.ndarray:
        """Cache entries written since the last call, (groups, slots); the counter restarts."""
        written = self.written.copy()
        self.written[:] = 0
        return written

    # .................................................................. prefill
    @torch.no_grad()
    def prefill(self, slots: list[int], prompts: list[list[int]]) -> np.ndarray:
        """Run whole prompts (fresh slots with room reserved for their worst case) through the
        model, writing every cache. Returns per-prompt-token depths (n, T) (-1 = padding)."""
        slots = np.asarray(slots, dtype=np.int64)
        n, T = len(prompts), max(len(p) for p in prompts)
        lens = np.array([len(p) for p in prompts], dtype=np.int64)
        ids = torch.zeros(n, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        ids = to_device(ids, self.device)
        valid_np = np.arange(T)[None, :] < lens[:, None]
        pos_np = np.broadcast_to(np.arange(T), (n, T))
        h = self.core.embed_tokens(ids)
        h = self._full_layers(self.prefix, 0, h, slots, pos_np, valid_np)
        valid = to_device(torch.from_numpy(valid_np), self.device)
        depth = torch.zeros(n, T + 1, dtype=torch.long, device=self.device)
        if self.num_recursions:
            h = self._prefill_recursions(h, valid, slots, depth)
        h = self._full_layers(self.suffix, self.layout.num_prefix, h, slots, pos_np, valid_np)
        if self.layout.full is not None:
            self.written[self.layout.full, slots] += lens
        d = depth[:, :T].cpu().numpy()
        d[~valid_np] = -1
        return d

    def _prefill_recursion(self, r: int, x: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor,
                           slots: np.ndarray) -> torch.Tensor:
        """Recursion r on packed tokens x (n, K, d) at positions ``idx`` (n, K; padding = T)."""
        n, K = idx.shape
        valid_np = valid.cpu().numpy()
        pos_np = idx.cpu().numpy()
        write_group, read_group = self.layout.rec_write[r], self.layout.rec_read[r]
        rows, n_write = None, 0
        if write_group is not None:  # this recursion stores K/V: entries follow the group's count
            cidx = self._cache_index(write_group, slots)[:, None] + np.arange(K)[None, :]
            rows = self._long(self.pool.row_index(write_group, slots, np.where(valid_np, cidx, -1)))
            qidx = np.where(valid_np, cidx, 0)
            n_write = n
        else:  # recursive KV sharing: read recursion 1's cache, indexed by position
            qidx = np.where(valid_np, pos_np, 0)
        seg = self._segment(read_group, slots, qidx, 0, n)
        cos, sin = self._rope(np.where(valid_np, pos_np, 0))
        x = self._layers(self.chunks[r], 0, x, cos, sin, n_write, None if rows is None else rows.reshape(n * K, -1), [seg])
        if write_group is not None:
            self.written[write_group, slots] += valid_np.sum(axis=1)
        return x

    def _prefill_recursions(self, h: torch.Tensor, valid: torch.Tensor, slots: np.ndarray,
                            depth: torch.Tensor) -> torch.Tensor:
        """The recursions of whole prompts: the model's compacted threshold forward."""
        cfg = self.config
        n, T, _ = h.shape
        hp = functional.pad(h, (0, 0, 0, 1))  # row T absorbs the padding of packed rows
        arange = torch.arange(T, device=h.device).expand(n, T)
        if self.kind == "token":
            _, choice, g = token_choice(self.core.router(h).float(), cfg.router_func, cfg.router_alpha,
                                        self.core.balance_bias)
            token_gate = functional.pad(g.to(h.dtype), (0, 0, 0, 1))
            assigned = functional.pad(choice + 1, (0, 1))
            h_first = hp
        cand_idx, cand_valid = arange, valid
        for r in range(self.num_recursions):
            gate = is_last = first = None
            if self.kind == "expert":
                x_c = gather_tokens(hp, cand_idx)
                logits = self.core.routers[r](x_c).squeeze(-1).float()
                decision = self.core.aux_routers[r](x_c).squeeze(-1).float() if cfg.use_aux_router else logits
                top, sel_valid = pack_mask(cand_valid & continues(decision, self.capacities[r]), pad_index=0)
                sel_idx = torch.where(sel_valid, cand_idx.gather(1, top), T)
                gate = gate_scores(logits.gather(1, top), cfg.router_func, cfg.router_alpha)[..., None]
            elif self.kind == "token":
                sel_idx, sel_valid = pack_mask(valid & (assigned[:, :T] >= r + 1), pad_index=T)
            else:
                sel_idx, sel_valid = arange, valid
            if sel_idx.size(1) == 0:
                break
            x = gather_tokens(hp, sel_idx)
            y = self._prefill_recursion(r, x, sel_idx, sel_valid, slots)
            if self.kind == "token":
                gate = gather_tokens(token_gate, sel_idx)
                is_last = gather_tokens(assigned[..., None], sel_idx) == r + 1
                first = gather_tokens(h_first, sel_idx)
            elif gate is not None:
                gate = gate.to(y.dtype)
            hp = scatter_tokens(hp, sel_idx, combine(cfg, x, y, gate, is_last, first))
            depth.scatter_add_(1, sel_idx, sel_valid.long())
            cand_idx, cand_valid = sel_idx, sel_valid
        return hp[:, :T]

    # .................................................................. decode
    @torch.no_grad()
    def enter(self, slots: np.ndarray, tokens: np.ndarray, positions: np.ndarray) -> None:
        """Embedding + prefix layers for each slot's newest token; the result becomes the
        slot's in-flight hidden state. Token-choice: the router fixes the token's depth."""
        slots = np.asarray(slots, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        if self.graphs is not None:
            return self.graphs.enter(slots, np.asarray(tokens, dtype=np.int64), positions)
        full = self.layout.full
        if self.kernels is not None:
            ints = self._token_ints(slots, positions)
            ints[6] = tokens
            self._decode_rows(self.prefix, 0, ints, 0, len(slots), len(slots) if full is not None else 0, "store",
                              embed=True)
        else:
            x = self.core.embed_tokens(self._long(tokens))[:, None, :]
            x = self._full_layers(self.prefix, 0, x, slots, positions[:, None])
            self.h.index_copy_(0, self._long(slots), x[:, 0])
        if full is not None:
            self.written[full, slots] += 1
        if self.kind == "token":
            cfg = self.config
            st = self._long(slots)
            x0 = self.h.index_select(0, st)
            _, choice, gate = self._rowwise(lambda t: token_choice(t, cfg.router_func, cfg.router_alpha,
                                                                   self.core.balance_bias),
                                            self._route(self.core.router.net, x0).float())
            self.h_first.index_copy_(0, st, x0)
            self.token_gate.index_copy_(0, st, gate.to(self.dtype))
            self.token_depth.index_copy_(0, st, choice + 1)
            self.token_depth_host[slots] = (choice + 1).cpu().numpy()

    @torch.no_grad()
    def decide(self, slots: np.ndarray, recs: np.ndarray) -> np.ndarray:
        """Whether each in-flight token (having run ``recs`` recursions) runs one more.
        ``slots`` sorted by ``recs``. Expert-choice: the routers run on every token that may
        continue, and the main router's weight g of that recursion is kept per slot for
        ``recurse`` (``self.gate``: a token's next ``recurse`` follows the ``decide`` that let it
        continue, on the same hidden state). One host sync at most."""
        slots = np.asarray(slots, dtype=np.int64)
        recs = np.asarray(recs, dtype=np.int64)
        go = recs < self.num_recursions
        if self.kind == "token":
            go &= recs < self.token_depth_host[slots]
        elif self.kind == "expert":
            # the fixed-shape calls compute the decision logits of their rows' next recursion
            kept = None if self.graphs is None else self.graphs.take_decision(slots, recs)
            if go.all():  # the common case: no token is past the last recursion
                rows, s, r = None, slots, recs
            else:
                rows = np.flatnonzero(go)
                s, r = slots[rows], recs[rows]
            if r.size:
                if kept is not None:
                    decision = kept if rows is None else kept[rows]
                else:
                    decision = self._route_expert(s, r)
                need = self.needs_decision[r]
                go[need if rows is None else rows[need]] = continues(decision[need], 0.0)
        return go

    def _route_expert(self, slots: np.ndarray, recs: np.ndarray) -> np.ndarray:
        """Expert-choice routers of recursion ``recs[i]`` on ``h[slots[i]]``: returns the decision
        logits (the auxiliary router's with ``use_aux_router``; fp32 NumPy; meaningful where the
        recursion needs a decision, ``needs_decision``) and stores the gate g = alpha *
        act(main logit) in ``self.gate[slot]`` for the eager ``recurse`` (not when the gate
        passes through, nor when CUDA graphs replay the block: they compute it inside).
        Linear routers on the CPU kernels: one ``kernels.RouteRows`` call for both."""
        cfg = self.config
        nr = self.num_recursions
        gated = cfg.gate_combine != "pass_through"
        if self._kroute is not None:
            return self._kroute(slots, recs + nr if cfg.use_aux_router else recs, recs)
        gated = gated and not (self.graphs is not None and self.static_block)
        decision = np.zeros(len(slots), dtype=np.float32)
        rows = np.flatnonzero(self.needs_decision[recs])
        main = None
        if gated:
            st = self._long(slots)
            main = self._router_logits(self.core.routers, self.h.index_select(0, st), recs)
            gate = self._rowwise(lambda t: gate_scores(t, cfg.router_func, cfg.router_alpha), main)
            self.gate.index_copy_(0, st, gate.to(self.gate.dtype))
        if rows.size:  # one host sync, only when some token's recursion has a capacity below 1
            if main is not None and not cfg.use_aux_router:
                logits = main.index_select(0, self._long(rows))
            else:
                routers = self.core.aux_routers if cfg.use_aux_router else self.core.routers
                logits = self._router_logits(routers, self.h.index_select(0, self._long(slots[rows])), recs[rows])
            decision[rows] = logits.cpu().numpy()
        return decision

    def _router_logits(self, routers, x: torch.Tensor, recs: np.ndarray) -> torch.Tensor:
        """``routers[recs[i]](x[i])`` (fp32) for every row. Linear routers run as one matmul
        over their stacked weights; MLP routers run once per recursion present."""
        if all(isinstance(r.net, nn.Linear) for r in routers):
            return self._router_logits_at(routers, x, self._long(recs))
        out = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
        for r in np.unique(recs):
            rows = self._long(np.nonzero(recs == r)[0])
            out[rows] = self._route(routers[int(r)].net, x.index_select(0, rows)).squeeze(-1).float()
        return out

    def _router_logits_at(self, routers, x: torch.Tensor, recs: torch.Tensor) -> torch.Tensor:
        """``_router_logits`` with the recursions as a device tensor and no host work (fixed-shape
        calls): linear routers as one stacked matmul, MLP routers each on every row."""
        stacked = self._stacked_routers(routers)
        if stacked is not None:
            W, bias = stacked
            out = functional.linear(x, W) if self.kernels is None else self.kernels.linear(x.contiguous(), W)
            if bias is not None:
                out = out + bias
        else:
            out = torch.cat([router.net(x) for router in routers], dim=1)
        return out.gather(1, recs[:, None]).squeeze(1).float()

    @staticmethod
    def _stacked_routers(routers) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Linear routers' weights (N_r, d) and biases (or None) stacked as they are now (a few
        microseconds per call; a cached stack would miss ``.data`` updates); None for MLP routers."""
        nets = [r.net for r in routers]
        if not all(isinstance(n, nn.Linear) for n in nets):
            return None
        W = torch.cat([n.weight.detach() for n in nets])
        bias = None
        if any(n.bias is not None for n in nets):
            bias = torch.cat([n.bias.detach() if n.bias is not None else torch.zeros_like(n.weight[:, 0]) for n in nets])
        return W, bias

    def _route(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A router network on x (n, d). On the CPU kernels its linear layers run there, so that
        a token's routing decision, like the rest of its step, does not depend on its batch
        (and its activations run on padded rows, ``_rowwise``)."""
        if self.kernels is None:
            return net(x)

        def run(x):
            for m in (net if isinstance(net, nn.Sequential) else [net]):
                if isinstance(m, nn.Linear):
                    y = self.kernels.linear(x.contiguous(), m.weight.detach())
                    x = y if m.bias is None else y + m.bias
                else:
                    x = m(x)
            return x

        return self._rowwise(run, x)

    ROW_PAD = 64

    def _rowwise(self, fn, x: torch.Tensor):
        """``fn(x)`` for a row-wise ``fn``; on the CPU kernel path computed on x padded with zero
        rows to a multiple of ``ROW_PAD`` rows. PyTorch's vectorised exp / tanh / erf round the
        tail of a tensor (past the last full vector) differently from its body, so without the
        padding a token's routing activations could depend on how many tokens share its step."""
        n = x.shape[0]
        pad = -n % self.ROW_PAD
        if self.kernels is None or pad == 0:
            return fn(x)
        out = fn(torch.cat([x, x.new_zeros((pad,) + tuple(x.shape[1:]))]))
        return tuple(o[:n] for o in out) if isinstance(out, tuple) else out[:n]

    def _plan_attention(self, segs: list[tuple], recs: np.ndarray, slots: np.ndarray) -> list[AttentionSegment]:
        """One attention call per cache group read, or a single call for the whole batch (each
        row reading its own group's blocks, padded to the longest) when padding costs less than
        ``merge_ratio`` times the split's reads: fewer, larger calls for short contexts."""
        bs = self.pool.block_size
        nbs = [int(np.max(q)) // bs + 1 for _, _, q in segs]
        groups = [self.layout.rec_read[int(recs[a])] for a, _, _ in segs]
        n = segs[-1][1]
        split = sum((b - a) * nb for (a, b, _), nb in zip(segs, nbs))
        if len(segs) == 1 or n * max(nbs) > self.merge_ratio * split:
            return [self._segment(g, slots[a:b], q, a, b) for g, (a, b, q) in zip(groups, segs)]
        nb = max(nbs)
        blocks = np.concatenate([self.pool.block_table(g, slots[a:b], nb) for g, (a, b, _) in zip(groups, segs)])
        qidx = np.concatenate([np.asarray(q, dtype=np.int64).reshape(-1, 1) for _, _, q in segs])
        return [self._make_segment(blocks, qidx, 0, n)]

    @torch.no_grad()
    def recurse(self, slots: np.ndarray, recs: np.ndarray, positions: np.ndarray) -> None:
        """One recursion (index ``recs[i]``) for each slot's in-flight token. ``slots`` must be
        sorted by ``recs``; the caller reserved room for one entry in each written group, and
        (expert-choice) ran ``decide(slots, recs)`` on the same hidden states, which set the
        slots' gates (``self.gate``; without it the update would use a stale gate)."""
        slots = np.asarray(slots, dtype=np.int64)
        recs = np.asarray(recs, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        if self.graphs is not None and self.static_block:
            return self.graphs.recurse(slots, recs, positions)
        if self.kernels is not None:
            return self._recurse_kernels(slots, recs, positions)
        n = len(slots)
        st = self._long(slots)
        x_in = self.h.index_select(0, st)
        cos, sin = self._rope(positions[:, None])
        bounds = np.flatnonzero(np.diff(recs)) + 1
        ranges = list(zip([0, *bounds.tolist()], [*bounds.tolist(), n]))  # rows of each recursion
        # cache plan: writes (rows with a write group come first: r=0 in shared mode); each row
        # writes entry cidx of its write group and attends to its read group up to qidx
        write_group, read_group = self._rec_write[recs], self._rec_read[recs]
        n_write = int((write_group >= 0).sum())
        qidx = positions.copy()
        rows_all = None
        if n_write:
            wg, ws = write_group[:n_write], slots[:n_write]
            cidx = self._cache_index(wg, ws)
            rows_all = self._long(self.pool.row_index(wg, ws, cidx)[:, :len(self.chunks[0])])
            qidx[:n_write] = cidx
        segs = []
        for a, b in ranges:
            if segs and read_group[segs[-1][0]] == read_group[a]:
                segs[-1] = (segs[-1][0], b)
            else:
                segs.append((a, b))
        segments = self._plan_attention([(a, b, qidx[a:b]) for a, b in segs], recs, slots)
        # the shared block: for each layer position j, the runs of rows that use the same unique
        # layer (one run under Cycle / Middle-Cycle sharing: then the whole block in one call)
        x = x_in[:, None, :]
        runs_by_j = self._layer_runs(recs)
        if all(len(runs) == 1 for runs in runs_by_j):
            x = self._layers([runs[0][2] for runs in runs_by_j], 0, x, cos, sin, n_write, rows_all, segments)
        else:
            for j, runs in enumerate(runs_by_j):
                parts = []
                for a, b, u in runs:
                    nw = max(0, min(b, n_write) - a)
                    parts.append(self._layers([u], j, x[a:b], cos[a:b], sin[a:b], nw,
                                              rows_all[a:a + nw, j:j + 1] if nw else None, self._clip(segments, a, b)))
                x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        self._combine(st, recs, x_in, x[:, 0])
        if n_write:
            self.written[write_group[:n_write], slots[:n_write]] += 1

    def _layer_runs(self, recs: np.ndarray) -> list[list[list[int]]]:
        """For each layer position j of the shared block, the runs [a, b, u] of rows (sorted by
        recursion) that use the same unique layer u: one run per j under Cycle / Middle-Cycle
        sharing, one per recursion present under Sequence sharing."""
        bounds = np.flatnonzero(np.diff(recs)) + 1
        ranges = list(zip([0, *bounds.tolist()], [*bounds.tolist(), len(recs)]))
        out = []
        for j in range(len(self.chunks[0])):
            runs: list[list[int]] = []
            for a, b in ranges:
                u = self.chunks[int(recs[a])][j]
                if runs and runs[-1][2] == u:
                    runs[-1][1] = b
                else:
                    runs.append([a, b, u])
            out.append(runs)
        return out

    def _combine(self, st: torch.Tensor, recs: np.ndarray, x_in: torch.Tensor, y: torch.Tensor) -> None:
        """The slots' new hidden states after a recursion: ``routing.combine`` of the input
        x_in, the block's output y and the token's gate (and, token-choice, H^1 and whether the
        recursion was its last)."""
        cfg = self.config
        gate = is_last = first = None
        if self.kind == "expert" and cfg.gate_combine != "pass_through":
            gate = self.gate.index_select(0, st)[:, None].to(y.dtype)
        elif self.kind == "token":
            gate = self.token_gate.index_select(0, st)
            is_last = (self.token_depth.index_select(0, st) == self._long(recs) + 1)[:, None]
            first = self.h_first.index_select(0, st)
        self.h.index_copy_(0, st, combine(cfg, x_in, y, gate, is_last, first))

    def _recurse_kernels(self, slots: np.ndarray, recs: np.ndarray, positions: np.ndarray) -> None:
        """``recurse`` on the CPU kernels: the shared block in one ``_decode_rows`` call that also
        applies the expert-choice update (h + g * block(h)) or stores the block's output; per
        layer and run of rows when recursions use different layers (Sequence sharing)."""
        cfg = self.config
        n = len(slots)
        write_group = self._rec_write[recs]
        n_write = int((write_group >= 0).sum())
        ints = np.empty((len(kernels.ROW_FIELDS), n), dtype=np.int64)
        ints[0], ints[1], ints[4], ints[5] = slots, positions, self._rec_read[recs], positions
        if n_write:  # rows with a write group come first; a writer attends up to its new entry
            wg, ws = write_group[:n_write], slots[:n_write]
            ints[2, :n_write] = wg
            ints[3, :n_write] = ints[5, :n_write] = self._cache_index(wg, ws)
            self.written[wg, ws] += 1
        expert = self.kind == "expert" and cfg.gate_combine != "pass_through"
        if self.static_block:
            if expert:
                return self._decode_rows(self.chunks[0], 0, ints, 0, n, n_write, "gated")
            if self.kind != "token":  # recursive, or the gate passes through: the block's output
                return self._decode_rows(self.chunks[0], 0, ints, 0, n, n_write, "store")
            y = self._decode_rows(self.chunks[0], 0, ints, 0, n, n_write, "out")
        else:  # layer by layer, each run of rows that use the same unique layer in one call
            y = None
            for j, runs in enumerate(self._layer_runs(recs)):
                parts = [self._decode_rows([u], j, ints, a, b, max(0, min(b, n_write) - a), "out",
                                           x=None if y is None else y[a:b].contiguous())
                         for a, b, u in runs]
                y = parts[0] if len(parts) == 1 else torch.cat(parts)
        st = self._long(slots)
        self._combine(st, recs, self.h.index_select(0, st), y)

    @torch.no_grad()
    def finish(self, slots: np.ndarray, positions: np.ndarray) -> torch.Tensor:
        """Suffix layers, final norm and LM head for tokens leaving the recursions: (n, V) fp32."""
        slots = np.asarray(slots, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        if self.graphs is not None:
            return self.graphs.finish(slots, positions)
        if self.kernels is not None:
            n = len(slots)
            y = self._decode_rows(self.suffix, self.layout.num_prefix, self._token_ints(slots, positions), 0, n,
                                  n if self.layout.full is not None else 0, "out")
            norm = self.core.norm
            return self.kernels.linear(self.kernels.rms_norm(y, norm.weight, norm.eps), self._lm_head)
        x = self.h.index_select(0, self._long(slots))[:, None, :]
        x = self._full_layers(self.suffix, self.layout.num_prefix, x, slots, positions[:, None])
        return self.model.lm_head(self.core.norm(x[:, 0])).float()
