"""Recipe files and ``key=value`` overrides (``mor train``, ``mor bench train``, ``mor experiment --set``).

A recipe is a YAML mapping of ``TrainConfig`` fields (:mod:`mor.train`) whose ``model``
section holds ``ModelConfig`` fields. An override ``key=value`` sets one field; a dotted key
reaches into a section (``model.num_recursions=2``). The value is read as a YAML scalar
(``true``, ``3``, ``0.5``, ``[0.9, 0.95]``, ``cuda``), with one number rule on top: a
decimal or scientific literal that YAML 1.1 leaves as a string (``1e-3``, ``2e15``) is a
float. An empty value is null.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def read_recipe_file(path: str | Path, what: str = "recipe") -> dict[str, Any]:
    """A YAML recipe file as a dict; ConfigError naming the file when it is missing or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {p} is not a text file (byte {e.start} is not UTF-8); give a YAML recipe") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{what} {p} must be a mapping of keys to values")
    return d


def parse_value(text: str) -> Any:
    """An override's value (module docstring)."""
    if text == "":
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


def apply_overrides(recipe: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``key=value`` overrides to ``recipe`` in place (and return it)."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like key=value "
                              "(e.g. lr=1e-3, device=cuda or model.num_recursions=2)")
        key, text = override.split("=", 1)
        node = recipe
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
        node[parts[-1]] = parse_value(text)
    return recipe
