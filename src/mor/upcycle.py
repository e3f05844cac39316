"""Up-training: initialise a recursive or MoR model from a pretrained vanilla Llama.

``mor train --init-from-hf DIR model.architecture=recursive|mor model.num_recursions=N
init_strategy=stepwise|average|lower|upper|random`` (paper Table 12; Relaxed Recursive
Transformers, Bae et al. 2024). ``DIR`` is a Hugging Face Llama directory (read by
:func:`mor.interop.hf_llama.read_llama_dir`) or a mor checkpoint / run directory of a
vanilla model.

The target keeps the source's shape (width, heads, vocabulary, RoPE); the recipe's
``model`` section chooses the recursion (architecture, sharing, N_r, router, KV mode).
Unless the recipe sets ``num_hidden_layers``, the target has the source's depth L when it
fits the sharing scheme, else the largest depth below it that fits (as the official code
does). A target shallower than the source first picks its L unrolled layers from the
source's evenly, ``round(linspace)`` over the middle layers (Middle-*: the first and last
layer are always kept), and the strategies below number those picked layers 0..L-1.

With B shared layers per recursion, N_r recursions, Middle-* sharing (first and last
layer unique, copied from source layers 0 and L-1), the shared layer j = 0..B-1 is:

* ``stepwise``: source layer ``round(linspace(1, L-2, B))[j]`` (Cycle / Sequence:
  ``linspace(0, L-1, B)``) - evenly spaced layers, first and last of the range included;
* ``lower``: source layer ``1 + j`` (Cycle / Sequence: ``j``) - the B lowest;
* ``upper``: source layer ``L-1-B + j`` (Cycle / Sequence: ``L-B + j``) - the B highest;
* ``random``: B distinct layers drawn from the middle range (Cycle / Sequence: all
  layers) with the run's seed, in ascending order;
* ``average``: the element-wise mean of the source layers that the unrolled positions
  using shared layer j had in the source (Middle-Cycle: layers ``1 + j + r*B`` for
  r = 0..N_r-1; Middle-Sequence: ``1 + j*N_r .. (j+1)*N_r``; Cycle / Sequence the same
  without the offset), norms included.

Every tensor of a layer (attention, MLP, both RMSNorms) comes from the same source
layer(s); the embedding, final norm and an untied LM head are copied; routers are fresh
(the model's own initialisation, seeded). ``round`` is Python's (half to even), as in the
official code.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, ModelConfig, valid_num_layers
from .model import MoRForCausalLM

INIT_STRATEGIES = ("stepwise", "average", "lower", "upper", "random")
# fields that must be the source's (the weights have these shapes / meanings)
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings")


class UpcycleError(ConfigError):
    """The pretrained model and the requested recursive / MoR target do not fit."""


@dataclass
class Source:
    config: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer: Path | None
    path: Path

    def build(self, target: ModelConfig, strategy: str | None, seed: int, device="cpu",
              verbose: bool = False) -> MoRForCausalLM:
        """The up-training start: ``target`` initialised from this model (``upcycle``)."""
        strategy = strategy or "stepwise"
        model, plan = upcycle(self.config, self.state, target, strategy, seed=seed)
        if verbose:
            print(f"[mor train] up-training from {self.path} ({strategy}): unique layer <- source layers {plan}",
                  file=sys.stderr)
        return model.to(device)


def prepare_upcycle(path: str | Path, train_cfg, data_vocab: int, init_from: str | None = None
                    ) -> tuple[ModelConfig, Source]:
    """What ``mor train --init-from-hf`` needs before building the model: the pretrained
    source and the target config (checked against the recipe, the data's tokenizer and the
    ``init_strategy``)."""
    if init_from:
        raise UpcycleError("give one of --init-from and --init-from-hf")
    strategy = train_cfg.init_strategy or "stepwise"
    if strategy not in INIT_STRATEGIES:
        raise ConfigError(f"init_strategy={strategy!r} is not valid; choose one of: {', '.join(INIT_STRATEGIES)}")
    source = load_source(path)
    target = target_config(source.config, train_cfg.model, vocab_size=data_vocab)
    check_tokenizers(source.tokenizer, Path(train_cfg.data) / "tokenizer.json")
    return target, source


def load_source(path: str | Path) -> Source:
    """A pretrained vanilla model: a mor checkpoint (or run) directory, or a Hugging Face
    Llama directory."""
    from . import checkpoint as ckpt

    p = Path(path)
    if not p.exists():
        raise UpcycleError(f"--init-from-hf: {p} does not exist")
    is_mor = (p / "checkpoints").is_dir() and not (p / "config.json").exists()
    if (p / "config.json").is_file():
        try:
            is_mor = json.loads((p / "config.json").read_text()).get("model_type") == "mor"
        except (json.JSONDecodeError, AttributeError):
            is_mor = False
    if is_mor:
        d = ckpt.resolve_checkpoint(p)
        model = ckpt.load_model(d)
        tok = d / "tokenizer.json"
        cfg, state = model.config, model.state_dict()
        tok = tok if tok.is_file() else None
    else:
        from .interop.hf_llama import read_llama_dir

        cfg, state, tok = read_llama_dir(p)
    if cfg.architecture != "vanilla":
        raise UpcycleError(f"--init-from-hf: {p} holds a {cfg.architecture} model; up-training starts from a "
                           "vanilla (every layer unique) model")
    return Source(cfg, state, tok, p)


def target_config(source: ModelConfig, model: dict, vocab_size: int | None = None) -> ModelConfig:
    """The recursive / MoR config to up-train: the source's shape with the recipe's
    recursion and routing fields. A recipe value that contradicts the source's shape is an
    error; ``vocab_size`` (the data's) must not exceed the source's."""
    m = dict(model)
    if "preset" in m:
        raise UpcycleError("model.preset cannot be combined with --init-from-hf: the shape comes from the "
                           "pretrained model")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(m) - names)
    if unknown:
        raise ConfigError(f"model: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    for k in SHAPE_FIELDS:
        if k in m and m[k] != getattr(source, k):
            raise UpcycleError(f"model.{k}={m[k]!r} differs from the pretrained model's {getattr(source, k)!r}; "
                               "with --init-from-hf the shape comes from the pretrained model (drop the key)")
    if vocab_size is not None and vocab_size > source.vocab_size:
        raise UpcycleError(f"the data's tokenizer has {vocab_size} tokens but the pretrained model's vocab_size is "
                           f"{source.vocab_size}; prepare the data with the model's tokenizer "
                           "(`mor prepare --tokenizer DIR`)")
    arch = m.get("architecture", "mor")
    if arch == "vanilla":
        raise UpcycleError("model.architecture='vanilla': up-training builds a recursive or MoR model; "
                           "to continue training a vanilla checkpoint use --init-from")
    base = {f.name: getattr(source, f.name) for f in dataclasses.fields(ModelConfig)
            if f.name in SHAPE_FIELDS or f.name in ("max_position_embeddings", "initializer_range")}
    kw = {**base, "architecture": arch, **m}
    L_src = source.num_hidden_layers
    if "num_hidden_layers" not in m:
        nr, sharing = kw.get("num_recursions", 3), kw.get("sharing", "middle_cycle")
        fit = valid_num_layers(L_src, nr, sharing)
        step = nr
        kw["num_hidden_layers"] = fit if fit == L_src else fit - step  # the largest depth <= L that fits
    cfg = ModelConfig(**kw)
    if cfg.num_hidden_layers > L_src:
        raise UpcycleError(f"num_hidden_layers={cfg.num_hidden_layers} exceeds the pretrained model's {L_src} "
                           "layers; up-training can keep or drop layers, not add them")
    if cfg.num_hidden_layers < (3 if cfg.is_middle else 1):
        raise UpcycleError(f"the pretrained model's {L_src} layers are too few for sharing={cfg.sharing!r} with "
                           f"num_recursions={cfg.num_recursions}")
    return cfg


def picked_layers(L_src: int, target: ModelConfig) -> list[int]:
    """The source layers that stand for the target's L unrolled layers (all of them when the
    depths are equal; else evenly spaced, first and last kept for Middle-* sharing)."""
    L = target.num_hidden_layers
    if L == L_src:
        return list(range(L_src))
    if target.is_middle:
        mid = [round(float(v)) for v in np.linspace(1, L_src - 2, L - 2)]
        return [0] + mid + [L_src - 1]
    return [round(float(v)) for v in np.linspace(0, L_src - 1, L)]


def layer_plan(L_src: int, target: ModelConfig, strategy: str, seed: int = 0) -> dict[int, list[int]]:
    """For every unique layer of ``target``: the source layers it is initialised from (their
    mean when more than one). The rules are the module docstring's."""
    if strategy not in INIT_STRATEGIES:
        raise ConfigError(f"init_strategy={strategy!r} is not valid; choose one of: {', '.join(INIT_STRATEGIES)}")
    if target.architecture == "vanilla":
        raise UpcycleError("the target must be recursive or MoR")
    eff = picked_layers(L_src, target)
    L, B = target.num_hidden_layers, target.layers_per_recursion
    lmap = target.layer_map()
    plan: dict[int, list[int]] = {}
    if target.is_middle:
        plan[lmap[0]] = [eff[0]]
        plan[lmap[-1]] = [eff[-1]]
        lo, hi = 1, L - 2  # the shared range, inclusive
    else:
        lo, hi = 0, L - 1
    body_units = sorted({lmap[l] for l in range(lo, hi + 1)})  # unique index of shared layer j
    assert len(body_units) == B
    if strategy == "average":
        for u in body_units:
            plan[u] = [eff[l] for l in range(lo, hi + 1) if lmap[l] == u]
        return dict(sorted(plan.items()))
    if strategy == "stepwise":
        src = [round(float(v)) for v in np.linspace(lo, hi, B)]
    elif strategy == "lower":
        src = list(range(lo, lo + B))
    elif strategy == "upper":
        src = list(range(hi + 1 - B, hi + 1))
    else:  # random
        src = sorted(random.Random(seed).sample(range(lo, hi + 1), B))
    for j, u in enumerate(body_units):
        plan[u] = [eff[src[j]]]
    return dict(sorted(plan.items()))


_LAYER_KEYS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
               "input_layernorm.weight", "post_attention_layernorm.weight")


def upcycle(source_cfg: ModelConfig, source_state: dict[str, torch.Tensor], target: ModelConfig,
            strategy: str = "stepwise", seed: int = 0) -> tuple[MoRForCausalLM, dict[int, list[int]]]:
    """Build ``target`` (recursive or MoR) initialised from a vanilla model's state dict.

    Returns the model (train mode, fp32) and the plan ``{unique layer: [source layers]}``."""
    for k in SHAPE_FIELDS:
        if getattr(source_cfg, k) != getattr(target, k) and k != "vocab_size":
            raise UpcycleError(f"{k}: the target has {getattr(target, k)!r}, the source {getattr(source_cfg, k)!r}")
    if target.vocab_size != source_cfg.vocab_size:
        raise UpcycleError(f"vocab_size: the target has {target.vocab_size}, the source {source_cfg.vocab_size}")
    plan = layer_plan(source_cfg.num_hidden_layers, target, strategy, seed)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = MoRForCausalLM(target)  # fresh routers (and everything we overwrite below)
    finally:
        torch.random.set_rng_state(gen_state)
    new = model.state_dict()
    with torch.no_grad():
        for k in ("model.embed_tokens.weight", "model.norm.weight"):
            new[k].copy_(source_state[k])
        if not target.tie_word_embeddings:
            new["lm_head.weight"].copy_(source_state["lm_head.weight"])
        for u, srcs in plan.items():
            for key in _LAYER_KEYS:
                ts = [source_state[f"model.layers.{s}.{key}"].float() for s in srcs]
                new[f"model.layers.{u}.{key}"].copy_(torch.stack(ts).mean(0) if len(ts) > 1 else ts[0])
    return model.train(), plan


def check_tokenizers(source_tok: Path | None, data_tok: Path | None) -> None:
    """The data must be tokenized with the pretrained model's tokenizer (same vocabulary)."""
    if source_tok is None or data_tok is None:
        return
    from tokenizers import Tokenizer

    a, b = Tokenizer.from_file(str(source_tok)).get_vocab(), Tokenizer.from_file(str(data_tok)).get_vocab()
    if a != b:
        raise UpcycleError(f"the data's tokenizer ({data_tok}) differs from the pretrained model's ({source_tok}); "
                           "prepare the data with `mor prepare --tokenizer` pointing at the model's tokenizer")
