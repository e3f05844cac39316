"""The engine thread and its bridge to asyncio.

The ``Engine`` is not thread-safe, so one thread owns it: it takes commands (add, abort)
from a queue between steps, runs ``step()`` while anything is unfinished, and hands each
step's tokens to the event loop in one call. Requests therefore join and leave the running
batch at every step (continuous batching), and an abort frees the request's slot and KV
blocks before the next step.

Log-probabilities come from the server layer, not the engine: a forward hook on the model's
LM head keeps the logits of the step's exiting tokens, whose rows are in the order of the
step's events (one row per produced token; checked every step, and logprobs are dropped
with an error in the log if that ever stops holding).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..engine import Engine, RequestError, SamplingParams
from .metrics import ServerMetrics

log = logging.getLogger("mor.serve")


class EngineDead(RuntimeError):
    """The engine thread stopped after an internal error; the server cannot generate."""


@dataclass
class Token:
    """One generated token as a request sees it."""

    token: int
    text: str  # new text (may be "" while the engine holds back a possible stop string)
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token id, logprob), most likely first
    finish_reason: str | None = None  # set on the last token
    final_text: str | None = None  # the whole output text, on the last token
    depths: list[int] | None = None  # recursion depth of every output token, on the last token


@dataclass
class RequestStream:
    """A request's tokens, delivered on the event loop. Iterate with ``async for``."""

    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None  # None: no logprobs; k >= 0: the sampled token's plus k alternatives
    arrival: float = field(default_factory=time.perf_counter)
    request_id: int | None = None
    finished: bool = False
    aborted: bool = False
    num_tokens: int = 0
    last_time: float = 0.0
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _accepted: asyncio.Future | None = None

    async def accepted(self) -> None:
        """Wait until the engine took the request; raises RequestError / EngineDead."""
        await self._accepted

    def __aiter__(self):
        return self

    async def __anext__(self) -> Token:
        if self.finished and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finish_reason is not None:
            self.finished = True
        return item


class EngineThread:
    """Runs an ``Engine`` in a thread; ``submit`` / ``abort`` from the event loop. Logprobs
    come from the LM-head rows of each step (``Engine.last_logits``)."""

    def __init__(self, engine: Engine, metrics: ServerMetrics, loop: asyncio.AbstractEventLoop):
        self.engine, self.metrics, self.loop = engine, metrics, loop
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, RequestStream] = {}  # engine request id -> stream (engine thread only)
        self.inflight = 0  # accepted or queued streams not finished (event loop only)
        self.error: BaseException | None = None
        self._want_logprobs = 0
        self._logprobs_ok = True
        self._thread = threading.Thread(target=self._run, name="mor-engine", daemon=True)
        self._stopping = False

    # ............................................................. event loop side
    def start(self) -> None:
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, logprobs: int | None = None) -> RequestStream:
        if self.error is not None:
            raise EngineDead(f"the engine stopped after an internal error: {self.error}")
        s = RequestStream(prompt_ids, params, logprobs)
        s._accepted = self.loop.create_future()
        self.inflight += 1
        self._cmds.put(("add", s))
        return s

    def abort(self, s: RequestStream) -> None:
        """Cancel a request (no-op when it finished); its slot is freed before the next step."""
        if not s.finished and not s.aborted:
            s.aborted = True
            self._cmds.put(("abort", s))

    def close(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._cmds.put(("stop", None))
        self._thread.join(timeout)

    def _deliver(self, items: list) -> None:
        for s, item in items:
            if item == "accepted":
                if not s._accepted.done():
                    s._accepted.set_result(None)
                continue
            if isinstance(item, BaseException):
                if not s._accepted.done():
                    s._accepted.set_exception(item)
                    s._accepted.exception()  # retrieved: no "never retrieved" warning if nobody waits
                self.inflight -= 1
                s._queue.put_nowait(item)
                continue
            if item == "gone":  # aborted
                self.inflight -= 1
                continue
            if item.finish_reason is not None:
                self.inflight -= 1
            s._queue.put_nowait(item)

    # ............................................................. engine thread
    def _post(self, items: list) -> None:
        if items:
            try:
                self.loop.call_soon_threadsafe(self._deliver, items)
            except RuntimeError:  # the event loop is closed (shutdown)
                pass

    def _run(self) -> None:
        eng = self.engine
        try:
            while True:
                out: list = []
                if not self._commands(block=not eng.has_unfinished, out=out):
                    self._post(out)
                    break
                if eng.has_unfinished:
                    events = eng.step()
                    self._dispatch(events, out)
                running = sum(1 for s in self._streams.values() if s.num_tokens > 0)
                self.metrics.observe_engine(eng.stats, running, len(self._streams) - running)
                self._post(out)
        except Exception as e:  # an engine bug: fail every request, keep the server answering
            log.exception("engine thread failed")
            self.error = e
            dead = EngineDead(f"the engine stopped after an internal error: {e}")
            self._post([(s, dead) for s in self._streams.values()])
            self._streams.clear()
            while True:  # fail whatever arrives later too
                try:
                    cmd, s = self._cmds.get(timeout=0.5)
                except queue.Empty:
                    if self._stopping:
                        return
                    continue
                if cmd == "stop":
                    return
                if cmd == "add":
                    self._post([(s, dead)])

    def _commands(self, block: bool, out: list) -> bool:
        """Apply queued commands; False when told to stop."""
        eng = self.engine
        while True:
            try:
                cmd, s = self._cmds.get(timeout=0.5) if block else self._cmds.get_nowait()
            except queue.Empty:
                if block and not self._stopping:
                    continue
                return True
            block = False
            if cmd == "stop":
                for rid, st in list(self._streams.items()):
                    eng.abort(rid)
                    out.append((st, EngineDead("the server is shutting down")))
                self._streams.clear()
                return False
            if cmd == "add":
                if s.aborted:
                    out.append((s, "gone"))
                    continue
                try:
                    rid = eng.add_request(s.prompt_ids, s.params)
                except Exception as e:  # noqa: BLE001 - a rejected request; the engine is untouched
                    if not isinstance(e, RequestError):
                        log.exception("add_request failed")
                    out.append((s, e))
                    continue
                s.request_id = rid
                self._streams[rid] = s
                if s.logprobs is not None:
                    self._want_logprobs += 1
                self.metrics.prompt_tokens.labels(self.metrics.model_name).inc(len(s.prompt_ids))
                self.metrics.prompt_len.labels(self.metrics.model_name).observe(len(s.prompt_ids))
                out.append((s, "accepted"))
            elif cmd == "abort":
                if s.request_id is not None and self._streams.pop(s.request_id, None) is not None:
                    eng.abort(s.request_id)
                    self._finish(s, "abort", time.perf_counter())
                    out.append((s, "gone"))
                # else: not added yet (the add command sees s.aborted) or already finished

    def _finish(self, s: RequestStream, reason: str, now: float) -> None:
        m, n = self.metrics, self.metrics.model_name
        if s.logprobs is not None:
            self._want_logprobs -= 1
        m.success.labels(n, reason).inc()
        m.e2e.labels(n).observe(now - s.arrival)
        m.gen_len.labels(n).observe(s.num_tokens)

    def _dispatch(self, events, out: list) -> None:
        now = time.perf_counter()
        m, n = self.metrics, self.metrics.model_name
        rows = getattr(self.engine, "last_logits", None) if self._want_logprobs else None
        if rows is not None:
            produced = sum(1 for ev in events if ev.token >= 0)
            if rows.size(0) != produced:
                if self._logprobs_ok:
                    log.error("LM-head rows (%d) do not match the step's tokens (%d): logprobs disabled",
                              rows.size(0), produced)
                self._logprobs_ok = False
                rows = None
        lp_rows: dict[int, torch.Tensor] = {}
        if rows is not None and self._logprobs_ok:
            want = [(i, ev) for i, ev in enumerate(e for e in events if e.token >= 0)
                    if (s := self._streams.get(ev.request_id)) is not None and s.logprobs is not None]
            if want:
                lp = torch.log_softmax(rows[[i for i, _ in want]].float(), dim=-1).cpu()
                lp_rows = {ev.request_id: lp[j] for j, (_, ev) in enumerate(want)}
        for ev in events:
            s = self._streams.get(ev.request_id)
            if s is None or ev.token < 0:
                continue
            out_ = ev.output
            tok = Token(token=ev.token, text=ev.text_delta)
            if ev.request_id in lp_rows:
                row = lp_rows[ev.request_id]
                tok.logprob = float(row[ev.token])
                if s.logprobs:
                    v, i = row.topk(min(s.logprobs, row.numel()))
                    tok.top = list(zip(i.tolist(), v.tolist()))
            s.num_tokens += 1
            m.generation_tokens.labels(n).inc()
            if s.num_tokens == 1:
                m.ttft.labels(n).observe(now - s.arrival)
            else:
                m.itl.labels(n).observe(now - s.last_time)
            s.last_time = now
            if ev.finished:
                tok.finish_reason = out_.finish_reason
                tok.final_text = out_.text
                tok.depths = list(out_.depths)
                del self._streams[ev.request_id]
                self._finish(s, out_.finish_reason, now)
            out.append((s, tok))
