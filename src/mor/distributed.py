"""Data parallelism for ``torchrun ... -m mor train`` on PyTorch's own distributed stack.

The trainer calls these helpers. Without a ``torchrun`` environment (no ``WORLD_SIZE`` > 1)
``init`` returns a disabled :class:`DistInfo` and every helper is a no-op or the plain
single-process operation, so one-process training is unchanged.

* :func:`init` reads ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` (set by ``torchrun``) and
  initialises the default process group: NCCL on CUDA (one GPU per local rank), gloo on
  CPU, with a collective timeout (recipe key ``dist_timeout``, overridden by the
  environment variable ``MOR_DIST_TIMEOUT``) so a dead or hung rank makes the others fail
  with an error instead of waiting forever.
* :func:`wrap_model` applies ``DistributedDataParallel`` (``parallel: ddp``, the default)
  or FSDP2 ``fully_shard`` (``parallel: fsdp2``). The FSDP2 units (see :func:`fsdp2_units`):

  - every unique layer outside the recursion (Middle-* first / last layer): its own unit;
  - the shared recursion block: ONE unit holding every shared layer plus the final norm,
    with ``reshard_after_forward=False``. FSDP2's grouped-module hooks all-gather a unit
    before the first of its modules runs and close it only after all of them have run.
    The final norm runs once, after the last recursion, so the unit stays open across all
    N_r recursions: its parameters are all-gathered once per forward, kept for backward
    (no re-gather), and its gradients are reduce-scattered once, not once per recursion.
    (Wrapping only the shared layers would re-open the unit at every recursion: 2 x N_r
    all-gathers per step; ``tests/test_distributed.py`` counts them.)
  - the root: embeddings (tied with the LM head), routers, and whatever is left.

  On CUDA, FSDP2 keeps bf16 parameters for compute and reduces gradients in fp32
  (``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``); sharded
  master weights and optimizer state stay fp32.
* Loss normalisation: :func:`all_reduce_sum` of the step's target-token count lets the
  trainer weight every micro-batch so the gradient is that of (sum of token losses) /
  (global token count over ranks and accumulation steps).
* Checkpoints: :func:`save_checkpoint` writes the single-directory format of
  :func:`mor.checkpoint.save_checkpoint` from rank 0. Under FSDP2 the full model and
  optimizer state dicts are first gathered with ``torch.distributed.checkpoint``'s
  ``get_model_state_dict`` / ``get_optimizer_state_dict`` (``full_state_dict=True``),
  a collective every rank joins. The optimizer state is stored in torch's ordinary
  index-keyed format, the one a single process writes, so any checkpoint resumes under
  any number of processes and either parallel mode (:func:`load_optimizer_state`).
"""

from __future__ import annotations

import datetime
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

#: Environment variable overriding the recipe's ``dist_timeout`` (seconds).
TIMEOUT_ENV = "MOR_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
PARALLEL_MODES = ("ddp", "fsdp2")


class DistributedError(RuntimeError):
    """The distributed environment is unusable (bad torchrun variables, missing GPUs, ...)."""


@dataclass
class DistInfo:
    """Where this process sits in the job. ``enabled`` is False for a single process."""

    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    backend: str | None = None
    timeout_s: float | None = None
    parallel: str = "none"  # none | ddp | fsdp2, set by wrap_model
    owns_group: bool = False  # init created the process group (and shutdown destroys it)

    @property
    def is_master(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------------- setup
def resolve_timeout(recipe_value: float | None = None) -> float:
    """The collective timeout in seconds: ``$MOR_DIST_TIMEOUT`` if set, else the recipe's
    ``dist_timeout``, else 600."""
    env = os.environ.get(TIMEOUT_ENV, "").strip()
    if env:
        try:
            value = float(env)
        except ValueError:
            raise DistributedError(f"{TIMEOUT_ENV}={env!r} is not a number of seconds") from None
        source = TIMEOUT_ENV
    else:
        value = DEFAULT_TIMEOUT_S if recipe_value is None else float(recipe_value)
        source = "dist_timeout"
    if not value > 0:
        raise DistributedError(f"{source}={value} must be a positive number of seconds")
    return value


def init(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Join the ``torchrun`` job described by the environment, or return a disabled DistInfo.

    ``device``: the recipe's device (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``). Under torchrun
    a CUDA device is always ``cuda:LOCAL_RANK`` (one GPU per process) with the NCCL backend;
    ``cpu`` (or ``auto`` without CUDA) uses gloo. ``timeout_s``: see :func:`resolve_timeout`.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None
    if world <= 1:
        return DistInfo()
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun "
                               f"(e.g. torchrun --nproc_per_node={world} -m mor train --config ...)")
    local = int(os.environ["LOCAL_RANK"])
    timeout = resolve_timeout(timeout_s)
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise DistributedError(f"device={device!r} but CUDA is not available; use device=cpu (gloo)")
        if local >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPU(s); "
                                   f"use --nproc_per_node <= the GPU count")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif device in ("auto", "cpu"):
        dev, backend = torch.device("cpu"), "gloo"
    else:
        raise DistributedError(f"device={device!r} is not supported for distributed training; use auto, cpu or cuda")
    owns = not tdist.is_initialized()
    if owns:
        kw: dict[str, Any] = {"device_id": dev} if backend == "nccl" else {}
        tdist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout), **kw)
    return DistInfo(True, tdist.get_rank(), tdist.get_world_size(), local, dev, tdist.get_backend(),
                    timeout, owns_group=owns)


def describe(dist: DistInfo) -> str:
    """A short description for the start-up line, e.g. ``x4 (fsdp2, nccl)``."""
    if not dist.enabled:
        return ""
    return f" x{dist.world_size} ({dist.parallel}, {dist.backend})"


def shutdown(dist: DistInfo) -> None:
    """Leave the job cleanly (barrier, then destroy the process group if ``init`` made it)."""
    if dist.enabled and dist.owns_group and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


def is_collective_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a failed collective: a timeout, a peer that closed its
    connection, an NCCL error. gloo raises plain ``RuntimeError`` with its source path."""
    if isinstance(exc, tdist.DistError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    msg = str(exc)
    return any(s in msg for s in ("gloo", "NCCL", "nccl", "Timed out", "timed out", "Connection closed",
                                  "Connection reset", "ProcessGroup", "c10d"))


def failure_message(exc: BaseException, dist: DistInfo) -> str:
    """A one-paragraph explanation of a failed collective for the user."""
    return (f"rank {dist.rank}/{dist.world_size}: a collective operation failed ({str(exc).strip()}). Another rank "
            f"probably crashed, was killed or hangs; collectives give up after {dist.timeout_s:g} s "
            f"(recipe key dist_timeout, or {TIMEOUT_ENV}). Check the other ranks' output for the first error")


# ---------------------------------------------------------------------- wrapping
def fsdp2_units(model: torch.nn.Module) -> list[tuple[str, list[torch.nn.Module], bool | None]]:
    """The FSDP2 units of a ``MoRForCausalLM``, innermost first, as
    ``(name, modules, reshard_after_forward)``; the root (the whole model) comes last.

    The shared recursion block is one unit with the final norm (see the module docstring):
    it opens before the first recursion and closes after the final norm, so it is
    all-gathered once per forward and kept for backward (``reshard_after_forward=False``).
    """
    core = model.model
    shared = sorted({u for chunk in core.chunks for u in chunk})
    units: list[tuple[str, list[torch.nn.Module], bool | None]] = []
    for u in range(len(core.layers)):
        if u not in shared:
            units.append((f"model.layers.{u}", [core.layers[u]], True))
    if shared:
        units.append(("recursion block", [core.layers[u] for u in shared] + [core.norm], False))
    units.append(("root", [model], None))  # None: FSDP2's default for the root (kept for backward)
    return units


@torch.no_grad()
def broadcast_module_state(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (what DDP does at start-up;
    FSDP2 does not, and the trainer seeds ranks differently)."""
    seen: set[int] = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        tdist.broadcast(t.data, src)


def wrap_model(model: torch.nn.Module, parallel: str, dist: DistInfo) -> torch.nn.Module:
    """Apply data parallelism; returns the module to call for training forwards.

    DDP returns a wrapper (keep using ``model`` for everything else); FSDP2 shards ``model``
    in place and returns it. ``parallel`` may also be a ``TrainConfig`` (its ``parallel``)."""
    parallel = getattr(parallel, "parallel", parallel)
    if not dist.enabled:
        return model
    if parallel not in PARALLEL_MODES:
        raise DistributedError(f"parallel={parallel!r} is not valid; choose one of: {', '.join(PARALLEL_MODES)}")
    dist.parallel = parallel
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        import inspect

        ids = [dist.device.index] if dist.device.type == "cuda" else None
        # Buffers are synced from rank 0 at construction only. The only buffers are the
        # token-choice balancing bias, kept identical by reduce_balance_load +
        # update_balance_bias, and the rank-local load it accumulates until then; a broadcast
        # before every forward would be a wasted collective per step (and rank 0's load must
        # never replace another rank's). torch >= 2.13 names the option forward_sync_buffers.
        if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
            return DDP(model, device_ids=ids, forward_sync_buffers=False)
        return DDP(model, device_ids=ids, broadcast_buffers=False)

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    broadcast_module_state(model)
    kw: dict[str, Any] = {}
    if dist.device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # DecoderLayer returns its K/V (views) next to its output; nothing modifies them in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for _name, modules, reshard in fsdp2_units(model):
        target = modules[0] if len(modules) == 1 else modules
        if reshard is None:
            fully_shard(target, **kw)
        else:
            fully_shard(target, reshard_after_forward=reshard, **kw)
    return model


def reshard(model: torch.nn.Module) -> None:
    """Free FSDP2's unsharded parameters (no-op without FSDP2).

    Units with ``reshard_after_forward=False`` (the root, the recursion block) stay
    unsharded after a forward until a backward reshards them. After a forward without
    backward (evaluation) the registered parameters are therefore the unsharded tensors,
    not the sharded ones the optimizer holds; resharding restores the sharded ones (and
    frees the memory). Not a collective."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def no_sync(wrapped, dist: DistInfo, skip: bool):
    """DDP: skip the gradient all-reduce on accumulation micro-steps. FSDP2 reduce-scatters
    every micro-step (keeping unsharded gradients would defeat the memory saving)."""
    if dist.enabled and skip and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return nullcontext()


# ---------------------------------------------------------------------- reductions
def all_reduce_sum(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """The sum of ``t`` over ranks (a new tensor; ``t`` itself when not distributed)."""
    if not dist.enabled:
        return t
    t = t.detach().clone()
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def global_count(local: int, dist: DistInfo) -> int:
    """The sum over ranks of a per-rank integer (e.g. the step's target-token count)."""
    if not dist.enabled:
        return int(local)
    return int(all_reduce_sum(torch.tensor(int(local), dtype=torch.int64, device=dist.device), dist).item())


def reduce_balance_load(model, dist: DistInfo) -> None:
    """Sum token-choice loss-free balancing loads over ranks (in place) so that
    ``model.update_balance_bias()`` moves the bias identically on every rank."""
    if not dist.enabled:
        return
    buf = getattr(model.model, "balance_load", None)
    if buf is not None:
        tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over all parameters; returns the total norm as a plain tensor
    (under FSDP2 the norm of the sharded gradients is a replicated DTensor)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


# ---------------------------------------------------------------------- checkpoints
def _param_fqns(opt: torch.optim.Optimizer, model: torch.nn.Module) -> list[str]:
    """The name of every optimizer parameter, in the optimizer's (index) order."""
    names: dict[int, str] = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """Every parameter name (including tied duplicates) -> its first name."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out[n] = first.setdefault(id(p), n)
    return out


def index_keyed_optimizer_state(osd: dict, opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """Convert a name-keyed optimizer state dict (``get_optimizer_state_dict``) to torch's
    index-keyed format (``Optimizer.state_dict()``), the format checkpoints store."""
    alias = _aliases(model)
    index = {n: i for i, n in enumerate(_param_fqns(opt, model))}

    def idx(name: str) -> int:
        return index[alias.get(name, name)]

    groups = [{**g, "params": [idx(n) for n in g["params"]]} for g in osd["param_groups"]]
    return {"state": {idx(n): s for n, s in osd["state"].items()}, "param_groups": groups}


def name_keyed_optimizer_state(sd: dict, opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """Convert an index-keyed optimizer state dict to the name-keyed format
    ``set_optimizer_state_dict`` reads."""
    fqns = _param_fqns(opt, model)
    if len(sd["param_groups"]) != len(opt.param_groups) or sum(len(g["params"]) for g in sd["param_groups"]) != len(fqns):
        raise DistributedError("the checkpoint's optimizer state does not fit this model's parameters")
    groups = [{**g, "params": [fqns[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": {fqns[int(i)]: s for i, s in sd["state"].items()}, "param_groups": groups}


def _is_name_keyed(sd: dict) -> bool:
    return any(isinstance(p, str) for g in sd.get("param_groups", []) for p in g["params"])


def optimizer_state(opt: torch.optim.Optimizer, model: torch.nn.Module, dist: DistInfo) -> dict:
    """The full optimizer state in torch's index-keyed format (rank 0; ``{}`` on other ranks
    under FSDP2). A collective under FSDP2: every rank must call it."""
    if dist.enabled and dist.parallel == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        reshard(model)  # the sharded parameters must be registered (see reshard)
        osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return index_keyed_optimizer_state(osd, opt, model) if dist.is_master else {}
    return opt.state_dict()


def load_optimizer_state(opt: torch.optim.Optimizer, model: torch.nn.Module, state: dict, dist: DistInfo) -> None:
    """Load an optimizer state saved by :func:`optimizer_state` (by any number of processes,
    either parallel mode). Under FSDP2 every rank passes the full state and keeps its shard."""
    if dist.enabled and dist.parallel == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        osd = state if _is_name_keyed(state) else name_keyed_optimizer_state(state, opt, model)
        reshard(model)
        set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(full_state_dict=True))
        return
    if _is_name_keyed(state):
        state = index_keyed_optimizer_state(state, opt, model)
    opt.load_state_dict(state)


def full_model_state(model: torch.nn.Module, dist: DistInfo) -> dict[str, torch.Tensor]:
    """The model's full state dict with each tensor once (a tied LM head dropped), on CPU
    under FSDP2. Under FSDP2 a collective that returns ``{}`` on ranks other than 0."""
    if dist.enabled and dist.parallel == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        reshard(model)
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    return sd


class _GatheredModel:
    """What ``mor.checkpoint.save_checkpoint`` needs of a model (``config`` and
    ``state_dict()``), holding a gathered full state dict instead of modules."""

    def __init__(self, config, state: dict[str, torch.Tensor]):
        self.config = config
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def save_checkpoint(path, model: torch.nn.Module, dist: DistInfo, **kwargs):
    """``mor.checkpoint.save_checkpoint`` from rank 0; returns the path there, None elsewhere.

    Every rank must call it under FSDP2 (the full state is gathered collectively)."""
    from . import checkpoint as ckpt

    if dist.enabled and dist.parallel == "fsdp2":
        state = full_model_state(model, dist)
        if not dist.is_master:
            return None
        return ckpt.save_checkpoint(path, _GatheredModel(model.config, state), **kwargs)
    if not dist.is_master:
        return None
    return ckpt.save_checkpoint(path, model, **kwargs)
