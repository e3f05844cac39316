"""``mor bench infer``: generation throughput of MoR against vanilla (paper protocol).

Protocol (SPEC.md section 8, paper section 4): unprompted generation (every request
starts from the end-of-text token) or a given prompt file; output lengths drawn uniformly
in ``mean * [1 - spread, 1 + spread]`` (mean 256 by default), the same draw for every
model; a warm-up run on the same engine before the timed run; two batch settings:

* ``batch``: ``--batch`` concurrent sequences (32);
* ``max``:   the memory-matched maximum batch. Vanilla runs at ``--vanilla-max-batch``
  sequences (or as many as ``--kv-budget-mb`` holds), each with a full-length KV cache;
  that KV memory is the budget. A MoR model runs at the largest batch whose *expected*
  KV memory fits the same budget (SPEC section 5 formulas, with the capacities as the
  fraction of tokens entering each recursion), and its KV pool is exactly the budget:
  if its tokens go deeper than expected, the engine preempts (reported).

Every MoR model (expert-choice, Middle-Cycle, N_r from ``--recursions``) is compared with
the vanilla model of the same width and the same number of unrolled layers, in the same
engine (MoR: continuous depth-wise batching; vanilla: continuous sequence-wise batching).
Each vanilla model is also compared with Hugging Face ``transformers`` ``generate`` on the
same weights (``LlamaForCausalLM``) and the same fixed-length workload at ``--batch``.

Random-init models are the default. Their routers are arbitrary, so the threshold rule
would give an arbitrary depth distribution; ``calibrate_expert_routers`` gives each
deciding router a bias so that on random token sequences the share of tokens continuing
at recursion r matches c_r / c_{r-1} (a fair depth distribution). The depths actually
produced during generation are measured and reported. ``--mor-checkpoint`` /
``--vanilla-checkpoint`` load trained models instead (no calibration).

``--profile`` adds, for every model at batch 1, ``--batch`` and its memory-matched batch, a
profile of steady decode steps (``mor.engine.profile``: time per phase and per op kind) placed
against this device's measured matmul peak and memory bandwidth (achieved GFLOP/s, GB/s,
share of the roofline limit; for MoR the speed-up over vanilla next to the roofline
prediction, the FLOP ratio and the KV ratio). ``--decode-precision`` runs every model with
opt-in low-precision weights (``mor.engine.quant``) and reports their accuracy cost.

The human table comes first; ``run`` returns the summary dict (printed by ``mor`` as the
last JSON line).
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..cache import expected_kv_layers_per_token, kv_bytes_per_token_layer
from ..config import ModelConfig, preset
from ..model import MoRForCausalLM
from ..runtime import resolve_device, resolve_dtype
from ..variants import Variant
from .. import validate
from ..engine.quant import DECODE_PRECISIONS
from .infer_profile import print_profile, profile_all

KERNEL_CHOICES = {"auto": None, "on": True, "off": False}  # --cpu-kernels -> Engine(cpu_kernels=...)
PAPER = {"batch": {2: 1.23, 3: 1.33, 4: 1.42}, "max": {2: 1.60, 3: 1.95, 4: 2.06}}


@dataclass
class InferBench:
    """The settings of one ``mor bench infer`` run (each is the CLI option of the same name)."""

    device: str = "auto"
    dtype: str = "auto"
    preset: str | None = None
    layers: int | None = None
    hidden_size: int | None = None
    vocab_size: int | None = None
    recursions: list[int] = field(default_factory=lambda: [2, 3, 4])
    kv_mode: str = "recursion_wise"
    schedule: str = "depth"
    batch: int = 32
    vanilla_max_batch: int | None = None
    kv_budget_mb: float | None = None
    skip_max: bool = False
    mean_len: int = 256
    len_spread: float = 0.5
    requests_per_slot: float | None = None
    prompts: str | None = None
    tokenizer: str | None = None
    temperature: float = 1.0
    seed: int = 0
    mor_checkpoint: list[str] = field(default_factory=list)
    vanilla_checkpoint: str | None = None
    hf: str = "first"
    threads: int | None = None
    block_size: int = 16
    calib_seqs: int = 16
    repeats: int = 1
    profile: bool = False
    decode_precision: str | None = None
    profile_steps: int = 16
    cpu_kernels: str = "auto"
    cuda_graphs: str = "auto"


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = InferBench()
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--preset", default=d.preset,
                   help="model shape, see mor.PRESETS (default: smollm-360m on CUDA; on CPU the 'small' preset "
                        "(hidden 256, vocab 8192) with 14 layers, which MoR-2/3/4 all fit: one vanilla partner)")
    p.add_argument("--layers", type=validate.positive_int, default=d.layers,
                   help="base layer count (default the preset's; MoR adds layers when (L-2) is not a multiple of N_r)")
    p.add_argument("--hidden-size", type=validate.positive_int, default=d.hidden_size, help="override the preset's width (FFN = 3x)")
    p.add_argument("--vocab-size", type=validate.positive_int, default=d.vocab_size, help="override the preset's vocabulary size")
    p.add_argument("--recursions", type=validate.positive_int, nargs="+", default=d.recursions, help="MoR N_r values (default 2 3 4)")
    p.add_argument("--kv-mode", default=d.kv_mode, choices=["recursion_wise", "shared"])
    p.add_argument("--schedule", default=d.schedule, choices=["depth", "sequence", "both"],
                   help="MoR batching: depth-wise (paper), sequence-wise, or both")
    p.add_argument("--batch", type=validate.positive_int, default=d.batch, help="fixed batch setting (default 32)")
    p.add_argument("--vanilla-max-batch", type=validate.positive_int, default=d.vanilla_max_batch,
                   help="vanilla's maximum batch, which sets the memory budget (default 256 on CUDA, 48 on CPU)")
    p.add_argument("--kv-budget-mb", type=validate.positive_float, default=d.kv_budget_mb,
                   help="KV memory budget instead of --vanilla-max-batch")
    p.add_argument("--skip-max", action="store_true", help="only the fixed batch setting")
    p.add_argument("--mean-len", type=validate.positive_int, default=d.mean_len, help="mean output length (default 256)")
    p.add_argument("--len-spread", type=validate.unit_fraction, default=d.len_spread, help="lengths uniform in mean*(1 +- spread)")
    p.add_argument("--requests-per-slot", type=validate.positive_float, default=d.requests_per_slot,
                   help="requests = this x batch (default 2 on CUDA, 1.5 on CPU); more than 1 exercises refills")
    p.add_argument("--prompts", default=d.prompts, help="text file, one prompt per line (needs a tokenizer)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="tokenizer.json for --prompts")
    p.add_argument("--temperature", type=validate.nonneg_float, default=d.temperature, help="sampling temperature (0 = greedy)")
    p.add_argument("--seed", type=validate.nonneg_int, default=d.seed)
    p.add_argument("--mor-checkpoint", action="append", default=[], help="trained MoR checkpoint (repeatable)")
    p.add_argument("--vanilla-checkpoint", default=d.vanilla_checkpoint, help="trained vanilla checkpoint")
    p.add_argument("--hf", default=d.hf, choices=["first", "all", "none"],
                   help="transformers.generate baseline for the first vanilla model (default), all, or none")
    p.add_argument("--threads", type=validate.positive_int, default=d.threads, help="CPU threads for torch (default: torch's)")
    p.add_argument("--block-size", type=validate.positive_int, default=d.block_size, help="KV block size in tokens")
    p.add_argument("--calib-seqs", type=validate.positive_int, default=d.calib_seqs, help="random sequences used to calibrate routers")
    p.add_argument("--repeats", type=validate.positive_int, default=d.repeats,
                   help="timed runs per configuration, in rounds over all configurations (interleaved); the "
                        "fastest counts (use >1 on a busy machine)")
    p.add_argument("--profile", action="store_true",
                   help="also profile steady decode steps of every model at batch 1, --batch and the memory-matched "
                        "batch: time per phase and per op kind, achieved GFLOP/s and bytes/token against the "
                        "measured matmul peak and memory bandwidth, MoR's speed-up against its roofline prediction")
    p.add_argument("--decode-precision", default=d.decode_precision, choices=list(DECODE_PRECISIONS),
                   help="opt-in low-precision decode weights for every model (mor.engine.quant; default: the "
                        "models' own, exact); reports NLL and greedy agreement against the full-precision model")
    p.add_argument("--profile-steps", type=int, default=d.profile_steps, help="steps per profile view (default 16)")
    p.add_argument("--cpu-kernels", default=d.cpu_kernels, choices=list(KERNEL_CHOICES),
                   help="decode steps on the compiled CPU kernels (mor.engine.kernels): auto (whenever they apply: "
                        "fp32 on CPU with a C compiler), on (required), off (PyTorch ops only)")
    p.add_argument("--cuda-graphs", default=d.cuda_graphs, choices=list(KERNEL_CHOICES),
                   help="decode calls replayed from CUDA graphs (mor.engine.graphs): auto (on CUDA), on (required), "
                        "off (eager launches)")


# ---------------------------------------------------------------------- router calibration
def _last_linear(router: nn.Module) -> nn.Linear:
    return [m for m in router.modules() if isinstance(m, nn.Linear)][-1]


def set_router_bias(router: nn.Module, value: float) -> None:
    """Give the router's output layer a bias ``value`` (adding the parameter if it has none)."""
    lin = _last_linear(router)
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, device=lin.weight.device, dtype=lin.weight.dtype))
    with torch.no_grad():
        lin.bias.fill_(value)


@torch.no_grad()
def calibrate_expert_routers(model: MoRForCausalLM, *, num_seqs: int = 16, seq_len: int = 256,
                             seed: int = 0) -> list[float]:
    """Bias each deciding expert-choice router so that, under the threshold rule on random token
    sequences, a fraction c_r / c_{r-1} of the candidates at recursion r continues (hence a
    fraction c_r of all tokens enters recursion r). Returns the measured entering fractions."""
    cfg = model.config
    if not (cfg.architecture == "mor" and cfg.router_type == "expert"):
        raise ValueError("router calibration applies to expert-choice MoR models")
    core = model.model
    deciders = core.aux_routers if cfg.use_aux_router else core.routers
    caps = cfg.resolved_capacities()
    dev = core.embed_tokens.weight.device
    g = torch.Generator().manual_seed(seed)
    T = min(seq_len, cfg.max_position_embeddings)
    ids = torch.randint(0, cfg.vocab_size, (num_seqs, T), generator=g).to(dev)
    captured: dict[int, torch.Tensor] = {}
    for r in range(cfg.num_recursions):
        if caps[r] >= 1.0:
            continue
        hook = deciders[r].register_forward_hook(lambda m, i, o, r=r: captured.__setitem__(r, o.squeeze(-1).float()))
        try:
            out = model(ids, routing="threshold")
        finally:
            hook.remove()
        if r not in captured:  # no token reached recursion r: nothing to calibrate on
            continue
        logits = captured.pop(r)
        n_cand = (out.depth >= r).sum(dim=1)  # candidates are packed first in each row
        valid = torch.arange(logits.size(1), device=dev)[None, :] < n_cand[:, None]
        vals = logits[valid]
        keep = caps[r] / caps[r - 1] if r > 0 else caps[0]
        if vals.numel() == 0:
            continue
        thr = torch.quantile(vals, 1.0 - keep).item()
        lin = _last_linear(deciders[r])
        set_router_bias(deciders[r], (0.0 if lin.bias is None else float(lin.bias[0])) - thr)
    depth = model(ids, routing="threshold").depth
    return [float((depth > r).float().mean()) for r in range(cfg.num_recursions)]


# ---------------------------------------------------------------------- models
@dataclass
class Entry:
    name: str
    model: MoRForCausalLM
    kind: str  # "vanilla" | "mor"
    num_recursions: int
    enter_fractions: list[float] | None = None  # measured on calibration data (MoR)
    reference: MoRForCausalLM | None = None  # the full-precision model when ``model`` is a low-precision copy
    accuracy: dict | None = None  # mor.engine.quant.decode_accuracy of ``model`` against ``reference``


def _shape(settings: InferBench, dev) -> tuple[str, dict, int | None]:
    """(preset name, config overrides, base layer count)."""
    over: dict[str, Any] = {}
    layers = settings.layers
    if settings.preset is None and dev.type != "cuda":
        name, layers = "small", layers or 14
    else:
        name = settings.preset or "smollm-360m"
    if settings.hidden_size:
        over.update(hidden_size=settings.hidden_size, intermediate_size=3 * settings.hidden_size)
    if settings.vocab_size:
        over["vocab_size"] = settings.vocab_size
    return name, over, layers


def mor_config(name: str, nr: int, layers: int | None, kv_mode: str, **over) -> ModelConfig:
    """The benchmark's MoR model: expert-choice, Middle-Cycle, ``nr`` recursions, from preset ``name``."""
    base = preset(name, "vanilla", **over)
    if layers is not None:
        base = base.replace(num_hidden_layers=layers)
    return Variant("mor-expert", nr, kv_mode=kv_mode).config(base)


def _build(cfg: ModelConfig, dev, dtype, seed: int) -> MoRForCausalLM:
    torch.manual_seed(seed)
    with torch.device(dev):
        m = MoRForCausalLM(cfg)
    return m.to(dtype).eval()


# ---------------------------------------------------------------------- runs
def _workload(n: int, mean: int, spread: float, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    lo, hi = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
    return rng.integers(lo, hi + 1, size=n).tolist()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_engine(model: MoRForCausalLM, prompts: list[list[int]], lengths: list[int], *, batch: int,
               schedule: str, temperature: float, seed: int, block_size: int,
               kv_budget_bytes: int | None = None, cpu_kernels: bool | None = None,
               cuda_graphs: bool | None = None) -> dict:
    """Warm up, then time one engine run of the workload; returns throughput and engine stats."""
    from ..engine import Engine, SamplingParams

    max_len = max(len(p) for p in prompts) + max(lengths)
    eng = Engine(model, max_batch=batch, max_model_len=min(max_len, model.config.max_position_embeddings),
                 kv_memory_bytes=kv_budget_bytes, block_size=block_size, schedule=schedule, seed=seed,
                 cpu_kernels=cpu_kernels, cuda_graphs=cuda_graphs)
    _sync(eng.device)
    t0 = time.perf_counter()
    graphs = eng.capture_graphs()  # (excluded: an engine records its graphs once, before serving)
    _sync(eng.device)
    capture_s = time.perf_counter() - t0
    for i in range(min(batch, 16)):  # warm-up (excluded)
        eng.add_request(prompts[i % len(prompts)], SamplingParams(max_tokens=8, temperature=temperature,
                                                                  ignore_eos=True))
    eng.run_until_done()
    eng.reset_stats()
    for i, n in enumerate(lengths):
        eng.add_request(prompts[i % len(prompts)], SamplingParams(max_tokens=n, temperature=temperature,
                                                                  ignore_eos=True))
    _sync(eng.device)
    t0 = time.perf_counter()
    eng.run_until_done()
    _sync(eng.device)
    wall = time.perf_counter() - t0
    s = eng.stats
    res = {
        "batch": batch, "schedule": eng.schedule, "requests": len(lengths), "workload_tokens": sum(lengths),
        "tokens": s.generated_tokens,
        "wall_s": wall, "tokens_per_s": s.generated_tokens / wall, "steps": s.steps,
        "mean_running": s.mean_running, "mean_block_batch": s.mean_block_batch, "occupancy": s.occupancy,
        "exit_fractions": [c / max(1, sum(s.exit_counts)) for c in s.exit_counts], "mean_depth": s.mean_depth,
        "preemptions": s.preemptions, "kv_pool_mb": s.kv["kv_pool_bytes"] / 2**20,
        "kv_peak_mb": s.kv["kv_peak_bytes"] / 2**20, "cpu_kernels": eng.cpu_kernels,
        "step_kernel": eng.step_kernel, "cuda_graphs": eng.cuda_graphs, "graphs_recorded": graphs, "graph_capture_s": capture_s,
    }
    del eng
    gc.collect()
    if model.model.embed_tokens.weight.is_cuda:
        torch.cuda.empty_cache()
    return res


def hf_llama(model: MoRForCausalLM):
    """A transformers LlamaForCausalLM holding a vanilla model's weights."""
    import transformers

    cfg = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu",
    )
    p = model.model.embed_tokens.weight
    with torch.device(p.device):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    if unexpected or not set(missing) <= {"lm_head.weight"}:
        raise RuntimeError(f"vanilla weights do not fit LlamaForCausalLM: {missing} {unexpected}")
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    return hf.to(p.dtype).eval()


@torch.no_grad()
def run_hf(model: MoRForCausalLM, prompt: list[int], n_seqs: int, length: int, *, temperature: float,
           seed: int) -> dict:
    """transformers ``generate`` (static batch of ``n_seqs``, ``length`` new tokens each)."""
    hf = hf_llama(model)
    dev = model.model.embed_tokens.weight.device
    ids = torch.tensor([prompt] * n_seqs, device=dev)
    kw = dict(attention_mask=torch.ones_like(ids), pad_token_id=0, eos_token_id=None,
              do_sample=temperature > 0, top_k=0, top_p=1.0)
    if temperature > 0:
        kw["temperature"] = temperature
    torch.manual_seed(seed)
    hf.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=length, min_new_tokens=length, **kw)
    _sync(dev)
    wall = time.perf_counter() - t0
    tokens = (out.size(1) - ids.size(1)) * n_seqs
    del hf
    gc.collect()
    return {"batch": n_seqs, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


# ---------------------------------------------------------------------- entry point
def run(args: argparse.Namespace) -> dict:
    return benchmark(InferBench(**{f.name: getattr(args, f.name) for f in fields(InferBench)}))


def benchmark(settings: InferBench) -> dict:
    """Run the benchmark (module docstring); prints the table and returns the summary."""
    from ..engine import RequestError

    dev = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, dev)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.batch < 1 or settings.mean_len < 1 or not (0 <= settings.len_spread < 1):
        raise RequestError(f"--batch={settings.batch} and --mean-len={settings.mean_len} must be >= 1 and "
                           f"--len-spread={settings.len_spread} in [0, 1)")
    if any(nr < 2 for nr in settings.recursions):
        raise RequestError(f"--recursions {settings.recursions}: MoR needs N_r >= 2")
    if settings.cuda_graphs == "on" and dev.type != "cuda":
        raise RequestError(f"--cuda-graphs on needs a CUDA device (--device {settings.device} is {dev.type}); "
                           f"use auto or off")
    per_slot = settings.requests_per_slot or (2.0 if dev.type == "cuda" else 1.5)
    shape, over, base_layers = _shape(settings, dev)
    t_start = time.perf_counter()

    # prompts: unprompted generation starts at the end-of-text token (id 0)
    prompts: list[list[int]] = [[0]]
    if settings.prompts:
        from tokenizers import Tokenizer

        tok_path = settings.tokenizer
        if tok_path is None:
            raise RequestError("--prompts needs --tokenizer (the tokenizer.json of the models)")
        tok = Tokenizer.from_file(tok_path)
        with open(settings.prompts, encoding="utf-8") as f:
            prompts = [tok.encode(line.rstrip("\n")).ids for line in f if line.strip()]
        if not prompts:
            raise RequestError(f"--prompts {settings.prompts} has no non-empty line")

    # models: vanilla partners keyed by layer count, MoR per N_r
    from ..checkpoint import load_model

    mors: list[Entry] = []
    vanillas: dict[int, Entry] = {}
    if settings.mor_checkpoint:
        for path in settings.mor_checkpoint:
            m = load_model(path, dev, dtype)
            if m.config.architecture != "mor":
                raise RequestError(f"--mor-checkpoint {path} is a {m.config.architecture} model")
            mors.append(Entry(f"MoR-{m.config.num_recursions}", m, "mor", m.config.num_recursions))
    else:
        for nr in settings.recursions:
            cfg = mor_config(shape, nr, base_layers, settings.kv_mode, **over)
            m = _build(cfg, dev, dtype, settings.seed + nr)
            fr = calibrate_expert_routers(m, num_seqs=settings.calib_seqs,
                                          seq_len=min(len(prompts[0]) + settings.mean_len, cfg.max_position_embeddings),
                                          seed=settings.seed)
            mors.append(Entry(f"MoR-{nr}", m, "mor", nr, fr))
    if settings.vanilla_checkpoint:
        m = load_model(settings.vanilla_checkpoint, dev, dtype)
        if m.config.architecture != "vanilla":
            raise RequestError(f"--vanilla-checkpoint {settings.vanilla_checkpoint} is a {m.config.architecture} model")
        for e in mors:
            vanillas[e.model.config.num_hidden_layers] = Entry(f"vanilla-{m.config.num_hidden_layers}L", m,
                                                               "vanilla", 0)
    else:
        for e in mors:
            L = e.model.config.num_hidden_layers
            if L not in vanillas:
                cfg = preset(shape, "vanilla", num_hidden_layers=L, **over)
                vanillas[L] = Entry(f"vanilla-{L}L", _build(cfg, dev, dtype, settings.seed), "vanilla", 0)

    if settings.decode_precision:  # every model decodes with low-precision weights; measure what that costs
        from ..engine.quant import decode_accuracy, low_precision_copy

        g = torch.Generator().manual_seed(settings.seed + 1)
        for e in mors + list(vanillas.values()):
            cfg = e.model.config
            ids = torch.randint(0, cfg.vocab_size, (4, min(128, cfg.max_position_embeddings)), generator=g).to(dev)
            e.reference, e.model = e.model, low_precision_copy(e.model, settings.decode_precision)
            e.accuracy = decode_accuracy(e.reference, e.model, ids)

    # memory budget (bytes) for the memory-matched setting, per vanilla partner
    max_seq = max(len(p) for p in prompts) + round(settings.mean_len * (1 + settings.len_spread))
    vmax = settings.vanilla_max_batch or (256 if dev.type == "cuda" else 48)

    def per_seq_bytes(m: MoRForCausalLM, fractions=None) -> float:
        """KV bytes of one full-length sequence (whole blocks) at the expected depth distribution."""
        cfg = m.config
        tokens = math.ceil(max_seq / settings.block_size) * settings.block_size
        return tokens * kv_bytes_per_token_layer(cfg, dtype) * expected_kv_layers_per_token(cfg, fractions)

    lengths: dict[tuple, list[int]] = {}
    schedules = ["depth", "sequence"] if settings.schedule == "both" else [settings.schedule]
    specs: dict[tuple, dict] = {}  # configuration -> what to run (insertion order = report order)

    def plan(entry: Entry, setting: str, batch: int, schedule: str, budget: int | None, partner: str) -> tuple:
        key = (id(entry), setting, batch, schedule)  # by entry: two checkpoints may share a name
        if key not in specs:
            wl = lengths.get((setting, batch)) or _workload(math.ceil(per_slot * batch), settings.mean_len,
                                                            settings.len_spread, settings.seed)
            lengths[(setting, batch)] = wl
            specs[key] = dict(entry=entry, setting=setting, batch=batch, schedule=schedule, budget=budget,
                              partner=partner, workload=wl)
        return key

    results = []
    max_cases: dict[str, tuple] = {}
    pairs: list[tuple[tuple, tuple, Entry, str]] = []  # (MoR configuration, its vanilla's, MoR entry, setting)
    for e in mors:
        v = vanillas[e.model.config.num_hidden_layers]
        cases = [("batch", settings.batch, settings.batch, None)]
        if not settings.skip_max:
            if settings.kv_budget_mb:
                budget = int(settings.kv_budget_mb * 2**20)
                v_batch = max(1, int(budget // per_seq_bytes(v.model)))
            else:
                budget, v_batch = int(math.ceil(vmax * per_seq_bytes(v.model))), vmax
            m_batch = max(1, int(budget // per_seq_bytes(e.model, e.enter_fractions)))
            cases.append(("max", v_batch, m_batch, budget))
            max_cases[e.name] = (v_batch, m_batch, budget)
        for setting, vb, mb, budget in cases:
            vkey = plan(v, setting, vb, "sequence", budget, "")
            for sch in schedules:
                pairs.append((plan(e, setting, mb, sch, budget, v.name), vkey, e, setting))
    # every configuration once per round, ``--repeats`` rounds, the fastest run of each counting:
    # a machine whose speed drifts slows all of them alike, so their ratios hold
    best: dict[tuple, dict] = {}
    for _ in range(max(1, settings.repeats)):
        for key, sp in specs.items():
            res = run_engine(sp["entry"].model, prompts, sp["workload"], batch=sp["batch"], schedule=sp["schedule"],
                             temperature=settings.temperature, seed=settings.seed, block_size=settings.block_size,
                             kv_budget_bytes=sp["budget"], cpu_kernels=KERNEL_CHOICES[settings.cpu_kernels],
                             cuda_graphs=KERNEL_CHOICES[settings.cuda_graphs])
            if key not in best or res["tokens_per_s"] > best[key]["tokens_per_s"]:
                best[key] = res
            print(f"  ran {sp['entry'].name} {sp['setting']} batch {sp['batch']} {sp['schedule']}: "
                  f"{res['tokens_per_s']:.1f} tok/s in {res['wall_s']:.2f} s, {res['steps']} steps"
                  + (f" ({res['graphs_recorded']} graphs recorded in {res['graph_capture_s']:.1f} s)"
                     if res["graphs_recorded"] else ""), flush=True)
    rows: list[dict] = []
    row_of: dict[tuple, dict] = {}
    for key, sp in specs.items():
        entry = sp["entry"]
        row_of[key] = row = {
            "model": entry.name, "kind": entry.kind, "num_recursions": entry.num_recursions, "setting": sp["setting"],
            "vs": sp["partner"], "unique_params": entry.model.num_parameters(),
            "layers": entry.model.config.num_hidden_layers,
            "kv_bytes_per_token": kv_bytes_per_token_layer(entry.model.config, dtype)
            * expected_kv_layers_per_token(entry.model.config, entry.enter_fractions),
            "calibrated_enter_fractions": entry.enter_fractions, **best[key]}
        rows.append(row)
    for mkey, vkey, e, setting in pairs:
        mrow = row_of[mkey]
        mrow["speedup"] = mrow["tokens_per_s"] / row_of[vkey]["tokens_per_s"]
        mrow["paper_speedup"] = PAPER[setting].get(e.num_recursions)
        results.append(mrow)
    hf_rows = []
    if settings.hf != "none":
        try:
            import transformers  # noqa: F401
        except ImportError:
            transformers = None
        if transformers is not None:
            for v in list(vanillas.values())[:None if settings.hf == "all" else 1]:
                n = settings.batch
                wl = [settings.mean_len] * n
                ours = hf = None
                for _ in range(max(1, settings.repeats)):  # interleaved, the fastest of each
                    o = run_engine(v.model, prompts[:1], wl, batch=n, schedule="sequence",
                                   temperature=settings.temperature, seed=settings.seed, block_size=settings.block_size,
                                   cpu_kernels=KERNEL_CHOICES[settings.cpu_kernels],
                                   cuda_graphs=KERNEL_CHOICES[settings.cuda_graphs])
                    h = run_hf(v.reference or v.model, prompts[0], n, settings.mean_len,
                               temperature=settings.temperature, seed=settings.seed)
                    ours = o if ours is None or o["tokens_per_s"] > ours["tokens_per_s"] else ours
                    hf = h if hf is None or h["tokens_per_s"] > hf["tokens_per_s"] else hf
                hf_rows.append({"model": v.name, "batch": n, "new_tokens": settings.mean_len,
                                "ours_tokens_per_s": ours["tokens_per_s"], "hf_tokens_per_s": hf["tokens_per_s"],
                                "ratio": ours["tokens_per_s"] / hf["tokens_per_s"]})

    prof = profile_all(settings, mors, vanillas, prompts[0], max_cases, dev) if settings.profile else None
    summary = {
        "device": str(dev), "device_name": _device_name(dev), "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "shape": shape, "shape_overrides": over, "kv_mode": settings.kv_mode,
        "repeats": settings.repeats, "cpu_kernels": any(r["cpu_kernels"] for r in rows),
        "step_kernel": all(r.get("step_kernel") for r in rows) if rows else False,
        "cuda_graphs": any(r["cuda_graphs"] for r in rows),
        "mean_len": settings.mean_len, "len_spread": settings.len_spread, "requests_per_slot": per_slot,
        "prompted": bool(settings.prompts), "temperature": settings.temperature, "vanilla_max_batch": vmax,
        "kv_budget_mb": settings.kv_budget_mb, "rows": rows, "comparisons": [
            {"model": r["model"], "setting": r["setting"], "schedule": r["schedule"], "batch": r["batch"],
             "vs": r["vs"], "speedup": r["speedup"], "paper_speedup": r["paper_speedup"]} for r in results],
        "hf": hf_rows, "profile": prof, "decode_precision": settings.decode_precision,
        "decode_accuracy": {e.name: e.accuracy for e in list(vanillas.values()) + mors if e.accuracy}, "wall_s": time.perf_counter() - t_start,
    }
    print_report(summary)
    if prof is not None:
        print_profile(prof)
    for name, a in summary["decode_accuracy"].items():
        print(f"{settings.decode_precision} decode accuracy {name}: NLL {a['nll']:.4f} -> {a['nll_low']:.4f}, "
              f"greedy agreement {a['greedy_agreement']:.3f}, max logit error {a['max_logit_error']:.4f}")
    return summary


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"


def print_report(s: dict[str, Any]) -> None:
    print(f"mor bench infer: {s['shape']} {s['dtype']} on {s['device_name']}; mean length {s['mean_len']} "
          f"(+-{s['len_spread']:.0%}), {'prompted' if s['prompted'] else 'unprompted'}, "
          f"temperature {s['temperature']}, KV {s['kv_mode']}, "
          f"{'CPU kernels' if s['cpu_kernels'] else 'PyTorch ops'} for decode"
          f"{' (each step one call)' if s.get('step_kernel') else ''}"
          f"{', CUDA graphs' if s['cuda_graphs'] else ''}")
    hdr = (f"{'model':<14}{'setting':<8}{'sched':<9}{'batch':>6}{'tok/s':>10}{'x van':>7}{'paper':>7}"
           f"{'KV peak MB':>11}{'KV pool MB':>11}{'preempt':>8}{'depth':>7}  occupancy by depth")
    print(hdr)
    print("-" * len(hdr))
    for r in s["rows"]:
        sp = f"{r['speedup']:.2f}" if "speedup" in r else ""
        pp = f"{r['paper_speedup']:.2f}" if r.get("paper_speedup") else ""
        occ = " ".join(f"{o:.2f}" for o in r["occupancy"]) if r["kind"] == "mor" else ""
        print(f"{r['model']:<14}{r['setting']:<8}{r['schedule']:<9}{r['batch']:>6}{r['tokens_per_s']:>10.1f}"
              f"{sp:>7}{pp:>7}{r['kv_peak_mb']:>11.1f}{r['kv_pool_mb']:>11.1f}{r['preemptions']:>8}"
              f"{r['mean_depth']:>7.2f}  {occ}")
    if s["hf"]:
        print("\nvanilla in this engine vs transformers.generate (same weights, fixed lengths):")
        for h in s["hf"]:
            print(f"  {h['model']:<14} batch {h['batch']:>4}: ours {h['ours_tokens_per_s']:.1f} tok/s, "
                  f"HF {h['hf_tokens_per_s']:.1f} tok/s, ratio {h['ratio']:.2f}")
    print(f"(total {s['wall_s']:.0f} s)")
