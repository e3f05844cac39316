"""The engine: scheduler + KV pool + runner, driven one step at a time.

One ``step()`` (continuous depth-wise batching, the default for MoR models):

1. routing decisions for tokens that finished a recursion in the previous step;
2. tokens that leave the recursions run the suffix, the LM head and sampling; their
   request either finishes (slot and KV blocks freed at once) or its new token enters;
3. waiting requests are admitted into free slots and their prompts prefilled;
4. KV blocks are reserved for every write of this step (preempting if the pool is dry);
5. entering tokens run the embedding and prefix layers;
6. the shared block runs ONCE on every in-flight token, each at its own recursion depth.

So a token of depth d spends d steps in the shared block, and an exiting token's slot is
refilled in the very next block call by its sequence's next token (or a new request's).
With ``schedule="sequence"`` step 6 repeats (decide, run) until every token has left the
recursions, so each step produces one token per running sequence: continuous
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

from ..cache import PoolExhausted, make_pool
from ..model import MoRForCausalLM
from .request import Request, RequestError, RequestOutput, SamplingParams
from .runner import ModelRunner
from .sampling import sample
from .scheduler import Scheduler

SCHEDULES = ("auto", "depth", "sequence")
EOS_TOKEN = "<|endoftext|>"


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
    kv: dict[str, Any] = field(default_factory=dict)

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
        return sum(d * c for d, c in enumerate(self.exit_counts)) / max(1, n)

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


class Engine:
    """Continuous-batching generation engine for an in-memory ``MoRForCausalLM``.

    ``max_batch``: concurrent sequences (slots). ``max_model_len``: tokens per sequence
    (prompt + output; default the model's context). KV pool size: ``num_blocks`` blocks,
    or ``kv_memory_bytes``, or by default the worst case for ``max_batch`` full sequences.
    ``schedule``: "depth" (depth-wise batching), "sequence", or "auto" (depth for MoR,
    sequence otherwise). ``tokenizer`` (a ``tokenizers.Tokenizer``) enables text prompts,
    text outputs and stop strings. ``attention_merge_ratio``: tokens at different depths read
    different caches; they share one attention call when padding to the longest costs less
    than this factor times separate calls (0: always separate). ``record_logits`` keeps each
    sampled token's logits in the outputs (tests, analysis)."""

    def __init__(self, model: MoRForCausalLM, tokenizer: Any = None, *, max_batch: int = 32,
                 max_model_len: int | None = None, kv_memory_bytes: int | None = None,
                 num_blocks: int | None = None, block_size: int = 16, schedule: str = "auto",
                 seed: int | None = None, eos_token_id: int | None = None, record_logits: bool = False,
                 attention_merge_ratio: float = 1.5):
        cfg = model.config
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        limit = cfg.max_position_embeddings
        if max_model_len is not None and not (1 <= max_model_len <= limit):
            raise ValueError(f"max_model_len={max_model_len} must be in [1, max_position_embeddings={limit}]")
        self.model = model.eval()
        self.config = cfg
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len or limit
        p = model.model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        self.pool = make_pool(cfg, max_seqs=max_batch, max_len=self.max_model_len, dtype=self.dtype,
                              device=self.device, block_size=block_size, num_blocks=num_blocks,
                              memory_bytes=kv_memory_bytes)
        self.runner = ModelRunner(model, self.pool, max_batch, merge_ratio=attention_merge_ratio)
        self.scheduler = Scheduler(max_batch)
        if schedule == "auto":
            schedule = "depth" if cfg.architecture == "mor" else "sequence"
        self.schedule = schedule
        if eos_token_id is None:
            eos_token_id = 0
            if tokenizer is not None and tokenizer.token_to_id(EOS_TOKEN) is not None:
                eos_token_id = tokenizer.token_to_id(EOS_TOKEN)
        self.eos_token_id = eos_token_id
        self.record_logits = record_logits
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed if seed is not None else random.randrange(2**62))
        self._next_id = 0
        self.reset_stats()

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
        self.scheduler.add(Request(request_id=rid, prompt_ids=ids, params=params, prompt=text, generator=gen,
                                   arrival=rid))
        return rid

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # .................................................................. one step
    def step(self) -> list[StepEvent]:
        """Run one engine step (see the module docstring); returns the tokens it produced."""
        t0 = time.perf_counter()
        events: list[StepEvent] = []
        sched = self.scheduler
        self._decide(sched.in_stage("pending"))
        self._exit(sched.in_stage("exit"), events)
        self._admit()
        self._enter()
        self._decide(sched.in_stage("pending"))  # entering tokens when recursion 1 is not certain
        if self.schedule == "depth":
            self._recurse()
        else:
            while self._recurse():
                self._decide(sched.in_stage("pending"))
        self.stats.steps += 1
        self.stats.running_sum += len(sched.running)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.step_time_s += time.perf_counter() - t0
        self._update_kv_stats()
        return events

    def _decide(self, reqs: list[Request]) -> None:
        if not reqs:
            return
        go = self.runner.decide(np.array([r.slot for r in reqs]), np.array([r.rec for r in reqs]),
                                np.array([r.token_depth for r in reqs]))
        for r, g in zip(reqs, go):
            r.stage = "run" if g else "exit"

    def _exit(self, reqs: list[Request], events: list[StepEvent]) -> None:
        if not reqs:
            return
        slots = np.array([r.slot for r in reqs])
        logits = self.runner.finish(slots, np.array([r.position for r in reqs]))
        tokens = sample(logits, [r.params for r in reqs], [r.generator for r in reqs], self.generator).tolist()
        for i, (req, tok) in enumerate(zip(reqs, tokens)):
            self.stats.exit_counts[req.rec] += 1
            self.stats.generated_tokens += 1
            if self.record_logits:
                req.logits.append(logits[i].detach().cpu())
            reason, delta = self._append(req, tok, req.rec)
            out = None
            if reason is not None:
                slot = self.scheduler.finish(req, reason)
                self.pool.free_seq(slot)
                self.stats.requests_finished += 1
                out = req.to_output()
            else:
                req.stage, req.rec, req.token_depth = "enter", 0, -1
            events.append(StepEvent(req.request_id, tok, delta, reason is not None, out))

    def _append(self, req: Request, tok: int, depth: int) -> tuple[str | None, str]:
        """Record a sampled token; returns (finish reason or None, new streamable text)."""
        p = req.params
        req.output_ids.append(tok)
        req.depths.append(depth)
        reason = None
        if tok == self.eos_token_id and not p.ignore_eos:
            reason = "stop"
        elif p.stop_token_ids and tok in p.stop_token_ids:
            reason = "stop"
        elif len(req.output_ids) >= p.max_tokens:
            reason = "length"
        if self.tokenizer is None:
            return reason, ""
        text = self.tokenizer.decode(req.output_ids)
        hold = 0
        if p.stop:
            hits = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if hits:  # cut the text before the earliest stop string
                text, reason = text[:min(hits)], "stop"
            elif reason is None:  # keep back a tail that may grow into a stop string
                hold = max((k for s in p.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if reason is None and text.endswith("\ufffd"):  # an incomplete UTF-8 sequence
            hold = max(hold, 1)
        emitted = req.text_emitted
        upto = len(text) - hold
        delta = text[emitted:upto] if upto > emitted else ""
        req.text_emitted = max(emitted, upto)
        req.text = text
        return reason, delta

    def _admit(self) -> None:
        """Admit waiting requests while the pool keeps room for each prompt's worst case
        (every token in every recursion) plus one new block per group for every running
        sequence; prefill the admitted prompts."""
        budget = [self.pool.free_blocks]

        def fits(req: Request) -> bool:
            worst = self.pool.worst_case_blocks(len(req.all_ids))
            growth = (len(self.scheduler.running) + 1) * self.pool.layout.total_layers
            if budget[0] < worst + growth:
                return False
            budget[0] -= worst
            return True

        admitted = self.scheduler.admit(fits)
        todo = [r for r in admitted if len(r.all_ids) > 1]
        if not todo:
            return
        for r in todo:  # reserve the worst case, prefill, give back what was not used
            n = len(r.all_ids) - 1
            for g in range(self.pool.layout.num_groups):
                self.pool.ensure(g, [r.slot], [n + 1 if g == self.pool.layout.full else n])
        depth = self.runner.prefill([r.slot for r in todo], [r.all_ids[:-1] for r in todo])
        for i, r in enumerate(todo):
            self.pool.trim(r.slot)
            n = len(r.all_ids) - 1
            self.stats.prompt_tokens += n
            d = depth[i, :n]
            for k in range(self.runner.num_recursions):
                self.stats.prefill_recursion_tokens[k] += int((d > k).sum())

    def _reserve(self, entering: list[Request], running: list[Request]) -> tuple[list[Request], list[Request]]:
        """Reserve one cache entry for each write this step will make; preempt the newest
        requests while the pool cannot. Returns the lists without preempted requests."""
        layout, pool = self.pool.layout, self.pool
        first = self.runner.first_recursion_is_certain()
        while True:
            try:
                if entering:
                    slots = np.array([r.slot for r in entering])
                    if layout.full is not None:
                        pool.ensure(layout.full, slots, np.array([r.position + 1 for r in entering]))
                    if first and layout.rec_write[0] is not None:
                        g = layout.rec_write[0]
                        pool.ensure(g, slots, pool.lens[g, slots] + 1)
                for r in range(self.runner.num_recursions):
                    g = layout.rec_write[r]
                    group = [q for q in running if q.rec == r]
                    if g is not None and group:
                        slots = np.array([q.slot for q in group])
                        pool.ensure(g, slots, pool.lens[g, slots] + 1)
                return entering, running
            except PoolExhausted:
                victim = self.scheduler.victim()
                if victim is None:
                    raise RuntimeError("KV pool exhausted by a single request (admission check failed)") from None
                slot = self.scheduler.preempt(victim)
                pool.free_seq(slot)
                self.stats.preemptions += 1
                entering = [q for q in entering if q is not victim]
                running = [q for q in running if q is not victim]

    def _enter(self) -> None:
        entering = self.scheduler.in_stage("enter")
        if not entering:
            return
        entering, _ = self._reserve(entering, self.scheduler.in_stage("run"))
        if not entering:
            return
        depths = self.runner.enter(np.array([r.slot for r in entering]),
                                   np.array([r.all_ids[-1] for r in entering]),
                                   np.array([r.position for r in entering]))
        nxt = "run" if self.runner.first_recursion_is_certain() else (
            "pending" if self.runner.num_recursions else "exit")
        for i, r in enumerate(entering):
            r.rec = 0
            r.token_depth = int(depths[i]) if depths is not None else -1
            r.stage = nxt

    def _recurse(self) -> bool:
        """Run one recursion for every token in stage "run"; False if there were none."""
        running = self.scheduler.in_stage("run")
        if not running:
            return False
        _, running = self._reserve([], running)
        if not running:
            return False
        recs = np.array([r.rec for r in running])
        self.runner.recurse(np.array([r.slot for r in running]), recs, np.array([r.position for r in running]))
        for r in running:
            self.stats.recursion_tokens[r.rec] += 1
            r.rec += 1
            r.stage = "pending"
        self.stats.block_calls += 1
        self.stats.block_tokens += len(running)
        return True

    def _update_kv_stats(self) -> None:
        self.stats.kv = self.pool.stats()

    def reset_stats(self) -> None:
        """Start counting afresh (e.g. after a warm-up run); the KV peak restarts from now."""
        nr = self.runner.num_recursions
        self.stats = EngineStats(max_batch=self.scheduler.max_batch, num_recursions=nr, schedule=self.schedule,
                                 recursion_tokens=[0] * nr, prefill_recursion_tokens=[0] * nr,
                                 exit_counts=[0] * (nr + 1))
        self.pool.peak_used = self.pool.used_blocks
        self.pool.group_peak = self.pool.group_used_blocks()
        self._update_kv_stats()

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
