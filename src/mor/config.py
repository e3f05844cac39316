"""Model configuration: Hugging Face Llama field names plus the Mixture-of-Recursions fields.

One dataclass describes all three model kinds (SPEC.md sections 1-5):

* ``vanilla``   - a plain Llama decoder, every layer unique;
* ``recursive`` - L unrolled layers built from fewer unique layers (parameter sharing),
  every token runs every recursion;
* ``mor``       - a recursive model whose router gives each token its own depth
  (expert-choice or token-choice).

Invalid combinations fail at construction with a message naming the field, the value
and the valid choices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any

ARCHITECTURES = ("vanilla", "recursive", "mor")
SHARING = ("cycle", "sequence", "middle_cycle", "middle_sequence")
ROUTER_TYPES = ("expert", "token")
ROUTER_ARCHS = ("linear", "mlp", "wide_mlp")
ROUTER_FUNCS = ("sigmoid", "tanh", "softmax")
KV_MODES = ("recursion_wise", "shared")
GATE_COMBINES = ("add", "pass_through")
BALANCING = ("loss", "loss_free", "none")
EXPERT_INFERENCE = ("threshold", "topk")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the valid values."""


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


@dataclass
class ModelConfig:
    # --- Llama backbone (Hugging Face field names) ---
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    # --- recursion and sharing ---
    architecture: str = "mor"
    num_recursions: int | None = None  # default: 1 for vanilla, 3 otherwise
    sharing: str = "middle_cycle"
    kv_mode: str = "recursion_wise"
    # --- router ---
    router_type: str = "expert"
    router_arch: str = "linear"
    # default: "sigmoid" for expert-choice, "softmax" for token-choice (the paper's final design)
    router_func: str | None = None
    router_alpha: float | None = None  # default: 1.0 for softmax, 0.1 for sigmoid/tanh (SPEC)
    # How a selected token's hidden state is updated. "add": H + g * block(H) where block(H)
    # includes the block's own residual stream (released code). "pass_through": block(H),
    # the router weight is not applied (ablation; equals the recursive model at capacity 1).
    gate_combine: str = "add"
    # --- expert-choice ---
    capacities: list[float] | None = None  # default (N_r - r + 1) / N_r
    aux_loss_coeff: float = 0.001  # BCE on raw router logits, summed over recursions
    use_aux_router: bool = False  # separate detached router trained by the BCE, used at inference
    capacity_warmup_steps: int = 0  # cosine warm-up of capacities from 1 to c_r (paper: hurts)
    expert_inference: str = "threshold"  # routing rule when labels are absent and not training
    # --- token-choice ---
    balancing: str = "loss"  # "loss": sum_i f_i P_i; "loss_free": bias updated after each step
    balance_coeff: float = 0.1
    balance_bias_rate: float = 0.001
    # False (released code): recursions before the token's last continue with block(H);
    # True (the paper's equation 2.2): they continue with g * block(H)
    gate_every_recursion: bool = False
    # --- both ---
    z_loss_coeff: float = 0.0

    def __post_init__(self) -> None:
        coerce_numbers(self)
        if self.head_dim is None:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads != 0:
                raise ConfigError(
                    f"num_attention_heads={self.num_attention_heads} does not divide hidden_size="
                    f"{self.hidden_size}; choose a divisor of hidden_size or set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.capacities is not None:
            self.capacities = [float(cap) for cap in self.capacities]
        if self.num_recursions is None:
            self.num_recursions = 1 if self.architecture == "vanilla" else 3
        if self.router_func is None:
            self.router_func = "softmax" if self.router_type == "token" else "sigmoid"
        if self.router_alpha is None:
            self.router_alpha = 1.0 if self.router_func == "softmax" else 0.1
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings", "num_recursions"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name}={v!r} must be a positive integer")
        _choice("architecture", self.architecture, ARCHITECTURES)
        _choice("sharing", self.sharing, SHARING)
        _choice("kv_mode", self.kv_mode, KV_MODES)
        _choice("router_type", self.router_type, ROUTER_TYPES)
        _choice("router_arch", self.router_arch, ROUTER_ARCHS)
        _choice("router_func", self.router_func, ROUTER_FUNCS)
        _choice("gate_combine", self.gate_combine, GATE_COMBINES)
        _choice("balancing", self.balancing, BALANCING)
        _choice("expert_inference", self.expert_inference, EXPERT_INFERENCE)
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ConfigError(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads="
                f"{self.num_attention_heads}; valid values: "
                f"{[k for k in range(1, self.num_attention_heads + 1) if self.num_attention_heads % k == 0]}"
            )
        if self.head_dim % 2 != 0:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.architecture == "vanilla":
            if self.num_recursions != 1:
                raise ConfigError(
                    f"num_recursions={self.num_recursions} is not valid for architecture='vanilla'; "
                    "a vanilla model has num_recursions=1 (use architecture='recursive' or 'mor')"
                )
            if self.kv_mode != "recursion_wise":
                raise ConfigError(f"kv_mode={self.kv_mode!r} needs recursions; vanilla uses 'recursion_wise'")
            return
        L, nr = self.num_hidden_layers, self.num_recursions
        body = L - 2 if self.sharing.startswith("middle") else L
        if body <= 0 or body % nr != 0:
            raise ConfigError(
                f"num_hidden_layers={L} does not fit sharing={self.sharing!r} with num_recursions={nr}: "
                f"{'(L-2)' if self.sharing.startswith('middle') else 'L'} must be a positive multiple of "
                f"num_recursions; the nearest valid value is num_hidden_layers="
                f"{valid_num_layers(L, nr, self.sharing)}"
            )
        if self.kv_mode == "shared" and nr < 2:
            raise ConfigError("kv_mode='shared' needs num_recursions >= 2")
        if self.architecture != "mor":
            return
        if self.router_type == "expert":
            if self.router_func == "softmax":
                raise ConfigError(
                    "router_func='softmax' is not valid for router_type='expert' (one score per token); "
                    "choose one of: sigmoid, tanh"
                )
            caps = self.resolved_capacities()
            if len(caps) != nr:
                raise ConfigError(f"capacities={self.capacities} must have num_recursions={nr} entries")
            for cap in caps:
                if not (0.0 < cap <= 1.0):
                    raise ConfigError(f"capacities={caps}: every capacity must be in (0, 1]")
            for a, b in zip(caps, caps[1:]):
                if b > a:
                    raise ConfigError(
                        f"capacities={caps} must be non-increasing (hierarchical filtering keeps a subset "
                        "of the previous recursion's tokens)"
                    )
            if self.kv_mode == "shared" and caps[0] != 1.0:
                raise ConfigError(
                    f"kv_mode='shared' needs capacities[0]=1.0 (every token passes recursion 1 and "
                    f"caches its K/V), got {caps[0]}"
                )
        else:
            if self.router_func == "tanh":
                raise ConfigError("router_func='tanh' is not valid for router_type='token'; choose one of: softmax, sigmoid")
            if self.capacities is not None:
                raise ConfigError("capacities applies to router_type='expert' only; token-choice sets depth per token")
            if self.use_aux_router:
                raise ConfigError("use_aux_router applies to router_type='expert' only (token-choice is causal)")
        if self.capacity_warmup_steps < 0:
            raise ConfigError(f"capacity_warmup_steps={self.capacity_warmup_steps} must be >= 0")

    # ------------------------------------------------------------------ derived structure
    def resolved_capacities(self) -> list[float]:
        nr = self.num_recursions
        if self.capacities is not None:
            return list(self.capacities)
        return [(nr - r + 1) / nr for r in range(1, nr + 1)]

    def enter_fractions(self) -> list[float]:
        """Expected share of tokens entering each recursion (one entry per recursion; empty
        for vanilla): the capacities c_r for expert-choice, a balanced depth assignment
        ((N_r - r + 1) / N_r, depth uniform on 1..N_r) for token-choice, 1 for recursive.
        FLOPs (``mor.flops``) and the KV memory estimate (``mor.cache``) both use it."""
        nr = self.num_recursions
        if self.architecture == "vanilla":
            return []
        if self.architecture == "recursive":
            return [1.0] * nr
        if self.router_type == "expert":
            return self.resolved_capacities()
        return [(nr - r + 1) / nr for r in range(1, nr + 1)]

    @property
    def is_middle(self) -> bool:
        return self.architecture != "vanilla" and self.sharing.startswith("middle")

    @property
    def layers_per_recursion(self) -> int:
        if self.architecture == "vanilla":
            return 0
        body = self.num_hidden_layers - 2 if self.is_middle else self.num_hidden_layers
        return body // self.num_recursions

    def layer_map(self) -> list[int]:
        """Unique layer index used by every unrolled layer (SPEC.md section 2)."""
        L, nr = self.num_hidden_layers, self.num_recursions
        if self.architecture == "vanilla":
            return list(range(L))
        B = self.layers_per_recursion
        if self.sharing == "cycle":
            return [l % B for l in range(L)]
        if self.sharing == "sequence":
            return [l // nr for l in range(L)]
        middle = range(1, L - 1)
        if self.sharing == "middle_cycle":
            mid = [1 + ((l - 1) % B) for l in middle]
        else:
            mid = [1 + ((l - 1) // nr) for l in middle]
        return [0] + mid + [max(mid) + 1]

    @property
    def num_unique_layers(self) -> int:
        return max(self.layer_map()) + 1

    def structure(self) -> tuple[list[int], list[list[int]], list[int]]:
        """(prefix, recursion chunks, suffix) as lists of unique layer indices.

        A recursion is one pass over a chunk of ``layers_per_recursion`` consecutive unrolled
        layers; vanilla has no chunks (every layer is in the prefix)."""
        m = self.layer_map()
        if self.architecture == "vanilla":
            return m, [], []
        B = self.layers_per_recursion
        if self.is_middle:
            prefix, body, suffix = m[:1], m[1:-1], m[-1:]
        else:
            prefix, body, suffix = [], m, []
        chunks = [body[i * B:(i + 1) * B] for i in range(self.num_recursions)]
        return prefix, chunks, suffix

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = "mor"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d.pop("model_type", None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def save(self, path: str | os.PathLike) -> None:
        """Write config.json atomically."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        from .runtime import write_atomic

        write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"config file {path} must hold a JSON object")
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def coerce_numbers(obj: Any) -> None:
    """Turn numeric strings into numbers for numeric dataclass fields (YAML reads ``1e-3`` as
    a string), and reject values of the wrong type with a message naming the field."""
    for f in dataclasses.fields(obj):
        v, t = getattr(obj, f.name), str(f.type)
        numeric = ("float" in t or "int" in t) and "str" not in t and "list" not in t and "tuple" not in t
        if not numeric or v is None or isinstance(v, bool):
            continue
        if isinstance(v, str):
            try:
                v = float(v) if "float" in t else int(v)
            except ValueError:
                raise ConfigError(f"{f.name}={v!r} must be a number") from None
        if "float" in t and isinstance(v, int):
            v = float(v)
        if "int" in t and "float" not in t and isinstance(v, float) and v.is_integer():
            v = int(v)
        setattr(obj, f.name, v)


def valid_num_layers(num_layers: int, num_recursions: int, sharing: str) -> int:
    """Smallest layer count >= num_layers that fits the sharing scheme (SPEC: layers are added)."""
    if sharing.startswith("middle"):
        return 2 + math.ceil(max(num_layers - 2, 1) / num_recursions) * num_recursions
    return math.ceil(num_layers / num_recursions) * num_recursions


# ---------------------------------------------------------------------- presets
_SHAPES: dict[str, dict[str, Any]] = {
    # SmolLM shapes of the paper (SPEC.md section 1)
    "smollm-135m": dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                        head_dim=64, intermediate_size=1536),
    "smollm-360m": dict(num_hidden_layers=32, hidden_size=960, num_attention_heads=15, num_key_value_heads=5,
                        head_dim=64, intermediate_size=2560),
    "smollm-730m": dict(num_hidden_layers=26, hidden_size=1536, num_attention_heads=24, num_key_value_heads=8,
                        head_dim=64, intermediate_size=4096),
    "smollm-1.7b": dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=32, num_key_value_heads=32,
                        head_dim=64, intermediate_size=8192),
    # small CPU shapes
    "tiny": dict(num_hidden_layers=8, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=192, vocab_size=512, max_position_embeddings=256),
    "small": dict(num_hidden_layers=8, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=768, vocab_size=8192, max_position_embeddings=1024),
}
_PAPER_COMMON = dict(vocab_size=49152, max_position_embeddings=2048, rope_theta=10000.0)
PRESETS = tuple(_SHAPES)


def preset(name: str, architecture: str = "mor", num_recursions: int | None = None, **overrides: Any) -> ModelConfig:
    """A preset shape as a given architecture.

    ``preset("smollm-360m", "mor", 4)`` gives the paper's 34-layer MoR-4: when the preset's
    layer count does not fit the sharing scheme, layers are added (SPEC.md section 1)."""
    _choice("preset", name, PRESETS)
    shape = dict(_SHAPES[name])
    if name.startswith("smollm"):
        shape = {**_PAPER_COMMON, **shape}
    if num_recursions is None:
        num_recursions = 1 if architecture == "vanilla" else 3
    kw = {**shape, "architecture": architecture, "num_recursions": num_recursions, **overrides}
    if architecture != "vanilla" and "num_hidden_layers" not in overrides:
        kw["num_hidden_layers"] = valid_num_layers(kw["num_hidden_layers"], num_recursions,
                                                   kw.get("sharing", "middle_cycle"))
    return ModelConfig(**kw)
