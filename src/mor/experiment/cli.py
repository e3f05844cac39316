"""``mor experiment isoflop`` and ``mor experiment combine``: the command lines (see the package doc)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from ..runlock import RunLock
from ..runtime import read_json, write_json
from ..variants import parse_variants
from .combine import combine_report
from .evaluation import EvalOptions, analyze_run, measure_throughput
from .plan import DEFAULT_MODELS, DEFAULT_NR, ExperimentError, Run, build_runs, check_tolerance, ensure_data
from .records import read_record, train_run
from .report import fmt_num, fmt_params, machine_info, markdown_table, write_report

LOG = "experiment.json"  # the experiment's own record of invocations, in OUT


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import __doc__ as doc

    sub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    sp = sub.add_parser("isoflop", help="train every model to the same FLOPs budget and compare",
                        description=doc.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("--shapes", default="micro",
                    help="comma list: micro, tiny, 135m, 360m or a base-recipe YAML (default micro)")
    sp.add_argument("--budget", default=None,
                    help="FLOPs budget(s), comma list (default: the shape's recipe, e.g. micro's flops_budget)")
    sp.add_argument("--models", default=DEFAULT_MODELS, help=f"model variants (default {DEFAULT_MODELS})")
    sp.add_argument("--nr", default=DEFAULT_NR, help="N_r values for variants without one (default 2,3)")
    sp.add_argument("--kv", default="recursion_wise", help="KV modes for MoR kinds: recursion_wise,shared")
    sp.add_argument("--sharing", default="middle_cycle", help="sharing schemes for recursive/MoR kinds")
    sp.add_argument("--out", default=None, help="experiment directory (default runs/experiment-<shapes>)")
    sp.add_argument("--data", default=None, help="a prepared corpus (mor prepare output) to use as is")
    sp.add_argument("--corpus", nargs="+", default=["shakespeare"],
                    help="sources prepared into OUT/data when --data is not given (default shakespeare)")
    sp.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary when preparing --corpus")
    sp.add_argument("--val-fraction", type=float, default=0.005, help="validation share when preparing --corpus")
    sp.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="recipe overrides for every model (dotted for the model section)")
    sp.add_argument("--tolerance", type=float, default=0.02,
                    help="largest allowed |FLOPs / budget - 1| after rounding to whole steps (default 0.02)")
    sp.add_argument("--report-dir", default=None, help="where results.md/json and plots go (default OUT)")
    sp.add_argument("--plan", action="store_true", help="print the plan (steps, tokens, FLOPs, params) and stop")
    sp.add_argument("--report-only", action="store_true", help="train nothing; rebuild the report from records")
    sp.add_argument("--no-analysis", action="store_true",
                    help="skip the post-training evaluation (causal NLL, depth scaling, few-shot, throughput)")
    sp.add_argument("--fewshot", action="store_true", help="also run the paper's 0-shot tasks (needs lm-eval)")
    sp.add_argument("--fewshot-tasks", default="paper", help="tasks for --fewshot (default: the paper's six)")
    sp.add_argument("--fewshot-limit", type=float, default=None, help="examples per task for --fewshot")
    sp.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True,
                    help="measure generation throughput with mor.bench.infer (default on)")
    sp.add_argument("--bench-set", nargs="+", default=[], metavar="KEY=VALUE", dest="bench_overrides",
                    help="settings of the throughput benchmark (mor.bench.infer.InferBench fields), e.g. batch=16")
    sp.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="trainer progress bars (default: when stderr is a terminal)")
    cp = sub.add_parser("combine", help="combine isoflop runs that differ only in seed: mean, spread, paired "
                        "comparisons", description="Combine replicates of `mor experiment isoflop` (the same plan "
                        "run with different --set seed=N) into one report: NLL per seed, mean and standard "
                        "deviation per model, and the paper's comparisons as paired differences within each "
                        "seed, with how many seeds agree with the paper's sign.")
    cp.add_argument("dirs", nargs="+", metavar="DIR", help="experiment directories (or their results.json)")
    cp.add_argument("--report-dir", default=None, help="where results.md/json and seeds.png go "
                    "(default: the first DIR + '-seeds')")


def print_plan(runs: list[Run], corpus_tokens: int | None) -> None:
    print(f"{'model':40s} {'params':>9s} {'steps':>7s} {'tokens':>10s} {'FLOPs':>11s} {'vs budget':>9s}"
          + ("  epochs" if corpus_tokens else ""))
    for r in runs:
        epochs = f"  {r.tokens / corpus_tokens:6.2f}" if corpus_tokens else ""
        print(f"{r.key:40s} {fmt_params(r.unique_params):>9s} {r.steps:7d} {fmt_num(r.tokens):>10s} "
              f"{r.flops:11.4e} {100 * r.flops_error:+8.3f}%{epochs}")


def command_line(args: argparse.Namespace) -> str:
    """The ``mor experiment isoflop`` command that reproduces ``args``: the options whose value
    differs from the parser's default (found by parsing a bare ``isoflop``)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args(["isoflop"]))
    words = ["mor experiment isoflop"]
    skip = {"experiment", "plan", "report_only", "no_analysis", "progress"}
    for key, default in defaults.items():
        value = getattr(args, key, default)
        if key in skip or value == default:
            continue
        flag = "--" + {"overrides": "set", "bench_overrides": "bench-set"}.get(key, key).replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, list):
            words += [flag, *(shlex.quote(str(v)) for v in value)]
        else:
            words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def run(args: argparse.Namespace) -> dict:
    if args.experiment == "combine":
        return combine_report(list(args.dirs), args.report_dir)
    if args.experiment != "isoflop":
        raise ExperimentError(f"unknown experiment {args.experiment!r}; choose: isoflop, combine")
    return isoflop(args)


def isoflop(args: argparse.Namespace) -> dict:
    t_start = time.time()
    shape_names = [Path(s.strip()).stem for s in str(args.shapes).split(",") if s.strip()]
    out = Path(args.out or f"runs/experiment-{'+'.join(shape_names)}")
    if args.plan:
        return _isoflop(args, out, t_start)
    with RunLock(out, "mor experiment"):  # one writer per experiment directory
        return _isoflop(args, out, t_start)


def _isoflop(args: argparse.Namespace, out: Path, t_start: float) -> dict:
    report_dir = Path(args.report_dir) if args.report_dir else out
    notes: set[str] = set()
    variants = parse_variants(args.models, args.nr, args.kv, args.sharing)

    def plan(data: str, vocab: int | None) -> list[Run]:
        return build_runs(args.shapes, args.budget, variants, out, data, list(args.overrides), vocab)

    # the plan first: every recipe must be valid and within tolerance before anything trains
    meta = None
    if args.data or (out / "data" / "meta.json").is_file():
        from ..data import load_meta

        data_dir = str(args.data or out / "data")
        meta = load_meta(data_dir)
    else:
        data_dir = str(out / "data")
    vocab = meta["vocab_size"] if meta else None
    runs = plan(data_dir, vocab)
    print_plan(runs, meta["splits"]["train"]["tokens"] if meta else None)
    check_tolerance(runs, args.tolerance)
    if args.plan:
        return {"experiment": "isoflop", "plan": [{"key": r.key, "steps": r.steps, "tokens": r.tokens,
                                                   "flops": r.flops, "flops_error": r.flops_error,
                                                   "unique_params": r.unique_params} for r in runs]}
    if not args.report_only:
        data_dir, meta = ensure_data(out, args.data, list(args.corpus), args.vocab_size, args.val_fraction)
        if vocab is None:  # the plan used the recipes' vocabulary; the corpus decides the real one
            runs = plan(data_dir, meta["vocab_size"])
            check_tolerance(runs, args.tolerance)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    actions = {r.key: "report-only" for r in runs} if args.report_only else train_all(runs, progress)
    # evaluation after training (cached per model, so reruns only fill in what is missing)
    if not args.report_only and not args.no_analysis:
        opts = EvalOptions(fewshot=args.fewshot, fewshot_tasks=args.fewshot_tasks, fewshot_limit=args.fewshot_limit,
                           bench_overrides=list(args.bench_overrides))
        for r in runs:
            rec = read_record(r)
            if rec.get("status") == "done":
                analyze_run(r, rec, data_dir, opts, notes)
        if args.throughput:
            measure_throughput(runs, opts, notes)
    if not any(read_record(r).get("analysis", {}).get("throughput") for r in runs):
        notes.add("throughput vs NLL not plotted: no throughput was measured (run with --throughput)")
    if not args.fewshot:
        notes.add("accuracy column empty: few-shot tasks are off by default (--fewshot runs the paper's 0-shot "
                  "tasks through lm-eval)")
    command = command_line(args)
    # the experiment's own record: every invocation that trained or evaluated, for the report
    log = read_json(out / LOG) or {"invocations": []}
    if not args.report_only:
        log["invocations"].append({"command": command, "start": t_start, "end": time.time(), "actions": actions})
        write_json(out / LOG, log)
    first = log["invocations"][0]["command"] if log["invocations"] else command
    header = {
        "command": first, "invocations": log["invocations"],
        "shapes": sorted({r.shape.name for r in runs}), "budgets": sorted({r.budget for r in runs}),
        "models": [r.variant.name for r in runs if r.shape is runs[0].shape and r.budget == runs[0].budget],
        "data": data_dir, "out": str(out), "machine": machine_info(), "tolerance": args.tolerance,
    }
    result = write_report(runs, report_dir, header, notes)
    failed = [k for k, a in actions.items() if a == "failed"]
    print(f"[experiment] report: {report_dir / 'results.md'}", file=sys.stderr)
    print(markdown_table(result["rows"]))
    return {"experiment": "isoflop", "out": str(out), "report": str(report_dir / "results.md"),
            "actions": actions, "failed": failed, "wall_s": time.time() - t_start,
            "rows": [{k: row[k] for k in ("key", "unique_params", "flops", "tokens", "nll", "causal_nll", "status")}
                     for row in result["rows"]]}


def train_all(runs: list[Run], progress: bool) -> dict[str, str]:
    """Train (or skip, resume, restart) every model in order; what happened to each."""
    actions: dict[str, str] = {}
    for i, r in enumerate(runs, 1):
        print(f"[experiment] {i}/{len(runs)} {r.key}: {r.steps} steps, {fmt_num(r.tokens)} tokens, "
              f"{fmt_params(r.unique_params)} unique params", file=sys.stderr)
        action, rec = train_run(r, progress)
        actions[r.key] = action
        if action == "skipped":
            print(f"[experiment] {r.key}: already trained (val NLL {rec['summary'].get('val_loss'):.4f}); "
                  "not training it again", file=sys.stderr)
    return actions
