"""Register the ``mor`` model type with transformers' Auto classes (importing this module does
it): ``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained(EXPORT)`` then use the installed
library's classes without ``trust_remote_code``."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .hf_remote.configuration_mor import MoRConfig
from .hf_remote.modeling_mor import MoRForCausalLM


def register() -> None:
    """Idempotent: registers ``mor`` unless transformers already knows it."""
    try:
        AutoConfig.register("mor", MoRConfig)
    except ValueError:  # already registered (by an earlier call)
        pass
    try:
        AutoModelForCausalLM.register(MoRConfig, MoRForCausalLM)
    except ValueError:
        pass


register()
