"""``mor eval CHECKPOINT``: validation NLL (``--data``) and few-shot accuracy (``--tasks``).

Examples::

    mor eval runs/demo --data data/shakespeare          # val split of a prepared dir
    mor eval runs/demo --data shakespeare --max-tokens 100000
    mor eval runs/demo --data notes.txt --data hf:json:val.jsonl
    mor eval runs/demo --tasks paper --limit 100        # the paper's six tasks and table
    mor eval runs/demo --tasks piqa,arc --task-routing both

NLL is reported for both expert-choice routing rules (top-k, as the paper reports, and the
causal threshold rule used for generation) with the dead-token ratio and sampling accuracy;
see :mod:`mor.eval.nll`. Few-shot tasks run offline through lm-eval
(:mod:`mor.eval.fewshot`). Results are merged into ``results.json`` in the checkpoint
directory; the last stdout line is the JSON summary.
"""

from __future__ import annotations

import argparse
from typing import Any

from .. import validate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--data", action="append", default=[], metavar="SOURCE",
                   help="held-out text for NLL: a prepared data dir (its val split), 'shakespeare', a "
                        ".txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG][@SPLIT] / hf:BUILDER:FILES; "
                        "repeat for several sources")
    p.add_argument("--tasks", default=None,
                   help="few-shot tasks: 'paper' (LAMBADA, HellaSwag, PIQA, ARC-E/C, WinoGrande, MMLU) or a "
                        "comma-separated subset (lambada,hellaswag,piqa,arc,arc_easy,arc_challenge,winogrande,mmlu)")
    p.add_argument("--limit", type=validate.limit_value, default=None,
                   help="evaluate only the first N documents of each task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=validate.nonneg_int, default=0, help="in-context examples per task (paper: 0)")
    p.add_argument("--routing", default="both", choices=("both", "topk", "threshold"),
                   help="expert-choice routing rule(s) for NLL (default both)")
    p.add_argument("--task-routing", default="topk", choices=("both", "topk", "threshold"),
                   help="expert-choice routing rule(s) for the tasks (default topk, as the paper)")
    p.add_argument("--seq-len", type=validate.positive_int, default=None,
                   help="NLL window length (default: the model's max_position_embeddings)")
    p.add_argument("--max-tokens", type=validate.positive_int, default=None, help="NLL: use only the first N tokens of each source")
    p.add_argument("--split", default="val", help="split of a prepared data dir (default val)")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column with the text")
    p.add_argument("--batch-size", type=validate.positive_int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--device", default="auto", help="auto (default: cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--no-save", action="store_true", help="do not merge the results into results.json")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..cli import CLIError
    from .common import describe, is_expert_choice, load_for_eval, update_results
    from .nll import run_nll, source_key

    if not args.data and not args.tasks:
        raise CLIError("nothing to evaluate: give --data SOURCE (validation NLL) and/or --tasks paper (few-shot)")
    model, tok, ckpt_dir = load_for_eval(args.checkpoint, device=args.device, dtype=args.dtype)
    cfg = model.config
    summary: dict[str, Any] = {"checkpoint": str(ckpt_dir), "model": describe(cfg)}
    print(f"evaluating {ckpt_dir}: {describe(cfg)}")
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)

    if args.data:
        nll_results = {}
        for source in args.data:
            r = run_nll(model, tok, source, seq_len=args.seq_len, batch_size=args.batch_size,
                        max_tokens=args.max_tokens, text_field=args.text_field, routing=args.routing,
                        split=args.split, progress=True)
            key = source_key(r, r["seq_len"], args.max_tokens)
            nll_results[key] = r
            print(f"NLL on {key} ({r['tokens']:,} tokens):")
            for mode, m in r["routing"].items():
                extra = []
                if "dead_token_ratio" in m:
                    extra.append(f"dead tokens {100 * m['dead_token_ratio']:.2f}%")
                if "sampling_accuracy" in m:
                    extra.append(f"sampling accuracy {100 * m['sampling_accuracy']:.2f}%")
                if "mean_depth" in m:
                    extra.append(f"mean depth {m['mean_depth']:.3f}")
                print(f"  {mode:>9}: NLL {m['nll']:.4f}  ppl {m['ppl']:.2f}" + ("  (" + ", ".join(extra) + ")"
                                                                              if extra else ""))
        summary["nll"] = nll_results

    if args.tasks:
        from .fewshot import EvalDependencyError, chance_table, format_table, run_tasks
        from .tasks import resolve_tasks

        try:
            specs = resolve_tasks(args.tasks)
        except ValueError as e:
            raise CLIError(str(e)) from None
        if not specs:
            raise CLIError(f"--tasks {args.tasks!r} names no task; give e.g. --tasks paper or --tasks piqa,arc")
        modes = ["topk", "threshold"] if args.task_routing == "both" else [args.task_routing]
        if not is_expert_choice(cfg):
            modes = ["topk"]  # the routing rule does not matter for this model
        fewshot: dict[str, Any] = {}
        for mode in modes:
            try:
                r = run_tasks(model, tok, [s.name for s in specs], routing=mode, limit=limit,
                              num_fewshot=args.num_fewshot, batch_size=args.batch_size, checkpoint=str(ckpt_dir))
            except EvalDependencyError as e:
                raise CLIError(str(e)) from None
            label = (mode if is_expert_choice(cfg) else "default") + (f"/limit{limit}" if limit else "")
            fewshot[label] = r
        rows = {k: v["table"] for k, v in fewshot.items()}
        rows["chance"] = chance_table(specs)
        print(f"few-shot accuracy (%), {args.num_fewshot}-shot" + (f", first {limit} docs per task" if limit else ""))
        print(format_table(rows))
        summary["fewshot"] = fewshot

    if not args.no_save:
        summary["results_json"] = str(update_results(ckpt_dir, {k: v for k, v in summary.items()
                                                                 if k in ("nll", "fewshot", "model")}))
    return summary

