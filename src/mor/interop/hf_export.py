"""Export a mor model as a Hugging Face transformers directory (``mor export CKPT OUT``).

* a vanilla model becomes a plain ``LlamaForCausalLM`` directory (no remote code);
* a recursive or MoR model becomes a ``model_type="mor"`` directory that carries its own
  code: ``configuration_mor.py`` / ``modeling_mor.py`` (:mod:`mor.interop.hf_remote`) and the
  library modules they import (:mod:`mor.interop.bundle`), with ``auto_map`` in config.json, so
  ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` loads it where mor is
  not installed.

Both hold ``model.safetensors`` (each shared tensor once: shared layers are one module, a
tied LM head is re-tied on load), ``generation_config.json`` and, when the checkpoint has
one, the tokenizer (``tokenizer.json`` + ``tokenizer_config.json``). The directory is
written next to OUT and renamed into place: a failed export leaves OUT untouched.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


from ..runlock import output_lock
from ..runtime import atomic_directory
from ..checkpoint import CheckpointError, load_model, load_tokenizer, resolve_checkpoint, unique_state_dict
from ..config import ModelConfig

FORMATS = ("hf", "mor")
REMOTE_ROOTS = {"mor.interop.hf_remote.modeling_mor": "modeling_mor",
                "mor.interop.hf_remote.configuration_mor": "configuration_mor"}
AUTO_MAP = {"AutoConfig": "configuration_mor.MoRConfig",
            "AutoModelForCausalLM": "modeling_mor.MoRForCausalLM"}


class ExportError(CheckpointError):
    """An export cannot be written (bad source, OUT in the way, unsupported model)."""


# ---------------------------------------------------------------------- public API
def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, *, routing: str = "topk",
              overwrite: bool = False) -> Path:
    """Export the mor checkpoint (or run directory) ``checkpoint`` to ``out`` (module doc)."""
    ckpt = resolve_checkpoint(checkpoint)
    model = load_model(ckpt)
    tok = ckpt / "tokenizer.json"
    load_tokenizer(ckpt, vocab_size=model.config.vocab_size)  # validates it when present
    return export_model(model, out, tokenizer=tok if tok.is_file() else None, routing=routing, overwrite=overwrite)


def export_model(model, out: str | os.PathLike, *, tokenizer: str | os.PathLike | Any = None,
                 routing: str = "topk", overwrite: bool = False) -> Path:
    """Export an in-memory ``MoRForCausalLM`` to ``out``. ``tokenizer``: a ``tokenizers.Tokenizer``
    or a tokenizer.json path (optional). ``routing``: the expert-choice rule the exported
    model's ``forward`` uses by default (generation always uses the causal rule)."""
    if routing not in ("topk", "threshold"):
        raise ExportError(f"routing={routing!r} is not valid; choose one of: topk, threshold")
    out = Path(out)
    with output_lock(out, "mor export"):  # one writer per output directory
        return _export_model(model, out, tokenizer, routing, overwrite)


def _export_model(model, out: Path, tokenizer, routing: str, overwrite: bool) -> Path:
    _check_out(out, overwrite)
    cfg: ModelConfig = model.config
    tok = _as_tokenizer(tokenizer)
    eos = _eos(tok)

    def write(tmp: Path) -> None:
        state = unique_state_dict(model)
        state = {k: v.to("cpu") for k, v in state.items()}
        dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
        common = {"bos_token_id": None, "eos_token_id": eos[0] if eos else None, "pad_token_id": None,
                  "dtype": dtype}
        if cfg.architecture == "vanilla":
            hf_cfg = {**llama_config(cfg), **common}
            gen_cache = True
        else:
            hf_cfg = {**mor_hf_config(cfg, routing), **common}
            gen_cache = False
            write_remote_code(tmp)
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        from safetensors.torch import save_file

        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        gen = {"eos_token_id": eos[0] if eos else None, "use_cache": gen_cache, "do_sample": False}
        if eos:
            gen["pad_token_id"] = eos[0]
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tok is not None:
            tok.save(str(tmp / "tokenizer.json"))
            tc = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_position_embeddings,
                  "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
            if eos:
                tc.update(eos_token=eos[1], pad_token=eos[1])
            (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2) + "\n")
        from .. import __version__

        (tmp / "mor_export.json").write_text(json.dumps(
            {"mor_version": __version__, "exported_at": time.time(), "architecture": cfg.architecture,
             "format": "llama" if cfg.architecture == "vanilla" else "mor-remote-code"}, indent=2) + "\n")

    _check_out(out, overwrite)
    with atomic_directory(out) as tmp:
        write(tmp)
    return out


def import_hf(src: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Convert a transformers Llama directory into a mor checkpoint directory at ``out``."""
    from ..checkpoint import save_checkpoint
    from .hf_llama import load_llama

    out = Path(out)
    with output_lock(out, "mor export"):  # one writer per output directory
        _check_out(out, overwrite)
        model, tok = load_llama(src, dtype=None)
        if tok is not None:
            _as_tokenizer(tok)  # a readable tokenizer.json, or a clear error before anything is written
        return save_checkpoint(out, model, tokenizer=tok, meta={"imported_from": str(Path(src).resolve())})


# ---------------------------------------------------------------------- configs
def llama_config(cfg: ModelConfig) -> dict[str, Any]:
    """transformers ``LlamaConfig`` values of a vanilla model (both the 4.x ``rope_theta`` and
    the 5.x ``rope_parameters`` spellings)."""
    if cfg.architecture != "vanilla":
        raise ExportError(f"architecture={cfg.architecture!r} has no Llama equivalent; only vanilla models "
                          "export as LlamaForCausalLM")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings, "initializer_range": cfg.initializer_range,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "pretraining_tp": 1, "use_cache": True,
    }


def mor_hf_config(cfg: ModelConfig, routing: str = "topk") -> dict[str, Any]:
    """config.json of a remote-code MoR export: the ``ModelConfig`` fields, ``routing``,
    ``architectures`` and ``auto_map``."""
    return {"architectures": ["MoRForCausalLM"], "auto_map": dict(AUTO_MAP), **cfg.to_dict(),
            "model_type": "mor", "routing": routing, "use_cache": False}


def write_remote_code(d: Path) -> list[str]:
    """Write the generated modeling/configuration files and the bundled library modules."""
    from .bundle import bundle

    files, block = bundle(REMOTE_ROOTS)
    files["modeling_mor.py"] += block
    for name, src in files.items():
        (d / name).write_text(src)
    return sorted(files)


# ---------------------------------------------------------------------- helpers
def _as_tokenizer(tokenizer):
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(tokenizer))
        except Exception as e:  # tokenizers raises a plain Exception
            raise ExportError(f"cannot read tokenizer {tokenizer}: {e}") from None
    return tokenizer


def _eos(tok) -> tuple[int, str] | None:
    """(id, text) of the tokenizer's end-of-text token, or None (no tokenizer, or none found)."""
    from ..runtime import find_eos

    return None if tok is None else find_eos(tok)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"output directory {out} is not empty; choose a new directory or pass --force")
