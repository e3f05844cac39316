"""The engine: scheduler + KV pool + runner, driven one step at a time.

``step()`` reads: ``plan = scheduler.schedule()`` -> ``runner.execute(plan)`` -> postprocess.

* schedule (``scheduler.py``): admit waiting requests into free slots, reserve KV room for
  every write of the step, preempt when the pool is dry;
* execute (``runner.py``): prefill admitted prompts; entering tokens run the embedding and
  prefix layers; routing decisions; the shared block runs ONCE on every in-flight token,
  each at its own recursion depth (continuous depth-wise batching, the default for MoR);
  decisions again; tokens that leave the recursions run the suffix, the LM head and
  sampling;
* postprocess (here): record the written cache entries in the pool; each sampled token is
  appended to its request (stop rules: ``Request.append_token``), which either finishes
  (slot and KV blocks freed at once) or enters its new token next step.

So a token of depth d spends d steps in the shared block, and an exiting token's slot is
refilled in the very next block call by its sequence's next token (or a new request's).
With ``schedule="sequence"`` the shared block repeats (run, decide) until every token has
left the recursions, so each step produces one token per running sequence: continuous
sequence-wise batching, used for vanilla and recursive models (for which it is the same
as running the layers in order).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..cache import make_pool
from ..model import MoRForCausalLM
from ..runtime import find_eos
from .quant import low_precision_copy
from .request import Request, RequestError, RequestOutput, SamplingParams
from .runner import ModelRunner, StepOutput
from .scheduler import SCHEDULES as SCHEDULE_KINDS
from .scheduler import Scheduler, StepPlan

SCHEDULES = ("auto",) + SCHEDULE_KINDS


@dataclass
class EngineStats:
    """What the engine did, for throughput and routing analysis.

    ``recursion_tokens[r]``: decode tokens that ran recursion r (0-based). ``exit_counts[d]``:
    generated tokens whose producing position ran d recursions. ``block_calls`` /
    ``block_tokens``: calls of the shared block and the tokens they processed (the mean is
    the block's effective batch). KV fields are bytes of the preallocated pool."""

    max_batch: int = 0
    num_recursions: int = 0
    schedule: str = ""
    steps: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    requests_finished: int = 0
    requests_rejected: int = 0
    preemptions: int = 0
    block_calls: int = 0
    block_tokens: int = 0
    recursion_tokens: list[int] = field(default_factory=list)
    prefill_recursion_tokens: list[int] = field(default_factory=list)
    exit_counts: list[int] = field(default_factory=list)
    running_sum: int = 0  # sum over steps of running requests (mean concurrency)
    step_time_s: float = 0.0
    kv_source: Any = field(default=None, repr=False)  # () -> the KV pool's statistics (KVPool.stats)

    @property
    def kv(self) -> dict[str, Any]:
        """The KV pool's sizes and use at the time of reading (bytes; the peak since
        ``reset_stats``): after an abort, without the step that would follow, and after a run
        (then nothing is in use) too."""
        return self.kv_source() if self.kv_source is not None else {}

    @property
    def occupancy(self) -> list[float]:
        """Share of the shared block's token slots taken by each recursion depth."""
        tot = max(1, self.block_tokens)
        return [t / tot for t in self.recursion_tokens]

    @property
    def mean_block_batch(self) -> float:
        return self.block_tokens / max(1, self.block_calls)

    @property
    def block_fill(self) -> float:
        """Mean fraction of ``max_batch`` filled in each shared-block call."""
        return self.mean_block_batch / max(1, self.max_batch)

    @property
    def mean_depth(self) -> float:
        n = sum(self.exit_counts)
        return sum(depth * count for depth, count in enumerate(self.exit_counts)) / max(1, n)

    @property
    def mean_running(self) -> float:
        """Mean number of running requests per step."""
        return self.running_sum / max(1, self.steps)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.step_time_s if self.step_time_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_batch": self.max_batch, "num_recursions": self.num_recursions, "schedule": self.schedule,
            "steps": self.steps, "generated_tokens": self.generated_tokens, "prompt_tokens": self.prompt_tokens,
            "requests_finished": self.requests_finished, "requests_rejected": self.requests_rejected,
            "preemptions": self.preemptions, "block_calls": self.block_calls, "block_tokens": self.block_tokens,
            "mean_block_batch": self.mean_block_batch, "block_fill": self.block_fill,
            "recursion_tokens": list(self.recursion_tokens), "occupancy": self.occupancy,
            "prefill_recursion_tokens": list(self.prefill_recursion_tokens),
            "exit_counts": list(self.exit_counts), "mean_depth": self.mean_depth,
            "mean_running": self.mean_running,
            "step_time_s": self.step_time_s, "tokens_per_s": self.tokens_per_s, **self.kv,
        }


@dataclass
class StepEvent:
    """A token produced in a step (``token`` -1 for a finished-only event)."""

    request_id: int
    token: int
    text_delta: str
    finished: bool
    output: RequestOutput | None = None  # set when finished
    depth: int = -1  # recursions run by the position whose output produced ``token``


class Engine:
    """Continuous-batching generation engine for an in-memory ``MoRForCausalLM``.

    ``max_batch``: concurrent sequences (slots). ``max_model_len``: tokens per sequence
    (prompt + output; default the model's context). KV pool size: ``num_blocks`` blocks,
    or ``kv_memory_bytes``, or by default the worst case for ``max_batch`` full sequences.
    ``schedule``: "depth" (depth-wise batching), "sequence", or "auto" (depth for MoR,
    sequence otherwise). ``tokenizer`` (a ``tokenizers.Tokenizer``) enables text prompts,
    text outputs and stop strings. ``attention_merge_ratio``: tokens at different depths read
    different caches; on PyTorch ops they share one attention call when padding to the longest
    costs less than this factor times separate calls (0: always separate); the CPU kernels
    always make one call, reading only each row's own blocks. ``record_logits`` keeps each
    sampled token's logits in the outputs (tests, analysis). ``decode_precision`` ("bf16",
    "fp16", "int8", "bf16-weights"; default None = the model's own weights, exact): the engine runs a
    low-precision copy of the model (``mor.engine.quant``); the caller's model is untouched.
    ``cpu_kernels``: decode steps (one token per sequence) on the compiled CPU kernels
    (``mor.engine.kernels``: weights streamed on all threads, attention reading the paged cache
    in place); None (default) = whenever they apply (fp32 on CPU, a C compiler present),
    True = required (ValueError naming why not), False = PyTorch ops only. ``self.cpu_kernels``
    says which runs. ``cuda_graphs``: decode calls replayed from CUDA graphs recorded once
    per batch / context bucket (``mor.engine.graphs``); None (default) = on CUDA, False = eager
    launches (prefill is always eager)."""

    def __init__(self, model: MoRForCausalLM, tokenizer: Any = None, *, max_batch: int = 32,
                 max_model_len: int | None = None, kv_memory_bytes: int | None = None,
                 num_blocks: int | None = None, block_size: int = 16, schedule: str = "auto",
                 seed: int | None = None, eos_token_id: int | None = None, record_logits: bool = False,
                 attention_merge_ratio: float = 1.5, decode_precision: str | None = None,
                 cpu_kernels: bool | None = None, cuda_graphs: bool | None = None):
        cfg = model.config
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        limit = cfg.max_position_embeddings
        if max_model_len is not None and not (1 <= max_model_len <= limit):
            raise ValueError(f"max_model_len={max_model_len} must be in [1, max_position_embeddings={limit}]")
        if decode_precision is not None:
            model = low_precision_copy(model, decode_precision, cpu_kernels=cpu_kernels is not False)
        self.decode_precision = decode_precision
        self.model = model.eval()
        self.config = cfg
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len or limit
        p = model.model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        self.pool = make_pool(cfg, max_seqs=max_batch, max_len=self.max_model_len, dtype=self.dtype,
                              block_size=block_size, num_blocks=num_blocks, memory_bytes=kv_memory_bytes)
        if schedule == "auto":
            schedule = "depth" if cfg.architecture == "mor" else "sequence"
        self.schedule = schedule
        self.scheduler = Scheduler(max_batch, self.pool, schedule)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed if seed is not None else random.randrange(2**62))
        self.runner = ModelRunner(model, self.pool, max_batch, merge_ratio=attention_merge_ratio,
                                  generator=self.generator, cpu_kernels=cpu_kernels,
                                  kernel_weights=torch.bfloat16 if getattr(model, "decode_precision", None) == "bf16-weights"
                                  else torch.float32, cuda_graphs=cuda_graphs)
        if eos_token_id is None:
            found = find_eos(tokenizer) if tokenizer is not None else None
            eos_token_id = found[0] if found else 0
        self.eos_token_id = eos_token_id
        self.record_logits = record_logits
        self.last_logits: torch.Tensor | None = None  # the latest step's LM-head rows (logprobs)
        self._next_id = 0
        self.reset_stats()

    @property
    def cpu_kernels(self) -> bool:
        """Whether decode steps run on the compiled CPU kernels (``runner.kernel_obstacle``: why not)."""
        return self.runner.kernels is not None

    @property
    def step_kernel(self) -> bool:
        """Whether each decode step runs as one call of the CPU kernels (``kernels.DecodeStep``:
        vanilla, recursive and expert-choice models with one shared block and linear routers)."""
        return self.runner.step_kernel is not None

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode calls replay CUDA graphs."""
        return self.runner.graphs is not None and self.runner.graphs.capture

    def capture_graphs(self) -> int:
        """Record now every CUDA graph a decode step of this engine can replay (each batch and
        context bucket up to ``max_batch`` / ``max_model_len``), so that none is recorded
        while serving; returns how many were new (0 without CUDA graphs)."""
        g = self.runner.graphs
        if g is None or not g.capture:
            return 0
        with torch.no_grad():
            return g.record_all(max_len=self.max_model_len)

    # .................................................................. requests
    def encode(self, prompt: str | list[int]) -> tuple[list[int], str | None]:
        """Token ids (and the text, if any) of a prompt; raises RequestError."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer; pass token ids or load a checkpoint with "
                                   "tokenizer.json")
            if prompt == "":
                raise RequestError("prompt is empty; give at least one token (for unprompted generation pass "
                                   f"[{self.eos_token_id}], the end-of-text token)")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RequestError(f"prompt has a character that is not valid Unicode text "
                                   f"({prompt[e.start:e.end]!r} at position {e.start})") from None
            return list(self.tokenizer.encode(prompt).ids), prompt
        try:
            items = list(prompt)
        except TypeError:
            raise RequestError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}") from None
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in items):
            raise RequestError("prompt token ids must be integers")
        return [int(t) for t in items], None

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None) -> int:
        """Validate and queue a request; returns its id. Raises RequestError, leaving the
        engine and its other requests untouched."""
        try:
            return self._add(prompt, params)
        except RequestError:
            self.stats.requests_rejected += 1
            raise

    def _add(self, prompt, params) -> int:
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        ids, text = self.encode(prompt)
        V, M = self.config.vocab_size, self.max_model_len
        if not ids:
            raise RequestError("prompt is empty (0 tokens); give at least one token (for unprompted generation "
                               f"pass [{self.eos_token_id}], the end-of-text token)")
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {V})")
        if len(ids) > M:
            raise RequestError(f"prompt has {len(ids)} tokens, longer than the context of {M} tokens "
                               f"(max_model_len)")
        if len(ids) + params.max_tokens > M:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = "
                               f"{len(ids) + params.max_tokens} tokens is more than the cache holds per sequence "
                               f"({M} = max_model_len); use max_tokens <= {M - len(ids)}")
        need = self.pool.worst_case_blocks(len(ids) + params.max_tokens) + self.pool.layout.total_layers
        if need > self.pool.num_blocks - 1:
            raise RequestError(f"request needs up to {need} KV blocks but the pool holds {self.pool.num_blocks - 1}; "
                               f"give the engine more KV memory or lower max_tokens ({params.max_tokens})")
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
        rid = self._next_id
        self._next_id += 1
        self.scheduler.add(Request(request_id=rid, prompt_ids=ids, params=params, prompt=text, generator=gen))
        return rid

    def abort(self, request_id: int) -> bool:
        """Cancel a waiting or running request: its slot and KV blocks are freed at once and
        no further events are produced for it. Returns False when no unfinished request has
        that id (unknown, finished or already aborted). Call it between steps."""
        return self.scheduler.abort(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # .................................................................. one step
    def step(self) -> list[StepEvent]:
        """Run one engine step (see the module docstring); returns the tokens it produced."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        timing = self.runner.timing  # per-phase wall clock, only while profiling (mor.engine.profile)
        if timing is not None:
            timing["schedule"] += time.perf_counter() - t0
        out = self.runner.execute(plan)
        self.last_logits = out.logits  # (tokens, V) fp32, rows in the order of the returned events
        if timing is not None:
            t1 = time.perf_counter()
        events = self._postprocess(plan, out)
        if timing is not None:
            timing["postprocess"] += time.perf_counter() - t1
        self.stats.steps += 1
        self.stats.running_sum += len(self.scheduler.running)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.step_time_s += time.perf_counter() - t0
        return events

    def _postprocess(self, plan: StepPlan, out: StepOutput) -> list[StepEvent]:
        """Record what the step wrote and produced: KV counts, request states, stats, events."""
        st, pool, nr = self.stats, self.pool, self.runner.num_recursions
        pool.add_written(out.written)
        for req in plan.admitted:
            pool.trim(req.slot)  # give back the worst-case reservation the sequence did not use
        for depths in out.prefill_depths:
            st.prompt_tokens += len(depths)
            for k in range(nr):
                st.prefill_recursion_tokens[k] += int((depths > k).sum())
        for recs in out.block_recs:
            st.block_calls += 1
            st.block_tokens += len(recs)
            for r, count in enumerate(np.bincount(recs, minlength=nr).tolist()):
                st.recursion_tokens[r] += count
        depths = out.exit_depths.tolist()
        for d, count in enumerate(np.bincount(out.exit_depths, minlength=nr + 1).tolist()):
            st.exit_counts[d] += count
        st.generated_tokens += len(depths)
        events: list[StepEvent] = []
        next_slots, next_tokens = [], []
        for i, (req, tok, depth) in enumerate(zip(out.exits, out.tokens, depths)):
            if self.record_logits:
                req.logits.append(out.logits[i].detach().cpu())
            reason, delta = req.append_token(tok, depth, self.eos_token_id, self.tokenizer)
            output = None
            if reason is not None:
                self.scheduler.finish(req, reason)
                st.requests_finished += 1
                output = req.to_output()
            else:
                next_slots.append(req.slot)
                next_tokens.append(tok)
            events.append(StepEvent(req.request_id, tok, delta, reason is not None, output, depth))
        self.scheduler.advance(out.run_slots, out.run_recs, np.array(next_slots, dtype=np.int64),
                               np.array(next_tokens, dtype=np.int64))
        st.preemptions = self.scheduler.preemptions - self._preemptions_at_reset
        return events

    def reset_stats(self) -> None:
        """Start counting afresh (e.g. after a warm-up run); the KV peak restarts from now."""
        nr = self.runner.num_recursions
        self.stats = EngineStats(max_batch=self.scheduler.max_batch, num_recursions=nr, schedule=self.schedule,
                                 recursion_tokens=[0] * nr, prefill_recursion_tokens=[0] * nr,
                                 exit_counts=[0] * (nr + 1), kv_source=self.pool.stats)
        self._preemptions_at_reset = self.scheduler.preemptions
        self.pool.restart_peaks()

    # .................................................................. convenience
    def run_until_done(self, on_event=None) -> list[RequestOutput]:
        """Step until every queued request finished; outputs in request-id order."""
        done: dict[int, RequestOutput] = {}
        while self.has_unfinished:
            for ev in self.step():
                if on_event is not None:
                    on_event(ev)
                if ev.finished:
                    done[ev.request_id] = ev.output
        return [done[k] for k in sorted(done)]
