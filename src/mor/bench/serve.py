"""``mor bench serve``: load-test OpenAI-compatible servers (``mor serve`` or any other).

Targets: checkpoints (each served in turn by ``mor serve`` in a child process on
127.0.0.1, same settings) and/or ``--url`` of running servers. ``--random-pair DIR`` first
writes two random-weight checkpoints of the same width and the same unrolled depth, a
vanilla model and an expert-choice MoR model (routers calibrated to the capacities, as in
``mor bench infer``), and serves both.

Workload (the same for every target): ``--num-requests`` completions with token-id
prompts, prompt and output lengths uniform in ``mean * [1 - spread, 1 + spread]``,
``ignore_eos`` so every request produces its drawn length, greedy. Load points: closed-loop
``--concurrency`` levels (C clients, each sending its next request when the last one
ended) and open-loop ``--request-rate`` levels (Poisson arrivals, requests per second).

All served checkpoints are up for the whole run; at each load point the targets take
turns (``--repeats`` times, the run with the most output tokens/s counts), so the slow
drifts of a shared machine hit them alike.

Each request is streamed (``stream_options.include_usage``): TTFT = first token - send,
ITL = gaps between token chunks, TPOT = (end - first token) / (tokens - 1), E2E = end - send.
Reported per load point: request throughput, output tokens/s, TTFT / TPOT / ITL / E2E
(mean, p50, p90, p99, ms), completed and failed requests. The table comes first; ``run``
returns the summary (one JSON line). Numbers are wall-clock on a shared machine: compare
targets measured in the same run, as ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="*", help="checkpoints to serve in turn (each with the same settings)")
    p.add_argument("--url", action="append", default=[], help="a running server's base URL (repeatable)")
    p.add_argument("--random-pair", metavar="DIR", default=None,
                   help="write random vanilla + MoR checkpoints of one shape under DIR and serve both")
    p.add_argument("--preset", default="small", help="--random-pair: model shape (default 'small')")
    p.add_argument("--layers", type=int, default=14, help="--random-pair: unrolled layers (default 14)")
    p.add_argument("--recursions", type=int, default=3, help="--random-pair: MoR N_r (default 3)")
    p.add_argument("--max-position", type=int, default=1024, help="--random-pair: context length (default 1024)")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32], help="closed-loop levels (1 8 32)")
    p.add_argument("--request-rate", type=float, nargs="*", default=[], help="Poisson request rates (req/s)")
    p.add_argument("--num-requests", type=int, default=64, help="requests per load point (default 64)")
    p.add_argument("--prompt-len", type=int, default=64, help="mean prompt tokens (default 64)")
    p.add_argument("--output-len", type=int, default=128, help="mean output tokens (default 128)")
    p.add_argument("--len-spread", type=float, default=0.5, help="lengths uniform in mean*(1 +- spread)")
    p.add_argument("--warmup", type=int, default=4, help="warm-up requests per target (default 4)")
    p.add_argument("--repeats", type=int, default=1, help="runs per load point and target; the best counts (1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=None, help="bearer key for the servers")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    g = p.add_argument_group("server settings (for checkpoints)")
    g.add_argument("--max-batch", type=int, default=32)
    g.add_argument("--kv-memory-gb", type=float, default=None)
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"])
    g.add_argument("--server-threads", type=int, default=None, help="torch threads of each served process")


# ---------------------------------------------------------------------- workload
def workload(n: int, prompt_len: int, output_len: int, spread: float, vocab: int, seed: int
             ) -> list[tuple[list[int], int]]:
    """``n`` (prompt token ids, output length) pairs; ids avoid 0 (end-of-text)."""
    rng = np.random.default_rng(seed)

    def lengths(mean: int) -> np.ndarray:
        lo, hi = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
        return rng.integers(lo, hi + 1, size=n)

    pl, ol = lengths(prompt_len), lengths(output_len)
    return [(rng.integers(1, vocab, size=int(a)).tolist(), int(b)) for a, b in zip(pl, ol)]


def summarize(results: list[dict], wall: float) -> dict[str, Any]:
    """Throughput and latency percentiles (ms) of one load point."""
    ok = [r for r in results if r.get("error") is None]
    out: dict[str, Any] = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": wall,
                           "request_throughput": len(ok) / wall if wall > 0 else 0.0,
                           "output_tokens": sum(r["tokens"] for r in ok)}
    out["output_tokens_per_s"] = out["output_tokens"] / wall if wall > 0 else 0.0
    errors = sorted({r["error"] for r in results if r.get("error")})
    if errors:
        out["errors"] = errors[:5]
    series = {"ttft": [r["ttft"] for r in ok],
              "tpot": [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1],
              "itl": [x for r in ok for x in r["itl"]], "e2e": [r["e2e"] for r in ok]}
    for k, v in series.items():
        a = np.asarray(v, dtype=float) * 1e3
        out[k + "_ms"] = ({"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
                           "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}
                          if a.size else None)
    return out


# ---------------------------------------------------------------------- client
async def _one(client, model: str, prompt: list[int], n: int, timeout: float) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times: list[float] = []
    tokens = None
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                err = (await r.aread()).decode(errors="replace")
                try:
                    err = json.loads(err)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                return {"error": f"HTTP {r.status_code}: {err[:200]}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": str(chunk["error"].get("message"))[:200]}
                if chunk.get("choices"):
                    times.append(time.perf_counter())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - a failed request is a result here
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    end = time.perf_counter()
    if not times:
        return {"error": "no tokens"}
    return {"ttft": times[0] - t0, "e2e": end - t0, "itl": list(np.diff(times)),
            "tokens": tokens if tokens is not None else len(times)}


async def run_point(url: str, model: str, jobs: list[tuple[list[int], int]], *, concurrency: int | None = None,
                    rate: float | None = None, seed: int = 0, api_key: str | None = None,
                    timeout: float = 600.0) -> dict:
    """One load point: closed loop with ``concurrency`` clients, or Poisson arrivals at ``rate``."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = concurrency or len(jobs)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout,
                                 limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit)) as cl:
        t0 = time.perf_counter()
        if concurrency is not None:
            it = iter(jobs)
            results: list[dict] = []

            async def worker():
                for p, n in it:
                    results.append(await _one(cl, model, p, n, timeout))

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            rng = np.random.default_rng(seed)
            gaps = rng.exponential(1.0 / rate, size=len(jobs)) if math.isfinite(rate) else np.zeros(len(jobs))
            tasks = []
            for (p, n), gap in zip(jobs, gaps):
                await asyncio.sleep(float(gap))
                tasks.append(asyncio.ensure_future(_one(cl, model, p, n, timeout)))
            results = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - t0
    return summarize(results, wall)


def _model_info(url: str, api_key: str | None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=30).json()["data"][0]
    return data


def _mean_depth(url: str) -> float | None:
    """``mor:mean_recursion_depth`` of a mor server (None for other servers)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url + "/metrics", timeout=30).text
        for fam in text_string_to_metric_families(text):
            if fam.name == "mor:mean_recursion_depth":
                return float(fam.samples[0].value)
    except (httpx.HTTPError, ValueError, IndexError):
        pass
    return None


# ---------------------------------------------------------------------- served checkpoints
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_main(cfg: dict, threads: int | None) -> None:
    """Child process: serve one checkpoint (quietly) until SIGTERM."""
    import sys

    import torch

    if threads:
        torch.set_num_threads(threads)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    from ..serve.app import ServeConfig
    from ..serve.server import serve

    serve(ServeConfig(**cfg))


class ServedCheckpoint:
    """``mor serve CKPT`` in a spawned child process on 127.0.0.1."""

    def __init__(self, checkpoint: str, args: argparse.Namespace):
        import multiprocessing as mp

        import httpx

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = dict(checkpoint=str(checkpoint), host="127.0.0.1", port=self.port, max_batch=args.max_batch,
                   kv_memory_gb=args.kv_memory_gb, device=args.device, dtype=args.dtype, api_key=args.api_key,
                   max_queue=max(256, args.num_requests), shutdown_grace_s=5.0)
        self.proc = mp.get_context("spawn").Process(target=_server_main, args=(cfg, args.server_threads),
                                                    daemon=True)
        self.proc.start()
        t0 = time.time()
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if not self.proc.is_alive() or time.time() - t0 > 300:
                self.close()
                raise RuntimeError(f"mor serve {checkpoint} did not start (exit code {self.proc.exitcode})")
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()  # SIGTERM: graceful stop
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def make_random_pair(out: str | Path, preset_name: str = "small", layers: int = 14, recursions: int = 3,
                     max_position: int = 1024, seed: int = 0) -> tuple[Path, Path]:
    """Random-weight vanilla and MoR (expert-choice, Middle-Cycle) checkpoints of the same
    width and unrolled depth under ``out``. The MoR routers are random too (linear, no
    bias): about half of the candidates continue at each routed recursion; the served
    depths are measured (``mor:mean_recursion_depth``)."""
    import torch

    from ..checkpoint import save_checkpoint
    from ..config import preset
    from .infer import _build, mor_config

    out = Path(out)
    mcfg = mor_config(preset_name, recursions, layers, "recursion_wise", max_position_embeddings=max_position)
    vcfg = preset(preset_name, "vanilla", num_hidden_layers=mcfg.num_hidden_layers,
                  max_position_embeddings=max_position)
    dev = torch.device("cpu")
    mm = _build(mcfg, dev, torch.float32, seed + 1)
    vm = _build(vcfg, dev, torch.float32, seed)
    L = mcfg.num_hidden_layers
    note = {"note": "random weights (mor bench serve --random-pair)"}
    v = save_checkpoint(out / f"vanilla-{L}L", vm, meta=note)
    m = save_checkpoint(out / f"mor{recursions}-{L}L", mm, meta=note)
    return v, m


# ---------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> dict:
    from ..engine import RequestError

    if args.num_requests < 1 or args.prompt_len < 1 or args.output_len < 1 or not 0 <= args.len_spread < 1:
        raise RequestError("--num-requests, --prompt-len and --output-len must be >= 1 and --len-spread in [0, 1)")
    if any(c < 1 for c in args.concurrency) or any(r <= 0 for r in args.request_rate):
        raise RequestError(f"--concurrency {args.concurrency} must be >= 1 and --request-rate "
                           f"{args.request_rate} > 0")
    if args.repeats < 1:
        raise RequestError(f"--repeats={args.repeats} must be >= 1")
    if not args.concurrency and not args.request_rate:
        raise RequestError("give at least one --concurrency or --request-rate level")
    checkpoints = list(args.checkpoints)
    if args.random_pair:
        checkpoints += [str(p) for p in make_random_pair(args.random_pair, args.preset, args.layers,
                                                         args.recursions, args.max_position, args.seed)]
    if not checkpoints and not args.url:
        raise RequestError("give checkpoints to serve, --url of a running server, or --random-pair DIR")
    points = [("concurrency", c) for c in args.concurrency] + [("rate", r) for r in args.request_rate]
    served: list[ServedCheckpoint] = []
    try:
        # every server is up for the whole run (an idle one only waits); at each load point the
        # targets take turns, best of --repeats, so slow drifts of a shared machine hit them alike
        urls = [(u, u.rstrip("/")) for u in args.url]
        for c in checkpoints:
            served.append(ServedCheckpoint(c, args))
            urls.append((c, served[-1].url))
        targets = []
        for where, url in urls:
            info = _model_info(url, args.api_key)
            vocab = (info.get("mor") or {}).get("vocab_size") or 256
            jobs = workload(args.num_requests, args.prompt_len, args.output_len, args.len_spread, vocab, args.seed)
            warm = workload(args.warmup, args.prompt_len, 8, 0.0, vocab, args.seed + 1)
            if warm:
                asyncio.run(run_point(url, info["id"], warm, concurrency=len(warm), api_key=args.api_key,
                                      timeout=args.timeout))
            targets.append((where, url, info, jobs, []))
        for how, level in points:
            kw = {"concurrency": level} if how == "concurrency" else {"rate": level}
            best: list[dict | None] = [None] * len(targets)
            for _ in range(args.repeats):
                for k, (where, url, info, jobs, _res) in enumerate(targets):
                    s = asyncio.run(run_point(url, info["id"], jobs, seed=args.seed, api_key=args.api_key,
                                              timeout=args.timeout, **kw))
                    if best[k] is None or s["output_tokens_per_s"] > best[k]["output_tokens_per_s"]:
                        best[k] = s
            for (where, url, info, jobs, res), s in zip(targets, best):
                res.append({"load": f"c={level}" if how == "concurrency" else f"rate={level:g}/s", **s})
        report: list[dict] = []
        for where, url, info, jobs, res in targets:
            mor_info = info.get("mor") or {}
            report.append({"target": str(where), "model": info["id"], "architecture": mor_info.get("architecture"),
                           "num_recursions": mor_info.get("num_recursions"), "schedule": mor_info.get("schedule"),
                           "mean_depth": _mean_depth(url), "points": res})
    finally:
        for sv in served:
            sv.close()
    ratios = _ratios(report)
    print_table(report, ratios, args)
    return {"workload": {"num_requests": args.num_requests, "prompt_len": args.prompt_len,
                         "output_len": args.output_len, "len_spread": args.len_spread, "seed": args.seed},
            "targets": report, "ratios": ratios}


def _ratios(report: list[dict]) -> list[dict]:
    """MoR / vanilla output tokens/s (and mean TPOT vanilla / MoR) at each load point."""
    van = [t for t in report if t["architecture"] == "vanilla"]
    mors = [t for t in report if t["architecture"] == "mor"]
    out = []
    if len(van) != 1:
        return out
    v = van[0]
    for m in mors:
        for pv, pm in zip(v["points"], m["points"]):
            if pv["output_tokens_per_s"] > 0 and pv.get("tpot_ms") and pm.get("tpot_ms"):
                out.append({"mor": m["model"], "vanilla": v["model"], "load": pm["load"],
                            "tokens_per_s_ratio": pm["output_tokens_per_s"] / pv["output_tokens_per_s"],
                            "tpot_ratio": pv["tpot_ms"]["mean"] / pm["tpot_ms"]["mean"]})
    return out


def print_table(report: list[dict], ratios: list[dict], args) -> None:
    print(f"workload: {args.num_requests} requests/point, prompt ~{args.prompt_len}, output ~{args.output_len} "
          f"tokens (+-{args.len_spread:.0%}), greedy, ignore_eos")
    head = (f"{'model':<22}{'load':>10}{'ok':>5}{'err':>5}{'req/s':>8}{'out tok/s':>11}"
            f"{'TTFT p50/p99 ms':>18}{'TPOT mean/p99':>16}{'ITL p50/p99':>14}")
    print(head)
    print("-" * len(head))

    def pair(d, a, b):
        return f"{d[a]:.0f}/{d[b]:.0f}" if d else "-"

    for t in report:
        if t.get("mean_depth") is not None and t["architecture"] == "mor":
            print(f"{t['model']}: mean recursion depth {t['mean_depth']:.2f} of {t['num_recursions']}")
        for p in t["points"]:
            print(f"{t['model'][:21]:<22}{p['load']:>10}{p['completed']:>5}{p['failed']:>5}"
                  f"{p['request_throughput']:>8.2f}{p['output_tokens_per_s']:>11.1f}"
                  f"{pair(p['ttft_ms'], 'p50', 'p99'):>18}{pair(p['tpot_ms'], 'mean', 'p99'):>16}"
                  f"{pair(p['itl_ms'], 'p50', 'p99'):>14}")
            for e in p.get("errors", []):
                print(f"    error: {e}")
    for r in ratios:
        print(f"{r['mor']} vs {r['vanilla']} at {r['load']}: output tokens/s x{r['tokens_per_s_ratio']:.2f}, "
              f"TPOT x{r['tpot_ratio']:.2f} faster")
