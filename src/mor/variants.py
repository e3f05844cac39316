"""The named model variants compared by ``mor experiment`` and both benchmarks.

A variant is a *kind* plus its recursion count, parameter-sharing scheme and KV mode:

=============  =========================================================================
kind           model fields it sets
=============  =========================================================================
``vanilla``    ``architecture=vanilla`` (every layer unique, N_r = 1)
``recursive``  ``architecture=recursive`` (shared layers, every token runs every recursion)
``mor-expert`` ``architecture=mor, router_type=expert`` (expert-choice routing)
``mor-token``  ``architecture=mor, router_type=token, router_func=softmax, balancing=loss``
               (the paper's token-choice recipe)
=============  =========================================================================

**Names.** ``vanilla``; otherwise ``KIND[-kvshare][-SHARING]-nrN``, e.g. ``recursive-nr2``,
``mor-expert-nr3``, ``mor-token-nr3``, ``mor-expert-kvshare-nr3`` (recursive KV sharing,
``kv_mode=shared``), ``mor-expert-cycle-nr2`` (Cycle sharing; SHARING is one of ``cycle``,
``sequence``, ``middle-cycle``, ``middle-sequence``, default Middle-Cycle, which the name
leaves out). In lists (``mor experiment --models``, ``mor bench train --models``) ``:N``
may stand for ``-nrN`` (``mor-token:3``), and a name without N_r takes the list's default.

A variant changes only the fields in :data:`KIND_KEYS`; everything else (the shape, the
capacities' defaults aside) comes from the base configuration it is applied to. When the
base's layer count does not fit the sharing scheme, layers are added (SPEC.md section 1).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, ModelConfig, valid_num_layers

#: model fields that belong to the variant; the base configuration's values are replaced
KIND_KEYS = ("architecture", "num_recursions", "sharing", "router_type", "router_func", "balancing",
             "kv_mode", "router_alpha", "capacities")
KINDS: dict[str, dict[str, Any]] = {
    "vanilla": dict(architecture="vanilla"),
    "recursive": dict(architecture="recursive"),
    "mor-expert": dict(architecture="mor", router_type="expert"),
    # the paper's token-choice recipe: softmax router, auxiliary balancing loss
    "mor-token": dict(architecture="mor", router_type="token", router_func="softmax", balancing="loss"),
}
LABELS = {"vanilla": "Vanilla", "recursive": "Recursive", "mor-expert": "MoR expert-choice",
          "mor-token": "MoR token-choice"}
#: sharing modifiers in names (longest first so "middle-cycle" is not read as "cycle")
SHARING_TAGS = {"middle-sequence": "middle_sequence", "middle-cycle": "middle_cycle", "sequence": "sequence",
                "cycle": "cycle"}
SHARING_NAMES = {"cycle": "Cycle", "sequence": "Sequence", "middle_cycle": "Middle-Cycle",
                 "middle_sequence": "Middle-Sequence"}
KV_MODES = ("recursion_wise", "shared")
_GRAMMAR = ("kinds: vanilla, recursive, mor-expert, mor-token; modifiers: -kvshare, -cycle, -sequence, "
            "-middle-cycle, -middle-sequence; N_r as -nrN or :N, e.g. mor-expert-kvshare-nr3 or mor-token:3")


class VariantError(ConfigError):
    """A model variant name or list cannot be read."""


@dataclass(frozen=True)
class Variant:
    """One model of a comparison: a kind, its recursions, sharing scheme and KV mode."""

    kind: str  # a key of KINDS
    num_recursions: int = 1
    sharing: str = "middle_cycle"
    kv_mode: str = "recursion_wise"

    @property
    def name(self) -> str:
        """The variant's name (module docstring), e.g. ``mor-expert-kvshare-nr3``."""
        if self.kind == "vanilla":
            return "vanilla"
        parts = [self.kind]
        if self.kv_mode == "shared":
            parts.append("kvshare")
        if self.sharing != "middle_cycle":
            parts.append(self.sharing.replace("_", "-"))
        return "-".join(parts) + f"-nr{self.num_recursions}"

    @property
    def label(self) -> str:
        """A table's model column, e.g. ``MoR expert-choice, KV sharing``."""
        s = LABELS[self.kind]
        if self.kind == "recursive" and self.sharing == "middle_cycle":
            s += " (Middle-Cycle)"
        elif self.kind != "vanilla" and self.sharing != "middle_cycle":
            s += f", {SHARING_NAMES[self.sharing]} sharing"
        if self.kv_mode == "shared":
            s += ", KV sharing"
        return s

    @property
    def is_mor(self) -> bool:
        return self.kind.startswith("mor")

    def model_fields(self) -> dict[str, Any]:
        """The model fields this variant sets (a subset of KIND_KEYS)."""
        fields = dict(KINDS[self.kind])
        if self.kind == "vanilla":
            fields["num_recursions"] = 1
            return fields
        fields.update(num_recursions=self.num_recursions, sharing=self.sharing, kv_mode=self.kv_mode)
        return fields

    def fit_layers(self, num_layers: int) -> int:
        """The layer count this variant uses for a base of ``num_layers`` layers."""
        if self.kind == "vanilla":
            return num_layers
        return valid_num_layers(num_layers, self.num_recursions, self.sharing)

    def config(self, base: ModelConfig) -> ModelConfig:
        """``base`` turned into this variant: the KIND_KEYS fields reset to their defaults and set
        by the variant, layers added where the sharing scheme needs them."""
        defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in KIND_KEYS}
        fields = {**defaults, **self.model_fields(), "num_hidden_layers": self.fit_layers(base.num_hidden_layers)}
        if fields.get("router_type") == "token":
            fields["use_aux_router"] = False  # an expert-choice option
        return base.replace(**fields)


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise VariantError(f"{what}={text!r} must be a comma list of integers (e.g. 2,3)") from None
    if not vals or any(v < 1 for v in vals):
        raise VariantError(f"{what}={text!r} must list positive integers")
    return vals


def _str_list(text: str, what: str, choices: tuple[str, ...]) -> list[str]:
    vals = [v.strip().replace("-", "_") for v in str(text).split(",") if v.strip()]
    for v in vals:
        if v not in choices:
            raise VariantError(f"{what}: {v!r} is not valid; choose from: {', '.join(choices)}")
    if not vals:
        raise VariantError(f"{what} is empty; choose from: {', '.join(choices)}")
    return vals


def _read_entry(entry: str, what: str) -> tuple[str, int | None, str | None, str | None]:
    """(kind, N_r or None, KV mode or None, sharing or None) of one name."""
    body, _, nr_text = entry.partition(":")
    kind = next((k for k in sorted(KINDS, key=len, reverse=True) if body == k or body.startswith(k + "-")), None)
    if kind is None:
        raise VariantError(f"{what}: unknown model {entry!r}; {_GRAMMAR}")
    rest = body[len(kind):].lstrip("-")
    kv, sharing, nr = None, None, None
    while rest:
        if rest.startswith("kvshare"):
            kv, rest = "shared", rest[len("kvshare"):]
        elif rest.startswith("nr") and rest[2:].isdigit() and not nr_text:
            nr, rest = int(rest[2:]), ""
        else:
            tag = next((t for t in SHARING_TAGS if rest.startswith(t)), None)
            if tag is None:
                raise VariantError(f"{what}: unknown modifier {rest!r} in {entry!r}; {_GRAMMAR}")
            sharing, rest = SHARING_TAGS[tag], rest[len(tag):]
        rest = rest.lstrip("-")
    if nr_text:
        nr = _int_list(nr_text, f"{what} {entry}")
        if len(nr) != 1:
            raise VariantError(f"{what}: {entry!r} names one N_r (e.g. {body}:3)")
        nr = nr[0]
    if kind == "vanilla" and (nr is not None or kv or sharing):
        raise VariantError(f"{what}: {entry!r}: a vanilla model has no recursions, sharing or KV mode")
    if kv and kind == "recursive":
        raise VariantError(f"{what}: {entry!r}: KV sharing is a MoR option (use mor-expert-kvshare)")
    return kind, nr, kv, sharing


def parse_variant(name: str, num_recursions: int | None = None, what: str = "model") -> Variant:
    """One variant from its name; ``num_recursions`` is used when the name gives none."""
    kind, nr, kv, sharing = _read_entry(name.strip(), what)
    if kind == "vanilla":
        return Variant("vanilla")
    nr = nr if nr is not None else num_recursions
    if nr is None or nr < 2:
        raise VariantError(f"{what}: {name!r}: recursive and MoR models need N_r >= 2 (e.g. {kind}-nr3)")
    return Variant(kind, nr, sharing or "middle_cycle", kv or "recursion_wise")


def parse_variants(models: str, nr: str = "2,3", kv: str = "recursion_wise", sharing: str = "middle_cycle",
                   what: str = "--models") -> list[Variant]:
    """Expand a comma list of names into variants, in order, without duplicates: a name without
    N_r is crossed with every ``nr``; a MoR name without ``kvshare`` with every ``kv``; a
    recursive or MoR name without a sharing modifier with every ``sharing``."""
    nrs = _int_list(nr, "--nr")
    kvs = _str_list(kv, "--kv", KV_MODES)
    sharings = _str_list(sharing, "--sharing", tuple(SHARING_NAMES))
    entries = [e.strip() for e in str(models).split(",") if e.strip()]
    if not entries:
        raise VariantError(f"{what} is empty")
    out: list[Variant] = []
    for entry in entries:
        kind, entry_nr, kv_fixed, sharing_fixed = _read_entry(entry, what)
        if kind == "vanilla":
            found = [Variant("vanilla")]
        else:
            entry_nrs = [entry_nr] if entry_nr is not None else nrs
            entry_kvs = [kv_fixed] if kv_fixed else (kvs if kind.startswith("mor") else ["recursion_wise"])
            entry_sharings = [sharing_fixed] if sharing_fixed else sharings
            found = [Variant(kind, n, s, k) for n in entry_nrs for s in entry_sharings for k in entry_kvs]
        for v in found:
            if v.kind != "vanilla" and v.num_recursions < 2:
                raise VariantError(f"{what}: {v.name}: recursive and MoR models need N_r >= 2")
            if v not in out:
                out.append(v)
    return out
