"""Inference for vanilla, recursive and MoR models: causal routing, recursion-aware KV
caches and a continuous depth-wise batching engine (docs/inference.md).

    llm = mor.LLM("runs/my-run")                      # a checkpoint or run directory
    outs = llm.generate(["To be, or not"], mor.SamplingParams(max_tokens=40, temperature=0.8))
    outs[0].text, outs[0].token_ids, outs[0].depths

Parts: ``scheduler`` (admission, KV reservation, preemption -> a ``StepPlan``), ``mor.cache``
(``KVPool`` bookkeeping, ``KVCache`` tensors), ``runner`` (executes a plan with the model's
modules), ``request`` (requests, stages, stop rules), ``core.Engine`` (schedule -> execute ->
postprocess; ``add_request``, ``step``, ``abort``), ``llm.LLM``.
"""

from .core import Engine, EngineStats, StepEvent
from .request import RequestError, RequestOutput, SamplingParams
from .llm import LLM, generate_text

__all__ = ["LLM", "SamplingParams", "RequestError", "RequestOutput", "generate_text", "EngineStats", "Engine",
           "StepEvent"]
