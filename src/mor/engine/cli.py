"""``mor generate CHECKPOINT --prompt TEXT [--prompt TEXT ...]``: sample text, streamed.

Several prompts run together in the engine; the terminal shows them one after another,
the current one live as it is produced. The summary (texts, depths, speed) is the
returned dict, printed by ``mor`` as the final JSON line.
"""

from __future__ import annotations

import argparse
import sys

from .. import validate
from .request import RequestError, SamplingParams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--prompt", "-p", action="append", default=[], type=validate.text_arg, help="prompt text (repeat for several)")
    p.add_argument("--prompt-file", help="a file with one prompt per line")
    p.add_argument("--max-tokens", "-n", type=int, default=64, help="new tokens per prompt at most (default 64)")
    p.add_argument("--temperature", "-t", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--stop", action="append", default=None,
                   help="stop string (repeatable; \\n and \\t stand for newline and tab)")
    p.add_argument("--seed", type=int, default=None, help="random seed (prompt i uses seed + i)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after the end-of-text token")
    p.add_argument("--tokenizer", help="tokenizer.json to use instead of the checkpoint's")
    p.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="weights and KV dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--max-batch", type=validate.positive_int, default=32, help="concurrent sequences (default 32)")
    p.add_argument("--schedule", default="auto", choices=["auto", "depth", "sequence"],
                   help="depth-wise or sequence-wise batching (auto: depth for MoR)")
    p.add_argument("--no-stream", action="store_true", help="print each text when it is complete")


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise RequestError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise RequestError(f"--prompt-file {args.prompt_file} is not UTF-8 text (byte {e.start})") from None
    if not prompts:
        raise RequestError("give at least one --prompt (or --prompt-file)")
    return prompts


def run(args: argparse.Namespace) -> dict:
    from .llm import LLM

    prompts = _prompts(args)
    if args.device:
        from ..train import resolve_device

        resolve_device(args.device)  # a clear error for cuda without CUDA, or a misspelt device
    stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop] if args.stop else None
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, stop=stop, seed=args.seed, ignore_eos=args.ignore_eos)
    tokenizer = None
    if args.tokenizer:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(args.tokenizer)
        except Exception as e:  # tokenizers raises a plain Exception
            raise RequestError(f"cannot read --tokenizer {args.tokenizer}: {e}") from None
    llm = LLM(args.checkpoint, tokenizer, device=args.device, dtype=args.dtype, max_batch=args.max_batch,
              schedule=args.schedule, seed=args.seed)
    if llm.tokenizer is None:
        raise RequestError(f"checkpoint {args.checkpoint} has no tokenizer.json; pass --tokenizer PATH")

    display = _Display(prompts, live=not args.no_stream, out=sys.stdout)
    errors = []
    outputs = [None] * len(prompts)
    for ev in llm.stream(prompts, params):
        text = ev.text
        if ev.output is not None and ev.output.error:
            errors.append(f"prompt {ev.index + 1}: {ev.output.error}")
            text = f"  [error: {ev.output.error}]"
        if ev.finished:
            outputs[ev.index] = ev.output
        display.add(ev.index, text, ev.finished)
    stats = llm.stats
    if errors:
        raise RequestError("; ".join(errors))
    return {
        "checkpoint": args.checkpoint,
        "outputs": [{"prompt": p, "text": o.text, "num_tokens": len(o.token_ids), "finish_reason": o.finish_reason,
                     "mean_depth": sum(o.depths) / max(1, len(o.depths))} for p, o in zip(prompts, outputs)],
        "generated_tokens": stats.generated_tokens,
        "tokens_per_s": stats.tokens_per_s,
        "exit_counts": stats.exit_counts,
    }


class _Display:
    """Shows several concurrently generated texts one after another: the current one live,
    the later ones buffered until their turn."""

    def __init__(self, prompts: list[str], live: bool, out):
        self.prompts, self.live, self.out = prompts, live, out
        self.buf = [""] * len(prompts)
        self.done = [False] * len(prompts)
        self.cur = 0
        if live:
            self._header(0)
            out.flush()

    def _header(self, i: int) -> None:
        if len(self.prompts) > 1:
            self.out.write(f"\n=== [{i + 1}/{len(self.prompts)}] ===\n")
        self.out.write(self.prompts[i])

    def add(self, i: int, text: str, finished: bool) -> None:
        self.buf[i] += text
        if self.live and i == self.cur:
            self.out.write(text)
        if finished:
            self.done[i] = True
            while self.cur < len(self.prompts) and self.done[self.cur]:
                if not self.live:
                    self._header(self.cur)
                    self.out.write(self.buf[self.cur])
                self.out.write("\n")
                self.cur += 1
                if self.live and self.cur < len(self.prompts):
                    self._header(self.cur)
                    self.out.write(self.buf[self.cur])
        self.out.flush()
