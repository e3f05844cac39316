"""The experiment's plots (matplotlib, Agg): NLL vs unique parameters and vs FLOPs with Pareto
frontiers, loss curves, test-time depth scaling, throughput vs NLL, and the seed replicates."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .records import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_COLORS = {"vanilla": "#444444", "recursive": "#1f77b4", "mor-expert": "#d62728", "mor-token": "#2ca02c"}
_MARKERS = {1: "o", 2: "s", 3: "^", 4: "D"}


def style(r: dict) -> dict:
    kv = r.get("kv_mode") == "shared"
    cyc = r.get("sharing") not in (None, "middle_cycle")
    return dict(color="#9467bd" if kv else ("#ff7f0e" if cyc else _COLORS.get(r["kind"], "k")),
                marker=_MARKERS.get(r["num_recursions"] or 1, "o"))


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated by another with smaller-or-equal x and smaller y, sorted by x."""
    front, best = [], math.inf
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def make_plots(rows: list[dict], report_dir: Path) -> list[str]:
    """Write the PNG plots; returns their file names."""
    plt = _pyplot()
    done = [r for r in rows if r["status"] == "done" and r["nll"] is not None]
    files: list[str] = []
    if not done:
        return files
    title_sfx = ", ".join(sorted({f"{r['shape']} @ {r['budget']:.3g} FLOPs" for r in done}))

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(report_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)

    # NLL vs unique parameters
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for r in done:
        ax.scatter(r["unique_params"] / 1e6, r["nll"], s=60, label=r["model"] + (
            f" N_r={r['num_recursions']}" if r["num_recursions"] else ""), **style(r))
        ax.annotate(r["name"], (r["unique_params"] / 1e6, r["nll"]), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    front = pareto([(r["unique_params"] / 1e6, r["nll"]) for r in done])
    xmax = max(r["unique_params"] for r in done) / 1e6 * 1.15
    ax.step([p[0] for p in front] + [xmax], [p[1] for p in front] + [front[-1][1]], where="post", ls="--",
            color="k", lw=1, label="Pareto frontier (fewest parameters for a given NLL)")
    ax.scatter([p[0] for p in front], [p[1] for p in front], s=180, facecolors="none", edgecolors="k", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("unique non-embedding parameters (M)")
    ax.set_ylabel("validation NLL (nats/token)")
    ax.set_title(f"NLL vs unique parameters ({title_sfx})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "nll_vs_params.png")

    # NLL vs FLOPs: validation curves (stable-phase evaluations) and final points
    fig, ax = plt.subplots(figsize=(7, 4.8))
    pts = []
    for r in done:
        _, val = read_metrics(Path(r["run_dir"]))
        fpt = r["flops"] / r["tokens"]
        tps = r["tokens"] / r["steps"]
        xs = [v["step"] * tps * fpt for v in val]
        ys = [v["val_loss"] for v in val]
        st = style(r)
        ax.plot(xs, ys, color=st["color"], alpha=0.5, lw=1)
        ax.scatter([r["flops"]], [r["nll"]], s=60, color=st["color"], marker=st["marker"], label=r["name"], zorder=3)
        pts += list(zip(xs, ys))
    front = pareto(pts)
    ax.plot([p[0] for p in front], [p[1] for p in front], ls="--", color="k", lw=1, label="Pareto frontier")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (paper counting, SPEC section 6)")
    ax.set_ylabel("validation NLL")
    lo = min(r["nll"] for r in done)
    ax.set_ylim(lo - 0.1, max(lo + 1.5, max(r["nll"] for r in done) + 0.2))
    ax.set_title(f"NLL vs FLOPs ({title_sfx}); lines: evaluations during training", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "nll_vs_flops.png")

    # loss curves
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    low = lo
    for r in done:
        tr, val = read_metrics(Path(r["run_dir"]))
        st = style(r)
        if tr:
            xs = [t.get("flops", math.nan) for t in tr]
            ys = np.array([t["loss"] for t in tr])
            k = max(1, min(5, len(ys) // 10))  # a short moving average: micro-batches are noisy
            smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
            axes[0].plot(xs[k - 1:], smooth, color=st["color"], label=r["name"], lw=1,
                         ls="--" if r["num_recursions"] == 2 else "-")
            low = min(low, float(smooth.min()))
        fpt, tps = r["flops"] / r["tokens"], r["tokens"] / r["steps"]
        axes[1].plot([v["step"] * tps * fpt for v in val], [v["val_loss"] for v in val], color=st["color"],
                     marker=st["marker"], ms=3, lw=1, label=r["name"], ls="--" if r["num_recursions"] == 2 else "-")
    axes[0].set_title("training loss (moving average)", fontsize=9)
    axes[1].set_title("validation NLL", fontsize=9)
    for a in axes:
        a.set_xlabel("training FLOPs")
        a.grid(alpha=0.3)
        a.set_ylim(low - 0.1, low + 2.0)
    axes[0].set_ylabel("NLL")
    axes[1].legend(fontsize=7)
    save(fig, "loss_curves.png")

    # test-time depth scaling
    ds = [r for r in done if r.get("depth_scaling")]
    if ds:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for r in ds:
            d = sorted((int(k), v) for k, v in r["depth_scaling"].items())
            st = style(r)
            ax.plot([x for x, _ in d], [y for _, y in d], color=st["color"], marker=st["marker"], label=r["name"],
                    ls="--" if r["num_recursions"] == 2 else "-")
            ax.axvline(r["num_recursions"], color=st["color"], alpha=0.15)
        ax.set_xlabel("recursions allowed at test time (trained N_r marked)")
        ax.set_ylabel("validation NLL")
        ax.set_xticks(sorted({int(k) for r in ds for k in r["depth_scaling"]}))
        ax.set_title("test-time recursion depth (beyond the trained N_r: extra passes of the last recursion)",
                     fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, "depth_scaling.png")

    # generation throughput (paired with vanilla) vs NLL
    tp = [r for r in done if r.get("infer_speedup")]
    if tp:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for r in tp:
            ax.scatter(r["infer_speedup"], r["nll"], s=60, **style(r))
            ax.annotate(f"{r['name']} ({r['infer_tok_per_s']:.0f} tok/s)", (r["infer_speedup"], r["nll"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.axvline(1.0, color="k", alpha=0.2)
        xs = [r["infer_speedup"] for r in tp]
        ax.set_xlim(min(xs) - 0.1, max(xs) + 0.45 * (max(xs) - min(xs) + 0.2))
        ax.set_xlabel("generation throughput relative to vanilla (mor bench infer, paired runs)")
        ax.set_ylabel("validation NLL")
        ax.set_title("inference throughput vs NLL", fontsize=9)
        ax.grid(alpha=0.3)
        save(fig, "throughput_vs_nll.png")
    return files


def combined_plot(res: dict, report_dir: Path) -> str:
    """NLL vs unique parameters (mean, min-max over seeds) and the paired differences to vanilla."""
    from matplotlib.ticker import FormatStrFormatter

    plt = _pyplot()

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    seen: dict[int, int] = {}
    for m in res["models"]:
        st = style(m)
        vals = list(m["nll_by_seed"].values())
        j = seen[m["unique_params"]] = seen.get(m["unique_params"], -1) + 1
        x = m["unique_params"] / 1e6 * (1 + 0.025 * j)  # models with equal counts side by side
        ax.errorbar([x], [m["nll_mean"]], yerr=[[m["nll_mean"] - min(vals)], [max(vals) - m["nll_mean"]]],
                    fmt=st["marker"], color=st["color"], capsize=3, ms=7, label=m["name"])
        ax.scatter([x] * len(vals), vals, s=10, color=st["color"], alpha=0.5)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("unique non-embedding parameters (M; equal counts drawn side by side)")
    ax.set_ylabel("validation NLL (mean; bars: min-max over seeds)")
    ax.set_title(f"equal training FLOPs, {len(res['seeds'])} seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    comps = [c for c in res["comparisons"] if c["b"] == "vanilla"]
    for i, c in enumerate(comps):
        ds = list(c["diff_by_seed"].values())
        bx.scatter(ds, [i] * len(ds), color="k", s=14, alpha=0.6, label="ours, one seed" if i == 0 else None)
        bx.plot([c["diff_mean"]], [i], "|", color="k", ms=16, mew=2, label="ours, mean" if i == 0 else None)
        if c["paper_diff"] is not None:
            bx.scatter([c["paper_diff"]], [i], marker="x", color="#d62728", s=40,
                       label="paper (360M)" if i == 0 else None)
    bx.axvline(0, color="k", alpha=0.3)
    bx.set_yticks(range(len(comps)))
    bx.set_yticklabels([c["a"] for c in comps], fontsize=8)
    bx.set_xlabel("NLL - vanilla NLL (same seed)")
    bx.set_title("difference to vanilla: left of 0 = better than vanilla", fontsize=9)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    name = "seeds.png"
    fig.savefig(report_dir / name, dpi=120)
    plt.close(fig)
    return name


