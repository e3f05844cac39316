"""Import checkpoints written by the authors' MoR training code: ``mor import-official``.

The official code (raymin0223/mixture_of_recursions) saves a run as a Hugging Face Llama
directory: ``config.json`` says ``model_type: llama`` (``architectures:
[MoRLlamaForCausalLM]`` for MoR runs) and holds no MoR field; every MoR setting lives in the
run's Hydra YAML (``recursive.*``, ``mor.*``, ``kv_sharing.*``, ``relaxation.*``); and
``pytorch_model.bin`` stores every tied copy of a shared tensor under each of its names.

This module turns such a directory plus its YAML into a ``mor`` checkpoint:

* the model config: the Llama shape from ``config.json`` (read by
  :func:`mor.interop.hf_llama.llama_config_to_mor`), the recursion / routing fields from the
  YAML (table in docs/model.md, "Coming from the official code");
* the weights: each unique tensor once. Every stored copy of a shared tensor must equal the
  others bit for bit - checkpoints written before the official fix 82c97f29 hold different
  attention tensors under the copies of a shared layer and are refused, naming the tensors;
* ``router_bias`` (token-choice loss-free balancing) becomes ``balance_bias`` divided by the
  router's alpha (the official code adds the bias to alpha * probability, mor to the
  probability), a tied ``lm_head`` is dropped (it is the embedding);
* what mor cannot represent - relaxation (LoRA / prompt) variants, random routers,
  un-weighted gating, untied norms, MLP routers of another width - is refused with a
  message naming the YAML key or the tensor.

Everything is checked before anything is written; the checkpoint is written atomically.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..runlock import output_lock
from ..checkpoint import CheckpointError, save_checkpoint
from ..config import ConfigError, ModelConfig
from ..model import MoRForCausalLM

OFFICIAL_ARCHITECTURES = ("MoRLlamaForCausalLM", "LlamaForCausalLM")
OFFICIAL_SHARING = ("cycle", "sequence", "middle_cycle", "middle_sequence")
MOR_SHARING = ("cycle", "middle_cycle")  # the official MoR wrappers support only these two
# official router_type -> (mor router_arch). The official "wide_mlp" router has the same
# d -> 2d -> out shape as its "mlp" router (the class is a copy), so it maps to mor's "mlp".
ROUTER_ARCH = {"linear": "linear", "mlp": "mlp", "wide_mlp": "mlp"}


class OfficialFormatError(CheckpointError):
    """An official checkpoint or its YAML cannot be imported (the message says why)."""


# ---------------------------------------------------------------------- the YAML recipe
class _Recipe:
    """Dotted, checked access to the run's Hydra YAML: a missing key is an error naming it."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def has(self, key: str) -> bool:
        node: Any = self.d
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def get(self, key: str, default: Any = ...) -> Any:
        node: Any = self.d
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is not ...:
                    return default
                raise OfficialFormatError(f"{self.source}: the run's YAML has no `{key}`; the importer needs it "
                                          "(pass the Hydra config the checkpoint was trained with)")
            node = node[part]
        return node

    def flag(self, key: str, default: Any = ...) -> bool:
        v = self.get(key, default)
        if v is None:
            return False
        if not isinstance(v, bool):
            raise OfficialFormatError(f"{self.source}: `{key}`={v!r} must be true or false")
        return v

    def choice(self, key: str, choices: tuple, default: Any = ...) -> str:
        v = self.get(key, default)
        if v not in choices:
            raise OfficialFormatError(f"{self.source}: `{key}`={v!r} cannot be imported; supported: "
                                      f"{', '.join(map(str, choices))}")
        return v


def read_recipe(path: str | Path) -> _Recipe:
    from ..train import read_recipe_file

    try:
        d = read_recipe_file(path, what="official run YAML")
    except ConfigError as e:
        raise OfficialFormatError(str(e)) from None
    return _Recipe(d, str(path))


# ---------------------------------------------------------------------- config
def official_model_config(hf: dict[str, Any], recipe: _Recipe, source: str = "config.json") -> tuple[ModelConfig, list[str]]:
    """The mor ``ModelConfig`` of an official run, and notes on training-only settings that
    mor does not carry over (they do not change the forward)."""
    from .hf_llama import llama_config_to_mor

    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    bad = [a for a in archs if a not in OFFICIAL_ARCHITECTURES]
    if bad:
        raise OfficialFormatError(f"{source}: architectures={archs}; an official MoR checkpoint has one of "
                                  f"{', '.join(OFFICIAL_ARCHITECTURES)}")
    plain = {k: v for k, v in hf.items() if k != "kv_sharing"}
    plain["architectures"] = ["LlamaForCausalLM"]
    base = llama_config_to_mor(plain, source=source)
    notes: list[str] = []

    if recipe.flag("relaxation.enable"):
        raise OfficialFormatError(
            f"{recipe.source}: relaxation.enable=true (a Relaxed Recursive Transformer with per-recursion "
            "LoRA / prompt / recursion-encoding weights); mor has no relaxation modules and cannot import it")
    if not recipe.flag("recursive.enable"):
        if recipe.flag("mor.enable", False) or recipe.flag("kv_sharing.enable", False):
            raise OfficialFormatError(f"{recipe.source}: mor.enable / kv_sharing.enable need recursive.enable=true")
        return base, notes  # a vanilla run

    nr = recipe.get("recursive.num_recursion")
    if not isinstance(nr, int) or isinstance(nr, bool) or nr < 1:
        raise OfficialFormatError(f"{recipe.source}: recursive.num_recursion={nr!r} must be a positive integer")
    if nr == 1:
        raise OfficialFormatError(f"{recipe.source}: recursive.num_recursion=1 (the base_depth form of the "
                                  "official code) is not supported; give the number of recursions")
    sharing = recipe.choice("recursive.sharing", OFFICIAL_SHARING)
    if not recipe.flag("recursive.ln_share"):
        raise OfficialFormatError(f"{recipe.source}: recursive.ln_share=false (an RMSNorm per recursion); mor "
                                  "shares the norms with their layer and cannot import it")
    kv_share = recipe.flag("kv_sharing.enable")
    if kv_share:
        kv_nr = recipe.get("kv_sharing.num_recursion", None)
        kv_sh = recipe.get("kv_sharing.sharing", None)
        if kv_nr not in (None, nr) or kv_sh not in (None, sharing):
            raise OfficialFormatError(
                f"{recipe.source}: kv_sharing (num_recursion={kv_nr!r}, sharing={kv_sh!r}) differs from "
                f"recursive (num_recursion={nr}, sharing={sharing!r}); mor shares K/V over the parameter-"
                "sharing recursions only")
        if recipe.flag("kv_sharing.update_cache", False):
            raise OfficialFormatError(f"{recipe.source}: kv_sharing.update_cache=true is not supported; mor's "
                                      "recursive KV sharing reuses the first recursion's K/V")
    fields: dict[str, Any] = dict(architecture="recursive", num_recursions=nr, sharing=sharing,
                                  kv_mode="shared" if kv_share else "recursion_wise")
    if recipe.flag("mor.enable"):
        if sharing not in MOR_SHARING:
            raise OfficialFormatError(f"{recipe.source}: recursive.sharing={sharing!r} with mor.enable=true; the "
                                      f"official MoR layers exist for {', '.join(MOR_SHARING)} only")
        if recipe.flag("mor.rand_router", False):
            raise OfficialFormatError(f"{recipe.source}: mor.rand_router=true (random routing, no router weights) "
                                      "cannot be imported")
        temp = float(recipe.get("mor.temp"))
        if temp != 1.0:
            notes.append(f"mor.temp={temp}: folded into the first router layer (weights divided by {temp})")
        kind = recipe.choice("mor.type", ("expert", "token"))
        arch = ROUTER_ARCH[recipe.choice("mor.router_type", tuple(ROUTER_ARCH))]
        fields.update(architecture="mor", router_type=kind, router_arch=arch)
        if recipe.flag("mor.z_loss", False):
            fields["z_loss_coeff"] = float(recipe.get("mor.z_coeff", 0.001))
        sec = f"mor.{kind}"
        gating = recipe.get(f"{sec}.gating", "weighted")
        if gating != "weighted":
            raise OfficialFormatError(f"{recipe.source}: {sec}.gating={gating!r}; mor implements the official "
                                      "'weighted' gating (H + g * block(H)) only")
        if kind == "expert":
            func = recipe.choice(f"{sec}.router_func", ("sigmoid", "tanh"))
            caps = recipe.get("mor.capacity")
            if caps is None:  # the official default (util/config.py): (N_r - i) / N_r
                caps = [(nr - i) / nr for i in range(nr)]
            try:
                caps = [float(c) for c in (caps.split(",") if isinstance(caps, str) else caps)]
            except (TypeError, ValueError):
                raise OfficialFormatError(f"{recipe.source}: mor.capacity={caps!r} must be comma-separated "
                                          "fractions, one per recursion") from None
            if len(caps) != nr:
                raise OfficialFormatError(f"{recipe.source}: mor.capacity has {len(caps)} entries for "
                                          f"recursive.num_recursion={nr}")
            sampling = recipe.choice(f"{sec}.sampling", ("aux_loss", "aux_router"))
            warm = recipe.get(f"{sec}.cap_warmup_step", None)
            if warm is None:  # the official default: the lr warm-up in micro-batches
                warm = int(recipe.get("num_warmup_steps", 0) or 0) * int(recipe.get("gradient_accumulation_steps", 1) or 1)
            fields.update(router_func=func, router_alpha=float(recipe.get(f"{sec}.alpha")), capacities=caps,
                          use_aux_router=sampling == "aux_router",
                          aux_loss_coeff=float(recipe.get(f"{sec}.coeff", 0.01)),
                          capacity_warmup_steps=int(warm))
            if sampling == "aux_router":
                notes.append("aux_router: the official code trains it with its own AdamW (10x lr); mor trains "
                             "it with the BCE through the main optimizer (docs/model.md)")
        else:
            func = "sigmoid" if recipe.get(f"{sec}.router_func", "softmax") == "sigmoid" else "softmax"
            alpha = float(recipe.get(f"{sec}.alpha", 0.1 if func == "sigmoid" else 1.0))
            bal = recipe.choice(f"{sec}.balancing", ("loss", "loss_free"))
            fields.update(router_func=func, router_alpha=alpha, balancing=bal)
            if bal == "loss":
                # the official balancing loss uses alpha * probability as P_i
                fields["balance_coeff"] = float(recipe.get(f"{sec}.coeff", 0.01)) * alpha
            else:
                fields["balance_bias_rate"] = float(recipe.get(f"{sec}.u")) / alpha
            if int(recipe.get(f"{sec}.bal_warmup_step", 0) or 0) > 0:
                notes.append(f"{sec}.bal_warmup_step: a training-time warm-up mor does not implement (ignored)")
    try:
        cfg = base.replace(**fields)
    except ConfigError as e:
        raise OfficialFormatError(f"{recipe.source}: {e}") from None
    return cfg, notes


# ---------------------------------------------------------------------- weights
_LAYER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
          "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
          "input_layernorm.weight", "post_attention_layernorm.weight")


def _router_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(official suffix under ``...router``, mor suffix under ``...net``) of one router."""
    if cfg.router_arch == "linear":
        return [("weight", "weight")]
    return [("0.weight", "0.weight"), ("2.weight", "2.weight")]


def official_key_map(cfg: ModelConfig) -> dict[str, str]:
    """Every official state-dict name -> the mor name it holds (many official names map to
    one mor name for shared tensors)."""
    out: dict[str, str] = {"model.embed_tokens.weight": "model.embed_tokens.weight",
                           "model.norm.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}

    def layer(official: str, unique: int) -> None:
        for s in _LAYER:
            out[f"{official}.{s}"] = f"model.layers.{unique}.{s}"

    if cfg.architecture != "mor":  # vanilla and recursive: a Llama whose copies are tied
        for l, u in enumerate(cfg.layer_map()):
            layer(f"model.layers.{l}", u)
        return out
    prefix, chunks, suffix = cfg.structure()
    nr = cfg.num_recursions
    for i, u in enumerate(prefix):
        layer(f"model.layers.{i}", u)
    first = len(prefix)
    if cfg.router_type == "expert":
        for r in range(nr):
            w = f"model.layers.{first + r}"
            for j, u in enumerate(chunks[r]):
                layer(f"{w}.block.{j}", u)
            for off, ours in _router_names(cfg):
                out[f"{w}.mor_router.router.{off}"] = f"model.routers.{r}.net.{ours}"
                if cfg.use_aux_router:
                    out[f"{w}.mlp_router.router.{off}"] = f"model.aux_routers.{r}.net.{ours}"
        last = first + nr
    else:
        # one wrapper; with cycle sharing the official code stores it as `model.layers` itself
        w = f"model.layers.{first}" if prefix else "model.layers"
        for r in range(nr):
            for j, u in enumerate(chunks[r]):
                layer(f"{w}.block_list.{r}.{j}", u)
        for off, ours in _router_names(cfg):
            out[f"{w}.mor_router.router.{off}"] = f"model.router.net.{ours}"
        if cfg.balancing == "loss_free":
            out[f"{w}.router_bias"] = "model.balance_bias"
        last = first + 1
    for i, u in enumerate(suffix):
        layer(f"model.layers.{last + i}", u)
    return out


def convert_state_dict(official: dict[str, torch.Tensor], cfg: ModelConfig, source: str = "checkpoint",
                       router_temp: float = 1.0) -> dict[str, torch.Tensor]:
    """The mor state dict (each unique tensor once) of an official one. Refuses unknown or
    missing tensors and shared tensors whose stored copies differ."""
    official = {k: v for k, v in official.items() if not k.endswith("rotary_emb.inv_freq")}
    kmap = official_key_map(cfg)
    unknown = sorted(k for k in official if k not in kmap)
    if unknown:
        hint = ""
        if any(re.search(r"lora|prompt|recursion_enc", k) for k in unknown):
            hint = " (relaxation / LoRA weights: mor has no relaxation modules)"
        raise OfficialFormatError(f"{source}: {len(unknown)} tensor(s) the run's YAML does not account for"
                                  f"{hint}: {unknown[:6]}{' ...' if len(unknown) > 6 else ''}")
    groups: dict[str, list[str]] = {}
    for off, ours in kmap.items():
        if off in official:
            groups.setdefault(ours, []).append(off)
    differ = []
    for ours, names in groups.items():
        ref = official[names[0]]
        for n in names[1:]:
            if official[n].shape != ref.shape or not torch.equal(official[n], ref):
                differ.append((names[0], n))
    if differ:
        shown = "; ".join(f"{a} != {b}" for a, b in differ[:4])
        raise OfficialFormatError(
            f"{source}: {len(differ)} shared tensor(s) hold different values under their tied copies ({shown}"
            f"{' ...' if len(differ) > 4 else ''}). The checkpoint lost its parameter tying (official code "
            "before fix 82c97f29 re-created attention per recursion); it is not the recursive model its "
            "YAML describes, so it is refused")
    state = {ours: official[names[0]] for ours, names in groups.items()}
    if cfg.tie_word_embeddings and "lm_head.weight" in state:
        head = state.pop("lm_head.weight")
        if not torch.equal(head, state.get("model.embed_tokens.weight", head)):
            raise OfficialFormatError(f"{source}: tie_word_embeddings=true but lm_head.weight differs from "
                                      "model.embed_tokens.weight")
    if cfg.architecture == "mor" and cfg.router_type == "token":
        state["model.balance_load"] = torch.zeros(cfg.num_recursions)
        if "model.balance_bias" in state:  # official: argmax(alpha * p + b); mor: argmax(p + b / alpha)
            state["model.balance_bias"] = state["model.balance_bias"].float() / cfg.router_alpha
        else:
            state["model.balance_bias"] = torch.zeros(cfg.num_recursions)
    if router_temp != 1.0:  # router(x / temp) == router with its first layer divided by temp
        first = "weight" if cfg.router_arch == "linear" else "0.weight"
        for k in list(state):
            if re.fullmatch(rf"model\.(routers\.\d+|aux_routers\.\d+|router)\.net\.{re.escape(first)}", k):
                state[k] = state[k] / router_temp
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MoRForCausalLM(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    missing = sorted(set(shapes) - set(state))
    if missing:
        want = sorted(o for o, m in kmap.items() if m in missing)
        raise OfficialFormatError(f"{source}: missing tensor(s) {want[:6]}{' ...' if len(want) > 6 else ''} "
                                  "that the run's YAML implies")
    for k, v in state.items():
        if tuple(v.shape) != shapes[k]:
            names = groups.get(k, [k])
            raise OfficialFormatError(f"{source}: {names[0]} has shape {tuple(v.shape)}, the config implies "
                                      f"{shapes[k]}")
    return state


# ---------------------------------------------------------------------- the whole import
def load_official(src: str | Path, recipe_path: str | Path, dtype: torch.dtype | None = torch.float32
                  ) -> tuple[MoRForCausalLM, Path | None, list[str]]:
    """An official checkpoint directory + its YAML -> (mor model in eval mode, tokenizer.json
    path or None, notes). Nothing is written."""
    from .hf_llama import read_json, read_weights

    d = Path(src)
    if not d.is_dir():
        raise OfficialFormatError(f"official checkpoint directory not found: {d}")
    recipe = read_recipe(recipe_path)
    hf = read_json(d / "config.json")
    cfg, notes = official_model_config(hf, recipe, source=str(d / "config.json"))
    temp = float(recipe.get("mor.temp", 1.0)) if cfg.architecture == "mor" else 1.0
    state = convert_state_dict(read_weights(d), cfg, source=str(d), router_temp=temp)
    with torch.device("meta"):
        model = MoRForCausalLM(cfg)
    model.to_empty(device="cpu")
    model.load_state_dict(state, strict=not cfg.tie_word_embeddings)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if dtype is not None:
        model.to(dtype)
    tok = d / "tokenizer.json"
    return model.eval(), (tok if tok.is_file() else None), notes


def import_official(src: str | Path, recipe_path: str | Path, out: str | Path, *,
                    tokenizer: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Convert an official checkpoint into a mor checkpoint directory at ``out``."""
    out = Path(out)
    with output_lock(out, "mor import-official"):  # one writer per output directory
        return _import_official(src, recipe_path, out, tokenizer, overwrite)


def _import_official(src, recipe_path, out: Path, tokenizer, overwrite: bool) -> dict[str, Any]:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OfficialFormatError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    model, tok, notes = load_official(src, recipe_path)
    if tokenizer is not None:
        tok = Path(tokenizer)
        if tok.is_dir():
            tok = tok / "tokenizer.json"
        if not tok.is_file():
            raise OfficialFormatError(f"tokenizer not found: {tok}")
    if tok is not None:
        from tokenizers import Tokenizer

        try:
            n = Tokenizer.from_file(str(tok)).get_vocab_size()
        except Exception as e:  # tokenizers raises a plain Exception
            raise OfficialFormatError(f"cannot read tokenizer {tok}: {e}") from None
        if n > model.config.vocab_size:
            raise OfficialFormatError(f"tokenizer {tok} has {n} tokens but the model's vocab_size is "
                                      f"{model.config.vocab_size}")
    if out.exists() and not any(out.iterdir()):
        shutil.rmtree(out)
    save_checkpoint(out, model, tokenizer=str(tok) if tok is not None else None,
                    meta={"imported_from": str(Path(src).resolve()), "official_recipe": str(recipe_path)})
    c = model.config
    return {"out": str(out), "architecture": c.architecture, "num_recursions": c.num_recursions,
            "sharing": c.sharing if c.architecture != "vanilla" else None,
            "router_type": c.router_type if c.architecture == "mor" else None, "kv_mode": c.kv_mode,
            "unique_params": model.num_parameters(), "tokenizer": tok is not None, "notes": notes}


# ---------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="DIR", help="checkpoint directory saved by the official code "
                   "(config.json + pytorch_model.bin)")
    p.add_argument("--recipe", required=True, metavar="CFG.yaml", help="the run's Hydra YAML (recursive.*, mor.*, "
                   "kv_sharing.*, relaxation.*)")
    p.add_argument("out", metavar="OUT", help="mor checkpoint directory to write")
    p.add_argument("--tokenizer", help="tokenizer.json (or a folder with one) to store with the checkpoint, when "
                   "DIR has none")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")


def run(args: argparse.Namespace) -> dict:
    s = import_official(args.src, args.recipe, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite)
    c = f"{s['architecture']}" + (f" ({s['router_type']}-choice)" if s["router_type"] else "")
    print(f"imported {args.src} -> {s['out']}: {c}, N_r={s['num_recursions']}, "
          f"{s['unique_params'] / 1e6:.2f}M unique non-embedding params", flush=True)
    for n in s["notes"]:
        print(f"  note: {n}")
    return s
