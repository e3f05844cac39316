"""Distributed training with torchrun: DDP and FSDP2 on CPU (gloo), checked against one process.

The multi-process tests launch real jobs with ``python -m torch.distributed.run`` (c10d
rendezvous on 127.0.0.1, a free port, gloo bound to the loopback interface):

* a 2-process DDP run and a 2-process FSDP2 run of a tiny MoR recipe, expert-choice (with an
  auxiliary router, and labels partly masked with -100 so that ranks and micro-batches hold
  different numbers of target tokens) and token-choice (loss-free balancing), follow the loss
  curve of one process with the same global batch; the replicated state (balancing bias,
  DDP parameters such as the auxiliary routers) is identical on every rank afterwards;
* their checkpoints (single-directory format) resume in ONE process with the same losses;
* FSDP2 all-gathers the shared recursion block once per forward/backward, not per recursion
  (counted by intercepting the collectives), and its gradients equal one process's;
* a killed rank makes the job exit with an error, and a hung rank makes the others fail after
  the collective timeout instead of waiting forever.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import yaml

from mor import checkpoint as ckpt
from mor import distributed as du
from mor.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not (tdist.is_available() and tdist.is_gloo_available()),
                                reason="torch.distributed with gloo is required")
LINUX = sys.platform.startswith("linux")

TINY = dict(preset="tiny", architecture="mor", num_recursions=3, max_position_embeddings=64)
ROUTERS = {
    "expert": dict(TINY, use_aux_router=True),
    # sigmoid router (alpha 0.1), not the softmax default: a softmax over 3 depths starts with every
    # probability near 1/3, where the last-bit differences between 1 and 2 processes can flip a few
    # argmax decisions and the weights then differ in those tokens' rows (losses still agree)
    "token": dict(TINY, router_type="token", balancing="loss_free", router_func="sigmoid", router_alpha=0.1),
}
MASK_MOD = 3  # expert-choice runs: targets with id % 3 == 0 are ignored (-100)
STEPS, CKPT_AT = 6, 3
WORLD, PER_RANK_BATCH, ACCUM = 2, 2, 2


# ---------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", du.TIMEOUT_ENV)}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def torchrun(*args: str, nproc: int = WORLD) -> list[str]:
    """A torchrun command line with the multi-node style c10d rendezvous on loopback."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=mor-test",
            "--max-restarts=0", *args]


def run_job(cmd: list[str], log: Path, timeout: float = 240, **env: str) -> str:
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(**env),
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s:\n{log.read_text()[-4000:]}")
    out = log.read_text()
    assert rc == 0, f"{' '.join(cmd)} failed ({rc}):\n{out[-6000:]}"
    return out


def write_recipe(path: Path, data_dir: str, out_dir: Path, model: dict, **kw) -> Path:
    recipe = dict(model=dict(model), data=data_dir, out_dir=str(out_dir), seq_len=32, batch_size=PER_RANK_BATCH,
                  grad_accum=ACCUM, max_steps=STEPS, lr=3e-3, eval_every=0, eval_batches=2, log_every=1,
                  ckpt_every=CKPT_AT, keep_last=5, tensorboard=False, progress=False, device="cpu")
    recipe.update(kw)
    path.write_text(yaml.safe_dump(recipe))
    return path


def metrics(out_dir: Path) -> tuple[dict[int, dict], dict]:
    """(training records by step, last validation record) of a run's metrics.jsonl."""
    recs = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in recs if "val_loss" in r]
    return {r["step"]: r for r in recs if "loss" in r}, (val[-1] if val else {})


def mask_labels(y: torch.Tensor) -> torch.Tensor:
    return y.masked_fill(y % MASK_MOD == 0, -100)


def patch_masking(mp: pytest.MonkeyPatch) -> None:
    """Mask training targets (not validation) by content, so the mask does not depend on how
    the global batch is split over ranks and micro-batches."""
    from mor.data import TokenLoader

    orig = TokenLoader.__next__

    def masked_next(self):
        x, y = orig(self)
        return x, mask_labels(y)

    mp.setattr(TokenLoader, "__next__", masked_next)


# Runs ``mor`` under torchrun like ``-m mor``, and before the process group is destroyed dumps
# this rank's copy of the replicated state (buffers; parameters, local shards under FSDP2).
WORKER = textwrap.dedent("""
    import os, sys, torch
    import mor.distributed as du
    from mor.cli import main

    if os.environ.get("MOR_TEST_MASK"):
        from mor.data import TokenLoader
        orig_next, mod = TokenLoader.__next__, int(os.environ["MOR_TEST_MASK"])
        def masked_next(self):
            x, y = orig_next(self)
            return x, y.masked_fill(y % mod == 0, -100)
        TokenLoader.__next__ = masked_next

    seen = {}
    orig_wrap, orig_shutdown = du.wrap_model, du.shutdown
    def wrap_model(model, parallel, dist):
        seen["model"] = model
        return orig_wrap(model, parallel, dist)
    def shutdown(dist):
        m = seen["model"]
        local = lambda t: (t.to_local() if hasattr(t, "to_local") else t).detach().cpu().clone()
        torch.save({"params": {n: local(p) for n, p in m.named_parameters()},
                    "buffers": {n: local(b) for n, b in m.named_buffers()}},
                   os.path.join(os.environ["MOR_TEST_DUMP"], f"rank{dist.rank}.pt"))
        orig_shutdown(dist)
    du.wrap_model, du.shutdown = wrap_model, shutdown
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Lazily run and cache: ("single", router) one process with the global batch, and
    (parallel, router) a 2-process torchrun job."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("dist_runs")

    def get(kind: str, router: str) -> Path:
        key = (kind, router)
        if key in cache:
            return cache[key]
        out = root / f"{kind}_{router}"
        masked = router == "expert"
        if kind == "single":
            cfg = TrainConfig(**yaml.safe_load(write_recipe(root / f"{kind}_{router}.yaml", data_dir, out,
                                                            ROUTERS[router]).read_text()))
            cfg.batch_size = PER_RANK_BATCH * WORLD
            with pytest.MonkeyPatch.context() as mp:
                if masked:
                    patch_masking(mp)
                train(cfg)
        else:
            recipe = write_recipe(root / f"{kind}_{router}.yaml", data_dir, out, ROUTERS[router], parallel=kind)
            worker = root / "worker.py"
            worker.write_text(WORKER)
            dump = root / f"dump_{kind}_{router}"
            dump.mkdir()
            t0 = time.perf_counter()
            log = run_job(torchrun(str(worker), "train", "--config", str(recipe)), root / f"{kind}_{router}.log",
                          MOR_TEST_DUMP=str(dump), MOR_TEST_MASK=str(MASK_MOD) if masked else "")
            print(f"torchrun {kind} {router}: {time.perf_counter() - t0:.1f} s")
            assert f"x{WORLD} ({kind}, gloo)" in log  # really distributed, in the requested mode
            assert log.count('"status": "ok"') == 1  # one summary line (rank 0), not one per rank
        cache[key] = out
        return out

    return get


CASES = [(p, r) for r in ROUTERS for p in ("ddp", "fsdp2")]


# ---------------------------------------------------------------------- acceptance 1
@pytest.mark.slow  # launches real torchrun process groups
@pytest.mark.parametrize("parallel,router", CASES)
def test_two_processes_follow_the_single_process_loss_curve(runs, parallel, router):
    single, _ = metrics(runs("single", router))
    multi, multi_val = metrics(runs(parallel, router))
    _, single_val = metrics(runs("single", router))
    assert sorted(multi) == sorted(single) == list(range(1, STEPS + 1))
    for step in single:
        a, b = single[step], multi[step]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5), step
        assert b["aux_loss"] == pytest.approx(a["aux_loss"], rel=1e-4, abs=1e-7), step
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), step
        assert b["tokens"] == a["tokens"] == step * WORLD * PER_RANK_BATCH * ACCUM * 32
    assert single[STEPS]["loss"] < single[1]["loss"] - 0.5  # it trained
    # validation is averaged over all ranks' slices: the single-process number
    assert multi_val["val_loss"] == pytest.approx(single_val["val_loss"], rel=1e-5)
    # and rank 0 wrote the same single-directory checkpoint format with the same weights
    pa = runs("single", router) / "checkpoints" / f"step_{STEPS:06d}"
    pb = runs(parallel, router) / "checkpoints" / f"step_{STEPS:06d}"
    assert sorted(p.name for p in pa.iterdir()) == sorted(p.name for p in pb.iterdir())
    from safetensors.torch import load_file

    wa, wb = load_file(str(pa / "model.safetensors")), load_file(str(pb / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    ckpt.load_model(pb)  # strict load


@pytest.mark.slow  # launches real torchrun process groups
@pytest.mark.parametrize("parallel,router", CASES)
def test_replicated_state_is_identical_on_all_ranks(runs, parallel, router):
    out = runs(parallel, router)
    dumps = [torch.load(out.parent / f"dump_{parallel}_{router}" / f"rank{r}.pt", weights_only=True)
             for r in range(WORLD)]
    names = list(dumps[0]["buffers"])
    if router == "token":
        assert "model.balance_bias" in names
        # the loss-free bias moved (and identically: loads are summed over ranks before the update)
        assert dumps[0]["buffers"]["model.balance_bias"].abs().sum() > 0
    for name in names:
        for r in range(1, WORLD):
            assert torch.equal(dumps[r]["buffers"][name], dumps[0]["buffers"][name]), (name, r)
    if parallel == "ddp":  # every rank holds a full replica: bit-identical parameters
        assert any(n.startswith("model.aux_routers.") for n in dumps[0]["params"]) or router == "token"
        for name, value in dumps[0]["params"].items():
            for r in range(1, WORLD):
                assert torch.equal(dumps[r]["params"][name], value), (name, r)
    # rank 0's bias / auxiliary routers are the single-process ones (the checkpoint holds rank 0's)
    from safetensors.torch import load_file

    final = f"step_{STEPS:06d}"
    wa = load_file(str(runs("single", router) / "checkpoints" / final / "model.safetensors"))
    wb = load_file(str(out / "checkpoints" / final / "model.safetensors"))
    keys = ["model.balance_bias"] if router == "token" else [k for k in wa if k.startswith("model.aux_routers.")]
    assert keys
    for k in keys:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=k)


# ---------------------------------------------------------------------- acceptance 2
@pytest.mark.slow  # launches real torchrun process groups
@pytest.mark.parametrize("parallel,router", CASES)
def test_two_process_checkpoint_resumes_in_one_process(runs, parallel, router, tmp_path):
    multi = runs(parallel, router)
    part = tmp_path / "resumed"
    (part / "checkpoints").mkdir(parents=True)
    import shutil

    name = f"step_{CKPT_AT:06d}"
    shutil.copytree(multi / "checkpoints" / name, part / "checkpoints" / name)
    recipe = yaml.safe_load((multi.parent / f"{parallel}_{router}.yaml").read_text())
    recipe.update(out_dir=str(part), batch_size=PER_RANK_BATCH * WORLD)  # same global batch, one process
    with pytest.MonkeyPatch.context() as mp:
        if router == "expert":
            patch_masking(mp)
        s = train(TrainConfig(**recipe), resume=True)
    assert s["steps"] == STEPS
    a, _ = metrics(multi)
    b, _ = metrics(part)
    assert sorted(b) == list(range(CKPT_AT + 1, STEPS + 1))
    for step in b:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-5), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4), step
        assert b[step]["lr"] == a[step]["lr"]


# ---------------------------------------------------------------------- mechanics (one 2-process job)
# Rank-local checks of the pieces the trainer uses, written per rank to one JSON report:
# * "gathers/...": FSDP2's collectives (all_gather_single / reduce_scatter_single, what
#   fully_shard issues) counted per unit, identified by the unit's padded flat size, during two
#   accumulation micro-steps of forward + backward; gradients compared with one process.
# * "balance/...": token-choice loss-free balancing under DDP (with no_sync accumulation) and
#   FSDP2: the load after reduce_balance_load and the bias after update_balance_bias, next to
#   what one process computes on the whole global batch.
MECHANICS_WORKER = textwrap.dedent("""
    import json, math, sys, torch, torch.distributed as tdist
    from torch.distributed.fsdp import fully_shard
    import mor.distributed as du
    from mor.config import preset
    from mor.model import MoRForCausalLM

    dist = du.init("cpu", 120)
    W, R = dist.world_size, dist.rank
    calls = []
    orig_ag, orig_rs = tdist.all_gather_single, tdist.reduce_scatter_single
    def ag(output_tensor, input_tensor, *a, **k):
        calls.append(("ag", output_tensor.numel()))
        return orig_ag(output_tensor, input_tensor, *a, **k)
    def rs(output, input, *a, **k):
        calls.append(("rs", input.numel()))
        return orig_rs(output, input, *a, **k)
    tdist.all_gather_single, tdist.reduce_scatter_single = ag, rs

    def padded(p):  # numel of a dim-0 sharded parameter in FSDP2's flat all-gather buffer
        return math.ceil(p.shape[0] / W) * W * (p.numel() // p.shape[0])

    def models(router):
        torch.manual_seed(0)
        cfg = preset("tiny", "mor", 3, vocab_size=300, max_position_embeddings=64, router_type=router,
                     balancing="loss_free")
        ref = MoRForCausalLM(cfg)
        model = MoRForCausalLM(cfg)
        model.load_state_dict(ref.state_dict())
        return ref, model

    def global_batches(seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(0, 300, (2 * W, 32), generator=g) for _ in range(2)]

    report = {}
    for router in ("expert", "token"):
        for mode in ("mor", "naive"):
            ref, model = models(router)
            units = du.fsdp2_units(model)
            if mode == "mor":
                du.wrap_model(model, "fsdp2", dist)
            else:  # the naive grouping: shared layers alone, resharded after forward
                shared = [m for m in units if m[0] == "recursion block"][0][1][:-1]
                for name, mods, _ in units:
                    if name.startswith("model.layers."):
                        fully_shard(mods[0])
                fully_shard(shared)
                fully_shard(model)
                units = [(n, (shared if n == "recursion block" else mods), r) for n, mods, r in units]
            sizes, claimed = {}, set()
            for name, mods, _ in units:
                ps = [p for m in mods for p in m.parameters() if id(p) not in claimed]
                claimed |= {id(p) for p in ps}
                sizes.setdefault(sum(padded(p) for p in ps), []).append(name)
            block = [s for s, names in sizes.items() if "recursion block" in names]
            assert len(block) == 1 and sizes[block[0]] == ["recursion block"], sizes
            batches = global_batches(1)
            calls.clear()
            for x in batches:  # two accumulation micro-steps
                mine = x[2 * R: 2 * R + 2]
                (model(mine, labels=mine).loss / 2).backward()
            count = lambda kind, size: sum(1 for k, n in calls if k == kind and n == size)
            rec = {"block_all_gathers": count("ag", block[0]), "block_reduce_scatters": count("rs", block[0]),
                   "all_gathers": sum(1 for k, _ in calls if k == "ag")}
            if mode == "mor":
                for x in batches:
                    (ref(x, labels=x).loss / 2).backward()
                rec["max_grad_err"] = max(
                    (p.grad.full_tensor() - q.grad).abs().max().item()
                    for p, q in zip(model.parameters(), ref.parameters()))
            report[f"gathers/{router}/{mode}"] = rec

    for parallel in ("ddp", "fsdp2"):
        ref, model = models("token")
        wrapped = du.wrap_model(model, parallel, dist)
        batches = global_batches(2)
        for i, x in enumerate(batches):  # the trainer's accumulation loop
            mine = x[2 * R: 2 * R + 2]
            with du.no_sync(wrapped, dist, i < len(batches) - 1):
                wrapped(mine, labels=mine).loss.backward()
        du.reduce_balance_load(model, dist)
        load = model.model.balance_load.tolist()
        model.update_balance_bias()
        with torch.no_grad():
            for x in batches:
                ref(x, labels=x)
        want_load = ref.model.balance_load.tolist()
        ref.update_balance_bias()
        report[f"balance/{parallel}"] = {"load": load, "want_load": want_load,
                                         "bias": model.model.balance_bias.tolist(),
                                         "want_bias": ref.model.balance_bias.tolist()}

    reports = [None] * W
    tdist.all_gather_object(reports, report)
    if R == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(reports, f)
    du.shutdown(dist)
""")


@pytest.fixture(scope="module")
def mechanics(tmp_path_factory):
    d = tmp_path_factory.mktemp("mechanics")
    worker = d / "mechanics_worker.py"
    worker.write_text(MECHANICS_WORKER)
    report_path = d / "report.json"
    run_job(torchrun(str(worker), str(report_path)), d / "mechanics.log")
    return json.loads(report_path.read_text())  # one report per rank


@pytest.mark.slow  # launches real torchrun process groups
def test_fsdp2_gathers_the_recursion_block_once_per_step(mechanics):
    nr, micro = 3, 2
    for rank, report in enumerate(mechanics):
        for router in ("expert", "token"):
            mor, naive = report[f"gathers/{router}/mor"], report[f"gathers/{router}/naive"]
            # one all-gather and one reduce-scatter of the shared block per forward + backward,
            # although the block runs N_r = 3 times in each
            assert mor["block_all_gathers"] == micro, (rank, report)
            assert mor["block_reduce_scatters"] == micro, (rank, report)
            # the counter sees the block's collectives: grouping the shared layers alone (the
            # naive unit) re-gathers them at every recursion, in forward and again in backward
            assert naive["block_all_gathers"] == 2 * nr * micro, (rank, report)
            assert mor["all_gathers"] < naive["all_gathers"]
            # and the sharded gradients are one process's full-batch gradients
            assert mor["max_grad_err"] < 1e-5, (rank, report)


@pytest.mark.slow  # launches real torchrun process groups
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_balancing_load_is_summed_over_ranks_and_micro_batches(mechanics, parallel):
    recs = [report[f"balance/{parallel}"] for report in mechanics]
    for rank, rec in enumerate(recs):
        # exact token counts per depth: the whole global batch, both micro-batches
        assert rec["load"] == rec["want_load"], (rank, rec)
        assert sum(rec["load"]) == 2 * WORLD * 2 * 32
        assert rec["bias"] == rec["want_bias"] == recs[0]["bias"], (rank, rec)
    assert any(b != 0 for b in recs[0]["bias"])


# ---------------------------------------------------------------------- acceptance 3
def _worker_pid(launcher_pid: int, rank: int, deadline: float) -> int:
    """The pid of torchrun's worker process with RANK=rank (a child of the launcher)."""
    while time.time() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid != launcher_pid:
                    continue
                env = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):
                continue
            if f"RANK={rank}".encode() in env:
                return int(entry.name)
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")


def _start_long_run(data_dir, tmp_path, **kw):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "long.yaml", data_dir, out, TINY, max_steps=100_000, ckpt_every=0, **kw)
    log = tmp_path / "job.log"
    f = open(log, "w")
    proc = subprocess.Popen(torchrun("-m", "mor", "train", "--config", str(recipe)), stdout=f,
                            stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    f.close()
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training is under way (rank 0 logged two steps)
        if proc.poll() is not None:
            pytest.fail(f"the job ended early ({proc.returncode}):\n{log.read_text()[-4000:]}")
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"training did not start:\n{log.read_text()[-4000:]}")
    return proc, log


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:  # only the job this test started: its own process group
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow  # launches real torchrun process groups
@pytest.mark.skipif(not LINUX, reason="finds worker pids through /proc")
def test_killed_rank_makes_the_job_exit(data_dir, tmp_path):
    proc, log = _start_long_run(data_dir, tmp_path, parallel="ddp")
    try:
        victim = _worker_pid(proc.pid, 1, time.time() + 30)
        t0 = time.time()
        os.kill(victim, signal.SIGKILL)
        rc = proc.wait(timeout=90)  # bounded: it must not hang
        elapsed = time.time() - t0
    finally:
        _stop(proc)
    out = log.read_text()
    assert rc != 0, out[-4000:]
    assert elapsed < 60, elapsed
    # torchrun names the failed rank and its signal
    assert "rank      : 1" in out and "SIGKILL" in out, out[-4000:]


@pytest.mark.slow  # launches real torchrun process groups
@pytest.mark.skipif(not LINUX, reason="finds worker pids through /proc")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_hung_rank_makes_the_others_fail_after_the_timeout(data_dir, tmp_path, parallel):
    timeout_s = 8  # generous: ranks may legitimately wait on each other for a few seconds on a busy machine
    proc, log = _start_long_run(data_dir, tmp_path, parallel=parallel, dist_timeout=timeout_s)
    try:
        victim = _worker_pid(proc.pid, 1, time.time() + 30)
        os.kill(victim, signal.SIGSTOP)  # alive but unresponsive: only a timeout can notice
        t0 = time.time()
        deadline = t0 + timeout_s + 60
        expected = "mor train: error: rank 0/2: a collective operation failed"
        while expected not in log.read_text():
            assert time.time() < deadline, f"rank 0 is still waiting:\n{log.read_text()[-4000:]}"
            time.sleep(0.2)
        elapsed = time.time() - t0
        os.kill(victim, signal.SIGCONT)  # let the stopped rank receive torchrun's SIGTERM
        rc = proc.wait(timeout=60)
    finally:
        _stop(proc)
    out = log.read_text()
    assert rc != 0
    assert timeout_s * 0.5 <= elapsed < timeout_s + 60, elapsed
    line = next(line for line in out.splitlines() if expected in line)
    assert "Timed out" in line and f"after {timeout_s:g} s" in line and "dist_timeout" in line, line


# ---------------------------------------------------------------------- units (no processes)
def test_timeout_setting(monkeypatch):
    monkeypatch.delenv(du.TIMEOUT_ENV, raising=False)
    assert du.resolve_timeout(None) == du.DEFAULT_TIMEOUT_S
    assert du.resolve_timeout(42) == 42
    monkeypatch.setenv(du.TIMEOUT_ENV, "7.5")
    assert du.resolve_timeout(42) == 7.5  # the environment overrides the recipe
    monkeypatch.setenv(du.TIMEOUT_ENV, "soon")
    with pytest.raises(du.DistributedError, match=du.TIMEOUT_ENV):
        du.resolve_timeout(42)
    monkeypatch.setenv(du.TIMEOUT_ENV, "0")
    with pytest.raises(du.DistributedError, match="positive"):
        du.resolve_timeout(42)
    from mor.config import ConfigError

    with pytest.raises(ConfigError, match="dist_timeout"):
        TrainConfig(max_steps=1, dist_timeout=0)


def test_init_without_torchrun_is_single_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    d = du.init()
    assert not d.enabled and d.rank == 0 and d.world_size == 1
    model = torch.nn.Linear(2, 2)
    assert du.wrap_model(model, "fsdp2", d) is model  # no-op in one process
    t = torch.ones(2)
    assert du.all_reduce_sum(t, d) is t and du.global_count(5, d) == 5
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(du.DistributedError, match="RANK"):
        du.init()


def test_fsdp2_units_group_the_shared_block_with_the_final_norm():
    from mor.config import preset
    from mor.model import MoRForCausalLM

    model = MoRForCausalLM(preset("tiny", "mor", 3))  # Middle-Cycle: 1 + 2 shared + 1
    units = {name: (mods, reshard) for name, mods, reshard in du.fsdp2_units(model)}
    core = model.model
    assert list(units) == ["model.layers.0", "model.layers.3", "recursion block", "root"]
    mods, reshard = units["recursion block"]
    assert mods == [core.layers[1], core.layers[2], core.norm] and reshard is False
    assert units["model.layers.0"] == ([core.layers[0]], True)
    vanilla = MoRForCausalLM(preset("tiny", "vanilla"))
    assert [n for n, _, _ in du.fsdp2_units(vanilla)] == [f"model.layers.{i}" for i in range(8)] + ["root"]


def test_optimizer_state_converts_between_index_and_name_keys():
    from mor.config import preset
    from mor.model import MoRForCausalLM
    from mor.train import build_optimizer

    model = MoRForCausalLM(preset("tiny", "mor", 3, vocab_size=300))  # tied embeddings
    opt = build_optimizer(model, TrainConfig(max_steps=1))
    x = torch.randint(0, 300, (2, 16))
    model(x, labels=x).loss.backward()
    opt.step()
    sd = opt.state_dict()
    named = du.name_keyed_optimizer_state(sd, opt, model)
    assert "model.embed_tokens.weight" in named["state"] and "lm_head.weight" not in named["state"]
    assert named["param_groups"][0]["params"][0] == "model.embed_tokens.weight"
    back = du.index_keyed_optimizer_state(named, opt, model)
    assert back["param_groups"] == sd["param_groups"]
    assert sorted(back["state"]) == sorted(sd["state"])
    for i, st in sd["state"].items():
        assert all(torch.equal(back["state"][i][k], v) for k, v in st.items())
    # a tied alias resolves to the same slot
    named["state"]["lm_head.weight"] = named["state"].pop("model.embed_tokens.weight")
    assert sorted(du.index_keyed_optimizer_state(named, opt, model)["state"]) == sorted(sd["state"])


def test_collective_failures_are_recognised():
    assert du.is_collective_failure(RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert du.is_collective_failure(RuntimeError("Timed out waiting 3000ms for recv operation to complete"))
    assert not du.is_collective_failure(RuntimeError("non-finite loss"))
    assert not du.is_collective_failure(ValueError("gloo"))
    msg = du.failure_message(RuntimeError("Timed out"), du.DistInfo(True, 1, 4, timeout_s=30))
    assert msg.startswith("rank 1/4:") and "30 s" in msg and du.TIMEOUT_ENV in msg


def test_single_process_loss_is_the_global_token_mean(data_dir, tmp_path, monkeypatch):
    """With ignored targets, micro-batches hold different token counts: the logged loss (and the
    gradient's objective) is sum of token losses / all target tokens of the step."""
    patch_masking(monkeypatch)
    cfg = TrainConfig(model=dict(TINY, vocab_size=300), data=data_dir, out_dir=str(tmp_path / "r"), seq_len=32,
                      batch_size=2, grad_accum=2, max_steps=1, eval_every=0, eval_batches=1, log_every=1,
                      tensorboard=False, progress=False, device="cpu")
    from mor.data import TokenLoader
    from mor.model import MoRForCausalLM

    torch.manual_seed(cfg.seed)
    model = MoRForCausalLM(cfg.model_config(300))  # the trainer's initial model (same seed)
    loader = TokenLoader(data_dir, "train", 2, 32, seed=cfg.seed)
    sums, counts = [], []
    with torch.no_grad():
        for _ in range(2):
            x, y = next(loader)
            logits = model(x).logits
            keep = y != -100
            sums.append(torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum").item())
            counts.append(int(keep.sum()))
    global_mean = sum(sums) / sum(counts)
    mean_of_means = sum(s / n for s, n in zip(sums, counts)) / 2
    # the case where a mean of micro-batch means would be measurably wrong
    assert counts[0] != counts[1] and not math.isclose(global_mean, mean_of_means, rel_tol=1e-4)
    train(cfg)
    logged = metrics(tmp_path / "r")[0][1]["loss"]
    assert logged == pytest.approx(global_mean, rel=1e-5)
