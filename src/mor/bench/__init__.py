"""Benchmarks: ``mor bench train`` and ``mor bench infer``.

Each benchmark measures the models side by side in one process and reports ratios;
nothing here is asserted as wall-clock in tests.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "train": ("mor.bench.train", "training throughput, MFU and memory: vanilla vs recursive vs MoR"),
    "infer": ("mor.bench.infer", "generation throughput in the engine: MoR vs vanilla (and transformers)"),
    "serve": ("mor.bench.serve", "load test of OpenAI-compatible servers: mor serve of MoR vs vanilla checkpoints"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (mod, help_) in BENCHES.items():
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        sp = sub.add_parser(name, help=help_, description=help_)
        module.add_arguments(sp)
        sp.set_defaults(_bench_module=mod)


def run(args: argparse.Namespace) -> dict:
    return {"bench": args.bench, **importlib.import_module(args._bench_module).run(args)}
