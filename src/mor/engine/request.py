"""Requests, their sampling parameters and their outputs."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import torch


class RequestError(ValueError):
    """A request is invalid (empty or too long prompt, bad sampling parameters, more tokens
    than the cache holds). The message names the bad value; other requests are unaffected."""


@dataclass
class SamplingParams:
    """How to pick each new token.

    ``temperature=0`` is greedy decoding. ``top_k=0`` and ``top_p=1`` switch those filters
    off. ``max_tokens`` new tokens at most; generation also stops at the end-of-text token
    (unless ``ignore_eos``), at any of ``stop_token_ids``, or when the text contains one of
    the ``stop`` strings (the text is cut before it; the token ids keep the token that
    completed it). ``seed`` gives the request its own random generator, so its samples do
    not depend on the other requests in the batch."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise RequestError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        if (not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool)
                or not math.isfinite(self.temperature) or self.temperature < 0):
            raise RequestError(f"temperature={self.temperature!r} must be a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise RequestError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off)")
        if (not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool)
                or not (0.0 < self.top_p <= 1.0)):
            raise RequestError(f"top_p={self.top_p!r} must be in (0, 1] (1 = off)")
        if self.seed is not None and not is_int(self.seed):
            raise RequestError(f"seed={self.seed!r} must be an integer or None")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
                raise RequestError(f"stop={self.stop!r} must be a non-empty string or a list of non-empty strings")
            self.stop = list(self.stop)
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(is_int(t) for t in self.stop_token_ids):
                raise RequestError(f"stop_token_ids={self.stop_token_ids!r} must be a list of integers")
            self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RequestOutput:
    """The result of one request.

    ``depths[i]`` is the number of recursions the model ran on the position whose output
    produced ``token_ids[i]`` (0 for vanilla models; N_r for recursive ones).
    ``finish_reason``: "length" (max_tokens), "stop" (end-of-text, a stop token or string),
    "abort" (``Engine.abort``), or "error" (the request was rejected; ``error`` says why and
    nothing was generated)."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    logits: torch.Tensor | None = None  # (len(token_ids), vocab) when the engine records logits

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Status(enum.Enum):
    """A request's life cycle."""

    WAITING = "waiting"  # queued (new or preempted)
    RUNNING = "running"  # holds a sequence slot and KV blocks
    FINISHED = "finished"


@dataclass
class Request:
    """A request inside the engine (host-side state only)."""

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    generator: torch.Generator | None = None
    status: Status = Status.WAITING
    slot: int = -1
    output_ids: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    text: str = ""
    text_emitted: int = 0  # characters of ``text`` already streamed
    finish_reason: str | None = None
    preemptions: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_id(self) -> int:
        """The newest token of the sequence (``all_ids[-1]`` without building the list)."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    @property
    def position(self) -> int:
        """Position of the in-flight token (the last token of the sequence so far)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def append_token(self, token: int, depth: int, eos_token_id: int, tokenizer: Any = None) -> tuple[str | None, str]:
        """Record a sampled token produced by a position that ran ``depth`` recursions.
        Returns (the finish reason or None, the new text that may be streamed).

        Stop strings cut the text before the earliest one; while none matched, a tail that
        could still grow into one (or an incomplete UTF-8 sequence) is held back."""
        p = self.params
        self.output_ids.append(token)
        self.depths.append(depth)
        reason = None
        if token == eos_token_id and not p.ignore_eos:
            reason = "stop"
        elif p.stop_token_ids and token in p.stop_token_ids:
            reason = "stop"
        elif len(self.output_ids) >= p.max_tokens:
            reason = "length"
        if tokenizer is None:
            return reason, ""
        text = tokenizer.decode(self.output_ids)
        hold = 0
        if p.stop:
            hits = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if hits:
                text, reason = text[:min(hits)], "stop"
            elif reason is None:
                hold = max((k for s in p.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if reason is None and text.endswith("\ufffd"):
            hold = max(hold, 1)
        upto = len(text) - hold
        delta = text[self.text_emitted:upto] if upto > self.text_emitted else ""
        self.text_emitted = max(self.text_emitted, upto)
        self.text = text
        return reason, delta

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=list(self.prompt_ids),
            text=self.text, token_ids=list(self.output_ids), depths=list(self.depths),
            finish_reason=self.finish_reason,
            logits=torch.stack(self.logits) if self.logits else None,
        )
