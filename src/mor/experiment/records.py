"""Run records and resume: what happened to each model of an experiment, kept on disk.

Each model runs in ``OUT/<shape>-<budget>/<model>/`` and keeps a record, ``experiment.json``,
holding its exact recipe, its training segments (start, end, wall-clock and CPU time, whether
it resumed or was interrupted), its summary and its post-training analysis. A model whose
record says done (same recipe, final checkpoint present) is not trained again; a model with
checkpoints from the same recipe resumes from its latest one; a model whose recipe changed
starts over.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from .. import checkpoint as ckpt
from ..config import ConfigError
from ..runtime import read_json, write_json
from ..train import TrainConfig, TrainError, train
from .plan import Run, comparable

RECORD = "experiment.json"


def read_record(run: Run) -> dict:
    """The record of ``run`` ({} when it has none yet)."""
    return read_json(run.run_dir / RECORD) or {}


def write_record(run: Run, record: dict) -> None:
    write_json(run.run_dir / RECORD, record)


def run_state(run: Run) -> tuple[str, dict]:
    """What to do with ``run``: ``done`` (skip), ``resume``, ``restart`` (recipe changed) or ``fresh``;
    and its record."""
    rec = read_record(run)
    same = rec.get("recipe") is not None and comparable(rec["recipe"]) == comparable(run.recipe)
    latest = ckpt.latest_checkpoint(run.run_dir)
    if same and rec.get("status") == "done" and rec.get("summary") and latest is not None:
        meta = read_json(latest / "meta.json") or {}
        if int(meta.get("step", -1)) == int(rec["summary"].get("steps", -2)):
            return "done", rec
    if latest is not None:
        return ("resume" if same else "restart"), rec
    return "fresh", rec


def close_open_segment(rec: dict, run_dir: Path) -> None:
    """An interrupted segment's time: from its start to its last checkpoint (work after that is redone)."""
    segs = rec.get("segments") or []
    if segs and segs[-1].get("end") is None:
        latest = ckpt.latest_checkpoint(run_dir)
        saved = (read_json(latest / "meta.json") or {}).get("saved_at") if latest else None
        seg = segs[-1]
        seg["interrupted"] = True
        seg["end"] = saved
        seg["wall_s"] = max(0.0, float(saved) - float(seg["start"])) if saved else 0.0


def train_run(run: Run, progress: bool, train_fn: Callable[..., dict] | None = None) -> tuple[str, dict]:
    """Train one model unless it is done; returns (what happened: skipped, trained, resumed, restarted or
    failed; its record)."""
    train_fn = train_fn or train
    action, rec = run_state(run)
    if action == "done":
        return "skipped", rec
    run.run_dir.mkdir(parents=True, exist_ok=True)
    recipe = copy.deepcopy(run.recipe)
    recipe["progress"] = progress
    if action == "restart":
        print(f"[experiment] {run.key}: its recipe changed since the checkpoints in {run.run_dir} were written; "
              "training it again from scratch", file=sys.stderr)
        recipe["overwrite"] = True
        rec = {}
    elif action == "fresh":
        # an attempt interrupted before its first checkpoint leaves only logs behind
        for stale in ("metrics.jsonl", "metrics.prev.jsonl"):
            (run.run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(run.run_dir / "tb", ignore_errors=True)
        rec = {}
    else:
        close_open_segment(rec, run.run_dir)
    rec.update(name=run.variant.name, label=run.variant.label, shape=run.shape.name, budget=run.budget,
               recipe=run.recipe, status="running", error=None)
    rec.setdefault("segments", []).append({"start": time.time(), "end": None, "resume": action == "resume"})
    rec.pop("analysis", None)
    write_record(run, rec)
    t0, cpu0 = time.time(), cpu_seconds()
    try:
        summary = train_fn(TrainConfig.from_dict(recipe), resume=action == "resume")
    except (TrainError, ConfigError, RuntimeError) as e:
        seg = rec["segments"][-1]
        seg.update(end=time.time(), wall_s=time.time() - t0, cpu_s=cpu_seconds() - cpu0, failed=True)
        rec.update(status="failed", error=f"{type(e).__name__}: {e}")
        write_record(run, rec)
        print(f"[experiment] {run.key} failed: {e}", file=sys.stderr)
        return "failed", rec
    seg = rec["segments"][-1]
    seg.update(end=time.time(), wall_s=time.time() - t0, train_wall_s=summary.get("wall_s"),
               cpu_s=cpu_seconds() - cpu0)
    rec.update(status="done", summary=summary, finished_at=time.time(),
               wall_s=sum(float(s.get("wall_s") or 0.0) for s in rec["segments"]),
               cpu_s=sum(float(s["cpu_s"]) for s in rec["segments"]) if all("cpu_s" in s for s in rec["segments"])
               else None)
    write_record(run, rec)
    return {"resume": "resumed", "restart": "restarted"}.get(action, "trained"), rec


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) of this process: a measure of a model's training cost that a
    busy machine distorts much less than wall-clock."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of a run's metrics.jsonl, one per step (the last one
    written wins, so steps redone after a resume are not counted twice)."""
    train_recs: dict[int, dict] = {}
    val_recs: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return [], []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
        if "loss" in r:
            train_recs[int(r["step"])] = r
        if "val_loss" in r:
            val_recs[int(r["step"])] = r
    return [train_recs[k] for k in sorted(train_recs)], [val_recs[k] for k in sorted(val_recs)]


