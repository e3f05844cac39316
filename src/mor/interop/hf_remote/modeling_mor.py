"""transformers model of a MoR / recursive checkpoint: a ``PreTrainedModel`` + ``GenerationMixin``
around mor's own ``MoRForCausalLM`` (the same module tree, so the weights keep mor's key
names, which are Hugging Face Llama's).

* ``forward(input_ids, labels=None, routing=None)``: ``routing`` defaults to
  ``config.routing`` (``topk``, the paper's evaluation rule); ``labels`` follow the Hugging Face
  convention (the model shifts them) and ``loss`` adds the router's auxiliary losses;
* ``generate``: every step recomputes the whole sequence (no KV cache) with the causal
  routing rule (``threshold`` for expert-choice), so it returns what ``mor.LLM`` returns;
* padding: mor models have no padding mask; right padding is accepted with a causal rule
  (earlier positions never see later ones), anything else is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ...model import MoRForCausalLM as _MoRCore
from .configuration_mor import MoRConfig


class MoRPreTrainedModel(PreTrainedModel):
    config_class = MoRConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]
    _supports_cache_class = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)


class MoRForCausalLM(MoRPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoRConfig):
        super().__init__(config)
        core = _MoRCore(config.to_mor())
        # the same modules, registered here so state-dict keys are mor's; the core holds no
        # parameters of its own and is kept out of the module tree
        self.model = core.model
        self.lm_head = core.lm_head
        object.__setattr__(self, "_mor_core", core)
        self.post_init()

    @property
    def mor_model(self) -> _MoRCore:
        """mor's ``MoRForCausalLM`` over this model's modules."""
        core = self._mor_core
        core.model, core.lm_head = self.model, self.lm_head
        return core

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @property
    def causal_routing(self) -> str:
        """The routing rule generation uses: ``threshold`` (causal) for expert-choice models;
        the others are causal with either value."""
        return "threshold"

    def forward(self, input_ids=None, attention_mask=None, labels=None, routing=None, inputs_embeds=None,
                return_dict=None, **kwargs):
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("MoR models take input_ids (inputs_embeds is not supported)")
        routing = routing or self.config.routing
        self._check_mask(attention_mask, routing)
        shifted = None
        if labels is not None:  # Hugging Face labels equal input_ids; mor's are next-token targets
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
        out = self.mor_model(input_ids, labels=shifted, routing=routing)
        return CausalLMOutputWithPast(loss=out.loss, logits=out.logits)

    def _check_mask(self, attention_mask, routing):
        if attention_mask is None or bool(attention_mask.all()):
            return
        m = attention_mask.to(torch.long)
        right_padded = bool((m[:, 1:] <= m[:, :-1]).all())
        c = self.config
        causal = not (c.architecture == "mor" and c.router_type == "expert" and routing == "topk")
        if not (right_padded and causal):
            raise ValueError("MoR models have no padding mask: pass unpadded input_ids, or right padding "
                             "with a causal routing rule (routing='threshold' for expert-choice models)")

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """No KV cache: every step runs the whole sequence with the causal routing rule."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("MoR generation takes unpadded prompts (batch prompts of equal length, "
                             "or generate one prompt at a time)")
        return {"input_ids": input_ids, "routing": self.causal_routing}
