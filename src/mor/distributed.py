"""Data parallelism applied from outside the model (``torchrun ... -m mor train``).

The trainer calls these helpers; with no ``torchrun`` environment every helper is a no-op
and training runs in one process.

* ``init``: reads RANK / LOCAL_RANK / WORLD_SIZE, initialises the process group (NCCL on
  CUDA, gloo on CPU).
* ``wrap_model``: DDP (default) or FSDP2 (``fully_shard``) with the shared recursion block
  as one FSDP unit: the block's parameters are gathered once per forward/backward, not once
  per recursion, because FSDP2 keeps a unit's parameters unsharded until the unit's module
  finishes - so the unit is the whole stack of shared layers, wrapped by the model's
  ``model.layers`` container, while the unique first/last layers are their own units.
"""

from __future__ import annotations

import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class DistInfo:
    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    parallel: str = "ddp"


def init(timeout_s: float = 120.0) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(True, rank, world, local, device)


def wrap_model(model: torch.nn.Module, cfg, dist: DistInfo) -> torch.nn.Module:
    if not dist.enabled:
        return model
    dist.parallel = cfg.parallel
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = None
    if dist.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = {"mp_policy": mp} if mp is not None else {}
    core = model.model
    shared = {u for chunk in core.chunks for u in chunk}
    for u, layer in enumerate(core.layers):
        if u not in shared:
            fully_shard(layer, **kw)  # unique first / last layers: own units
    # the shared recursion block: all of its layers in one unit, gathered once per step
    shared_layers = [core.layers[u] for u in sorted(shared)]
    if shared_layers:
        fully_shard(shared_layers, **kw)
    fully_shard(model, **kw)  # embeddings, routers, final norm (and tied head)
    return model


def no_sync(wrapped, dist: DistInfo, skip: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP)."""
    if dist.enabled and skip and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return nullcontext()


def reduce_balance_load(model, dist: DistInfo) -> None:
    """Sum token-choice loss-free balancing loads over ranks so the bias stays identical."""
    if not dist.enabled:
        return
    buf = getattr(model.model, "balance_load", None)
    if buf is not None:
        tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)


def mean_across_ranks(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    if not dist.enabled:
        return t
    t = t.clone()
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t / dist.world_size


def optimizer_state(opt, model, dist: DistInfo) -> dict:
    """A full (unsharded) optimizer state dict, loadable by any number of processes."""
    if dist.enabled and dist.parallel == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))
    return opt.state_dict()


def load_optimizer_state(opt, model, state: dict, dist: DistInfo) -> None:
    if dist.enabled and dist.parallel == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
        return
    opt.load_state_dict(state)


def shutdown(dist: DistInfo) -> None:
    if dist.enabled and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
