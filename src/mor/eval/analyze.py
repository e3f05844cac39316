"""``mor analyze CHECKPOINT --text ... | --file ...``: where a MoR model spends its compute.

For the given text (tokenized with the checkpoint's tokenizer, at most ``--max-tokens``
tokens, cut into consecutive chunks of ``--seq-len`` tokens that are each one forward
pass) and each routing rule (expert-choice: ``topk`` and ``threshold``; other models: one):

* **depth map** - every token's recursion depth (how many recursions it ran), as HTML
  (``depth.html``: the text with each token's background colored by its depth, a legend,
  and the depth in a tooltip, like the paper's Figure 1) and as PNG (``depth_<mode>.png``);
* **depth histogram** - tokens per depth (``depth_histogram.png``);
* **router histograms** - per recursion, the router scores of the selected and of the
  unselected candidate tokens (``router_histograms_<mode>.png``; expert-choice: sigmoid of
  the decision router's logit; token-choice: the probability of each depth, split by the
  tokens assigned that depth);
* **test-time depth scaling** - NLL of the text as the maximum recursion depth goes from 1
  to N_r and beyond (``depth_scaling.png``): depth is capped at d <= N_r, and for d > N_r the
  tokens that reached the last recursion run d - N_r extra passes of the last recursion's
  shared block (exact definition: :mod:`mor.eval.depth`). The NLL is the mean over every
  token after the first of its chunk.

All numbers also go to ``analysis.json`` in the output folder (default
``<checkpoint>/analysis``) and, summarised, into the checkpoint's ``results.json``. The
depths and router scores come from :func:`mor.eval.depth.forward_depth`, which reproduces the
model's own forward exactly at the default depth.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.nn import functional

from .. import textchunks, validate
from ..runtime import write_atomic
from .common import describe, is_expert_choice, load_for_eval, model_routing, routing_modes, update_results
from .depth import forward_depth

HIST_BINS = 30


# ---------------------------------------------------------------------- colors
def depth_colors(max_depth: int) -> list[str]:
    """Background color (hex) of depths 0..max_depth: depth 0 (never processed by a
    recursion) light grey, depths 1..max_depth along a light-to-dark yellow-green-blue scale."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["YlGnBu"]
    out = ["#eeeeee"]
    for d in range(1, max_depth + 1):
        t = 0.12 + 0.76 * ((d - 1) / max(1, max_depth - 1))
        out.append(to_hex(cmap(t)))
    return out


def _text_color(bg: str) -> str:
    r, g, b = (int(bg[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "#ffffff" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "#000000"


# ---------------------------------------------------------------------- tokens -> text pieces
def token_pieces(text: str, enc) -> list[str]:
    """The piece of ``text`` each token covers (from the tokenizer's character offsets).
    A token that only continues a character already shown (a multi-byte character split
    over tokens) gets an empty piece; text between tokens is attached to the next token."""
    pieces, cursor = [], 0
    for _start, end in enc.offsets:
        pieces.append(text[cursor:end] if end > cursor else "")
        cursor = max(cursor, end)
    if pieces and cursor < len(text):
        pieces[-1] += text[cursor:]
    return pieces


# ---------------------------------------------------------------------- analysis
@torch.no_grad()
def analyze_text(model, tokenizer, text: str, *, modes: list[str] | None = None, seq_len: int | None = None,
                 max_tokens: int = 2048, extra_depth: int = 2) -> dict[str, Any]:
    """Depths, router scores and depth scaling of ``model`` on ``text`` (module doc).

    Returns a JSON-ready dict; the per-token lists (``token_ids``, ``pieces``, per-mode
    ``depth``) are what the renderers draw."""
    cfg = model.config
    nr = cfg.num_recursions
    device = next(model.parameters()).device
    # only the first max_tokens tokens are encoded (bounded pieces of a long text)
    ids, offsets = textchunks.encode_prefix(tokenizer, text, max_tokens)
    if len(ids) < 2:
        raise ValueError("the text gives fewer than 2 tokens; give a longer --text or --file")
    pieces = token_pieces(text if len(ids) < max_tokens else text[:offsets[-1][1]],
                          SimpleNamespace(offsets=offsets))[:len(ids)]
    seq_len = min(int(seq_len or cfg.max_position_embeddings), cfg.max_position_embeddings)
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    if len(chunks) > 1 and len(chunks[-1]) < 2:  # a 1-token tail predicts nothing: merge it away
        chunks[-2:] = [chunks[-2][:-1], chunks[-2][-1:] + chunks[-1]]
    modes = modes or routing_modes(cfg)
    if cfg.architecture == "vanilla":
        depths_to_try = [1]
    elif cfg.architecture == "mor" and cfg.router_type == "token":
        depths_to_try = list(range(1, nr + 1))
    else:
        depths_to_try = list(range(1, nr + 1 + max(0, extra_depth)))
    out: dict[str, Any] = {
        "model": describe(cfg), "num_recursions": nr, "tokens": len(ids), "seq_len": seq_len,
        "chunks": len(chunks), "token_ids": ids, "pieces": pieces, "modes": {},
    }
    for mode in modes:
        routing = model_routing(mode)
        depth_all: list[int] = []
        rec_scores: dict[int, dict[str, list[float]]] = {}
        for ch in chunks:
            x = torch.tensor([ch], dtype=torch.long, device=device)
            res = forward_depth(model, x, routing=routing, record=True)
            if res.depth is not None:
                depth_all += res.depth[0].tolist()
            for rec in res.records:
                v = rec.valid[0]
                sc, sel = rec.scores[0][v].float().cpu(), rec.selected[0][v].cpu()
                d = rec_scores.setdefault(rec.recursion, {"selected": [], "unselected": []})
                d["selected"] += sc[sel].tolist()
                d["unselected"] += sc[~sel].tolist()
        m: dict[str, Any] = {"routing": routing}
        if depth_all:
            hist = [0] * (max(nr, max(depth_all)) + 1)
            for d in depth_all:
                hist[d] += 1
            m.update(depth=depth_all, depth_histogram=hist, mean_depth=sum(depth_all) / len(depth_all))
        m["router_histograms"] = {
            str(r): {
                **_hist(v["selected"], v["unselected"]),
                "selected_mean": _mean(v["selected"]), "unselected_mean": _mean(v["unselected"]),
                # share of candidates on which the threshold rule (score > 0.5) agrees with the decision
                "threshold_agreement": _agreement(v["selected"], v["unselected"]),
            } for r, v in sorted(rec_scores.items())}
        m["depth_scaling"] = [_scaling_point(model, chunks, routing, d, device) for d in depths_to_try]
        out["modes"][mode] = m
    return out


def _hist(sel: list[float], unsel: list[float]) -> dict[str, list]:
    """Histograms of the selected and unselected scores over shared bins spanning their range."""
    import numpy as np

    both = sel + unsel
    lo, hi = (min(both), max(both)) if both else (0.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.01, hi + 0.01
    edges = np.linspace(lo, hi, HIST_BINS + 1)
    return {"bin_edges": edges.tolist(),
            "selected": np.histogram(sel, bins=edges)[0].tolist(),
            "unselected": np.histogram(unsel, bins=edges)[0].tolist()}


def _mean(vals: list[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None


def _agreement(sel: list[float], unsel: list[float]) -> float | None:
    n = len(sel) + len(unsel)
    return (sum(v > 0.5 for v in sel) + sum(v <= 0.5 for v in unsel)) / n if n else None


def _scaling_point(model, chunks, routing, max_depth, device) -> dict[str, Any]:
    tot, n, dsum = 0.0, 0, 0.0
    for ch in chunks:
        x = torch.tensor([ch], dtype=torch.long, device=device)
        res = forward_depth(model, x, routing=routing, max_depth=max_depth)
        lg = res.logits[0, :-1].float()
        tot += functional.cross_entropy(lg, x[0, 1:], reduction="sum").item()
        n += len(ch) - 1
        if res.depth is not None:
            dsum += res.depth.float().sum().item()
    nll = tot / n
    return {"max_depth": max_depth, "nll": nll, "ppl": math.exp(min(nll, 50.0)),
            "mean_depth": dsum / sum(len(c) for c in chunks) if dsum else None,
            "beyond_trained_depth": max_depth > model.config.num_recursions}


# ---------------------------------------------------------------------- rendering
def render_html(analysis: dict[str, Any], title: str = "Recursion depth per token") -> str:
    """The depth map as a standalone HTML page: one section per routing mode, each token a
    ``<span class="tok" data-pos=... data-depth=...>`` with its depth's background color."""
    nr = analysis["num_recursions"]
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;}"
        ".text{font-family:monospace;white-space:pre-wrap;line-height:1.7;border:1px solid #ccc;padding:1em;}"
        ".tok{border-radius:2px;padding:1px 0;box-shadow:inset -1px 0 #fff;}.legend span{display:inline-block;padding:2px 8px;margin-right:4px;"
        "font-family:monospace;border:1px solid #999;}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(analysis['model'])}; {analysis['tokens']} tokens in {analysis['chunks']} chunk(s) of "
        f"at most {analysis['seq_len']}. Background color = number of recursions the token ran.</p>",
    ]
    for mode, m in analysis["modes"].items():
        if "depth" not in m:
            parts.append(f"<h2>{html.escape(mode)}</h2><p>This model has no recursions: every token has the "
                         "same depth.</p>")
            continue
        depths = m["depth"]
        colors = depth_colors(max(nr, max(depths)))
        parts.append(f"<section class='mode' data-mode='{html.escape(mode)}'>")
        parts.append(f"<h2>routing: {html.escape(mode)} (mean depth {m['mean_depth']:.3f})</h2>")
        legend = "".join(
            f"<span style='background:{colors[d]};color:{_text_color(colors[d])}'>depth {d}: "
            f"{m['depth_histogram'][d] if d < len(m['depth_histogram']) else 0}</span>"
            for d in range(len(colors)) if d > 0 or m["depth_histogram"][0])
        parts.append(f"<p class='legend'>{legend}</p><div class='text'>")
        for i, (piece, d) in enumerate(zip(analysis["pieces"], depths)):
            shown = html.escape(piece).replace("\n", "\u21b5\n")
            parts.append(f"<span class='tok' data-pos='{i}' data-depth='{d}' title='token {i}: depth {d}' "
                         f"style='background:{colors[d]};color:{_text_color(colors[d])}'>{shown}</span>")
        parts.append("</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110)


def render_depth_png(analysis: dict[str, Any], mode: str, path: Path, max_tokens: int = 1200,
                     fontsize: float = 9.0, width_in: float = 11.0) -> None:
    """The depth map as an image: tokens laid out as monospace text on colored boxes
    (the first ``max_tokens`` tokens)."""
    from matplotlib.patches import Patch, Rectangle

    # one x unit = the advance of one monospace character (DejaVu Sans Mono: 0.602 em)
    ax_width_in = 0.98 * width_in
    xmax = ax_width_in * 72 / (0.602 * fontsize)
    width_chars = int(xmax) - 1
    m = analysis["modes"][mode]
    nr = analysis["num_recursions"]
    depths = m["depth"][:max_tokens]
    colors = depth_colors(max(nr, max(m["depth"])))
    lines: list[list[tuple[str, int]]] = [[]]
    col = 0
    for piece, d in zip(analysis["pieces"], depths):
        segs = piece.split("\n")
        for j, seg in enumerate(segs):
            if j > 0:
                lines[-1].append(("\u21b5", d))
                lines.append([])
                col = 0
            if col + len(seg) > width_chars and col > 0:
                lines.append([])
                col = 0
            lines[-1].append((seg, d))
            col += len(seg)
    n_lines = len(lines)
    height = 0.8 + 0.24 * n_lines
    fig = _figure(width_in, height)
    ax = fig.add_axes((0.01, 0.0, 0.98, 1.0 - 0.5 / height))
    ax.set_xlim(0, xmax)
    ax.set_ylim(n_lines, -0.2)
    ax.axis("off")
    for y, line in enumerate(lines):
        x = 0
        for seg, d in line:
            if seg:
                ax.add_patch(Rectangle((x, y + 0.05), len(seg), 0.9, facecolor=colors[d], edgecolor="white",
                                       linewidth=0.6))
                ax.text(x, y + 0.5, seg, family="DejaVu Sans Mono", fontsize=fontsize, va="center", ha="left",
                        color=_text_color(colors[d]))
            x += len(seg)
    handles = [Patch(facecolor=colors[d], edgecolor="#999", label=f"depth {d}") for d in range(1, len(colors))]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.savefig(path)


def render_depth_histogram(analysis: dict[str, Any], path: Path) -> None:
    modes = [k for k, m in analysis["modes"].items() if "depth_histogram" in m]
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(modes))
    for j, mode in enumerate(modes):
        h = analysis["modes"][mode]["depth_histogram"]
        ax.bar([d + (j - (len(modes) - 1) / 2) * width for d in range(len(h))], h, width=width, label=mode)
    ax.set_xlabel("recursion depth")
    ax.set_ylabel("tokens")
    ax.set_title("Tokens per recursion depth")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def render_router_histograms(analysis: dict[str, Any], mode: str, path: Path) -> None:
    hs = analysis["modes"][mode]["router_histograms"]
    n = max(1, len(hs))
    fig = _figure(3.2 * n, 3.0)
    for j, (r, h) in enumerate(hs.items()):
        ax = fig.add_subplot(1, n, j + 1)
        edges = h["bin_edges"]
        centers = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        w = edges[1] - edges[0]
        ax.bar(centers, h["unselected"], width=w, alpha=0.6, label="unselected", color="#d95f02")
        ax.bar(centers, h["selected"], width=w, alpha=0.6, label="selected", color="#1b9e77")
        if edges[0] <= 0.5 <= edges[-1]:
            ax.axvline(0.5, color="k", lw=0.8, ls="--")
        ax.set_title(f"recursion {r}")
        ax.set_xlabel("router score")
        if j == 0:
            ax.set_ylabel("tokens")
            ax.legend(fontsize=7)
    fig.suptitle(f"Router scores, selected vs unselected ({mode})")
    fig.tight_layout()
    fig.savefig(path)


def render_depth_scaling(analysis: dict[str, Any], path: Path) -> None:
    fig = _figure(6, 3.5)
    ax = fig.add_subplot()
    for mode, m in analysis["modes"].items():
        pts = m["depth_scaling"]
        ax.plot([p["max_depth"] for p in pts], [p["nll"] for p in pts], marker="o", label=mode)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axvline(analysis["num_recursions"], color="k", lw=0.8, ls="--", label="trained N_r")
    ax.set_xlabel("maximum recursion depth")
    ax.set_ylabel("NLL (nats/token)")
    ax.set_title("Test-time depth scaling")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def write_outputs(analysis: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write the HTML, PNGs and analysis.json into ``out_dir``; returns name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    p = out_dir / "depth.html"
    write_atomic(p, render_html(analysis))
    files["depth_html"] = str(p)
    has_depth = [k for k, m in analysis["modes"].items() if "depth" in m]
    for mode in has_depth:
        p = out_dir / f"depth_{mode}.png"
        render_depth_png(analysis, mode, p)
        files[f"depth_png_{mode}"] = str(p)
    if has_depth:
        p = out_dir / "depth_histogram.png"
        render_depth_histogram(analysis, p)
        files["depth_histogram_png"] = str(p)
    for mode, m in analysis["modes"].items():
        if m["router_histograms"]:
            p = out_dir / f"router_histograms_{mode}.png"
            render_router_histograms(analysis, mode, p)
            files[f"router_histograms_png_{mode}"] = str(p)
    p = out_dir / "depth_scaling.png"
    render_depth_scaling(analysis, p)
    files["depth_scaling_png"] = str(p)
    p = out_dir / "analysis.json"
    write_atomic(p, json.dumps({**analysis, "files": files}, indent=1) + "\n")
    files["analysis_json"] = str(p)
    return files


def summary(analysis: dict[str, Any]) -> dict[str, Any]:
    """The numbers without the per-token lists (for results.json and stdout)."""
    s = {k: v for k, v in analysis.items() if k not in ("token_ids", "pieces", "modes")}
    s["modes"] = {}
    for mode, m in analysis["modes"].items():
        s["modes"][mode] = {
            "mean_depth": m.get("mean_depth"), "depth_histogram": m.get("depth_histogram"),
            "depth_scaling": [{"max_depth": p["max_depth"], "nll": p["nll"]} for p in m["depth_scaling"]],
            "router": {r: {k: h[k] for k in ("selected_mean", "unselected_mean", "threshold_agreement")}
                       for r, h in m["router_histograms"].items()},
        }
    return s


# ---------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", type=validate.text_arg, help="the text to analyse")
    src.add_argument("--file", help="a UTF-8 text file to analyse")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint>/analysis)")
    p.add_argument("--routing", default="both", choices=("both", "topk", "threshold"),
                   help="expert-choice routing rule(s) to analyse (default both)")
    p.add_argument("--seq-len", type=validate.positive_int, default=None,
                   help="tokens per forward pass (default: the model's max_position_embeddings)")
    p.add_argument("--max-tokens", type=validate.positive_int, default=2048, help="analyse at most this many tokens (default 2048)")
    p.add_argument("--extra-depth", type=validate.nonneg_int, default=2,
                   help="depth scaling: extra passes beyond N_r to try (default 2; not for token-choice)")
    p.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--no-save", action="store_true", help="do not merge the summary into results.json")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..cli import CLIError

    model, tok, ckpt_dir = load_for_eval(args.checkpoint, device=args.device)
    if args.file is not None:
        f = Path(args.file)
        if not f.is_file():
            raise FileNotFoundError(f"--file {f} not found")
        text = textchunks.read_text_prefix(f, tok, args.max_tokens)  # never more of the file than needed
    else:
        text = args.text
    modes = routing_modes(model.config)
    if args.routing != "both" and is_expert_choice(model.config):
        modes = [args.routing]
    t0 = time.time()
    try:
        analysis = analyze_text(model, tok, text, modes=modes, seq_len=args.seq_len, max_tokens=args.max_tokens,
                                extra_depth=args.extra_depth)
    except ValueError as e:
        raise CLIError(str(e)) from None
    out_dir = Path(args.out) if args.out else Path(ckpt_dir) / "analysis"
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"--out {out_dir} is an existing file; give a folder for the analysis files")
    files = write_outputs(analysis, out_dir)
    summ = {**summary(analysis), "files": files, "seconds": round(time.time() - t0, 2),
            "checkpoint": str(ckpt_dir)}
    if not args.no_save:
        summ["results_json"] = str(update_results(ckpt_dir, {"analysis": summ}))
    print(f"analysed {analysis['tokens']} tokens with {analysis['model']} -> {out_dir}")
    for mode, m in summ["modes"].items():
        sc = ", ".join(f"d{p['max_depth']}={p['nll']:.3f}" for p in m["depth_scaling"])
        md = f"mean depth {m['mean_depth']:.3f}, histogram {m['depth_histogram']}" if m["mean_depth"] is not None \
            else "no recursions"
        print(f"  [{mode}] {md}; NLL by max depth: {sc}")
    return summ
