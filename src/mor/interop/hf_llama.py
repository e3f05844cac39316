"""Read a Hugging Face transformers Llama directory (Llama, SmolLM, ...) as a vanilla mor model.

A vanilla ``MoRForCausalLM`` uses Hugging Face's ``LlamaForCausalLM`` module names, so the
weights load under their own keys; only the configuration is translated. Supported layouts:

* ``model.safetensors``, or shards listed in ``model.safetensors.index.json``;
* ``pytorch_model.bin``, or shards listed in ``pytorch_model.bin.index.json``, read with
  ``torch.load(weights_only=True)`` (a pickle holding anything but plain tensors is refused).

Safetensors wins when a directory holds both. Configuration values that change the
computation and that mor does not implement (rope scaling, biases, another activation,
attention dropout) are refused with the value named, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError
from ..config import ConfigError, ModelConfig

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ACTIVATIONS = ("silu", "swish")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
# keys some older checkpoints carry that are not parameters (mor computes RoPE on the fly)
_IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq",)


class HFFormatError(CheckpointError):
    """A Hugging Face directory is missing, incomplete, unsupported or does not fit its config."""


# ---------------------------------------------------------------------- public API
def read_llama_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Path | None]:
    """Read a transformers Llama directory.

    Returns ``(config, state_dict, tokenizer_json)``: a vanilla ``ModelConfig``; the weights
    under mor's key names (equal to Hugging Face Llama's), in their stored dtype, checked
    against the shapes the config implies; ``lm_head.weight`` is the embedding tensor itself
    when the embeddings are tied, so ``model.load_state_dict(state_dict)`` works strictly;
    and the path of ``tokenizer.json`` (None when the directory has none)."""
    d = _check_dir(path)
    hf = read_json(d / "config.json")
    cfg = llama_config_to_mor(hf, source=d / "config.json")
    state = read_weights(d)
    state = check_state(state, cfg, source=d)
    tok = d / "tokenizer.json"
    return cfg, state, (tok if tok.is_file() else None)


def read_hf_dir(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Path | None]:
    """Like :func:`read_llama_dir`, also accepting a directory written by ``mor export``
    (``model_type="mor"``: a recursive or MoR model, e.g. downloaded from the Hub)."""
    d = _check_dir(path)
    hf = read_json(d / "config.json")
    if hf.get("model_type") != "mor":
        return read_llama_dir(d)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    try:
        cfg = ModelConfig.from_dict({k: v for k, v in hf.items() if k in names})
    except (ConfigError, TypeError) as e:
        raise HFFormatError(f"{d / 'config.json'}: {e}") from None
    state = check_state(read_weights(d), cfg, source=d)
    tok = d / "tokenizer.json"
    return cfg, state, (tok if tok.is_file() else None)


def load_llama(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32):
    """A ``MoRForCausalLM`` (eval mode) with the weights of a transformers Llama directory
    (a vanilla model) or of a ``mor export`` directory, and the path of its tokenizer.json (or
    None). ``dtype=None`` keeps the stored dtype; the default is float32 like a freshly built
    mor model."""
    from ..model import MoRForCausalLM

    cfg, state, tok = read_hf_dir(path)
    return model_from_state(MoRForCausalLM, cfg, state, device=device, dtype=dtype), tok


def model_from_state(cls, cfg: ModelConfig, state: dict[str, torch.Tensor], device="cpu", dtype=None):
    """Build ``cls(cfg)`` without random initialisation and assign ``state`` (which must be
    complete and shape-checked); re-ties the LM head to the embedding when the config says so."""
    with torch.device("meta"):
        model = cls(cfg)
    state = {k: v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else v.dtype)
             for k, v in state.items()}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:  # every tensor must have come from the state dict
        raise HFFormatError(f"weights missing for {left[:5]}")
    return model.eval()


# ---------------------------------------------------------------------- config
def read_json(f: Path) -> dict[str, Any]:
    if not f.is_file():
        raise HFFormatError(f"{f.parent} has no {f.name}; expected a Hugging Face model directory "
                            f"(config.json + {' or '.join(WEIGHT_FILES)})")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{f} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise HFFormatError(f"{f} must hold a JSON object")
    return d


def rope_theta_of(hf: dict[str, Any], source: Path | str = "config.json") -> float:
    """The RoPE base of a Llama config, refusing any rope scaling (transformers 4.x writes
    ``rope_theta`` + ``rope_scaling``, 5.x writes ``rope_parameters``)."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    for name, p in (("rope_parameters", params), ("rope_scaling", scaling)):
        if p is None:
            continue
        if not isinstance(p, dict):
            raise HFFormatError(f"{source}: {name}={p!r} is not supported; mor implements only default RoPE")
        kind = p.get("rope_type", p.get("type", "default"))
        if kind != "default":
            raise HFFormatError(f"{source}: {name}.rope_type={kind!r} is not supported; mor implements only "
                                "rope_type='default' (plain RoPE with rope_theta)")
        extra = sorted(set(p) - {"rope_type", "type", "rope_theta"})
        if extra:
            raise HFFormatError(f"{source}: {name} has {extra}, which mor does not implement "
                                "(only rope_type='default' with rope_theta)")
        if "rope_theta" in p:
            theta = p["rope_theta"]
    return float(10000.0 if theta is None else theta)


def llama_config_to_mor(hf: dict[str, Any], source: Path | str = "config.json") -> ModelConfig:
    """Translate a transformers ``LlamaConfig`` dict into a vanilla ``ModelConfig``."""
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise HFFormatError(f"{source}: model_type={mt!r} is not supported; mor reads "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints")
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if bad:
        raise HFFormatError(f"{source}: architectures={archs} is not supported; choose a directory saved "
                            f"from {', '.join(SUPPORTED_ARCHITECTURES)}")
    act = hf.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise HFFormatError(f"{source}: hidden_act={act!r} is not supported; mor's MLP is SwiGLU "
                            f"(hidden_act one of: {', '.join(SUPPORTED_ACTIVATIONS)})")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag, False):
            raise HFFormatError(f"{source}: {flag}={hf[flag]!r} is not supported; mor's linear layers have no bias")
    if float(hf.get("attention_dropout", 0.0) or 0.0) != 0.0:
        raise HFFormatError(f"{source}: attention_dropout={hf['attention_dropout']!r} is not supported; "
                            "mor has no dropout (use 0.0)")
    theta = rope_theta_of(hf, source)
    heads = hf.get("num_attention_heads")
    try:
        return ModelConfig(
            architecture="vanilla", num_recursions=1,
            vocab_size=hf.get("vocab_size"), hidden_size=hf.get("hidden_size"),
            intermediate_size=hf.get("intermediate_size"), num_hidden_layers=hf.get("num_hidden_layers"),
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim"), max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=theta, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
        )
    except (ConfigError, TypeError) as e:
        raise HFFormatError(f"{source}: {e}") from None


# ---------------------------------------------------------------------- weights
def _check_dir(path: str | Path) -> Path:
    d = Path(path)
    if not d.exists():
        raise HFFormatError(f"Hugging Face model directory not found: {d}")
    if not d.is_dir():
        raise HFFormatError(f"{d} is not a directory; expected a Hugging Face model directory "
                            f"(config.json + {' or '.join(WEIGHT_FILES)})")
    return d


def read_weights(d: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory's weight files (safetensors preferred over .bin)."""
    d = Path(d)
    if (d / "model.safetensors").is_file():
        return _read_safetensors(d / "model.safetensors")
    if (d / "model.safetensors.index.json").is_file():
        return _read_sharded(d / "model.safetensors.index.json", _read_safetensors)
    if (d / "pytorch_model.bin").is_file():
        return _read_bin(d / "pytorch_model.bin")
    if (d / "pytorch_model.bin.index.json").is_file():
        return _read_sharded(d / "pytorch_model.bin.index.json", _read_bin)
    raise HFFormatError(f"{d} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def _read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise HFFormatError(f"cannot read {f} (truncated or corrupted?): {e}") from None


def _read_bin(f: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HFFormatError(f"refusing {f}: it is not a plain tensor state dict (weights_only=True "
                            f"rejected it: {first})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise HFFormatError(f"cannot read {f} (truncated or corrupted?): {e}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise HFFormatError(f"{f} does not hold a state dict (a dict of name -> tensor)")
    return obj


def _read_sharded(index: Path, reader) -> dict[str, torch.Tensor]:
    idx = read_json(index)
    wmap = idx.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise HFFormatError(f"{index} has no weight_map")
    shards = sorted(set(wmap.values()))
    for s in shards:
        if not isinstance(s, str) or Path(s).name != s:
            raise HFFormatError(f"{index}: shard name {s!r} is not a file name in the directory")
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise HFFormatError(f"{index} lists shard(s) missing from {index.parent}: {missing}")
    state: dict[str, torch.Tensor] = {}
    for s in shards:
        part = reader(index.parent / s)
        dup = sorted(set(part) & set(state))
        if dup:
            raise HFFormatError(f"{index.parent / s} repeats tensor(s) found in another shard: {dup[:5]}")
        state.update(part)
    absent = sorted(k for k in wmap if k not in state)
    if absent:
        raise HFFormatError(f"{index} lists tensor(s) its shards do not hold: {absent[:5]}")
    return state


def expected_shapes(cfg: ModelConfig, cls=None) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of ``cls(cfg)`` (default ``MoRForCausalLM``), built on the
    meta device (no memory, no initialisation)."""
    if cls is None:
        from ..model import MoRForCausalLM as cls
    with torch.device("meta"):
        m = cls(cfg)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def check_state(state: dict[str, torch.Tensor], cfg: ModelConfig, source: Path | str) -> dict[str, torch.Tensor]:
    """Check ``state`` holds exactly the tensors ``MoRForCausalLM(cfg)`` has, with the same
    shapes (a tied LM head may be absent or present; it becomes the embedding)."""
    state = {k: v for k, v in state.items() if not k.endswith(_IGNORED_KEY_SUFFIXES)}
    shapes = expected_shapes(cfg)
    tied = cfg.tie_word_embeddings
    if tied:
        state.pop("lm_head.weight", None)
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(set(shapes) - set(state) - optional)
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise HFFormatError(f"{source}: weights do not fit config.json: missing {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                            f"{' ...' if len(unexpected) > 5 else ''}")
    for k, v in state.items():
        if tuple(v.shape) != shapes[k]:
            raise HFFormatError(f"{source}: tensor {k} has shape {tuple(v.shape)}, config.json implies {shapes[k]}")
        if not v.is_floating_point():
            raise HFFormatError(f"{source}: tensor {k} has dtype {v.dtype}; expected floating-point weights")
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state

