"""transformers configuration of a MoR / recursive model: mor's ``ModelConfig`` fields at the top
level of config.json (Hugging Face Llama names for the backbone), plus ``routing``, the
expert-choice rule used by ``forward`` when none is passed (``topk``: the paper's evaluation
rule, as mor's native lm-eval adapter uses; ``threshold``: the causal rule). Generation
always uses the causal rule."""

from __future__ import annotations

import dataclasses

from transformers import PretrainedConfig

from ...config import ModelConfig

MOR_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
ROUTINGS = ("topk", "threshold")


class MoRConfig(PretrainedConfig):
    model_type = "mor"

    def __init__(self, routing: str = "topk", **kwargs):
        if routing not in ROUTINGS:
            raise ValueError(f"routing={routing!r} is not valid; choose one of: {', '.join(ROUTINGS)}")
        given = {k: kwargs.pop(k) for k in MOR_FIELDS if k in kwargs}
        mor = ModelConfig(**given)  # validates; fills the defaults
        for k in MOR_FIELDS:
            if k != "tie_word_embeddings":  # the base class owns this one
                setattr(self, k, getattr(mor, k))
        self.routing = routing
        super().__init__(tie_word_embeddings=mor.tie_word_embeddings, **kwargs)

    def to_mor(self) -> ModelConfig:
        """The ``mor.ModelConfig`` these values describe."""
        return ModelConfig(**{k: getattr(self, k) for k in MOR_FIELDS})
