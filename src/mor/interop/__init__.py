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

__all__ = ["HFFormatError", "read_llama_dir"]
