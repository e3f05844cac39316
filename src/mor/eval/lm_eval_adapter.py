"""The lm-eval (``lm-eval==0.4.13``) model ``mor``: any vanilla / recursive / MoR checkpoint.

Importing this module registers the model with lm-eval's registry. lm-eval's own command
line only imports its built-in models, so use one of:

* ``python -m mor.eval.lm_eval_cli --model mor --model_args pretrained=CHECKPOINT --tasks ...``
  (lm-eval's CLI with this module imported and the packaged offline tasks on the include path);
* ``mor eval CHECKPOINT --tasks paper`` (the paper's six tasks and table);
* from Python: ``import mor.eval.lm_eval_adapter`` then
  ``lm_eval.simple_evaluate(model="mor", model_args="pretrained=...", ...)``.

Model arguments (``--model_args key=value,...``): ``pretrained`` (checkpoint or run
directory, required), ``routing`` (``topk``, the default and the paper's rule, or
``threshold``; expert-choice only), ``batch_size``, ``device`` (``auto``), ``dtype``
(``float32``), ``max_length`` (default the model's ``max_position_embeddings``),
``max_gen_toks`` (256). Scoring semantics are those of :mod:`mor.eval.scoring`.
"""

from __future__ import annotations

import logging

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
    raise ImportError("the lm-eval adapter needs lm-eval 0.4.13: pip install 'mor[eval]' "
                      "(or pip install lm-eval==0.4.13)") from e

import torch
from tqdm import tqdm

from .common import describe, load_for_eval
from .scoring import Scorer

log = logging.getLogger(__name__)


def _int_or_default(v, default: int) -> int:
    """lm-eval passes batch sizes as ints or strings such as ``auto`` / ``auto:4``."""
    if v is None:
        return default
    if isinstance(v, str):
        return int(v) if v.isdigit() else default
    return int(v)


@register_model("mor")
class MoRLM(TemplateLM):
    """lm-eval model over a :class:`~mor.eval.scoring.Scorer`."""

    def __init__(self, pretrained: str | None = None, routing: str = "topk", batch_size=16,
                 max_batch_size=None, device: str | None = "auto", dtype: str = "float32",
                 max_length: int | None = None, max_gen_toks: int = 256, model=None, tokenizer=None,
                 **kwargs):
        super().__init__()
        if kwargs:
            log.warning("mor: ignoring unsupported model arguments %s", sorted(kwargs))
        if model is None:
            if not pretrained:
                raise ValueError("the mor model needs pretrained=CHECKPOINT (a checkpoint or run directory)")
            device = device or "auto"
            if str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI defaults to cuda:0; like its HF model, fall back to the CPU
                log.warning("mor: device %s requested but CUDA is not available; using cpu", device)
                device = "cpu"
            model, tokenizer, ckpt_dir = load_for_eval(pretrained, device=device, dtype=dtype)
            self.checkpoint = str(ckpt_dir)
        else:
            if tokenizer is None:
                raise ValueError("pass tokenizer= together with model=")
            self.checkpoint = str(pretrained) if pretrained else None
        bs = _int_or_default(batch_size, 16)
        if max_batch_size:
            bs = min(bs, int(max_batch_size))
        self.scorer = Scorer(model, tokenizer, routing=routing, batch_size=bs,
                             max_length=int(max_length) if max_length else None)
        self.model = model
        self.tokenizer = tokenizer
        self.routing = routing
        self.max_gen_toks = int(max_gen_toks)
        self._device = self.scorer.device

    # .................................................................. TemplateLM interface
    @property
    def eot_token_id(self) -> int:
        return self.scorer.eos_id

    @property
    def max_length(self) -> int:
        return self.scorer.max_length

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    @property
    def tokenizer_name(self) -> str:
        return f"mor:{self.checkpoint or 'in-memory'}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.scorer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.scorer.decode(tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return self.scorer.encode_pair(context, continuation)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ((context, continuation), context ids, continuation ids) triples."""
        res = self.scorer.loglikelihood_tokens([(ctx, cont) for _, ctx, cont in requests], progress=not disable_tqdm)
        for (key, _, _), r in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        res = self.scorer.loglikelihood_rolling(texts, progress=not disable_tqdm)
        for t, r in zip(texts, res):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), r)
        return res

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        contexts, untils, maxes = [], [], []
        eot = self.scorer.decode([self.eot_token_id])
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None)
            if isinstance(until, str):
                until = [until]
            until = list(until or []) + [eot]
            if gen_kwargs.get("do_sample") and float(gen_kwargs.get("temperature", 1.0) or 0) > 0:
                log.warning("mor: generate_until decodes greedily; do_sample/temperature are ignored")
            contexts.append(context)
            untils.append(until)
            maxes.append(int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)))
        out = []
        for i in tqdm(range(0, len(contexts), self.batch_size), disable=disable_tqdm, desc="generate_until"):
            sl = slice(i, i + self.batch_size)
            out += self.scorer.generate(contexts[sl], untils[sl], maxes[sl])
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def get_model_info(self) -> dict:
        return {"model_source": "mor", "checkpoint": self.checkpoint, "routing": self.routing,
                "architecture": describe(self.model.config)}
