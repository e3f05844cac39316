"""``mor serve CHECKPOINT``: the OpenAI-compatible HTTP server (docs/serving.md)."""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--served-model-name", default=None, help="model name in the API (default: the directory name)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 and /tokenize (default: $MOR_API_KEY if set)")
    p.add_argument("--max-batch", type=int, default=32, help="concurrent sequences in the engine (default 32)")
    p.add_argument("--kv-memory-gb", type=float, default=None,
                   help="KV pool size (default: worst case of max-batch full sequences, capped at 1 GB on CPU, "
                        "8 GB on CUDA)")
    p.add_argument("--max-model-len", type=int, default=None, help="tokens per sequence (default: the model's context)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting beyond the running batch before new ones get 503 (default 256)")
    p.add_argument("--max-logprobs", type=int, default=20, help="most alternatives per token in logprobs (default 20)")
    p.add_argument("--chat-template", default=None, help="a Jinja chat template file (overrides the checkpoint's)")
    p.add_argument("--schedule", default="auto", choices=["auto", "depth", "sequence"],
                   help="depth-wise or sequence-wise batching (auto: depth for MoR)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="weights and KV dtype (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed for requests without their own")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds running requests may take to finish after SIGTERM/SIGINT (default 30)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> dict:
    try:
        from .app import ServeConfig
        from .server import serve
    except ImportError as e:
        from ..cli import CLIError

        raise CLIError(f"mor serve needs the [serve] extra (pip install 'mor[serve]'): {e}") from None
    cfg = ServeConfig(checkpoint=args.checkpoint, host=args.host, port=args.port,
                      served_model_name=args.served_model_name, api_key=args.api_key or os.environ.get("MOR_API_KEY"),
                      max_batch=args.max_batch, kv_memory_gb=args.kv_memory_gb, max_model_len=args.max_model_len,
                      max_queue=args.max_queue, max_logprobs=args.max_logprobs, chat_template=args.chat_template,
                      schedule=args.schedule, device=args.device, dtype=args.dtype, seed=args.seed,
                      shutdown_grace_s=args.shutdown_grace, log_level=args.log_level)
    try:
        return serve(cfg)
    except OSError as e:
        from ..cli import CLIError

        raise CLIError(str(e)) from None
