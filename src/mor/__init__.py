"""mor: Mixture-of-Recursions language models (Bae et al., NeurIPS 2025)."""

from .config import ConfigError, ModelConfig, preset, PRESETS
from .model import MoRForCausalLM, MoROutput

__version__ = "0.1.0"
__all__ = ["ModelConfig", "ConfigError", "preset", "PRESETS", "MoRForCausalLM", "MoROutput"]
