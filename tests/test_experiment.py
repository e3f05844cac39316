"""`mor experiment isoflop`: model lists, recipes, equal-FLOPs plan, end-to-end run, resume."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from mor import checkpoint as ckpt
from mor import experiment
from mor.experiment import plan, records
from mor.flops import paper_flops_per_token
from mor.train import load_recipe
from mor.variants import Variant, parse_variants

ROOT = Path(__file__).resolve().parents[1]

def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    experiment.add_arguments(p)
    return p.parse_args(argv)


# ---------------------------------------------------------------------- recipes and the plan
def test_micro_recipe_is_a_valid_training_recipe():
    r = load_recipe(str(ROOT / "configs/experiment/micro.yaml"))
    assert r.flops_budget is not None and r.schedule == "wsd"


def test_paper_shapes_use_the_paper_recipe_and_counts(corpus_dir, tmp_path):
    """360M recipes: the paper's parameter counts (SPEC section 1) and warm-up rule (section 7)."""
    shape = plan.load_shape("360m")
    want = {"vanilla": 315e6, "mor-expert-nr2": 167e6, "mor-expert-nr3": 118e6}
    for variant in parse_variants("vanilla,mor-expert", nr="2,3"):
        r = plan.model_recipe(shape, variant, 16.5e18, "data/x", tmp_path / variant.name, vocab_size=49152)
        run = plan.plan_run(plan.Run(shape, variant, 16.5e18, r, tmp_path / variant.name), 49152)
        assert abs(run.unique_params / want[variant.name] - 1) < 0.01, (variant.name, run.unique_params)
        assert r["seq_len"] == 2048 and r["batch_size"] * r["grad_accum"] == 1024 and r["lr"] == 3e-3
        # warm-up: 5% of the steps the 2e18 budget would take (configs/paper/generate.py)
        paper_name = "vanilla-360m" if variant.kind == "vanilla" else variant.name.replace("-nr", "-360m-nr")
        paper = load_recipe(str(ROOT / "configs" / "paper" / f"{paper_name}.yaml"))
        assert r["warmup_steps"] == paper.warmup_steps
        assert abs(run.flops_error) < 0.02
    # a shape's layer count is raised to fit the sharing scheme (SPEC: layers are added)
    r = plan.model_recipe(shape, Variant("mor-expert", 4), 16.5e18, "d", tmp_path / "x", vocab_size=49152)
    assert plan.plan_run(plan.Run(shape, Variant("mor-expert", 4), 16.5e18, r, tmp_path), 49152).config.num_hidden_layers == 34


def test_micro_shape_fits_the_sharing_schemes(tmp_path):
    shape = plan.load_shape("micro")
    budget = float(shape.recipe["flops_budget"])
    runs = [plan.plan_run(plan.Run(shape, s, budget, plan.model_recipe(shape, s, budget, "d", tmp_path / s.name,
                                                              vocab_size=8192), tmp_path / s.name), 8192)
            for s in parse_variants(plan.DEFAULT_MODELS)]
    plan.check_tolerance(runs, 0.003)  # the default budget rounds to within 0.3%
    by = {r.variant.name: r for r in runs}
    # same unrolled depth for Middle-Cycle and Cycle at N_r=2; MoR trains on more tokens at equal FLOPs
    assert by["mor-expert-cycle-nr2"].config.num_hidden_layers == by["vanilla"].config.num_hidden_layers
    assert by["mor-expert-nr3"].tokens > by["mor-expert-nr2"].tokens > by["recursive-nr2"].tokens
    assert by["recursive-nr2"].tokens == by["vanilla"].tokens
    assert by["mor-expert-nr3"].unique_params < 0.55 * by["vanilla"].unique_params


def test_plan_rejects_budgets_that_round_badly(corpus_dir, tmp_path):
    """A budget that buys only a few steps cannot keep every model within 2%: stop before training."""
    args = parse(["isoflop", "--shapes", "tiny", "--budget", "2.6e8", "--models", "vanilla,mor-expert:3",
                  "--corpus", str(corpus_dir), "--vocab-size", "300", "--out", str(tmp_path / "exp")])
    with pytest.raises(plan.ExperimentError, match="more than 2% off the budget"):
        experiment.run(args)
    assert not (tmp_path / "exp" / "data").exists()  # nothing was prepared or trained


# ---------------------------------------------------------------------- end to end, with resume
def _records(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/*/experiment.json"))}


def _argv(corpus_dir, out, report, models, *extra):
    return ["isoflop", "--shapes", "tiny", "--budget", "3e9", "--models", models, "--corpus", str(corpus_dir),
            "--vocab-size", "300", "--val-fraction", "0.15", "--out", str(out), "--report-dir", str(report),
            "--set", "eval_every=8", "ckpt_every=8", *extra]


def _spy_train(monkeypatch) -> list[tuple[str, bool]]:
    """Record every (model directory, resume) the experiment hands to the trainer."""
    calls: list[tuple[str, bool]] = []
    real_train = records.train

    def spy(cfg, resume=False, **kw):
        calls.append((Path(cfg.out_dir).name, resume))
        return real_train(cfg, resume=resume, **kw)

    monkeypatch.setattr(records, "train", spy)
    return calls


def test_isoflop_end_to_end_and_resume(corpus_dir, tmp_path, monkeypatch):
    out, report = tmp_path / "exp", tmp_path / "report"
    argv = _argv(corpus_dir, out, report, "vanilla,mor-expert:3", "--no-throughput")

    # 1. interrupt the MoR model right after its first periodic checkpoint (step 8)
    real_save = ckpt.save_checkpoint

    def save_then_stop(path, model, **kw):
        p = real_save(path, model, **kw)
        if model.config.architecture == "mor" and kw["meta"]["step"] == 8:
            raise KeyboardInterrupt
        return p

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        experiment.run(parse(argv))
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    recs = _records(out)
    assert recs["vanilla"]["status"] == "done" and recs["mor-expert-nr3"]["status"] == "running"
    assert [p.name for p in ckpt.list_checkpoints(out / "tiny-3e9" / "mor-expert-nr3")] == ["step_000008"]

    # 2. rerun: the finished model is not trained again, the interrupted one resumes from step 8
    calls = _spy_train(monkeypatch)
    res = experiment.run(parse(argv))
    assert calls == [("mor-expert-nr3", True)]
    assert res["actions"] == {"tiny-3e9/vanilla": "skipped", "tiny-3e9/mor-expert-nr3": "resumed"}
    recs2 = _records(out)
    assert recs2["vanilla"]["summary"] == recs["vanilla"]["summary"]
    assert recs2["vanilla"]["finished_at"] == recs["vanilla"]["finished_at"]
    mor = recs2["mor-expert-nr3"]
    assert mor["status"] == "done" and len(mor["segments"]) == 2
    assert mor["segments"][0]["interrupted"] and mor["segments"][1]["resume"]
    # the resumed run finished the planned schedule, every step logged once
    train_recs, _ = records.read_metrics(out / "tiny-3e9" / "mor-expert-nr3")
    assert [r["step"] for r in train_recs] == list(range(1, mor["summary"]["steps"] + 1))
    assert mor["summary"]["steps"] == res_plan_steps(argv, "mor-expert-nr3")

    # 3. the report: table, JSON, plots
    for f in ("results.md", "results.json", "nll_vs_params.png", "nll_vs_flops.png", "loss_curves.png",
              "depth_scaling.png"):
        assert (report / f).is_file() and (report / f).stat().st_size > 0, f
    result = json.loads((report / "results.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"vanilla", "mor-expert-nr3"}
    md = (report / "results.md").read_text()
    for r in rows.values():
        assert r["status"] == "done"
        # equal compute: every model within 2% of the budget, counted as the trainer counts
        assert abs(r["flops"] / 3e9 - 1) <= 0.02
        model = ckpt.load_model(r["checkpoint"])
        assert r["flops"] == pytest.approx(paper_flops_per_token(model.config, 32) * r["tokens"])
        # the table's parameter counts are the models' own counts
        assert r["unique_params"] == model.num_parameters() == r["planned_unique_params"]
        assert f"| {r['unique_params'] / 1e6:.2f}M |" in md
        assert r["nll"] > 0 and r["causal_nll"] > 0
    assert rows["vanilla"]["depth_scaling"] in (None, {})
    assert set(rows["mor-expert-nr3"]["depth_scaling"]) == {"1", "2", "3", "4"}
    assert rows["mor-expert-nr3"]["tokens"] > rows["vanilla"]["tokens"]
    assert "| MoR expert-choice | 3 |" in md and "| Vanilla | - |" in md

    # 4. nothing left to do: a third invocation trains nothing
    calls.clear()
    res = experiment.run(parse(argv))
    assert calls == [] and set(res["actions"].values()) == {"skipped"}


def res_plan_steps(argv, name) -> int:
    """The step count the plan computes for ``name`` (without training anything)."""
    plan = experiment.run(parse(argv + ["--plan"]))["plan"]
    return next(p["steps"] for p in plan if p["key"].endswith("/" + name))


@pytest.mark.slow
def test_isoflop_token_choice_recipe_change_and_throughput(corpus_dir, tmp_path, monkeypatch):
    """Token-choice depth scaling, retraining a model whose recipe changed, and the throughput plot
    through `mor bench infer` when that benchmark is installed."""
    out, report = tmp_path / "exp", tmp_path / "report"
    argv = _argv(corpus_dir, out, report, "vanilla,mor-token:2", "--no-throughput")
    experiment.run(parse(argv))
    rows = {r["name"]: r for r in json.loads((report / "results.json").read_text())["rows"]}
    tok = rows["mor-token-nr2"]
    assert set(tok["depth_scaling"]) == {"1", "2"}
    # depth N_r through forward_depth is the model's own forward (token-choice is causal)
    assert tok["depth_scaling"]["2"] == pytest.approx(tok["causal_nll"], rel=1e-5)

    calls = _spy_train(monkeypatch)
    i = argv.index("ckpt_every=8") + 1
    res = experiment.run(parse(argv[:i] + ["lr=1e-3"] + argv[i:]))
    assert calls == [("vanilla", False), ("mor-token-nr2", False)]
    assert set(res["actions"].values()) == {"restarted"}
    assert json.loads((out / "tiny-3e9" / "vanilla" / "experiment.json").read_text())["recipe"]["lr"] == 1e-3

    calls.clear()
    experiment.run(parse(argv[:i] + ["lr=1e-3"] + argv[i:-1] + ["--throughput", "--bench-set", "mean_len=8",
                                                               "batch=2", "requests_per_slot=1"]))
    assert calls == []
    rows = {r["name"]: r for r in json.loads((report / "results.json").read_text())["rows"]}
    assert rows["mor-token-nr2"]["infer_tok_per_s"] > 0 and rows["vanilla"]["infer_speedup"] == 1.0
    assert (report / "throughput_vs_nll.png").is_file()


def test_combine_replicates(corpus_dir, tmp_path):
    """Two seeds of the same plan: per-model mean/std and paired differences, checked against the
    replicates' own results.json; non-replicates are refused."""
    import numpy as np

    dirs = []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        argv = _argv(corpus_dir, out, out, "vanilla,recursive:2,mor-expert:2", "--no-analysis", "--no-throughput")
        argv.insert(argv.index("ckpt_every=8") + 1, f"seed={seed}")
        experiment.run(parse(argv))
        dirs.append(out)
    rows = [{r["name"]: r for r in json.loads((d / "results.json").read_text())["rows"]} for d in dirs]
    assert rows[0]["vanilla"]["nll"] != rows[1]["vanilla"]["nll"]  # the seed really changed the run

    report = tmp_path / "seeds"
    res = experiment.run(parse(["combine", *map(str, dirs), "--report-dir", str(report)]))
    assert res["seeds"] == [0, 1]
    for name in ("vanilla", "recursive-nr2", "mor-expert-nr2"):
        vals = [r[name]["nll"] for r in rows]
        m = res["models"][f"tiny-3e9/{name}"]
        assert m["nll_mean"] == pytest.approx(np.mean(vals)) and m["nll_std"] == pytest.approx(np.std(vals, ddof=1))
    comps = {(c["a"], c["b"]): c for c in res["comparisons"]}
    assert set(comps) == {("mor-expert-nr2", "vanilla"), ("recursive-nr2", "vanilla"),
                          ("mor-expert-nr2", "recursive-nr2")}
    c = comps[("mor-expert-nr2", "vanilla")]
    diffs = [r["mor-expert-nr2"]["nll"] - r["vanilla"]["nll"] for r in rows]
    assert c["diff_mean"] == pytest.approx(np.mean(diffs))
    assert c["paper_diff"] == pytest.approx(2.7511 - 2.7824)
    assert c["a_better"] == sum(d < 0 for d in diffs) == c["seeds_agreeing_with_paper"]
    md = (report / "results.md").read_text()
    assert "| seed 0 | seed 1 | mean | std |" in md and (report / "seeds.png").stat().st_size > 0
    assert f"{rows[1]['vanilla']['nll']:.4f}" in md

    # results.json's run_dir is relative to where the experiment ran; the directory's own layout wins
    res1 = json.loads((dirs[1] / "results.json").read_text())
    for r in res1["rows"]:
        r["run_dir"] = "somewhere/else/" + r["key"]
    (dirs[1] / "results.json").write_text(json.dumps(res1))
    assert experiment.run(parse(["combine", *map(str, dirs), "--report-dir", str(report)]))["seeds"] == [0, 1]

    # not replicates: one directory, the same seed twice, a different plan
    with pytest.raises(plan.ExperimentError, match="at least two"):
        experiment.run(parse(["combine", str(dirs[0])]))
    with pytest.raises(plan.ExperimentError, match="seed 0"):
        experiment.run(parse(["combine", str(dirs[0]), str(dirs[0])]))
    other = tmp_path / "other"
    other.mkdir()
    bad = json.loads((dirs[1] / "results.json").read_text())
    for r in bad["rows"]:
        r["tokens"] *= 2
        r["run_dir"] = str(dirs[1] / r["key"])
    (other / "results.json").write_text(json.dumps(bad))
    with pytest.raises(plan.ExperimentError, match="tokens differs"):
        experiment.run(parse(["combine", str(dirs[0]), str(other)]))
    with pytest.raises(plan.ExperimentError, match="no results.json"):
        experiment.run(parse(["combine", str(dirs[0]), str(tmp_path / "missing")]))
