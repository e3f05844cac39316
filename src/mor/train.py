"""Pre-training: ``mor train --config RECIPE.yaml [key=value ...]``.

A recipe is a YAML file whose keys are the fields of ``TrainConfig``; its ``model`` section
holds ``ModelConfig`` fields and optionally ``preset``. Overrides use dotted keys:
``mor train --config configs/demo.yaml max_steps=50 model.num_recursions=2``.

What the loop does (SPEC.md section 7): AdamW with weight decay on matrices only,
warmup-stable-decay or cosine schedule advanced per optimizer step, gradient clipping,
gradient accumulation with the auxiliary losses scaled like the LM loss, fp32 on CPU and
bf16 autocast on CUDA, optional ``torch.compile``, the loss-free bias update after each
optimizer step, periodic validation, atomic checkpoints (the last N kept) that resume
exactly, a progress bar (loss, tok/s, MFU, ETA), TensorBoard + JSONL metrics, and a final
JSON summary line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from . import checkpoint as ckpt
from . import runlock, validate
from .config import ConfigError, ModelConfig, coerce_numbers, preset
from .flops import executed_flops_per_token, measure_matmul_peak, paper_flops_per_token, steps_for_budget
from .model import MoRForCausalLM
from .recipe import apply_overrides, read_recipe_file
from .runtime import autocast_for, resolve_device, to_json, write_atomic

SCHEDULES = ("wsd", "cosine", "constant")
INTERMIXED_ARGS = True  # `mor train --resume lr=1e-3`: overrides may follow the options


class TrainError(RuntimeError):
    """Training cannot start or continue (bad recipe, data, non-finite loss, ...)."""


@dataclass
class TrainConfig:
    model: dict = field(default_factory=dict)  # ModelConfig fields, plus optional "preset"
    data: str = "data/shakespeare"  # a directory written by `mor prepare`
    out_dir: str = "runs/default"
    seed: int = 0
    # batch geometry (global batch = batch_size * grad_accum * world_size sequences)
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    # run length: exactly one of these
    max_steps: int | None = None
    max_tokens: int | None = None
    flops_budget: float | None = None  # paper counting (SPEC section 6): forward FLOPs/token x tokens
    # optimizer and schedule
    lr: float = 3e-3
    min_lr_ratio: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    schedule: str = "wsd"
    warmup_steps: int | None = None  # default: warmup_frac of the run
    warmup_frac: float = 0.05
    decay_frac: float = 0.2  # WSD: linear decay over the last 20% of steps
    # evaluation, logging, checkpoints
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    ckpt_every: int = 0  # 0: only at the end
    keep_last: int = 3
    tensorboard: bool = True
    progress: bool = True
    # end-of-run samples
    num_samples: int = 0
    sample_tokens: int = 64
    sample_prompt: str = ""
    sample_temperature: float = 0.8
    sample_top_k: int = 50
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 autocast on CUDA) | fp32 | bf16
    compile: bool = False
    parallel: str = "ddp"  # ddp | fsdp2 (used under torchrun; see docs/distributed.md)
    dist_timeout: float = 600.0  # seconds before a stuck collective fails (env MOR_DIST_TIMEOUT overrides)
    overwrite: bool = False  # a fresh run may replace the checkpoints/metrics already in out_dir
    init_strategy: str | None = None  # with --init-from-hf: stepwise (default) | average | lower | upper | random

    def __post_init__(self):
        coerce_numbers(self)
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule={self.schedule!r} is not valid; choose one of: {', '.join(SCHEDULES)}")
        given = [k for k in ("max_steps", "max_tokens", "flops_budget") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"give exactly one run length of max_steps, max_tokens, flops_budget (got {given or 'none'})")
        for k in ("seq_len", "batch_size", "grad_accum"):
            if int(getattr(self, k)) < 1:
                raise ConfigError(f"{k}={getattr(self, k)} must be >= 1")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"dtype={self.dtype!r} is not valid; choose one of: auto, fp32, bf16")
        if self.parallel not in ("ddp", "fsdp2"):
            raise ConfigError(f"parallel={self.parallel!r} is not valid; choose one of: ddp, fsdp2")
        if not float(self.dist_timeout) > 0:
            raise ConfigError(f"dist_timeout={self.dist_timeout} must be a positive number of seconds")
        if not isinstance(self.model, dict):
            raise ConfigError("model must be a mapping of ModelConfig fields")
        validate.check_train_config(self)

    # .................................................................. recipes
    @classmethod
    def from_dict(cls, d: dict, source: str = "recipe") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**d)

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The ModelConfig of the recipe. ``vocab_size`` (the data's) is used unless the recipe
        sets one; a recipe vocab smaller than the data's is an error."""
        m = dict(self.model)
        name = m.pop("preset", None)
        mcfg_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(m) - mcfg_fields)
        if unknown:
            raise ConfigError(f"model: unknown key(s) {unknown}; valid keys: {sorted(mcfg_fields | {'preset'})}")
        if vocab_size is not None:
            if "vocab_size" in m and m["vocab_size"] < vocab_size:
                raise TrainError(f"model.vocab_size={m['vocab_size']} is smaller than the data's tokenizer "
                                 f"vocabulary ({vocab_size} tokens)")
            m.setdefault("vocab_size", vocab_size)
        if name is None:
            return ModelConfig(**m)
        arch = m.pop("architecture", "mor")
        nr = m.pop("num_recursions", None)
        return preset(name, arch, nr, **m)


def load_recipe(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """A recipe file (or none: the defaults) with ``key=value`` overrides (:mod:`mor.recipe`)."""
    d: dict[str, Any] = read_recipe_file(path) if path else {}
    return TrainConfig.from_dict(apply_overrides(d, list(overrides)), source=path or "overrides")


# ---------------------------------------------------------------------- schedule
def lr_multiplier(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based) of ``total``."""
    warm = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_frac * total))
    if warm > 0 and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    lo = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(1, total - warm)
        prog = min(1.0, (step - warm) / span)
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * prog))
    decay = int(round(cfg.decay_frac * total))
    start = total - decay
    if decay <= 0 or step < start:
        return 1.0
    return lo + (1 - lo) * max(0.0, (total - step) / decay)  # 1 at the decay's first step, 1/decay at the last


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8, **kw)


# ---------------------------------------------------------------------- helpers
def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(("MT19937", np.array(st["numpy"], dtype=np.uint32), 624, 0, 0.0))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class MetricsLogger:
    """JSONL always; TensorBoard when enabled (rank 0 only)."""

    def __init__(self, out_dir: Path, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.f = open(out_dir / "metrics.jsonl", "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                self.tb = None

    def log(self, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        self.f.write(to_json({"step": step, **metrics}, indent=None))  # strict JSON
        self.f.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.f.close()
            if self.tb is not None:
                self.tb.close()


def evaluate(model, stream, cfg: TrainConfig, device, autocast, dist=None) -> dict:
    """Validation NLL of ``stream`` (the capped validation split) with the training-time routing,
    by the one NLL definition of :func:`mor.eval.nll.evaluate_nll`.

    In a distributed run (``dist`` enabled) every rank scores its share of the windows (under
    FSDP2 all ranks must run the forward anyway) and the sums are all-reduced, so every rank
    returns the NLL one process would compute."""
    from .eval.nll import evaluate_nll

    was = model.training
    world = dist.world_size if dist is not None and dist.enabled else 1
    rank = dist.rank if world > 1 else 0
    with autocast():
        res = evaluate_nll(model, stream, seq_len=cfg.seq_len, routing="topk", batch_size=cfg.batch_size,
                           device=device, rank=rank, world_size=world)
    model.train(was)
    tot, n = res["nll_sum"], res["tokens"]
    if world > 1:
        from .distributed import all_reduce_sum, reshard

        reshard(model)  # FSDP2: a forward without backward leaves some units unsharded
        red = all_reduce_sum(torch.tensor([tot, float(n)], dtype=torch.float64, device=dist.device), dist).tolist()
        tot, n = red[0], int(red[1])
    if n == 0:
        raise TrainError("the validation split has no token to score")
    return {"val_loss": tot / n, "val_ppl": math.exp(min(tot / n, 50.0))}


# ---------------------------------------------------------------------- the trainer
def train(cfg: TrainConfig, *, resume: bool = False, init_from: str | None = None,
          init_from_hf: str | None = None) -> dict | None:
    """Train from a recipe; returns the run summary (on rank 0; None on other ranks).

    Under ``torchrun`` (WORLD_SIZE > 1) this joins the process group first (see
    ``mor.distributed`` and docs/distributed.md); a collective that fails or times out
    because another rank died or hangs is reported as a ``TrainError`` naming this rank."""
    from . import distributed as dist_util

    try:
        dist = dist_util.init(cfg.device, cfg.dist_timeout)
    except dist_util.DistributedError as e:
        raise TrainError(str(e)) from None
    try:
        # one writer per run directory (rank 0 holds it; the kernel releases it at exit)
        with runlock.RunLock(cfg.out_dir, "mor train") if dist.is_master else nullcontext():
            summary = _train(cfg, dist, resume=resume, init_from=init_from, init_from_hf=init_from_hf)
    except Exception as e:
        if dist.enabled and dist_util.is_collective_failure(e):
            raise TrainError(dist_util.failure_message(e, dist)) from e
        raise
    return summary if dist.is_master else None


def _train(cfg: TrainConfig, dist, *, resume: bool, init_from: str | None, init_from_hf: str | None = None) -> dict:
    from .data import TokenLoader, load_meta, read_split
    from . import distributed as dist_util

    torch.manual_seed(cfg.seed + dist.rank)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = dist.device if dist.enabled else resolve_device(cfg.device)
    master = dist.rank == 0
    out_dir = Path(cfg.out_dir)
    if master:  # what a killed writer left (the lock says none is alive); never a checkpoint
        runlock.remove_stale_temporaries(out_dir / "checkpoints")

    meta = load_meta(cfg.data)
    if init_from_hf:  # up-training (mor.upcycle): the pretrained model's shape, the recipe's recursion
        from .upcycle import prepare_upcycle

        mcfg, source = prepare_upcycle(init_from_hf, cfg, meta["vocab_size"], init_from=init_from)
    elif cfg.init_strategy is not None:
        raise TrainError(f"init_strategy={cfg.init_strategy!r} needs --init-from-hf DIR (the pretrained model)")
    else:
        mcfg = cfg.model_config(vocab_size=meta["vocab_size"])
    train_loader = TokenLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                               rank=dist.rank, world_size=dist.world_size)
    # validation: the first eval_batches global batches' worth of windows of the val split
    val_stream = read_split(cfg.data, "val", cfg.eval_batches * cfg.batch_size * dist.world_size * cfg.seq_len + 1)
    if len(val_stream) < 2:
        raise TrainError(f"the 'val' split of {cfg.data} has {len(val_stream)} token(s); validation needs at least 2 "
                         "(prepare the data with val_fraction > 0)")
    if cfg.seq_len > mcfg.max_position_embeddings:
        raise TrainError(f"seq_len={cfg.seq_len} exceeds model.max_position_embeddings={mcfg.max_position_embeddings}")
    validate.check_token_ids(Path(cfg.data).expanduser(), meta, mcfg.vocab_size)

    # run length in optimizer steps
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * dist.world_size
    fpt_paper = paper_flops_per_token(mcfg, cfg.seq_len)
    if cfg.max_steps is not None:
        total_steps = int(cfg.max_steps)
    elif cfg.max_tokens is not None:
        total_steps = max(1, round(cfg.max_tokens / tokens_per_step))
    else:
        total_steps = steps_for_budget(cfg.flops_budget, fpt_paper, tokens_per_step)

    # model, optionally from a checkpoint's weights with fresh training state
    start_step, tokens_seen, train_state = 0, 0, None
    resume_from = ckpt.latest_checkpoint(out_dir) if resume else None
    if resume and resume_from is None:
        raise TrainError(f"--resume: no checkpoint under {out_dir / 'checkpoints'}")
    # a fresh run in a directory with checkpoints needs overwrite=true; the old checkpoints are
    # removed only once the new run has saved its first one
    stale = ckpt.list_checkpoints(out_dir) if resume_from is None else []
    if stale and not cfg.overwrite:
        raise TrainError(f"{out_dir} already holds checkpoints ({stale[-1].name}); use --resume to "
                         "continue, overwrite=true to start over, or another out_dir")
    if stale and master and (out_dir / "metrics.jsonl").exists():
        os.replace(out_dir / "metrics.jsonl", out_dir / "metrics.prev.jsonl")
    if resume_from is not None:
        saved_cfg = ckpt.load_config(resume_from)
        if saved_cfg != mcfg:
            raise TrainError(f"--resume: the recipe's model differs from the checkpoint's config.json in {resume_from}")
        model = ckpt.load_model(resume_from, device=device)
        train_state = ckpt.load_train_state(resume_from)
    elif init_from:
        model = ckpt.load_model(init_from, device=device)
        if model.config != mcfg:
            raise TrainError(f"--init-from {init_from}: its config.json differs from the recipe's model")
        _check_same_tokenizer(init_from, cfg.data)
    elif init_from_hf:
        model = source.build(mcfg, cfg.init_strategy, cfg.seed, device, verbose=master)
        del source
    else:
        with torch.device(device):
            model = MoRForCausalLM(mcfg)
    model.train()
    tok_path = Path(cfg.data) / "tokenizer.json"
    if not tok_path.exists():
        raise TrainError(f"{cfg.data} has no tokenizer.json; run `mor prepare` first")

    wrapped = dist_util.wrap_model(model, cfg.parallel, dist)  # DDP wrapper / FSDP2 (in place) / plain
    fwd = torch.compile(wrapped) if cfg.compile else wrapped
    # fused AdamW (CUDA and CPU kernels): on CPU the per-parameter loop is ~5x slower
    opt = build_optimizer(model, cfg, fused=not (dist.enabled and cfg.parallel == "fsdp2"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, total_steps, cfg))
    if train_state is not None:
        dist_util.load_optimizer_state(opt, model, train_state["optimizer"], dist)
        sched.load_state_dict(train_state["scheduler"])
        train_loader.load_state_dict(train_state["data"])
        start_step, tokens_seen = int(train_state["step"]), int(train_state["tokens"])
        set_rng_state(train_state["rng"])
    autocast = autocast_for(device, cfg.dtype)

    # throughput accounting: executed FLOPs (MFU) against this machine's measured matmul peak
    exec_fpt = 3 * executed_flops_per_token(mcfg, cfg.seq_len)
    peak = measure_matmul_peak(device, seconds=0.5) if master else 0.0
    logger = MetricsLogger(out_dir, cfg.tensorboard, enabled=master)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / "recipe.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        n_params = model.num_parameters()
        print(f"[mor train] {mcfg.architecture}"
              + (f" ({mcfg.router_type}-choice, N_r={mcfg.num_recursions}, {mcfg.sharing}, kv={mcfg.kv_mode})"
                 if mcfg.architecture == "mor" else
                 (f" (N_r={mcfg.num_recursions}, {mcfg.sharing})" if mcfg.architecture == "recursive" else ""))
              + f" | {n_params / 1e6:.2f}M unique non-embedding params | {total_steps} steps x "
              f"{tokens_per_step} tokens | device {device}" + dist_util.describe(dist),
              file=sys.stderr)

    def save(step: int, final: bool = False) -> Path | None:
        state = {
            "optimizer": dist_util.optimizer_state(opt, model, dist),
            "scheduler": sched.state_dict(),
            "data": train_loader.state_dict(),
            "step": step, "tokens": tokens_seen, "rng": rng_state(),
        }
        # every rank calls this: under FSDP2 the full model / optimizer state is gathered
        # collectively, then rank 0 writes the single-process checkpoint format
        path = dist_util.save_checkpoint(out_dir / "checkpoints" / f"step_{step:06d}", model, dist,
                                         tokenizer=str(tok_path), train_state=state,
                                         meta={"step": step, "tokens": tokens_seen, "total_steps": total_steps})
        if not master:
            return None
        while stale:
            old = stale.pop()
            if old != path:
                shutil.rmtree(old, ignore_errors=True)
        ckpt.prune_checkpoints(out_dir, cfg.keep_last)
        return path

    bar = None
    if master and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr)
    t_start = time.perf_counter()
    t_last, tok_last = t_start, tokens_seen
    last_loss, last_val = float("nan"), {}
    tps = mfu = 0.0
    for step in range(start_step, total_steps):
        model.set_step(step)
        loss_sum = torch.zeros((), device=device)
        aux_sum = torch.zeros((), device=device)
        stats = None
        # The LM loss is (sum of token losses) / (target tokens over all micro-batches and
        # ranks). Micro-batch i's mean is weighted n_i * world / N (DDP and FSDP2 average
        # gradients over ranks), written as a divisor so that one process with full
        # batches divides by exactly grad_accum. Auxiliary losses are per-batch means,
        # scaled like the LM loss of equal-sized micro-batches (1 / grad_accum).
        micro_batches = [next(train_loader) for _ in range(cfg.grad_accum)]
        counts = [int((y != -100).sum()) for _, y in micro_batches]
        n_global = dist_util.global_count(sum(counts), dist)
        if n_global == 0:
            raise TrainError(f"step {step} has no target tokens (every label is -100)")
        for micro, (x, y) in enumerate(micro_batches):
            if device.type == "cuda":  # page-locked, so the copy is really asynchronous
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with dist_util.no_sync(wrapped, dist, micro < cfg.grad_accum - 1), autocast():
                out = fwd(x, labels=y)
                if counts[micro]:
                    lm = out.lm_loss / (n_global / (counts[micro] * dist.world_size))
                else:  # no targets here: contribute nothing, but keep every parameter in the graph
                    lm = out.logits.float().sum() * 0.0
                loss = lm + out.aux_loss / cfg.grad_accum
            loss.backward()
            loss_sum += lm.detach()
            aux_sum += out.aux_loss.detach() / cfg.grad_accum
            stats = out.router_stats
        if dist.enabled:  # global means, identical on every rank (so all ranks stop together below)
            red = dist_util.all_reduce_sum(torch.stack([loss_sum, aux_sum]), dist) / dist.world_size
            loss_sum, aux_sum = red[0], red[1]
        if not torch.isfinite(loss_sum):
            raise TrainError(f"non-finite loss ({loss_sum.item()}) at step {step}; stopping before the optimizer "
                             f"step. Checkpoints already in {out_dir / 'checkpoints'} are intact (try a lower lr)")
        grad_norm = dist_util.clip_grad_norm(model, cfg.grad_clip) if cfg.grad_clip > 0 else None
        opt.step()
        step_lr = sched.get_last_lr()[0]  # the lr this optimizer step used
        sched.step()
        opt.zero_grad(set_to_none=True)
        dist_util.reduce_balance_load(model, dist)
        model.update_balance_bias()
        tokens_seen += tokens_per_step
        done = step + 1

        if done % cfg.log_every == 0 or done == total_steps or done == start_step + 1:
            last_loss = loss_sum.item()
            now = time.perf_counter()
            tps = (tokens_seen - tok_last) / max(now - t_last, 1e-9)
            mfu = tps * exec_fpt / (peak * dist.world_size) if peak > 0 else 0.0
            if mfu > 1.0:  # the start-up peak was measured under contention: measure again; the
                # peak is at least the rate just achieved, so MFU never reads above 100%
                peak = max(peak, measure_matmul_peak(device, seconds=0.5), tps * exec_fpt / dist.world_size)
                mfu = tps * exec_fpt / (peak * dist.world_size)
            t_last, tok_last = now, tokens_seen
            rec = {"loss": last_loss, "aux_loss": aux_sum.item(), "lr": step_lr,
                   "tokens": tokens_seen, "tok_per_s": tps, "mfu": mfu,
                   "flops": fpt_paper * tokens_seen}
            if grad_norm is not None:
                rec["grad_norm"] = float(grad_norm)
            if stats:
                for k, v in stats.items():
                    v = v.detach().float().cpu()
                    if v.dim() == 0:
                        rec[f"router/{k}"] = v.item()
                    else:
                        for i, vi in enumerate(v.tolist()):
                            rec[f"router/{k}/{i + 1}"] = vi
            if device.type == "cuda":
                rec["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            logger.log(done, **rec)
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * mfu:.1f}%")
        if bar is not None:
            bar.update(1)
        if cfg.eval_every and (done % cfg.eval_every == 0) and done != total_steps:
            last_val = evaluate(model, val_stream, cfg, device, autocast, dist=dist)
            logger.log(done, **last_val)
            if bar is not None:
                bar.write(f"step {done}: val_loss {last_val['val_loss']:.4f} ppl {last_val['val_ppl']:.2f}")
        if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done != total_steps:
            save(done)
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t_start
    final_step = max(total_steps, start_step)
    last_val = evaluate(model, val_stream, cfg, device, autocast, dist=dist)
    logger.log(final_step, **last_val)
    path = save(final_step, final=True)
    summary = {
        "out_dir": str(out_dir), "checkpoint": str(path) if path else None,
        "architecture": mcfg.architecture, "router_type": mcfg.router_type if mcfg.architecture == "mor" else None,
        "num_recursions": mcfg.num_recursions, "unique_params": model.num_parameters(),
        "steps": final_step, "tokens": tokens_seen, "flops": fpt_paper * tokens_seen,
        "train_loss": last_loss, **last_val, "tok_per_s": tps, "mfu": mfu, "wall_s": wall,
    }
    logger.close()
    dist_util.shutdown(dist)
    if master and cfg.num_samples > 0:
        # rank 0 alone (the process group is gone): under FSDP2 the model is sharded, so
        # sample from the final checkpoint's full weights instead
        sampler = ckpt.load_model(path, device=device) if dist.parallel == "fsdp2" else model
        summary["samples"] = _samples(sampler, tok_path, cfg, device)
    return summary


def _check_same_tokenizer(checkpoint: str, data: str) -> None:
    """Refuse starting from weights trained with another tokenizer than the data's (same
    vocabulary size or not: ids would mean different text)."""
    ck_tok = ckpt.resolve_checkpoint(checkpoint) / "tokenizer.json"
    data_tok = Path(data).expanduser() / "tokenizer.json"
    if ck_tok.is_file() and data_tok.is_file():
        if validate.tokenizer_fingerprint(ck_tok) != validate.tokenizer_fingerprint(data_tok):
            raise TrainError(f"--init-from {checkpoint}: its tokenizer.json differs from the data's ({data_tok}); "
                             "the same token ids would mean different text. Prepare the data with "
                             f"`mor prepare ... --tokenizer {ck_tok}`")


def _samples(model, tok_path: Path, cfg: TrainConfig, device) -> list[str]:
    from tokenizers import Tokenizer

    from .engine import SamplingParams, generate_text

    tok = Tokenizer.from_file(str(tok_path))
    params = SamplingParams(max_tokens=cfg.sample_tokens, temperature=cfg.sample_temperature,
                            top_k=cfg.sample_top_k, seed=cfg.seed)
    prompts = [cfg.sample_prompt] * cfg.num_samples
    model.eval()
    texts = generate_text(model, tok, prompts, params)
    for i, t in enumerate(texts):
        print(f"\n--- sample {i + 1} ---\n{cfg.sample_prompt}{t}", file=sys.stderr)
    return texts


# ---------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML recipe (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, dotted for sections: lr=1e-3 model.num_recursions=2")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue exactly from the run's latest checkpoint")
    g.add_argument("--init-from", metavar="CHECKPOINT", help="start from a checkpoint's weights with fresh state")
    p.add_argument("--init-from-hf", metavar="DIR", help="up-train: build the recipe's recursive / MoR model from a "
                   "pretrained vanilla model (Hugging Face Llama directory or mor checkpoint) with init_strategy")


def run(args: argparse.Namespace) -> dict:
    cfg = load_recipe(args.config, args.overrides)
    return train(cfg, resume=args.resume, init_from=args.init_from, init_from_hf=args.init_from_hf)
