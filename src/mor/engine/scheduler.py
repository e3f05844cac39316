"""The scheduler: admission, KV reservation and preemption; it plans each engine step.

It owns the request queue, the sequence slots and the requests' KV block reservations
(through the pool's methods); it touches no tensors. Each running request has exactly one
*in-flight token* (the newest token of its sequence). What that token runs next is kept per
slot in NumPy arrays, so that a step is planned and advanced with a few array operations
whatever the batch: ``stage[slot]`` is ``ENTER`` (embedding + prefix layers, then usually
recursion 1) or ``RUN`` (recursion ``rec[slot]``), with the token's id and position in
``token`` / ``position``. :meth:`Scheduler.schedule` returns a :class:`StepPlan`:

1. waiting requests are admitted first-come first-served into free slots while the pool
   keeps room for each prompt's worst case (every token in every recursion) plus one block
   per layer for every running sequence; their prompts (all tokens but the last) are
   prefilled and the last token enters like a decoded token;
2. room is reserved for every K/V write the step may make (one cache entry in each group
   the in-flight token may write); when the pool runs dry the most recently admitted
   request is preempted: its cache is dropped and it goes back to the head of the queue,
   to be recomputed from its prompt and the tokens it already produced (which gives the
   same continuation).

After the step the engine reports what happened (:meth:`Scheduler.advance`): tokens that
continue run their next recursion, and each sampled token becomes its sequence's new
in-flight token.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..cache import KVPool, PoolExhausted
from .request import Request, Status

SCHEDULES = ("depth", "sequence")
FREE, ENTER, RUN = 0, 1, 2  # a slot's stage: no request / its in-flight token enters / runs recursion rec


@dataclass
class StepPlan:
    """The work of one engine step.

    ``admitted``: requests admitted this step (their worst case is reserved until the step
    ends). ``prefill``: those with a prompt (all but its last token) to run first.
    ``enter``: slots whose in-flight token enters (sorted). ``run`` / ``run_recs``: slots whose
    in-flight token runs recursion ``run_recs[i]`` (sorted by recursion, then slot).
    ``requests``, ``tokens``, ``positions``: per slot, the request, its in-flight token and that
    token's position - the scheduler's own mapping and arrays, valid until the step's result
    is recorded (``Scheduler.advance``), not copies. ``schedule``: "depth" (each token runs at
    most one recursion; the shared block runs once on tokens at mixed depths) or "sequence"
    (tokens run until they leave)."""

    schedule: str
    admitted: list[Request] = field(default_factory=list)
    prefill: list[Request] = field(default_factory=list)
    enter: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    run: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    run_recs: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    requests: dict[int, Request] = field(default_factory=dict)
    tokens: np.ndarray | None = None
    positions: np.ndarray | None = None


class Scheduler:
    def __init__(self, max_batch: int, pool: KVPool, schedule: str):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        self.max_batch = max_batch
        self.pool = pool
        self.schedule_kind = schedule
        self.num_recursions = nr = len(pool.layout.rec_write)
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self.requests: dict[int, Request] = {}  # request_id -> unfinished request
        # per slot: its in-flight token's stage, recursions run, id and position
        self.stage = np.full(max_batch, FREE, dtype=np.int8)
        self.rec = np.zeros(max_batch, dtype=np.int64)
        self.token = np.zeros(max_batch, dtype=np.int64)
        self.position = np.zeros(max_batch, dtype=np.int64)
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self._admit_counter = 0
        self._admit_order: dict[int, int] = {}  # request_id -> admission counter
        self.preemptions = 0
        # the cache groups an in-flight token may write this step: row r < nr for a token that
        # runs recursion r, row nr for an entering one (-1 pads)
        lay, sequence = pool.layout, schedule == "sequence"
        rows = []
        for r in range(nr + 1):
            entering = r == nr
            first = [lay.full] if entering and lay.full is not None else []
            recs = (range(0 if entering else r, nr) if sequence
                    else range(min(1, nr)) if entering else [r])
            rows.append(first + [lay.rec_write[k] for k in recs if lay.rec_write[k] is not None])
        width = max(1, max(len(g) for g in rows))
        self._writes = np.array([g + [-1] * (width - len(g)) for g in rows], dtype=np.int64)

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
        self.stage[slot] = FREE
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
        plan = StepPlan(self.schedule_kind, admitted=admitted, prefill=[r for r in admitted if len(r.all_ids) > 1],
                        requests=self.running, tokens=self.token, positions=self.position)
        while True:
            plan.enter = np.flatnonzero(self.stage == ENTER)
            run = np.flatnonzero(self.stage == RUN)
            order = np.argsort(self.rec[run], kind="stable")  # by recursion, then slot
            plan.run, plan.run_recs = run[order], self.rec[run[order]]
            try:
                self._reserve(plan.enter, plan.run, plan.run_recs)
                return plan
            except PoolExhausted:
                victim = self._victim()
                if victim is None:
                    raise RuntimeError("KV pool exhausted by a single request (admission check failed)") from None
                self._preempt(victim)
                plan.admitted = [r for r in plan.admitted if r is not victim]
                plan.prefill = [r for r in plan.prefill if r is not victim]

    def advance(self, run_slots: np.ndarray, run_recs: np.ndarray, enter_slots: np.ndarray,
                enter_tokens: np.ndarray) -> None:
        """Record a step's result: the tokens of ``run_slots`` continue and run recursion
        ``run_recs`` next; each of ``enter_slots`` has a new in-flight token ``enter_tokens``
        (the one just sampled) that enters next step."""
        self.stage[run_slots] = RUN
        self.rec[run_slots] = run_recs
        self.stage[enter_slots] = ENTER
        self.rec[enter_slots] = 0
        self.token[enter_slots] = enter_tokens
        self.position[enter_slots] += 1

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
            req.slot = slot = self._free_slots.pop()
            req.status = Status.RUNNING
            self.running[slot] = req
            self.stage[slot], self.rec[slot] = ENTER, 0
            self.token[slot], self.position[slot] = req.last_id, req.position
            self._admit_counter += 1
            self._admit_order[req.request_id] = self._admit_counter
            for g in range(pool.layout.num_groups):  # every token, the entering one too, in every group
                pool.ensure(g, [slot], [len(req.all_ids)])
            admitted.append(req)
        return admitted

    def _reserve(self, enter: np.ndarray, run: np.ndarray, run_recs: np.ndarray) -> None:
        """Room for one more cache entry in every group each in-flight token may write."""
        keys = np.concatenate([np.full(len(enter), self.num_recursions, dtype=np.int64), run_recs])
        groups = self._writes[keys].ravel()  # each token's row of groups, -1 pads
        seqs = np.concatenate([enter, run]).repeat(self._writes.shape[1])
        keep = groups >= 0
        self.pool.ensure_one_more_each(groups[keep], seqs[keep])

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
