"""Builders shared by the test modules (no test module imports another): tiny random models,
random text, small random checkpoints, and the CLI run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mor import MoRForCausalLM, preset
from mor import checkpoint as ckpt
from mor.cli import main

#: vocabulary of the tiny random models
V = 97
#: words of the random documents (the corpus fixture and the evaluation texts)
CORPUS_WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum".split()
WORDS = tuple(CORPUS_WORDS) + (".", "Question", "Answer", "yes", "no")


def tiny(architecture: str = "mor", **overrides):
    """The ``tiny`` preset with a 97-token vocabulary."""
    overrides.setdefault("vocab_size", V)
    return preset("tiny", architecture, **overrides)


def build(cfg, seed: int = 0, router_std: float | None = 0.5) -> MoRForCausalLM:
    """A random model in eval mode; larger router weights (``router_std``) make routing decisive
    and varied (None keeps the initialisation)."""
    torch.manual_seed(seed)
    model = MoRForCausalLM(cfg).eval()
    if router_std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "router" in name:
                    p.normal_(0, router_std)
    return model


def random_words(length: int, generator: torch.Generator, words=WORDS) -> str:
    return " ".join(words[j] for j in torch.randint(0, len(words), (length,), generator=generator).tolist())


def random_docs(n: int, length: int, seed: int) -> list[str]:
    """``n`` documents of ``length`` random words."""
    g = torch.Generator().manual_seed(seed)
    return [random_words(length, g) for _ in range(n)]


def make_checkpoint(path: Path, architecture: str = "mor", seed: int = 0, **overrides) -> Path:
    """A small random checkpoint with a 300-token BPE; routers get larger weights so that
    routing decisions vary from token to token."""
    from mor.data import train_tokenizer

    tok = train_tokenizer(random_docs(4, 300, 123), 300)
    nr = 1 if architecture == "vanilla" else 3
    cfg = preset("tiny", architecture, nr, **{"max_position_embeddings": 64, "vocab_size": 300, **overrides})
    torch.manual_seed(seed)
    model = MoRForCausalLM(cfg)
    for name, p in model.named_parameters():
        if "router" in name:
            p.data.normal_(0.0, 0.5)
    return ckpt.save_checkpoint(path, model, tokenizer=tok)


def run_cli(argv, capsys) -> tuple[int, dict, str]:
    """``mor ARGV`` in-process: (exit code, the final JSON line, everything printed)."""
    rc = main(argv)
    out = capsys.readouterr().out
    return rc, json.loads(out.strip().splitlines()[-1]), out
