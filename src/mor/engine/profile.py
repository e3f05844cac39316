"""Where a decode step's time goes (issue 17's measurement).

Two views of the same engine, each averaged over ``steps`` consecutive ``Engine.step`` calls:

* **phases** (wall clock, no profiler): ``schedule`` (the scheduler's plan), the runner's
  ``prefill`` / ``enter`` (embedding + prefix layers + first routing decision) / ``block``
  (the shared block and its routing) / ``finish`` (suffix layers, final norm, LM head) /
  ``sample``, the engine's ``postprocess``, and ``other`` (the rest of ``Engine.step``).
  They sum to the measured step time. On CUDA each phase boundary synchronises the device.
* **ops** (``torch.profiler``): the self time of every aten op in the steps, by kind:
  ``matmul`` (mm / addmm / bmm / int8 weight-only mm), ``attention`` (the SDPA kernels),
  ``kv_copy`` (index_select / index_copy of cache rows and hidden states: the paged K/V
  gather and write), ``other_ops`` (everything else: norms, RoPE, masks, routing, sampling
  arithmetic) and ``host`` (the step's wall time not inside any op: Python, NumPy
  bookkeeping, dispatch). With the CPU kernels (``Engine.cpu_kernels``) a decode layer is one
  compiled call that the profiler does not see: its own phase clocks (``mor.engine.kernels``,
  ``PROFILE_PHASES``) are added to the kinds (projections and LM head -> matmul, attention ->
  attention, RoPE + cache write -> kv_copy, norms -> other_ops) and taken out of ``host``
  (what stays in ``host`` from the compiled calls: their serial gathers and state updates,
  the routers, the final norm and sampling, and starting their threads);
  ``kernel_phases_s`` keeps them by phase. They sum to the profiled step time (which the profiler inflates;
  compare shares, not absolute numbers, with the unprofiled phases). On CUDA the op times
  are device (kernel) times and ``host`` is what the device did not cover.

On CUDA two more numbers say whether a step is bound by the host: ``host_phases_s``, the part
of each runner phase until its last launch returned (before the phase clock waits for the
device; it includes the waits inside the phase - the decisions' event in enter / block,
token-choice's depths, sampling's read-back - so read it with ``syncs_per_step``), and
``syncs_per_step``, the synchronising CUDA operations per step that PyTorch's sync debug
mode reports (reading values back, copies from pageable memory; event waits are not counted).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

PHASES = ("schedule", "prefill", "enter", "block", "finish", "sample", "postprocess", "other")
OP_KINDS = ("matmul", "attention", "kv_copy", "other_ops", "host")

_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm", "aten::baddbmm")
_KV_COPY = ("aten::index_select", "aten::index_copy_", "aten::index_copy")
# ops that only dispatch to one of the above: their (small) self time counts, their calls do not
_COMPOSITE = ("aten::scaled_dot_product_attention", "aten::linear", "aten::matmul")


def op_kind(name: str) -> str:
    """The kind (``OP_KINDS`` less ``host``) of an aten op or CUDA kernel name."""
    low = name.lower()
    if name in _MATMUL or "gemm" in low or "gemv" in low:
        return "matmul"
    if "scaled_dot_product" in low or "flash" in low or "attention" in low or "fmha" in low:
        return "attention"
    if name in _KV_COPY or "index_select" in low or "indexcopy" in low or "index_copy" in low:
        return "kv_copy"
    return "other_ops"


@dataclass
class StepProfile:
    """Per-step averages: ``phases_s`` (wall clock) and ``ops_s`` (profiler), seconds per step."""

    steps: int
    tokens: int  # generated over the wall-clock steps
    step_s: float  # mean wall time of a step, no profiler
    phases_s: dict[str, float] = field(default_factory=dict)
    profiled_step_s: float = 0.0
    ops_s: dict[str, float] = field(default_factory=dict)
    op_calls: dict[str, float] = field(default_factory=dict)  # aten op calls per step, by kind (leaf ops)
    kernel_phases_s: dict[str, float] = field(default_factory=dict)  # CPU kernels' phases, seconds per step
    host_phases_s: dict[str, float] = field(default_factory=dict)  # CUDA: each runner phase's host part
    syncs_per_step: float | None = None  # CUDA: synchronising operations per step
    # the ops (CUDA: kernels) with the most time, by name: [calls per step, seconds per step]
    top_ops: dict[str, list[float]] = field(default_factory=dict)

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(1, self.steps)

    def shares(self, which: str = "phases") -> dict[str, float]:
        d, total = (self.phases_s, self.step_s) if which == "phases" else (self.ops_s, self.profiled_step_s)
        return {k: v / total if total > 0 else 0.0 for k, v in d.items()}

    def as_dict(self) -> dict:
        return {"steps": self.steps, "tokens_per_step": self.tokens_per_step, "step_s": self.step_s,
                "phases_s": dict(self.phases_s), "phase_shares": self.shares("phases"),
                "profiled_step_s": self.profiled_step_s, "ops_s": dict(self.ops_s),
                "op_shares": self.shares("ops"), "op_calls_per_step": dict(self.op_calls),
                "kernel_phases_s": dict(self.kernel_phases_s), "host_phases_s": dict(self.host_phases_s),
                "syncs_per_step": self.syncs_per_step, "top_ops": dict(self.top_ops)}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_phases(engine, steps: int, host: dict[str, float] | None = None) -> tuple[dict[str, float], float, int, int]:
    """Run up to ``steps`` engine steps with the runner's phase clocks on. Returns (seconds per
    phase, summed step wall time, steps run, tokens generated); on CUDA the phases' host parts
    are added to ``host`` when given."""
    runner = engine.runner
    runner.timing = timing = {p: 0.0 for p in PHASES if p != "other"}
    runner.host_timing = host
    wall, done, tokens = 0.0, 0, 0
    try:
        while done < steps and engine.has_unfinished:
            _sync(engine.device)
            t0 = time.perf_counter()
            events = engine.step()
            _sync(engine.device)
            wall += time.perf_counter() - t0
            tokens += sum(1 for e in events if e.token >= 0)
            done += 1
    finally:
        runner.timing = runner.host_timing = None
    timing["other"] = wall - sum(timing.values())
    return timing, wall, done, tokens


def count_syncs(engine, steps: int) -> float:
    """Synchronising CUDA operations per step over up to ``steps`` engine steps, as PyTorch's
    sync debug mode reports them (``torch.cuda.set_sync_debug_mode``: a value read back, a copy
    from pageable memory; waits on events are not counted). CUDA engines only."""
    import warnings

    if engine.device.type != "cuda":
        raise ValueError(f"count_syncs needs a CUDA engine (this one runs on {engine.device})")
    done = 0
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            while done < steps and engine.has_unfinished:
                engine.step()
                done += 1
        finally:
            torch.cuda.set_sync_debug_mode(before)
    n = sum(1 for w in caught if "synchronizing" in str(w.message))
    return n / max(1, done)


TOP_OPS = 12  # how many of the most expensive ops (CUDA: kernels) ``profile_ops`` names


def profile_ops(engine, steps: int, top: dict | None = None
                ) -> tuple[dict[str, float], dict[str, float], float, int, dict[str, float]]:
    """Run up to ``steps`` engine steps under ``torch.profiler``. Returns (seconds per op kind,
    op calls per kind, summed step wall time, steps run, seconds per CPU-kernel phase); the
    kinds sum to the wall time. ``top``, when given, receives the ``TOP_OPS`` ops (CUDA:
    kernels, those replayed from graphs included) with the most time: name -> [calls, seconds]
    over the run."""
    from torch.profiler import ProfilerActivity, profile

    from . import kernels

    cuda = engine.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    done, wall = 0, 0.0
    use_kernels = bool(getattr(engine, "cpu_kernels", False))
    if use_kernels:
        kernels.set_profiling(True)
    try:
        with profile(activities=acts) as prof:
            while done < steps and engine.has_unfinished:
                _sync(engine.device)
                t0 = time.perf_counter()
                engine.step()
                _sync(engine.device)
                wall += time.perf_counter() - t0
                done += 1
    finally:
        kphases = kernels.take_profile() if use_kernels else {}
        if use_kernels:
            kernels.set_profiling(False)
    secs = {k: 0.0 for k in OP_KINDS}
    calls = {k: 0.0 for k in OP_KINDS if k != "host"}
    timed = []  # (seconds, name, calls) of every op that counted
    for ev in prof.key_averages():
        if cuda:
            t = ev.self_device_time_total
            if ev.device_type != torch.autograd.DeviceType.CUDA or t <= 0:
                if ev.key.startswith("aten::") and ev.key not in _COMPOSITE:
                    calls[op_kind(ev.key)] += ev.count
                continue
        else:
            if not ev.key.startswith("aten::"):
                continue
            t = ev.self_cpu_time_total
            if ev.key not in _COMPOSITE:
                calls[op_kind(ev.key)] += ev.count
        secs[op_kind(ev.key)] += t * 1e-6
        timed.append((t * 1e-6, ev.key, ev.count))
    if top is not None:
        top.update({name: [float(n), t] for t, name, n in sorted(timed, reverse=True)[:TOP_OPS]})
    for phase, t in kphases.items():
        secs[kernels.PHASE_KIND[phase]] += t
    secs["host"] = wall - sum(secs.values())
    return secs, calls, wall, done, kphases


def profile_engine(engine, steps: int = 16, ops: bool = True, repeats: int = 1) -> StepProfile:
    """Both views over ``steps`` steps each (phases first, then ops), per-step averages.
    The engine should be in steady decode (requests admitted, prompts prefilled). With
    ``repeats`` > 1 the phases view is the fastest (most tokens per second) of that many
    consecutive windows (a busy machine only ever slows a window down)."""
    return profile_engines([engine], steps, ops, repeats)[0]


def profile_engines(engines: list, steps: int = 16, ops: bool | list[bool] = True,
                    repeats: int = 1) -> list[StepProfile]:
    """``profile_engine`` for several engines side by side: their timed windows interleaved,
    one window of each per round for ``repeats`` rounds, the fastest window of each counting,
    so that a machine whose speed drifts (a shared VM) slows them alike and their ratio holds.
    "Fastest" is the most tokens per second (MoR's steps do not all make the same number of
    tokens, so the shortest steps are not the most productive ones).
    ``ops``: whether to take the profiler view, for all engines or per engine."""
    want_ops = list(ops) if isinstance(ops, (list, tuple)) else [ops] * len(engines)
    def rate(window) -> float:  # tokens per second of a window (0 for an empty one)
        _, wall, n, tokens = window
        return tokens / wall if n and wall > 0 else 0.0

    best: list[tuple | None] = [None] * len(engines)
    hosts: list[dict | None] = [None] * len(engines)
    for _ in range(max(1, repeats)):
        for i, engine in enumerate(engines):
            host = {} if engine.device.type == "cuda" else None
            window = time_phases(engine, steps, host)
            if best[i] is None or rate(window) > rate(best[i]):
                best[i], hosts[i] = window, host
    out = []
    for engine, (phases, wall, n, tokens), host, with_ops in zip(engines, best, hosts, want_ops):
        n = max(1, n)
        prof = StepProfile(steps=n, tokens=tokens, step_s=wall / n, phases_s={k: v / n for k, v in phases.items()})
        if host is not None:
            prof.host_phases_s = {k: v / n for k, v in host.items()}
            prof.syncs_per_step = count_syncs(engine, steps)
        if with_ops:
            top: dict[str, list[float]] = {}
            secs, calls, pwall, m, kphases = profile_ops(engine, steps, top)
            m = max(1, m)
            prof.top_ops = {k: [n / m, t / m] for k, (n, t) in top.items()}
            prof.profiled_step_s = pwall / m
            prof.ops_s = {k: v / m for k, v in secs.items()}
            prof.op_calls = {k: v / m for k, v in calls.items()}
            prof.kernel_phases_s = {k: v / m for k, v in kphases.items()}
        out.append(prof)
    return out
