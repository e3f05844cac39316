"""The experiment's report: ``results.md`` (the paper's Table 3 layout), ``results.json`` and plots.

NLL is the trainer's final validation loss (top-k routing, as the paper reports it); causal
NLL is the whole validation split under the causal routing rule (threshold rule for
expert-choice; the same forward otherwise); FLOPs are paper counting (SPEC section 6).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch

from ..runtime import write_atomic, write_json
from .plan import Run
from .plots import make_plots
from .records import read_record

#: The paper's Table 3 (360M shape, 16.5e18 FLOPs; SPEC.md section 8): name -> (unique params, tokens,
#: validation NLL, average few-shot accuracy)
PAPER_TABLE3 = {
    "vanilla": (315e6, 20e9, 2.7824, 42.3),
    "recursive-nr2": (167e6, 20e9, 2.8079, 42.6),
    "recursive-nr3": (118e6, 20e9, 2.8466, 41.5),
    "mor-expert-nr2": (167e6, 27e9, 2.7511, 43.1),
    "mor-expert-nr3": (118e6, 30e9, 2.7925, 42.6),
    "mor-token-nr3": (118e6, 30e9, 2.9163, 40.0),
    "mor-expert-kvshare-nr3": (118e6, 31e9, 2.7983, 41.9),
}


def result_row(run: Run, rec: dict) -> dict:
    """One row of the results table."""
    s = rec.get("summary") or {}
    a = rec.get("analysis") or {}
    fs = (a.get("fewshot") or {}).get("table") or {}
    acc = None
    if isinstance(fs, dict) and fs:  # mor.eval.fewshot.paper_table: columns in percent and "Avg"
        acc = fs.get("Avg")
        if acc is None:  # a subset of the tasks: the mean of the columns that ran
            have = [v for k, v in fs.items() if k != "Avg" and isinstance(v, (int, float))]
            acc = sum(have) / len(have) if have else None
    row = {
        "key": run.key, "name": run.variant.name, "model": run.variant.label, "kind": run.variant.kind,
        "shape": run.shape.name, "budget": run.budget,
        "num_recursions": run.variant.num_recursions if run.variant.kind != "vanilla" else None,
        "sharing": run.variant.sharing if run.variant.kind != "vanilla" else None,
        "kv_mode": run.variant.kv_mode if run.variant.is_mor else None,
        "status": rec.get("status", "missing"), "error": rec.get("error"),
        "planned_steps": run.steps, "planned_flops": run.flops, "planned_unique_params": run.unique_params,
        "unique_params": s.get("unique_params"), "steps": s.get("steps"), "tokens": s.get("tokens"),
        "flops": s.get("flops"), "flops_error": (s["flops"] / run.budget - 1.0) if s.get("flops") else None,
        "nll": s.get("val_loss"), "causal_nll": a.get("causal_nll"), "causal_routing": a.get("causal_routing"),
        "depth_scaling": a.get("depth_scaling"), "accuracy": acc, "fewshot": fs or None,
        "tok_per_s_train": s.get("tok_per_s"), "mfu": s.get("mfu"), "train_wall_s": s.get("wall_s"),
        "wall_s": rec.get("wall_s"), "cpu_s": rec.get("cpu_s"), "segments": len(rec.get("segments") or []),
        "started_at": (rec.get("segments") or [{}])[0].get("start"), "finished_at": rec.get("finished_at"),
        "infer_tok_per_s": (a.get("throughput") or {}).get("tok_per_s"),
        "infer_speedup": (a.get("throughput") or {}).get("speedup"),
        "infer_vanilla_tok_per_s": (a.get("throughput") or {}).get("vanilla_tok_per_s"),
        "checkpoint": s.get("checkpoint"), "run_dir": str(run.run_dir),
    }
    return row


def fmt_params(n: float | None) -> str:
    return "-" if n is None else (f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}B")


def fmt_num(x: float | None) -> str:
    """Token counts: 1.23M, 20.00B."""
    if x is None:
        return "-"
    for div, suf in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suf}"
    return f"{x:g}"


def fmt_wall(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def fmt_flops(x: float | None) -> str:
    return "-" if x is None else f"{x:.3e}"


def markdown_table(rows: list[dict]) -> str:
    """The results in the paper's Table 3 layout (plus the causal NLL and wall-clock)."""
    multi_shape = len({r["shape"] for r in rows}) > 1
    multi_budget = len({r["budget"] for r in rows}) > 1
    best = {}
    for r in rows:
        grp = (r["shape"], r["budget"])
        if r["nll"] is not None and (grp not in best or r["nll"] < best[grp]):
            best[grp] = r["nll"]
    head = (["shape"] if multi_shape else []) + (["budget"] if multi_budget else []) + [
        "model", "N_r", "unique params", "FLOPs", "FLOPs vs budget", "tokens", "NLL", "causal NLL",
        "accuracy", "wall-clock"] + (["CPU time"] if any(r.get("cpu_s") for r in rows) else []) + (
        ["decode speed-up"] if any(r.get("infer_speedup") for r in rows) else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        nll = "-" if r["nll"] is None else f"{r['nll']:.4f}"
        if r["nll"] is not None and r["nll"] == best.get((r["shape"], r["budget"])):
            nll = f"**{nll}**"
        if r["status"] != "done":
            nll = f"({r['status']})"
        cells = ([r["shape"]] if multi_shape else []) + ([f"{r['budget']:.3g}"] if multi_budget else []) + [
            r["model"], "-" if r["num_recursions"] is None else str(r["num_recursions"]),
            fmt_params(r["unique_params"]), fmt_flops(r["flops"]),
            "-" if r["flops_error"] is None else f"{100 * r['flops_error']:+.2f}%",
            fmt_num(r["tokens"]), nll,
            "-" if r["causal_nll"] is None else f"{r['causal_nll']:.4f}",
            "-" if r["accuracy"] is None else f"{r['accuracy']:.1f}",
            fmt_wall(r["wall_s"])]
        if "CPU time" in head:
            cells.append(fmt_wall(r.get("cpu_s")))
        if "decode speed-up" in head:
            cells.append("-" if r.get("infer_speedup") is None else f"{r['infer_speedup']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paper_table(rows: list[dict]) -> str:
    """This run next to the paper's Table 3, as differences from vanilla (the scale-free comparison)."""
    out = []
    for grp in sorted({(r["shape"], r["budget"]) for r in rows}):
        g = {r["name"]: r for r in rows if (r["shape"], r["budget"]) == grp and r["status"] == "done"}
        if "vanilla" not in g or not any(n in PAPER_TABLE3 for n in g if n != "vanilla"):
            continue
        v, pv = g["vanilla"], PAPER_TABLE3["vanilla"]
        head = ["model", "params / vanilla (ours, paper)", "tokens / vanilla (ours, paper)",
                "NLL - vanilla NLL (ours)", "(paper)", "same sign"]
        lines = [f"\n{grp[0]} @ {grp[1]:.3g} FLOPs vs the paper's Table 3 (360M @ 16.5e18), relative to each "
                 "one's vanilla model:\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, p in PAPER_TABLE3.items():
            if name == "vanilla" or name not in g:
                continue
            r = g[name]
            d, dp = r["nll"] - v["nll"], p[2] - pv[2]
            lines.append(f"| {r['model']}, N_r={r['num_recursions']} | {r['unique_params'] / v['unique_params']:.2f}, "
                         f"{p[0] / pv[0]:.2f} | {r['tokens'] / v['tokens']:.2f}, {p[1] / pv[1]:.2f} | {d:+.4f} | "
                         f"{dp:+.4f} | {'yes' if (d < 0) == (dp < 0) else 'no'} |")
        out.append("\n".join(lines) + "\n")
    return "".join(out)


def depth_table(rows: list[dict]) -> str:
    rows = [r for r in rows if r.get("depth_scaling")]
    if not rows:
        return ""
    depths = sorted({int(d) for r in rows for d in r["depth_scaling"]})
    head = ["model", "N_r"] + [f"depth {d}" for d in depths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r["num_recursions"])]
        for d in depths:
            v = r["depth_scaling"].get(str(d))
            mark = "" if v is None or d <= r["num_recursions"] else " (+1)"
            cells.append("-" if v is None else f"{v:.4f}{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def _wall_line(header: dict, rows: list[dict]) -> str:
    """Wall-clock: the models' own times summed, and the span of the invocations that did the work."""
    inv = [i for i in header.get("invocations", []) if i.get("end")]
    span = sum(i["end"] - i["start"] for i in inv)
    trained = sum(r["wall_s"] or 0 for r in rows)
    starts = [r["started_at"] for r in rows if r.get("started_at")]
    ends = [r["finished_at"] for r in rows if r.get("finished_at")]
    first_last = (max(ends) - min(starts)) if starts and ends else None
    return (f"Wall-clock: the models' training runs (including checkpoints, final validation and any time lost "
            f"to interruptions up to the last checkpoint): {trained / 60:.1f} min in total"
            + (f"; first model started to last model finished: {first_last / 60:.1f} min" if first_last else "")
            + (f"; recorded invocations (training, evaluation, throughput, report): {span / 60:.1f} min over "
               f"{len(inv)}" if inv else "") + ".\n")


def write_report(runs: list[Run], report_dir: Path, header: dict, notes: set[str]) -> dict:
    """results.json, results.md and the plots, from the runs' records."""
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = [result_row(r, read_record(r)) for r in runs]
    for r in rows:  # vanilla's throughput: the median of its paired measurements against each MoR model
        if r["kind"] == "vanilla" and r["infer_tok_per_s"] is None:
            vals = [x["infer_vanilla_tok_per_s"] for x in rows if x["shape"] == r["shape"]
                    and x["budget"] == r["budget"] and x.get("infer_vanilla_tok_per_s")]
            if vals:
                r["infer_tok_per_s"], r["infer_speedup"] = float(np.median(vals)), 1.0
    plots = make_plots(rows, report_dir)
    result = {"experiment": header, "rows": rows, "plots": plots, "notes": sorted(notes)}
    write_json(report_dir / "results.json", result)
    md = [f"# isoFLOP comparison: {', '.join(header['shapes'])} at "
          f"{', '.join(f'{b:.3g}' for b in header['budgets'])} FLOPs\n",
          f"Command: `{header['command']}`\n",
          f"Machine: {header['machine'].get('cpu', '?')}, {header['machine']['cpu_count']} CPU cores"
          + (f", {header['machine']['gpu']}" if header['machine'].get('gpu') else "")
          + f"; torch {header['machine']['torch']}. Corpus: {header['data']}.\n",
          _wall_line(header, rows),
          "NLL: the trainer's final validation loss (top-k routing, as the paper reports it). Causal NLL: the "
          "whole validation split with the causal routing rule (threshold rule for expert-choice; the same "
          "model forward otherwise). FLOPs: paper counting (SPEC section 6). Unique params: non-embedding, "
          "shared tensors once, routers excluded.\n",
          markdown_table(rows)]
    pt = paper_table(rows)
    if pt:
        md.append(pt)
    dt = depth_table(rows)
    if dt:
        md += ["\nValidation NLL with the recursion depth capped (or extended by one extra pass of the last "
               "recursion, marked +1) at test time:\n", dt]
    if plots:
        md.append("\n" + "\n".join(f"![{p[:-4]}]({p})" for p in plots) + "\n")
    if notes:
        md.append("\nNotes:\n" + "\n".join(f"- {n}" for n in sorted(notes)) + "\n")
    write_atomic(report_dir / "results.md", "\n".join(md))
    return result


