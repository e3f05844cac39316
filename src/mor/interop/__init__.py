"""Hugging Face interoperability: read transformers Llama directories, export MoR models as
transformers directories (``mor export``).

* :func:`mor.interop.hf_llama.read_llama_dir` - a Llama directory -> (``ModelConfig``,
  state dict in mor key names, tokenizer.json path);
* :func:`mor.interop.hf_export.export_hf` - a mor model/checkpoint -> a directory that
  ``transformers.AutoModelForCausalLM`` loads without ``mor`` installed.

Only the export needs ``transformers`` at load time (the ``[hf]`` extra); reading a Llama
directory needs only safetensors/torch.
"""

from .hf_llama import HFFormatError, read_llama_dir

__all__ = ["HFFormatError", "read_llama_dir", "register_hf"]


def register_hf() -> None:
    """Make transformers' ``AutoConfig`` / ``AutoModelForCausalLM`` load ``model_type="mor"``
    directories with this library's classes, without ``trust_remote_code`` (needs transformers)."""
    from . import hf_auto

    hf_auto.register()
