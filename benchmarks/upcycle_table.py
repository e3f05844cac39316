"""Table of the up-training study (benchmarks/upcycle_study.sh): final validation NLL of
every run under OUT, from each run's metrics.jsonl."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def final_val(run: Path) -> tuple[float, int] | None:
    f = run / "metrics.jsonl"
    if not f.is_file():
        return None
    last = None
    for line in f.read_text().splitlines():
        rec = json.loads(line)
        if "val_loss" in rec:
            last = (rec["val_loss"], rec["step"])
    return last


def main(out: str) -> None:
    root = Path(out)
    van = final_val(root / "vanilla")
    if van:
        print(f"source: vanilla, {van[1]} steps, val NLL {van[0]:.4f}\n")
    strategies = ["stepwise", "average", "lower", "upper", "random", "scratch"]
    print("| init | " + " | ".join(f"{a} val NLL" for a in ("recursive", "mor")) + " |")
    print("|---|---|---|")
    for s in strategies:
        cells = []
        for a in ("recursive", "mor"):
            v = final_val(root / f"{a}-{s}")
            cells.append(f"{v[0]:.4f}" if v else "-")
        print(f"| {s} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/upcycle-study")
