"""scripts/gpu_check.sh, the prepared GPU check, cannot rot: its --smoke mode runs every step
on the CPU with tiny shapes (slow: ~2-5 minutes on 2 cores), and its full mode refuses to
run without CUDA instead of measuring the wrong device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def run_script(*args, timeout):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the full mode would run for minutes")
def test_full_mode_needs_cuda(tmp_path):
    res = run_script(str(tmp_path / "out"), timeout=120)
    assert res.returncode == 2
    assert "no CUDA device" in res.stderr


def test_unknown_option_is_refused(tmp_path):
    res = run_script("--fast", timeout=30)
    assert res.returncode == 2 and "unknown option --fast" in res.stderr
    res = run_script("--only", "tests,bench_fast", timeout=30)
    assert res.returncode == 2 and "unknown step bench_fast" in res.stderr and "bench_infer_eager" in res.stderr
    res = run_script("--budget", "5m", timeout=30)
    assert res.returncode == 2 and "--budget needs whole seconds" in res.stderr


def test_only_runs_the_named_steps_within_the_budget(tmp_path):
    """--only picks steps; a step that would start with under 20 s of --budget left (here:
    every step, 30 s minus the 15 s kept for the summary) is skipped."""
    out = tmp_path / "gpu-check"
    res = run_script("--smoke", "--only", "bench_infer,fsdp2", "--budget", "30", str(out), timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s["status"] for s in summary["steps"]}
    assert list(steps) == ["bench_infer", "prepare", "fsdp2"], res.stdout[-2000:]
    assert set(steps.values()) == {"skipped"} and not summary["ok"] and res.returncode == 1


@pytest.mark.slow
def test_smoke_mode_runs_every_step(tmp_path):
    out = tmp_path / "gpu-check"
    res = run_script("--smoke", str(out), timeout=1500)
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == ["tests", "bench_infer", "bench_infer_eager", "bench_train", "prepare", "fsdp2",
                           "bench_train_compile"]
    bad = {k: (s["status"], s["tail"]) for k, s in steps.items() if s["status"] != "ok"}
    assert not bad and summary["ok"] and res.returncode == 0, (bad, res.stdout[-2000:], res.stderr[-2000:])
    assert "passed" in steps["tests"]["tail"]
    train = steps["bench_train"]["result"]
    assert set(train["models"]) == {"vanilla", "recursive", "mor-expert", "mor-token", "mor-expert-nr2"}
    assert all(m["tok_per_s"] > 0 and m["peak_mem_bytes"] for m in train["models"].values())
    assert steps["bench_train_compile"]["result"]["models"]["vanilla"]["tok_per_s"] > 0
    assert steps["bench_infer"]["result"]["rows"]
    assert steps["bench_infer_eager"]["result"]["cuda_graphs"] is False
    assert steps["fsdp2"]["result"]["steps"] == 2
    assert (out / "summary.md").read_text().startswith("# gpu_check (smoke): all steps passed")
    assert (out / "logs.tar.gz").stat().st_size > 0
    assert json.loads(res.stdout.strip().splitlines()[-1])["ok"] is True
