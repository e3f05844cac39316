"""The user-facing API: ``LLM`` (checkpoint or in-memory model) and ``generate_text``."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..cache import worst_case_bytes
from ..config import ConfigError
from ..model import MoRForCausalLM
from ..runtime import find_eos, resolve_device, resolve_dtype
from .core import Engine, EngineStats, StepEvent
from .request import RequestError, RequestOutput, SamplingParams

DEFAULT_KV_CAP_GB = (1.0, 8.0)  # (CPU, CUDA): default KV pool cap of LLM


def _unwrap(model: Any) -> MoRForCausalLM:
    """The MoRForCausalLM inside a torch.compile / DDP wrapper."""
    for attr in ("_orig_mod", "module"):
        while hasattr(model, attr) and not isinstance(model, MoRForCausalLM):
            model = getattr(model, attr)
    if not isinstance(model, MoRForCausalLM):
        raise TypeError(f"expected a MoRForCausalLM, got {type(model).__name__}")
    return model


def _as_prompt_list(prompts: Any) -> list:
    """A single prompt (text or token ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _per_request_params(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list:
    """One SamplingParams per prompt. A single seeded SamplingParams gives request i the seed
    ``seed + i``: a call is reproducible and identical prompts still differ."""
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        if params.seed is None or n == 1:
            return [params] * n
        return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]
    params = list(params)
    if len(params) != n:
        raise RequestError(f"got {len(params)} SamplingParams for {n} prompts; give one, or one per prompt")
    return params


@dataclass
class StreamEvent:
    """A streamed piece of output: ``index`` is the prompt's position in the call."""

    index: int
    text: str
    token: int
    finished: bool
    output: RequestOutput | None = None


class LLM:
    """Generate with a vanilla, recursive or MoR model.

    ``model``: a checkpoint directory, a run directory (its latest checkpoint), or an
    in-memory ``MoRForCausalLM`` (then pass ``tokenizer`` for text prompts). ``device``
    defaults to CUDA when available; ``dtype`` to bf16 on CUDA and fp32 on CPU (for
    checkpoints; an in-memory model is converted in place when they are given). Engine
    options: ``max_batch`` concurrent sequences, ``max_model_len`` tokens per sequence,
    ``kv_memory_gb`` KV pool size (default: the worst case for max_batch full-length
    sequences, capped at 1 GB on CPU and 8 GB on CUDA), ``block_size``, ``schedule``
    ("auto" | "depth" | "sequence"), ``seed`` for requests without their own seed,
    ``cpu_kernels`` (None: the compiled CPU decode kernels whenever they apply),
    ``cuda_graphs`` (None: decode from CUDA graphs on CUDA) and ``decode_precision`` (opt-in
    low-precision decode), as for ``Engine``."""

    def __init__(self, model: str | os.PathLike | MoRForCausalLM, tokenizer: Any = None, *,
                 device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                 max_batch: int = 32, max_model_len: int | None = None, kv_memory_gb: float | None = None,
                 block_size: int = 16, schedule: str = "auto", seed: int | None = None,
                 cpu_kernels: bool | None = None, decode_precision: str | None = None,
                 cuda_graphs: bool | None = None):
        try:
            device = None if device is None else resolve_device(device)
            dtype = None if dtype is None or dtype == "auto" else resolve_dtype(dtype)
        except ConfigError as e:
            raise RequestError(str(e)) from None
        if isinstance(model, (str, os.PathLike)):
            from ..checkpoint import load_model, load_tokenizer

            dev = device or resolve_device("auto")
            dtype = dtype or resolve_dtype("auto", dev)
            self.checkpoint = str(model)
            model_obj = load_model(model, dev, dtype)
            if tokenizer is None:
                tokenizer = load_tokenizer(model, vocab_size=model_obj.config.vocab_size)
        else:
            self.checkpoint = None
            model_obj = _unwrap(model)
            if device is not None or dtype is not None:  # converts the given model in place
                model_obj = model_obj.to(device=device, dtype=dtype)
        self.model = model_obj.eval()
        self.tokenizer = tokenizer
        self._engine_kwargs = dict(max_batch=max_batch, max_model_len=max_model_len, block_size=block_size,
                                   schedule=schedule, seed=seed, cpu_kernels=cpu_kernels,
                                   cuda_graphs=cuda_graphs, decode_precision=decode_precision,
                                   kv_memory_bytes=None if kv_memory_gb is None else int(kv_memory_gb * 2**30))
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        """The engine (created on first use; its KV pool is allocated once). Without
        ``kv_memory_gb`` the pool holds the worst case for ``max_batch`` full-length sequences,
        capped at DEFAULT_KV_CAP_GB (the engine preempts if sequences outgrow it)."""
        if self._engine is None:
            kw = dict(self._engine_kwargs)
            if kw["kv_memory_bytes"] is None:
                cfg = self.model.config
                p = self.model.model.embed_tokens.weight
                L = kw["max_model_len"] or cfg.max_position_embeddings
                worst = worst_case_bytes(cfg, max_seqs=kw["max_batch"], max_len=L, dtype=p.dtype,
                                         block_size=kw["block_size"])
                one = worst_case_bytes(cfg, max_seqs=1, max_len=L, dtype=p.dtype, block_size=kw["block_size"])
                cap = int(DEFAULT_KV_CAP_GB[p.device.type == "cuda"] * 2**30)
                if worst > cap:
                    kw["kv_memory_bytes"] = max(cap, 2 * one)
            self._engine = Engine(self.model, self.tokenizer, **kw)
        return self._engine

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    def stream(self, prompts: Any, params: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> Iterator[StreamEvent]:
        """Generate, yielding text as it is produced. An invalid request yields one finished
        event whose output has ``finish_reason="error"``; the others run normally."""
        prompts = _as_prompt_list(prompts)
        plist = _per_request_params(params, len(prompts))
        eng = self.engine
        index: dict[int, int] = {}
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            try:
                index[eng.add_request(p, sp)] = i
            except RequestError as e:
                ids = list(p) if not isinstance(p, str) else []
                yield StreamEvent(i, "", -1, True, RequestOutput(request_id=-1, prompt=p if isinstance(p, str) else None,
                                                                  prompt_token_ids=ids, finish_reason="error",
                                                                  error=str(e)))
        while eng.has_unfinished:
            for ev in eng.step():
                if ev.request_id in index:
                    yield StreamEvent(index[ev.request_id], ev.text_delta, ev.token, ev.finished, ev.output)

    def generate(self, prompts: Any, params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 on_event: Callable[[StreamEvent], None] | None = None) -> list[RequestOutput]:
        """Outputs in prompt order (text, token_ids, per-token depths, finish_reason; rejected
        requests have finish_reason "error" and ``error``)."""
        n = len(_as_prompt_list(prompts))
        outs: list[RequestOutput | None] = [None] * n
        for ev in self.stream(prompts, params):
            if on_event is not None:
                on_event(ev)
            if ev.finished:
                outs[ev.index] = ev.output
        return outs  # type: ignore[return-value]


def generate_text(model: MoRForCausalLM, tokenizer: Any, prompts: list[str], params: SamplingParams | None = None,
                  *, max_batch: int = 32) -> list[str]:
    """Completions of ``prompts`` by an in-memory model (e.g. samples at the end of training).

    An empty prompt means unprompted generation: the model starts right after the
    end-of-text token, like at the start of a training document. The KV pool is sized for
    exactly these requests; the model's train/eval mode is restored. Raises RequestError if
    a prompt or the parameters are invalid."""
    model = _unwrap(model)
    if not prompts:
        return []
    plist = _per_request_params(params, len(prompts))
    eos = (find_eos(tokenizer) or (0, ""))[0]
    ids = []
    for p, sp in zip(prompts, plist):
        sp.validate()
        if not isinstance(p, str):
            raise RequestError(f"prompt {p!r} must be a string")
        ids.append(tokenizer.encode(p).ids if p else [eos])
    ctx = model.config.max_position_embeddings
    need = max(len(i) + sp.max_tokens for i, sp in zip(ids, plist))
    was_training = model.training
    try:
        # a one-off engine: recording CUDA graphs for its shapes would cost more than it saves
        eng = Engine(model, tokenizer, max_batch=min(max_batch, len(prompts)), max_model_len=min(ctx, need),
                     eos_token_id=eos, cuda_graphs=False)
        for i, sp in zip(ids, plist):
            eng.add_request(i, sp)
        return [o.text for o in eng.run_until_done()]
    finally:
        model.train(was_training)


__all__ = ["LLM", "StreamEvent", "generate_text", "StepEvent"]
