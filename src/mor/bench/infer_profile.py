"""``mor bench infer --profile``: where a decode step's time goes, against this device's limits.

Each model is profiled at batch 1, ``--batch`` and its memory-matched batch
(``mor.engine.profile``: wall-clock phases and torch.profiler op kinds), each MoR model side
by side with its vanilla partner (timed windows interleaved), and placed against the
roofline measured in the same run: the step's FLOPs at the matmul peak and its bytes
(weights once per step + the K/V its attention reads) at the memory bandwidth.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING

import torch

from ..cache import expected_kv_layers_per_token
from ..model import MoRForCausalLM

if TYPE_CHECKING:
    from .infer import Entry, InferBench


def decode_bytes_per_step(model: MoRForCausalLM) -> int:
    """Weight bytes a decode step reads: every parameter once (the shared block runs once per
    step under depth-wise batching), the token embedding excepted unless tied to the LM head."""
    core = model.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        w = core.embed_tokens.weight
        total -= w.numel() * w.element_size()
    return total


def _steady_engine(entry: Entry, batch: int, settings: InferBench, prompt: list[int], budget: int | None):
    """An engine for ``entry`` at ``batch`` concurrent sequences, warmed up into steady decode
    with enough tokens left for the profile. Returns (engine, context, K/V bytes read per step)."""
    from ..engine import Engine, SamplingParams
    from .infer import KERNEL_CHOICES

    cfg = entry.model.config
    n_steps = max(1, settings.profile_steps)
    warm = 2 + 4 * (entry.num_recursions + 1)
    reps = max(1, settings.repeats)
    windows = reps + 1 + (1 if entry.model.model.embed_tokens.weight.is_cuda else 0)  # + ops (+ syncs on CUDA)
    length = warm + windows * n_steps * (entry.num_recursions + 1) + 8
    max_len = min(len(prompt) + length + 1, cfg.max_position_embeddings)
    eng = Engine(entry.model, max_batch=batch, max_model_len=max_len, kv_memory_bytes=budget,
                 block_size=settings.block_size, schedule="depth" if entry.kind == "mor" else "sequence",
                 seed=settings.seed, cpu_kernels=KERNEL_CHOICES[settings.cpu_kernels],
                 cuda_graphs=KERNEL_CHOICES[settings.cuda_graphs])
    eng.capture_graphs()
    for _ in range(batch):
        eng.add_request(prompt, SamplingParams(max_tokens=length, temperature=settings.temperature, ignore_eos=True))
    for _ in range(warm):
        eng.step()
    kv_read = eng.pool.used_bytes  # each step's attention reads every cached entry once (per layer)
    return eng, len(prompt) + warm + n_steps // 2, kv_read


def _profile_row(entry: Entry, batch: int, prof, ctx: int, kv_read: int, *, peak: float, bandwidth: float) -> dict:
    """One profile row: the engine's profile placed against the roofline of this device: the
    step's FLOPs at ``peak`` FLOP/s and its bytes (weights once per step + the K/V the step's
    attention reads) at ``bandwidth`` bytes/s."""
    from ..flops import executed_flops_per_token

    tps = prof.tokens_per_step / prof.step_s if prof.step_s > 0 else 0.0
    flops_tok = executed_flops_per_token(entry.model.config, ctx)  # a decode token at context ctx: every key once
    weights = decode_bytes_per_step(entry.model)
    bytes_tok = (weights + kv_read) / max(prof.tokens_per_step, 1e-9)
    limit = min(peak / flops_tok, bandwidth / bytes_tok)
    return {"model": entry.name, "kind": entry.kind, "batch": batch, "tokens_per_s": tps,
            "tokens_per_step": prof.tokens_per_step, "context": ctx,
            "flops_per_token": flops_tok, "gflops_per_s": tps * flops_tok / 1e9, "peak_gflops_per_s": peak / 1e9,
            "bytes_per_token": bytes_tok, "read_gb_per_s": tps * bytes_tok / 1e9,
            "bandwidth_gb_per_s": bandwidth / 1e9, "roofline_tokens_per_s": limit, "of_roofline": tps / limit,
            **prof.as_dict()}


def profile_models(entries: list[tuple[Entry, int, int | None]], settings: InferBench, prompt: list[int], *,
                   peak: float, bandwidth: float, ops: list[bool] | None = None) -> list[dict]:
    """Profile ``--profile-steps`` steady decode steps of each (entry, batch, KV budget) side by
    side (``mor.engine.profile.profile_engines``: their timed windows interleaved, so their
    ratios hold on a machine whose speed drifts) and return one row each (``_profile_row``)."""
    from ..engine.profile import profile_engines

    made = [_steady_engine(e, batch, settings, prompt, budget) for e, batch, budget in entries]
    profs = profile_engines([eng for eng, _, _ in made], max(1, settings.profile_steps),
                            ops if ops is not None else True, repeats=max(1, settings.repeats))
    rows = [_profile_row(e, batch, prof, ctx, kv_read, peak=peak, bandwidth=bandwidth)
            for (e, batch, _), prof, (_, ctx, kv_read) in zip(entries, profs, made)]
    del made
    gc.collect()
    return rows


def profile_all(settings: InferBench, mors: list[Entry], vanillas: dict[int, Entry], prompt: list[int],
                max_cases: dict[str, tuple[int, int | None]], dev: torch.device) -> dict:
    """Profile every model at batch 1, ``--batch`` and its memory-matched batch. Each MoR model
    is profiled side by side with its vanilla partner (``profile_models``); its row gets the
    measured speed-up over that paired vanilla run (``vs_tokens_per_s``) next to the roofline
    prediction, the FLOP ratio and the KV ratio of the shape. The vanilla row printed for a
    setting is its first pairing."""
    from ..flops import measure_matmul_peak, measure_memory_bandwidth

    dtype = mors[0].model.model.embed_tokens.weight.dtype if mors else torch.float32
    peak = measure_matmul_peak(dev, dtype)
    bandwidth = measure_memory_bandwidth(dev)
    rows = []
    done: set[tuple] = set()
    for e in mors:
        v = vanillas[e.model.config.num_hidden_layers]
        cases = [("1", 1, 1, None), ("batch", settings.batch, settings.batch, None)]
        if e.name in max_cases:
            cases.append(("max",) + max_cases[e.name])
        for setting, vb, mb, budget in cases:
            key = (v.name, setting, vb)
            vr, mr = profile_models([(v, vb, budget), (e, mb, budget)], settings, prompt, peak=peak,
                                    bandwidth=bandwidth, ops=[key not in done, True])
            vr["setting"] = setting
            if key not in done:
                done.add(key)
                rows.append(vr)
            mr.update(setting=setting, vs=v.name, vs_tokens_per_s=vr["tokens_per_s"])
            mr["speedup"] = mr["tokens_per_s"] / vr["tokens_per_s"] if vr["tokens_per_s"] else 0.0
            mr["roofline_speedup"] = mr["roofline_tokens_per_s"] / vr["roofline_tokens_per_s"]
            mr["flop_ratio"] = vr["flops_per_token"] / mr["flops_per_token"]
            mr["kv_ratio"] = (expected_kv_layers_per_token(v.model.config)
                              / expected_kv_layers_per_token(e.model.config, e.enter_fractions))
            mr["of_roofline_speedup"] = mr["speedup"] / mr["roofline_speedup"]
            rows.append(mr)
    return {"peak_gflops_per_s": peak / 1e9, "bandwidth_gb_per_s": bandwidth / 1e9, "rows": rows}


def print_profile(p: dict) -> None:
    from ..engine.profile import OP_KINDS, PHASES

    print(f"\nprofile: matmul peak {p['peak_gflops_per_s']:.1f} GFLOP/s, memory read {p['bandwidth_gb_per_s']:.1f} GB/s "
          f"(measured in this run); shares of the step time")
    hdr = (f"{'model':<14}{'set':<6}{'batch':>6}{'tok/s':>9}{'ms/step':>8}{'GFLOP/s':>9}{'GB/s':>7}{'roof':>6}  "
           + " ".join(f"{k[:6]:>6}" for k in PHASES) + " | " + " ".join(f"{k[:7]:>7}" for k in OP_KINDS)
           + f"{'ops/st':>7}{'x van':>7}{'pred':>6}{'FLOPx':>6}{'KVx':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in p["rows"]:
        ph, op = r["phase_shares"], r["op_shares"]
        extra = (f"{r['speedup']:>7.2f}{r['roofline_speedup']:>6.2f}{r['flop_ratio']:>6.2f}{r['kv_ratio']:>6.2f}"
                 if "speedup" in r else "")
        print(f"{r['model']:<14}{r['setting']:<6}{r['batch']:>6}{r['tokens_per_s']:>9.1f}{r['step_s'] * 1e3:>8.2f}"
              f"{r['gflops_per_s']:>9.1f}{r['read_gb_per_s']:>7.1f}{r['of_roofline']:>6.2f}  "
              + " ".join(f"{ph[k]:>6.2f}" for k in PHASES) + " | " + " ".join(f"{op[k]:>7.2f}" for k in OP_KINDS)
              + f"{sum(r['op_calls_per_step'].values()):>7.0f}" + extra)
    hrows = [r for r in p["rows"] if r.get("host_phases_s")]
    if hrows:  # CUDA: is each phase bound by its launches (host part close to the whole)?
        runner_phases = ("prefill", "enter", "block", "finish", "sample")
        print("\nCUDA host part of each phase, ms per step (until its last launch returned) / whole phase; "
              "synchronising operations per step")
        hdr = (f"{'model':<14}{'set':<6}{'batch':>6}" + "".join(f"{k:>16}" for k in runner_phases)
               + f"{'syncs':>7}")
        print(hdr)
        print("-" * len(hdr))
        for r in hrows:
            cells = "".join(f"{r['host_phases_s'].get(k, 0.0) * 1e3:>8.2f}/{r['phases_s'].get(k, 0.0) * 1e3:<7.2f}"
                            for k in runner_phases)
            print(f"{r['model']:<14}{r['setting']:<6}{r['batch']:>6}{cells}{r['syncs_per_step'] or 0.0:>7.2f}")
    for r in hrows:  # CUDA: which kernels the step is made of (graph-replayed ones included)
        if r.get("top_ops"):
            print(f"\n{r['model']} {r['setting']} batch {r['batch']}: kernels with the most time "
                  f"(calls and ms per step)")
            for name, (n, t) in r["top_ops"].items():
                print(f"  {n:>8.1f} {t * 1e3:>8.3f}  {name[:100]}")
    krows = [r for r in p["rows"] if r.get("kernel_phases_s")]
    if krows:  # the compiled decode layers' own clocks (mor.engine.kernels): inside the kinds above
        from ..engine.kernels import PROFILE_PHASES

        print("\nCPU kernel phases, ms per step (the matmul / attention / kv_copy / other_ops kinds above include them)")
        hdr = f"{'model':<14}{'set':<6}{'batch':>6}" + "".join(f"{k[:9]:>10}" for k in PROFILE_PHASES)
        print(hdr)
        print("-" * len(hdr))
        for r in krows:
            print(f"{r['model']:<14}{r['setting']:<6}{r['batch']:>6}"
                  + "".join(f"{r['kernel_phases_s'].get(k, 0.0) * 1e3:>10.2f}" for k in PROFILE_PHASES))
