"""mor: Mixture-of-Recursions language models (Bae et al., NeurIPS 2025)."""

from .config import ConfigError, ModelConfig, preset, PRESETS
from .model import MoRForCausalLM, MoROutput

__version__ = "0.1.0"
__all__ = ["ModelConfig", "ConfigError", "preset", "PRESETS", "MoRForCausalLM", "MoROutput"]


def __getattr__(name: str):
    """Lazy exports: ``mor.LLM`` and ``mor.SamplingParams`` import the inference engine on use."""
    if name in ("LLM", "SamplingParams"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'mor' has no attribute {name!r}")
