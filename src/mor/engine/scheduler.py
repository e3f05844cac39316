"""The scheduler: pure-Python bookkeeping of requests, sequence slots and decode stages.

It owns no tensors. Each running request holds one sequence slot and has exactly one
*in-flight token* (the newest token of its sequence) whose stage says what runs next:

    enter    the token needs embedding + prefix layers (then, usually, recursion 1)
    run      the token runs recursion ``rec`` in this step
    pending  the token ran ``rec`` recursions; a routing decision says run or exit
    exit     the token leaves: suffix layers, LM head, sampling

Admission is first-come first-served into free slots while the caller's memory check
passes. Preemption (when the KV pool runs dry) takes the most recently admitted request,
drops its cache and puts it back at the head of the queue; it is recomputed from its
prompt and the tokens it already produced, which gives the same continuation.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable

from .request import FINISHED, RUNNING, WAITING, Request

STAGES = ("enter", "run", "pending", "exit")


class Scheduler:
    def __init__(self, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        self.max_batch = max_batch
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self._admit_counter = 0
        self._admit_order: dict[int, int] = {}  # request_id -> admission counter

    # .................................................................. queue
    def add(self, req: Request) -> None:
        req.status = WAITING
        self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self, fits: Callable[[Request], bool]) -> list[Request]:
        """Move waiting requests (in order) into free slots while ``fits(request)`` holds."""
        admitted = []
        while self.waiting and self._free_slots and fits(self.waiting[0]):
            req = self.waiting.popleft()
            req.slot = self._free_slots.pop()
            req.status = RUNNING
            req.stage, req.rec, req.token_depth = "enter", 0, -1
            self.running[req.slot] = req
            self._admit_counter += 1
            self._admit_order[req.request_id] = self._admit_counter
            admitted.append(req)
        return admitted

    def _release(self, req: Request) -> int:
        slot = req.slot
        del self.running[slot]
        self._admit_order.pop(req.request_id, None)
        self._free_slots.append(slot)
        req.slot = -1
        req.stage = ""
        return slot

    def finish(self, req: Request, reason: str) -> int:
        """Mark a running request finished; returns the slot it freed."""
        req.finish_reason = reason
        req.status = FINISHED
        return self._release(req)

    def victim(self) -> Request | None:
        """The request to preempt: the most recently admitted one (None if fewer than two run)."""
        if len(self.running) < 2:
            return None
        return max(self.running.values(), key=lambda r: self._admit_order[r.request_id])

    def preempt(self, req: Request) -> int:
        """Send a running request back to the head of the queue; returns the slot it freed."""
        slot = self._release(req)
        req.status = WAITING
        req.preemptions += 1
        self.waiting.appendleft(req)
        return slot

    # .................................................................. stage views
    def in_stage(self, stage: str) -> list[Request]:
        """Running requests whose in-flight token is at ``stage`` (sorted by recursion, slot)."""
        return sorted((r for r in self.running.values() if r.stage == stage), key=lambda r: (r.rec, r.slot))

    @staticmethod
    def set_stage(reqs: Iterable[Request], stage: str) -> None:
        for r in reqs:
            r.stage = stage
