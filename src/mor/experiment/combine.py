"""Seed replicates: ``mor experiment combine DIR DIR ...``.

At small scale the seed (initialisation and batch order) moves a model's NLL by as much as
the differences being measured, so one run decides little. Replicates are the same
``isoflop`` command with ``--set seed=N`` and their own ``--out``; :func:`combine_report`
reads their ``results.json``, checks that they trained the same plan with different seeds,
and reports each model's NLL per seed with mean and standard deviation, and the paper's
comparisons as paired differences within each seed, with how many seeds agree with the sign
of the paper's Table 3 difference.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from ..recipe import read_recipe_file
from ..runtime import read_json, write_atomic, write_json
from .plan import ExperimentError
from .plots import combined_plot
from .records import RECORD
from .report import PAPER_TABLE3, fmt_flops, fmt_num, fmt_params

#: Paired comparisons checked across replicates (A, B): "A - B" in validation NLL, per seed; the paper's
#: difference comes from PAPER_TABLE3 where it has both models.
COMPARISONS = (
    ("mor-expert-nr2", "vanilla", "MoR expert N_r=2 vs vanilla (equal FLOPs, 0.6x params)"),
    ("mor-expert-nr3", "vanilla", "MoR expert N_r=3 vs vanilla (equal FLOPs, 0.5x params)"),
    ("mor-token-nr3", "vanilla", "MoR token N_r=3 vs vanilla"),
    ("mor-expert-kvshare-nr3", "vanilla", "MoR expert N_r=3, KV sharing vs vanilla"),
    ("recursive-nr2", "vanilla", "recursive N_r=2 vs vanilla"),
    ("recursive-nr3", "vanilla", "recursive N_r=3 vs vanilla"),
    ("mor-expert-nr2", "recursive-nr2", "MoR expert vs recursive, N_r=2 (same unique params)"),
    ("mor-expert-nr3", "recursive-nr3", "MoR expert vs recursive, N_r=3 (same unique params)"),
    ("mor-expert-nr3", "mor-token-nr3", "expert-choice vs token-choice, N_r=3"),
    ("mor-expert-kvshare-nr3", "mor-expert-nr3", "KV sharing vs recursion-wise KV, N_r=3"),
    ("mor-expert-nr2", "mor-expert-nr3", "MoR expert N_r=2 vs N_r=3"),
    ("mor-expert-nr3", "mor-expert-cycle-nr2",
     "Middle-Cycle N_r=3 vs Cycle N_r=2 (same unique params)"),
)


def _replicate_seed(row: dict, source: Path) -> int:
    """The seed a finished model was trained with, from its recorded recipe: in SOURCE/<key>
    when SOURCE is the experiment directory, else where results.json says the run was (a path
    relative to the directory the experiment ran from)."""
    dirs = ([source / row["key"]] if source.is_dir() else []) + [Path(row["run_dir"])]
    for run_dir in dirs:
        rec = read_json(run_dir / RECORD)
        if rec and rec.get("recipe") is not None:
            return int(rec["recipe"].get("seed", 0))
        if (run_dir / "recipe.yaml").is_file():
            return int(read_recipe_file(run_dir / "recipe.yaml").get("seed", 0))
    raise ExperimentError(f"{source}: model {row['key']} has no record or recipe.yaml in "
                          f"{' or '.join(map(str, dirs))}; cannot tell its seed")


def load_replicates(dirs: list[str]) -> list[dict]:
    """Read the results.json of every experiment directory and check that they are replicates:
    the same models, the same planned FLOPs and unique parameters, different seeds."""
    if len(dirs) < 2:
        raise ExperimentError(f"combine needs at least two experiment directories (got {len(dirs)})")
    reps = []
    for d in dirs:
        f = Path(d) / "results.json"
        if not f.is_file():
            f = Path(d)
        res = read_json(f) if f.is_file() else None
        if not res or "rows" not in res:
            raise ExperimentError(f"{d}: no results.json from `mor experiment isoflop` (run it, or "
                                  "`--report-only` to rebuild the report)")
        rows = {r["key"]: r for r in res["rows"] if r.get("status") == "done" and r.get("nll") is not None}
        if not rows:
            raise ExperimentError(f"{d}: no finished model in {f}")
        seeds = {_replicate_seed(r, Path(d)) for r in rows.values()}
        if len(seeds) != 1:
            raise ExperimentError(f"{d}: models were trained with different seeds {sorted(seeds)}")
        reps.append({"dir": str(d), "seed": seeds.pop(), "rows": rows,
                     "command": (res.get("experiment") or {}).get("command")})
    by_seed: dict[int, str] = {}
    for rep in reps:
        if rep["seed"] in by_seed:
            raise ExperimentError(f"{rep['dir']} and {by_seed[rep['seed']]} both used seed {rep['seed']}: "
                                  "they are not independent replicates (rerun with --set seed=N)")
        by_seed[rep["seed"]] = rep["dir"]
    common = set(reps[0]["rows"]).intersection(*(set(r["rows"]) for r in reps[1:]))
    if not common:
        raise ExperimentError("the experiment directories share no finished model: "
                              + "; ".join(f"{r['dir']}: {sorted(r['rows'])}" for r in reps))
    for key in sorted(common):
        ref = reps[0]["rows"][key]
        for rep in reps[1:]:
            r = rep["rows"][key]
            for field in ("planned_flops", "planned_unique_params", "tokens"):
                a, b = ref.get(field), r.get(field)
                if a is None or b is None or not math.isclose(a, b, rel_tol=1e-9):
                    raise ExperimentError(f"{key}: {field} differs between {reps[0]['dir']} ({a}) and "
                                          f"{rep['dir']} ({b}); replicates must train the same plan")
    for rep in reps:
        rep["rows"] = {k: v for k, v in rep["rows"].items() if k in common}
    return sorted(reps, key=lambda r: r["seed"])


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def combine_replicates(reps: list[dict]) -> dict:
    """Per-model mean and spread over seeds, and the paired comparisons (same seed, same data order)."""
    keys = list(reps[0]["rows"])  # the first replicate's table order
    seeds = [r["seed"] for r in reps]
    models = []
    for k in keys:
        base = reps[0]["rows"][k]
        nll = [r["rows"][k]["nll"] for r in reps]
        cn = [r["rows"][k].get("causal_nll") for r in reps]
        sp = [r["rows"][k].get("infer_speedup") for r in reps]
        m, s = _mean_std(nll)
        models.append({
            "key": k, "name": base["name"], "model": base["model"], "kind": base["kind"],
            "num_recursions": base.get("num_recursions"), "sharing": base.get("sharing"),
            "kv_mode": base.get("kv_mode"), "shape": base["shape"], "budget": base["budget"],
            "unique_params": base["unique_params"], "flops": base["flops"], "tokens": base["tokens"],
            "nll_by_seed": dict(zip(map(str, seeds), nll)), "nll_mean": m, "nll_std": s,
            "causal_nll_mean": _mean_std(cn)[0] if all(c is not None for c in cn) else None,
            "infer_speedup_mean": _mean_std(sp)[0] if all(x is not None for x in sp) else None,
        })
    comparisons = []
    groups = sorted({k.rsplit("/", 1)[0] for k in keys})
    for g in groups:
        for a, b, label in COMPARISONS:
            ka, kb = f"{g}/{a}", f"{g}/{b}"
            if ka not in keys or kb not in keys:
                continue
            d = [r["rows"][ka]["nll"] - r["rows"][kb]["nll"] for r in reps]
            m, s = _mean_std(d)
            paper = (PAPER_TABLE3[a][2] - PAPER_TABLE3[b][2]) if a in PAPER_TABLE3 and b in PAPER_TABLE3 else None
            first_better = sum(x < 0 for x in d)
            agree = None if paper is None else sum((x < 0) == (paper < 0) for x in d)
            comparisons.append({"group": g, "a": a, "b": b, "label": label, "diff_by_seed": dict(zip(map(str, seeds), d)),
                                "diff_mean": m, "diff_std": s, "a_better": first_better, "paper_diff": paper,
                                "seeds_agreeing_with_paper": agree, "n": len(d)})
    return {"seeds": seeds, "dirs": [r["dir"] for r in reps], "commands": [r["command"] for r in reps],
            "models": models, "comparisons": comparisons}


def _verdict(c: dict) -> str:
    n = c["n"]
    if c["paper_diff"] is None:
        return f"first better in {c['a_better']}/{n}"
    k = c["seeds_agreeing_with_paper"]
    return f"holds ({k}/{n})" if k == n else (f"reversed (0/{n})" if k == 0 else f"mixed ({k}/{n})")


def combined_markdown(res: dict) -> str:
    seeds = res["seeds"]
    n = len(seeds)
    md = [f"# isoFLOP comparison over {n} seeds ({', '.join(map(str, seeds))})\n",
          "Replicates (one `mor experiment isoflop` run each; same plan, different `seed`, which changes the "
          "initialisation and the order of training batches):\n"]
    md += [f"- seed {s}: `{(c or '?').strip()}` ({d})" for s, c, d in zip(seeds, res["commands"], res["dirs"])]
    md.append("\nValidation NLL per seed, mean and sample standard deviation over seeds:\n")
    head = ["model", "N_r", "unique params", "FLOPs", "tokens"] + [f"seed {s}" for s in seeds] + [
        "mean", "std", "causal NLL (mean)"]
    if any(m["infer_speedup_mean"] is not None for m in res["models"]):
        head.append("decode speed-up (mean)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = min(m["nll_mean"] for m in res["models"])
    for m in res["models"]:
        mean = f"{m['nll_mean']:.4f}"
        cells = [m["model"],
                 "-" if m["num_recursions"] is None else str(m["num_recursions"]), fmt_params(m["unique_params"]),
                 fmt_flops(m["flops"]), fmt_num(m["tokens"])]
        cells += [f"{m['nll_by_seed'][str(s)]:.4f}" for s in seeds]
        cells += [f"**{mean}**" if m["nll_mean"] == best else mean, f"{m['nll_std']:.4f}",
                  "-" if m["causal_nll_mean"] is None else f"{m['causal_nll_mean']:.4f}"]
        if "decode speed-up (mean)" in head:
            cells.append("-" if m["infer_speedup_mean"] is None else f"{m['infer_speedup_mean']:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    md.append("\n".join(lines) + "\n")
    md.append("Paired comparisons: NLL(first) - NLL(second) within each seed (negative: the first model is "
              "better). Paper: the same difference in Table 3 (360M, 16.5e18 FLOPs). Verdict: in how many "
              "seeds the sign agrees with the paper's.\n")
    head = ["comparison", "paper"] + [f"seed {s}" for s in seeds] + ["mean", "std", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    multi = len({c["group"] for c in res["comparisons"]}) > 1
    for c in res["comparisons"]:
        cells = [(f"{c['group']}: " if multi else "") + c["label"],
                 "-" if c["paper_diff"] is None else f"{c['paper_diff']:+.4f}"]
        cells += [f"{c['diff_by_seed'][str(s)]:+.4f}" for s in seeds]
        cells += [f"{c['diff_mean']:+.4f}", f"{c['diff_std']:.4f}", _verdict(c)]
        lines.append("| " + " | ".join(cells) + " |")
    md.append("\n".join(lines) + "\n")
    return "\n".join(md)


def combine_report(dirs: list[str], report_dir: str | None = None) -> dict:
    """Combine the replicates in ``dirs`` into ``results.md``/``results.json``/``seeds.png`` in
    ``report_dir`` (default: the first directory + ``-seeds``); returns the CLI summary."""
    reps = load_replicates(list(dirs))
    res = combine_replicates(reps)
    report_dir = Path(report_dir or (str(Path(dirs[0])).rstrip("/") + "-seeds"))
    report_dir.mkdir(parents=True, exist_ok=True)
    plot = combined_plot(res, report_dir)
    md = combined_markdown(res) + f"\n![seeds]({plot})\n"
    res["plots"] = [plot]
    write_json(report_dir / "results.json", res)
    write_atomic(report_dir / "results.md", md)
    print(md)
    print(f"[experiment] combined report: {report_dir / 'results.md'}", file=sys.stderr)
    return {"experiment": "combine", "report": str(report_dir / "results.md"), "seeds": res["seeds"],
            "models": {m["key"]: {"nll_mean": m["nll_mean"], "nll_std": m["nll_std"]} for m in res["models"]},
            "comparisons": [{k: c[k] for k in ("a", "b", "diff_mean", "diff_std", "a_better", "paper_diff",
                                                "seeds_agreeing_with_paper")} for c in res["comparisons"]]}


