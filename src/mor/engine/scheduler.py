"""The scheduler: admission, KV reservation and preemption; it plans each engine step.

It owns the request queue, the sequence slots and the requests' KV block reservations
(through the pool's methods); it touches no tensors. Each running request has exactly one
*in-flight token* (the newest token of its sequence) whose :class:`Stage` says what it
runs next: ``ENTER`` (embedding + prefix layers, then usually recursion 1) or ``RUN``
(recursion ``rec``). :meth:`Scheduler.schedule` returns a :class:`StepPlan`:

1. waiting requests are admitted first-come first-served into free slots while the pool
   keeps room for each prompt's worst case (every token in every recursion) plus one block
   per layer for every running sequence; their prompts (all tokens but the last) are
   prefilled and the last token enters like a decoded token;
2. room is reserved for every K/V write the step may make (one cache entry in each group
   the in-flight token may write); when the pool runs dry the most recently admitted
   request is preempted: its cache is dropped and it goes back to the head of the queue,
   to be recomputed from its prompt and the tokens it already produced (which gives the
   same continuation).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..cache import KVPool, PoolExhausted
from .request import Request, Stage, Status

SCHEDULES = ("depth", "sequence")


@dataclass
class StepPlan:
    """The work of one engine step.

    ``admitted``: requests admitted this step (their worst case is reserved until the step
    ends). ``prefill``: those with a prompt (all but its last token) to run first.
    ``enter``: requests whose in-flight token enters (sorted by slot). ``run``: requests
    whose in-flight token runs recursion ``rec`` (sorted by recursion, then slot).
    ``schedule``: "depth" (each token runs at most one recursion; the shared block runs
    once on tokens at mixed depths) or "sequence" (tokens run until they leave)."""

    schedule: str
    admitted: list[Request] = field(default_factory=list)
    prefill: list[Request] = field(default_factory=list)
    enter: list[Request] = field(default_factory=list)
    run: list[Request] = field(default_factory=list)


class Scheduler:
    def __init__(self, max_batch: int, pool: KVPool, schedule: str):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        self.max_batch = max_batch
        self.pool = pool
        self.schedule_kind = schedule
        self.num_recursions = len(pool.layout.rec_write)
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self.requests: dict[int, Request] = {}  # request_id -> unfinished request
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self._admit_counter = 0
        self._admit_order: dict[int, int] = {}  # request_id -> admission counter
        self.preemptions = 0
        self._groups_cache: dict[tuple[Stage, int], tuple[int, ...]] = {}

    # .................................................................. queue
    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)
        self.requests[req.request_id] = req

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, req: Request) -> None:
        """Give back a running request's slot and KV blocks."""
        slot = req.slot
        del self.running[slot]
        self._admit_order.pop(req.request_id, None)
        self._free_slots.append(slot)
        self.pool.free_seq(slot)
        req.slot = -1

    def finish(self, req: Request, reason: str) -> None:
        """Mark a request finished (freeing its slot and blocks if it runs)."""
        if req.status is Status.RUNNING:
            self._release(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        req.finish_reason = reason
        req.status = Status.FINISHED
        self.requests.pop(req.request_id, None)

    def abort(self, request_id: int) -> bool:
        """Cancel a waiting or running request; False if there is no such unfinished request."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        self.finish(req, "abort")
        return True

    # .................................................................. planning
    def schedule(self) -> StepPlan:
        """Admit, reserve KV room for every write of the step (preempting if needed), plan."""
        admitted = self._admit()
        plan = StepPlan(self.schedule_kind, admitted=admitted, prefill=[r for r in admitted if len(r.all_ids) > 1])
        while True:
            plan.enter = sorted((r for r in self.running.values() if r.stage is Stage.ENTER), key=lambda r: r.slot)
            plan.run = sorted((r for r in self.running.values() if r.stage is Stage.RUN),
                              key=lambda r: (r.rec, r.slot))
            try:
                self._reserve(plan.enter + plan.run)
                return plan
            except PoolExhausted:
                victim = self._victim()
                if victim is None:
                    raise RuntimeError("KV pool exhausted by a single request (admission check failed)") from None
                self._preempt(victim)
                plan.admitted = [r for r in plan.admitted if r is not victim]
                plan.prefill = [r for r in plan.prefill if r is not victim]

    def _admit(self) -> list[Request]:
        """Move waiting requests (in order) into free slots while the pool keeps room for
        their worst case plus one block per layer for every running sequence; reserve the
        worst case of each admitted prompt. Returns the admitted requests."""
        pool = self.pool
        budget = pool.free_blocks
        admitted = []
        while self.waiting and self._free_slots:
            req = self.waiting[0]
            worst = pool.worst_case_blocks(len(req.all_ids))
            if budget < worst + (len(self.running) + 1) * pool.layout.total_layers:
                break
            budget -= worst
            self.waiting.popleft()
            req.slot = self._free_slots.pop()
            req.status = Status.RUNNING
            req.stage, req.rec = Stage.ENTER, 0
            self.running[req.slot] = req
            self._admit_counter += 1
            self._admit_order[req.request_id] = self._admit_counter
            for g in range(pool.layout.num_groups):  # every token, the entering one too, in every group
                pool.ensure(g, [req.slot], [len(req.all_ids)])
            admitted.append(req)
        return admitted

    def _groups_written(self, req: Request) -> tuple[int, ...]:
        """Cache groups the in-flight token of ``req`` may write into this step."""
        key = (req.stage, req.rec)
        groups = self._groups_cache.get(key)
        if groups is None:
            lay, nr = self.pool.layout, self.num_recursions
            sequence = self.schedule_kind == "sequence"
            if req.stage is Stage.ENTER:
                first = [lay.full] if lay.full is not None else []
                recs = range(nr) if sequence else range(min(1, nr))
            else:
                first, recs = [], (range(req.rec, nr) if sequence else [req.rec])
            groups = self._groups_cache[key] = tuple(first + [lay.rec_write[r] for r in recs
                                                             if lay.rec_write[r] is not None])
        return groups

    def _reserve(self, reqs: list[Request]) -> None:
        by_group: dict[int, list[int]] = {}
        for req in reqs:
            for g in self._groups_written(req):
                by_group.setdefault(g, []).append(req.slot)
        for g, slots in sorted(by_group.items()):
            self.pool.ensure_one_more(g, np.array(slots, dtype=np.int64))

    def _victim(self) -> Request | None:
        """The request to preempt: the most recently admitted one (None if fewer than two run)."""
        if len(self.running) < 2:
            return None
        return max(self.running.values(), key=lambda r: self._admit_order[r.request_id])

    def _preempt(self, req: Request) -> None:
        """Send a running request back to the head of the queue, dropping its cache."""
        self._release(req)
        req.status = Status.WAITING
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)
