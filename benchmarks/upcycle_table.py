"""Table of the up-training study (benchmarks/upcycle_study.sh): for every init strategy and
architecture, the validation NLL right after the initialisation (recomputed here, before any
up-training step) and after the up-training budget (each run's metrics.jsonl; mean and range
over the seeds found)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

STRATEGIES = ["stepwise", "average", "lower", "upper", "random", "scratch"]
ARCHS = ["recursive", "mor"]


def final_val(run: Path) -> float | None:
    f = run / "metrics.jsonl"
    if not f.is_file() or not (run / "checkpoints").is_dir():
        return None
    vals = [json.loads(line)["val_loss"] for line in f.read_text().splitlines() if "val_loss" in line]
    return vals[-1] if vals else None


@torch.no_grad()
def init_nll(root: Path, arch: str, strategy: str) -> float:
    """Validation NLL of the seed-0 initialisation, with the study's evaluation batches."""
    from mor import upcycle
    from mor.data import TokenLoader
    from mor.model import MoRForCausalLM
    from mor.train import evaluate, load_recipe

    cfg = load_recipe("configs/upcycle/uptrain.yaml", [f"data={root / 'data'}", f"model.architecture={arch}"])
    src = upcycle.load_source(root / "vanilla")
    target = upcycle.target_config(src.config, cfg.model)
    if strategy == "scratch":
        torch.manual_seed(0)
        model = MoRForCausalLM(cfg.model_config(vocab_size=src.config.vocab_size))
    else:
        model, _ = upcycle.upcycle(src.config, src.state, target, strategy, seed=0)
    loader = TokenLoader(str(root / "data"), "val", cfg.batch_size, cfg.seq_len, shuffle=False)
    from contextlib import nullcontext
    return evaluate(model, loader, cfg.eval_batches, torch.device("cpu"), nullcontext)["val_loss"]


def main(out: str) -> None:
    torch.set_num_threads(1)
    root = Path(out)
    van = final_val(root / "vanilla")
    if van is not None:
        print(f"source: pretrained vanilla (8 layers, 1.58M non-embedding params), val NLL {van:.4f}\n")
    head = " | ".join(f"{a}: NLL at init | {a}: NLL after up-training" for a in ARCHS)
    print(f"| init | {head} |")
    print("|---|" + "---|" * (2 * len(ARCHS)))
    for s in STRATEGIES:
        cells = []
        for a in ARCHS:
            runs = sorted(root.glob(f"{a}-{s}")) + sorted(root.glob(f"{a}-{s}-seed*"))
            vals = [v for v in (final_val(r) for r in runs) if v is not None]
            cells.append(f"{init_nll(root, a, s):.3f}")
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.3f}")
            else:
                cells.append(f"{statistics.mean(vals):.3f} ({min(vals):.3f}-{max(vals):.3f}, {len(vals)} seeds)")
        print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/upcycle-study")
