"""Chat templates of mor checkpoints.

Where a checkpoint keeps its chat template (the Hugging Face conventions, so a tokenizer
folder from the Hub works as is):

1. ``chat_template.jinja`` next to ``tokenizer.json``, else
2. the ``chat_template`` key of ``tokenizer_config.json`` (a string, or a list of
   ``{"name", "template"}`` of which the one named "default" is used).

``mor serve --chat-template FILE`` overrides both. Templates are Jinja2, rendered in a
sandbox with ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token`` and
``raise_exception`` (as transformers renders them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError, resolve_checkpoint


class ChatTemplateError(ValueError):
    """The chat template cannot render these messages (or there is none)."""


def load_chat_template(checkpoint: str | Path | None, override: str | Path | None = None) -> str | None:
    """The chat template text of a checkpoint (see the module docstring), or None."""
    if override is not None:
        p = Path(override)
        if not p.is_file():
            raise CheckpointError(f"--chat-template {p} is not a file")
        return p.read_text(encoding="utf-8")
    if checkpoint is None:
        return None
    d = resolve_checkpoint(checkpoint)
    f = d / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8")
    cfg = d / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        tpl = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{cfg} is not a JSON object: {e}") from None
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    if tpl is not None and not isinstance(tpl, str):
        raise CheckpointError(f"{cfg}: chat_template must be a string or a list of named templates")
    return tpl


class ChatTemplate:
    """A compiled chat template."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise ChatTemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise CheckpointError(f"the chat template does not compile: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token, **kwargs)
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None
