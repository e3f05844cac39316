"""Helpers for the server tests: tiny checkpoints with a BPE tokenizer and a live server."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import torch

from mor import MoRForCausalLM, preset

V = 320
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hum".split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bpe_tokenizer():
    """A byte-level BPE (mor.data.train_tokenizer) with two chat special tokens."""
    from mor.data import train_tokenizer

    g = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (400,), generator=g).tolist())
            for _ in range(4)]
    tok = train_tokenizer(docs, vocab_size=300)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    assert tok.get_vocab_size() <= V
    return tok


def make_checkpoint(path: Path, arch: str = "mor", seed: int = 0, chat_template: str | None = CHATML,
                    **kw) -> Path:
    """A tiny random model (decisive routers, so depths vary) saved with the tokenizer and,
    optionally, a chat template in tokenizer_config.json."""
    from mor.checkpoint import save_checkpoint

    kw.setdefault("vocab_size", V)
    kw.setdefault("tie_word_embeddings", False)
    kw.setdefault("max_position_embeddings", 128)
    torch.manual_seed(seed)
    model = MoRForCausalLM(preset("tiny", arch, **kw)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "router" in n:
                p.normal_(0, 0.5)
    ck = save_checkpoint(path, model, tokenizer=bpe_tokenizer())
    if chat_template is not None:
        (ck / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template}))
    return ck


class LiveServer:
    """``mor serve`` in a background thread of the test process, on 127.0.0.1 and a free port."""

    def __init__(self, checkpoint, **kw):
        from mor.serve.app import ServeConfig
        from mor.serve.server import build_server

        kw.setdefault("port", 0)
        kw.setdefault("max_batch", 8)
        self.cfg = ServeConfig(checkpoint=str(checkpoint), host="127.0.0.1", **kw)
        self.server = build_server(self.cfg)
        self.state = self.server.mor_state
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        t0 = time.time()
        while self.server.bound is None:
            if not self.thread.is_alive() or time.time() - t0 > 30:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.server.bound[1]}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
