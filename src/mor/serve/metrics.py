"""Prometheus metrics of ``mor serve`` (``GET /metrics``), vLLM-style names under ``mor:``.

Serving (label ``model_name``):

* ``mor:num_requests_running`` / ``mor:num_requests_waiting`` - accepted requests that have
  produced a token / not yet (one per choice: a request with ``n=2`` counts twice);
* ``mor:kv_cache_usage_perc`` - fraction (0-1) of the KV pool's blocks in use;
* ``mor:prompt_tokens_total`` / ``mor:generation_tokens_total`` - tokens served (a prompt
  counts once per choice; tokens of cancelled requests count too);
* ``mor:request_success_total{finished_reason="stop|length|abort"}``;
* ``mor:request_errors_total{status}`` - requests answered with an error;
* ``mor:num_preemptions_total``;
* histograms ``mor:time_to_first_token_seconds``, ``mor:inter_token_latency_seconds``,
  ``mor:e2e_request_latency_seconds``, ``mor:request_prompt_tokens``,
  ``mor:request_generation_tokens``.

MoR (since the server started):

* ``mor:mean_recursion_depth`` - mean recursions per generated token;
* ``mor:generation_tokens_by_depth_total{depth}`` - generated tokens by recursion depth;
* ``mor:recursion_occupancy{recursion}`` - share of the shared block's token slots taken
  by recursion r (1-based), the depth-wise batching occupancy;
* ``mor:mean_block_batch`` - tokens per shared-block call;
* ``mor:kv_cache_bytes{group}`` - KV bytes in use per cache group (``full``, ``rec0``...);
  ``mor:kv_cache_pool_bytes`` the pool's size.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from ..engine import EngineStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
disable_created_metrics()  # no "*_created" series (as vLLM)

TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class ServerMetrics:
    """All metrics of one server in their own registry (several servers fit one process)."""

    def __init__(self, model_name: str, num_recursions: int, kv_groups: list[str]):
        self.registry = r = CollectorRegistry()
        m = ["model_name"]
        self.model_name = model_name
        self.running = Gauge("mor:num_requests_running", "Requests producing tokens", m, registry=r)
        self.waiting = Gauge("mor:num_requests_waiting", "Accepted requests without a token yet", m, registry=r)
        self.kv_usage = Gauge("mor:kv_cache_usage_perc", "Fraction of the KV pool in use (0-1)", m, registry=r)
        self.prompt_tokens = Counter("mor:prompt_tokens", "Prompt tokens of accepted requests", m, registry=r)
        self.generation_tokens = Counter("mor:generation_tokens", "Generated tokens", m, registry=r)
        self.success = Counter("mor:request_success", "Finished requests", m + ["finished_reason"], registry=r)
        self.errors = Counter("mor:request_errors", "Requests answered with an error", m + ["status"], registry=r)
        self.preemptions = Counter("mor:num_preemptions", "Requests preempted by the engine", m, registry=r)
        self.ttft = Histogram("mor:time_to_first_token_seconds", "Time to first token", m,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mor:inter_token_latency_seconds", "Time between consecutive tokens", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("mor:e2e_request_latency_seconds", "Request latency, arrival to last token", m,
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_len = Histogram("mor:request_prompt_tokens", "Prompt tokens per request", m,
                                    buckets=TOKEN_BUCKETS, registry=r)
        self.gen_len = Histogram("mor:request_generation_tokens", "Generated tokens per request", m,
                                 buckets=TOKEN_BUCKETS, registry=r)
        self.mean_depth = Gauge("mor:mean_recursion_depth", "Mean recursions per generated token", m, registry=r)
        self.depth_tokens = Counter("mor:generation_tokens_by_depth", "Generated tokens by recursion depth",
                                    m + ["depth"], registry=r)
        self.occupancy = Gauge("mor:recursion_occupancy", "Share of shared-block token slots per recursion",
                               m + ["recursion"], registry=r)
        self.block_batch = Gauge("mor:mean_block_batch", "Tokens per shared-block call", m, registry=r)
        self.kv_bytes = Gauge("mor:kv_cache_bytes", "KV bytes in use per cache group", m + ["group"], registry=r)
        self.kv_pool_bytes = Gauge("mor:kv_cache_pool_bytes", "KV pool size in bytes", m, registry=r)
        # create the labelled series up front, so a scrape shows them before any traffic
        self.preemptions.labels(model_name)
        for reason in ("stop", "length", "abort"):
            self.success.labels(model_name, reason)
        for d in range(num_recursions + 1):
            self.depth_tokens.labels(model_name, str(d))
        for k in range(num_recursions):
            self.occupancy.labels(model_name, str(k + 1))
        for g in kv_groups:
            self.kv_bytes.labels(model_name, g)
        self._seen_preemptions = 0
        self._seen_exits: list[int] = [0] * (num_recursions + 1)

    def observe_engine(self, stats: EngineStats, running: int, waiting: int) -> None:
        """Refresh the gauges from the engine's cumulative stats and the KV pool's current
        usage (``stats.kv``, read from the pool now; engine thread, after a step or an abort)."""
        n = self.model_name
        kv = stats.kv
        self.running.labels(n).set(running)
        self.waiting.labels(n).set(waiting)
        if kv.get("kv_pool_bytes"):
            self.kv_usage.labels(n).set(kv["kv_used_bytes"] / kv["kv_pool_bytes"])
            self.kv_pool_bytes.labels(n).set(kv["kv_pool_bytes"])
        for g, b in kv.get("kv_group_used_bytes", {}).items():
            self.kv_bytes.labels(n, g).set(b)
        if stats.preemptions > self._seen_preemptions:
            self.preemptions.labels(n).inc(stats.preemptions - self._seen_preemptions)
        self._seen_preemptions = stats.preemptions
        for d, c in enumerate(stats.exit_counts):
            if c > self._seen_exits[d]:
                self.depth_tokens.labels(n, str(d)).inc(c - self._seen_exits[d])
                self._seen_exits[d] = c
        self.mean_depth.labels(n).set(stats.mean_depth)
        for k, occ in enumerate(stats.occupancy):
            self.occupancy.labels(n, str(k + 1)).set(occ)
        self.block_batch.labels(n).set(stats.mean_block_batch)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
