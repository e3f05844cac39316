"""The FastAPI application: OpenAI-compatible endpoints on one engine thread.

``create_app(config)`` loads the checkpoint and returns the app; the engine thread starts
and stops with the app's lifespan. ``mor.serve.server.serve`` runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import RequestError, SamplingParams
from .bridge import EngineDead, EngineThread, RequestStream, Token
from .chat import ChatTemplate, ChatTemplateError, load_chat_template
from .metrics import ServerMetrics
from .streaming import APIKeyMiddleware, EventStream, disconnected, interleave
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                       _Sampling)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_N = 16


@dataclass
class ServeConfig:
    """Settings of ``mor serve`` (see ``mor serve --help``)."""

    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    api_key: str | None = None
    max_batch: int = 32
    kv_memory_gb: float | None = None
    max_model_len: int | None = None
    block_size: int = 16
    schedule: str = "auto"
    device: str | None = None
    dtype: str | None = None
    seed: int | None = None
    max_queue: int = 256  # requests (choices) waiting beyond the running batch before 503
    max_logprobs: int = 20
    chat_template: str | None = None
    shutdown_grace_s: float = 30.0
    log_level: str = "warning"


class ServerState:
    """What the endpoints share: the model, tokenizer, engine thread and metrics."""

    def __init__(self, cfg: ServeConfig):
        from ..engine import LLM

        self.cfg = cfg
        self.llm = LLM(cfg.checkpoint, device=cfg.device, dtype=cfg.dtype, max_batch=cfg.max_batch,
                       max_model_len=cfg.max_model_len, kv_memory_gb=cfg.kv_memory_gb, block_size=cfg.block_size,
                       schedule=cfg.schedule, seed=cfg.seed)
        self.engine = self.llm.engine
        self.engine.capture_graphs()  # on CUDA: record every decode graph now, not while serving
        self.tokenizer = self.llm.tokenizer
        self.model_config = self.llm.model.config
        self.name = cfg.served_model_name or str(cfg.checkpoint).rstrip("/").split("/")[-1]
        self.max_model_len = self.engine.max_model_len
        self.vocab_size = self.model_config.vocab_size
        src = load_chat_template(cfg.checkpoint, cfg.chat_template)
        eos = self.tokenizer.id_to_token(self.engine.eos_token_id) if self.tokenizer is not None else ""
        self.chat_template = ChatTemplate(src, bos_token=eos or "", eos_token=eos or "") if src else None
        self.metrics = ServerMetrics(self.name, self.engine.stats.num_recursions,
                                     list(self.engine.stats.kv.get("kv_group_used_bytes", {})))
        self.thread: EngineThread | None = None
        self.draining = False
        self.created = int(time.time())


# ---------------------------------------------------------------------- helpers
class _ClientGone(Exception):
    """The client closed the connection before its (non-streamed) answer was ready."""


def _param_of(loc: tuple) -> str | None:
    """The parameter a pydantic error is about ("messages.0.content"); a union's branch tags
    ("str", "list[int]", ...) end the path."""
    parts = []
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        p = str(p)
        if any(c in p for c in "[]") or p in ("str", "int", "float", "bool", "function-after"):
            break
        parts.append(p)
    return ".".join(parts) or None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _sampling(st: ServerState, req: _Sampling, max_tokens: int | None) -> dict[str, Any]:
    """SamplingParams fields from a request, each checked with its parameter named."""
    def bad(param: str, msg: str):
        raise APIError(400, f"{param}: {msg}", param, "invalid_value")

    t = 1.0 if req.temperature is None else req.temperature
    if not math.isfinite(t) or t < 0:
        bad("temperature", f"{t} must be a finite number >= 0 (0 = greedy)")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        bad("top_p", f"{top_p} must be in (0, 1]")
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    if top_k < 0:
        bad("top_k", f"{req.top_k} must be >= 1, or 0 / -1 for no top-k filter")
    if not 1 <= req.n <= MAX_N:
        bad("n", f"{req.n} must be in [1, {MAX_N}]")
    if max_tokens is not None and max_tokens < 1:
        bad("max_tokens", f"{max_tokens} must be >= 1")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    if stop is not None and not all(stop):
        bad("stop", "stop strings must be non-empty")
    ids = req.stop_token_ids
    if ids is not None and any(not 0 <= i < st.vocab_size for i in ids):
        bad("stop_token_ids", f"token ids must be in [0, {st.vocab_size})")
    if req.seed is not None and not -2**63 <= req.seed < 2**63 - MAX_N * 4096:
        bad("seed", f"{req.seed} must fit a signed 64-bit integer")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(req, name)
        if v not in (None, 0, 0.0):
            bad(name, f"{v}: penalties are not supported by this server (give 0 or leave it out)")
    if req.repetition_penalty not in (None, 1, 1.0):
        bad("repetition_penalty", f"{req.repetition_penalty}: not supported (give 1 or leave it out)")
    if req.logit_bias:
        bad("logit_bias", "not supported by this server")
    return dict(temperature=float(t), top_p=float(top_p), top_k=min(top_k, st.vocab_size), stop=stop or None,
                stop_token_ids=list(ids) if ids else None, ignore_eos=req.ignore_eos)


def _check_model(st: ServerState, name: str | None) -> None:
    if name is not None and name != st.name:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{st.name}`.", "model",
                       "model_not_found")


def _encode(st: ServerState, text: str, add_special_tokens: bool = True) -> list[int]:
    if st.tokenizer is None:
        raise APIError(400, "this checkpoint has no tokenizer.json: send the prompt as token ids", "prompt")
    return list(st.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)


def _check_prompt(st: ServerState, ids: list[int], max_tokens: int | None, param: str = "prompt") -> int:
    """Checks a prompt against the vocabulary and the context; returns max_tokens to use."""
    if not ids:
        raise APIError(400, f"{param} is empty: give at least one token", param, "invalid_value")
    bad = next((t for t in ids if not 0 <= t < st.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {st.vocab_size})", param,
                       "invalid_value")
    M = st.max_model_len
    if len(ids) >= M:
        raise APIError(400, f"This model's maximum context length is {M} tokens, but the prompt has {len(ids)} "
                            f"tokens (leave room for at least one new token).", param, "context_length_exceeded")
    if max_tokens is not None and len(ids) + max_tokens > M:
        raise APIError(400, f"This model's maximum context length is {M} tokens: the prompt ({len(ids)} tokens) "
                            f"+ max_tokens ({max_tokens}) is {len(ids) + max_tokens}; use max_tokens <= "
                            f"{M - len(ids)}.", "max_tokens", "context_length_exceeded")
    return max_tokens if max_tokens is not None else M - len(ids)


def _token_str(st: ServerState, t: int) -> str:
    return st.tokenizer.decode([t], skip_special_tokens=False) if st.tokenizer is not None else f"token_id:{t}"


def _messages(st: ServerState, messages, add_generation_prompt: bool, kwargs: dict | None) -> str:
    if st.chat_template is None:
        raise APIError(400, "this checkpoint has no chat template (chat_template.jinja or tokenizer_config.json "
                            "'chat_template'; or start the server with --chat-template FILE): use /v1/completions",
                       "messages", "chat_template_missing")
    msgs = []
    for i, m in enumerate(messages):
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            texts = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{i}].content: only text parts are supported, got {part.type!r}",
                                   f"messages.{i}.content")
                texts.append(part.text)
            d["content"] = "".join(texts)
        msgs.append(d)
    try:
        return st.chat_template.render(msgs, add_generation_prompt=add_generation_prompt, **(kwargs or {}))
    except ChatTemplateError as e:
        raise APIError(400, str(e), "messages") from None


# ---------------------------------------------------------------------- the app
def with_extensions(choice: dict, t: Token, return_token_ids: bool) -> dict:
    """A streamed choice with the extension fields: ``mor_depths`` in its last chunk and,
    when asked for, the chunk's ``token_ids`` (as vLLM)."""
    if t.finish_reason is not None:
        choice["mor_depths"] = t.depths
    if return_token_ids:
        choice["token_ids"] = [t.token]
    return choice


def create_app(cfg: ServeConfig, state: ServerState | None = None) -> FastAPI:
    st = state or ServerState(cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st.thread = EngineThread(st.engine, st.metrics, asyncio.get_running_loop())
        st.thread.start()
        try:
            yield
        finally:
            st.draining = True
            st.thread.close()

    app = FastAPI(title="mor serve", lifespan=lifespan)
    app.state.mor = st
    M = st.metrics

    def error_response(e: APIError) -> JSONResponse:
        M.errors.labels(st.name, str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"the body is not valid JSON: {first.get('msg')}", None,
                                           "invalid_json"))
        param = _param_of(tuple(first.get("loc", ())))
        if param is None:
            return error_response(APIError(400, "the body must be a JSON object (Content-Type: application/json)",
                                           None, "invalid_json"))
        return error_response(APIError(400, f"{param or 'body'}: {first.get('msg')}", param, "invalid_value"))

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, e: Exception):
        return Response(status_code=499)  # nobody reads it; the requests were cancelled

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return error_response(APIError(e.status_code, str(e.detail), None, None, getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error"))

    if cfg.api_key is not None:
        app.add_middleware(APIKeyMiddleware, key=cfg.api_key, on_fail=error_response)

    def admit(n_new: int) -> EngineThread:
        th = st.thread
        if st.draining:
            raise APIError(503, "the server is shutting down", None, "shutting_down")
        if th is None or th.error is not None:
            raise APIError(503, "the engine is not running", None, "engine_dead")
        cap = cfg.max_batch + cfg.max_queue
        if th.inflight + n_new > cap:
            raise APIError(503, f"the server is at capacity: {th.inflight} requests running or queued, at most "
                                f"{cap} (--max-batch + --max-queue); retry later", None, "queue_full",
                           {"Retry-After": "1"})
        return th

    async def start(jobs: list[tuple[list[int], SamplingParams, int | None]]) -> list[RequestStream]:
        th = admit(len(jobs))
        streams = [th.submit(ids, sp, lp) for ids, sp, lp in jobs]
        try:
            for s in streams:
                await s.accepted()
        except RequestError as e:
            for s in streams:
                th.abort(s)
            raise APIError(400, str(e), None, "invalid_value") from None
        except EngineDead as e:
            raise APIError(503, str(e), None, "engine_dead") from None
        except BaseException:
            for s in streams:
                th.abort(s)
            raise
        return streams

    def abort_all(streams: list[RequestStream]) -> None:
        for s in streams:
            st.thread.abort(s)

    async def collect(request: Request, streams: list[RequestStream]) -> list[list[Token]]:
        async def one(s: RequestStream) -> list[Token]:
            return [t async for t in s]

        work = asyncio.ensure_future(asyncio.gather(*(one(s) for s in streams)))
        watch = asyncio.ensure_future(disconnected(request))
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:  # the client went away
                raise _ClientGone()
            return work.result()
        except EngineDead as e:
            raise APIError(503, str(e), None, "engine_dead") from None
        finally:
            work.cancel()
            watch.cancel()
            abort_all(streams)

    def ids_and_text(prompt) -> list[tuple[list[int], str | None]]:
        if isinstance(prompt, str):
            items = [prompt]
        elif prompt and all(_is_int(t) for t in prompt):
            items = [list(prompt)]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, "prompt is empty", "prompt", "invalid_value")
        out = []
        for p in items:
            if isinstance(p, str):
                if p == "":
                    raise APIError(400, "prompt is empty: give at least one token", "prompt", "invalid_value")
                out.append((_encode(st, p), p))
            else:
                out.append((list(p), None))
        return out

    # ..................................................................... routes
    @app.get("/health")
    async def health():
        if st.thread is None or st.thread.error is not None:
            raise APIError(503, "the engine is not running", None, "engine_dead")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(M.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": [{
            "id": st.name, "object": "model", "created": st.created, "owned_by": "mor", "root": str(cfg.checkpoint),
            "max_model_len": st.max_model_len,
            "mor": {"architecture": st.model_config.architecture, "num_recursions": st.engine.stats.num_recursions,
                    "schedule": st.engine.schedule, "vocab_size": st.vocab_size,
                    "max_batch": st.engine.stats.max_batch}}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request):
        _check_model(st, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", "prompt", "invalid_value")
        if body.messages is not None:
            ids = _encode(st, _messages(st, body.messages, body.add_generation_prompt, None), False)
        else:
            ids = _encode(st, body.prompt, body.add_special_tokens)
        return {"count": len(ids), "max_model_len": st.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest, request: Request):
        _check_model(st, body.model)
        bad = next((t for t in body.tokens if not 0 <= t < st.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"tokens: token id {bad} is outside the vocabulary [0, {st.vocab_size})", "tokens",
                           "invalid_value")
        if st.tokenizer is None:
            raise APIError(400, "this checkpoint has no tokenizer.json", "tokens")
        return {"prompt": st.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(st, body.model)
        fields = _sampling(st, body, body.max_tokens)
        if body.suffix:
            raise APIError(400, "suffix is not supported", "suffix", "invalid_value")
        if body.best_of not in (None, body.n):
            raise APIError(400, "best_of must equal n (or be left out)", "best_of", "invalid_value")
        lp = body.logprobs
        if lp is not None and not 0 <= lp <= cfg.max_logprobs:
            raise APIError(400, f"logprobs: {lp} must be in [0, {cfg.max_logprobs}] (--max-logprobs)", "logprobs",
                           "invalid_value")
        prompts = ids_and_text(body.prompt)
        jobs, meta = [], []
        default = body.max_tokens is None
        for i, (ids, text) in enumerate(prompts):
            mt = _check_prompt(st, ids, body.max_tokens)
            if default:
                mt = min(mt, DEFAULT_COMPLETION_TOKENS)
            for j in range(body.n):
                idx = i * body.n + j
                seed = None if body.seed is None else body.seed + idx
                jobs.append((ids, SamplingParams(max_tokens=mt, seed=seed, **fields), lp))
                meta.append((idx, ids, text))
        streams = await start(jobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        usage = {"prompt_tokens": sum(len(ids) for ids, _ in prompts)}

        def echo_text(ids, text) -> str:
            if text is not None:
                return text
            return st.tokenizer.decode(ids, skip_special_tokens=False) if st.tokenizer is not None else ""

        def logprobs_block(toks: list[Token], offset: int) -> dict:
            out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for t in toks:
                s = _token_str(st, t.token)
                out["tokens"].append(s)
                out["token_logprobs"].append(t.logprob)
                out["top_logprobs"].append({_token_str(st, i): v for i, v in (t.top or [])} if lp else None)
                out["text_offset"].append(offset)
                offset += len(t.text)
            return out

        if not body.stream:
            results = await collect(request, streams)
            choices = []
            for (idx, ids, text), toks in zip(meta, results):
                last = toks[-1]
                prefix = echo_text(ids, text) if body.echo else ""
                c = {"index": idx, "text": prefix + (last.final_text or ""),
                     "logprobs": logprobs_block(toks, len(prefix)) if lp is not None else None,
                     "finish_reason": last.finish_reason, "mor_depths": last.depths}
                if body.return_token_ids:
                    c.update(prompt_token_ids=ids, token_ids=[t.token for t in toks])
                choices.append(c)
            n_out = sum(len(t) for t in results)
            usage.update(completion_tokens=n_out, total_tokens=usage["prompt_tokens"] + n_out)
            return {"id": rid, "object": "text_completion", "created": created, "model": st.name,
                    "choices": choices, "usage": usage}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        offsets = {}

        def chunk(choices: list[dict], usage_: dict | None = None) -> dict:
            c = {"id": rid, "object": "text_completion", "created": created, "model": st.name, "choices": choices}
            if include_usage:
                c["usage"] = usage_
            return c

        def first(k: int) -> dict | None:
            idx, ids, text = meta[k]
            if not body.echo:
                offsets[idx] = 0
                return None
            e = echo_text(ids, text)
            offsets[idx] = len(e)
            return chunk([{"index": idx, "text": e, "logprobs": None, "finish_reason": None}])

        def piece(k: int, t: Token) -> dict:
            idx = meta[k][0]
            c = {"index": idx, "text": t.text,
                 "logprobs": logprobs_block([t], offsets[idx]) if lp is not None else None,
                 "finish_reason": t.finish_reason}
            offsets[idx] += len(t.text)
            return chunk([with_extensions(c, t, body.return_token_ids)])

        def final(n_out: int) -> dict | None:
            if not include_usage:
                return None
            return chunk([], {**usage, "completion_tokens": n_out, "total_tokens": usage["prompt_tokens"] + n_out})

        return EventStream(interleave(streams, first, piece, final), lambda: abort_all(streams))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        _check_model(st, body.model)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"{param}: {max_tokens} must be >= 1", param, "invalid_value")
        fields = _sampling(st, body, max_tokens)
        k = body.top_logprobs
        if k is not None and not 0 <= k <= cfg.max_logprobs:
            raise APIError(400, f"top_logprobs: {k} must be in [0, {cfg.max_logprobs}] (--max-logprobs)",
                           "top_logprobs", "invalid_value")
        if k and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
        lp = (k or 0) if body.logprobs else None
        text = _messages(st, body.messages, body.add_generation_prompt, body.chat_template_kwargs)
        ids = _encode(st, text, add_special_tokens=False)
        mt = _check_prompt(st, ids, max_tokens, "messages")
        jobs = [(ids, SamplingParams(max_tokens=mt, seed=None if body.seed is None else body.seed + j, **fields), lp)
                for j in range(body.n)]
        streams = await start(jobs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = {"prompt_tokens": len(ids)}

        def content_logprobs(toks: list[Token]) -> list[dict]:
            out = []
            for t in toks:
                s = _token_str(st, t.token)
                out.append({"token": s, "logprob": t.logprob, "bytes": list(s.encode("utf-8")),
                            "top_logprobs": [{"token": (a := _token_str(st, i)), "logprob": v,
                                              "bytes": list(a.encode("utf-8"))} for i, v in (t.top or [])]})
            return out

        if not body.stream:
            results = await collect(request, streams)
            choices = [{"index": j, "message": {"role": "assistant", "content": toks[-1].final_text or ""},
                        "logprobs": {"content": content_logprobs(toks)} if lp is not None else None,
                        "finish_reason": toks[-1].finish_reason, "mor_depths": toks[-1].depths}
                       for j, toks in enumerate(results)]
            if body.return_token_ids:
                for c, toks in zip(choices, results):
                    c.update(prompt_token_ids=ids, token_ids=[t.token for t in toks])
            n_out = sum(len(t) for t in results)
            usage.update(completion_tokens=n_out, total_tokens=len(ids) + n_out)
            return {"id": rid, "object": "chat.completion", "created": created, "model": st.name,
                    "choices": choices, "usage": usage}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices: list[dict], usage_: dict | None = None) -> dict:
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": st.name,
                 "choices": choices}
            if include_usage:
                c["usage"] = usage_
            return c

        def first(j: int) -> dict:
            return chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}])

        def piece(j: int, t: Token) -> dict:
            c = {"index": j, "delta": {"content": t.text},
                 "logprobs": {"content": content_logprobs([t])} if lp is not None else None,
                 "finish_reason": t.finish_reason}
            return chunk([with_extensions(c, t, body.return_token_ids)])

        def final(n_out: int) -> dict | None:
            if not include_usage:
                return None
            return chunk([], {**usage, "completion_tokens": n_out, "total_tokens": len(ids) + n_out})

        return EventStream(interleave(streams, first, piece, final), lambda: abort_all(streams))

    return app
