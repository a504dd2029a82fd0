"""Prometheus metrics (prometheus-client), served on --metrics-port.

Every server owns its own CollectorRegistry, so several servers in one process (tests) never clash.
Engine gauges and per-step histograms are fed by each model's engine thread after every step;
request histograms and the status counter by the servicer when a request ends.

Per-tenant metrics carry a `tenant` label. Its values are only names of configured tenants (the
label is set after authentication, from the tenants file), so their number stays bounded by the
file; callers without a valid key are counted in tinyserve_unauthenticated_requests, unlabelled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from tinyserve.tenancy import usage

if TYPE_CHECKING:
    from tinyserve.engine.engine import EngineStats
    from tinyserve.memory import MemorySplit

# Latency buckets in seconds: 5 ms .. 2 min.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_BUCKETS = (0, 1, 16, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    """All tinyserve metrics, labelled by model (and method/status for request counts)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self._memory: _MemoryCollector | None = None
        m, t, g = ["model"], ["tenant"], ["model_name"]

        def gauge(name: str, doc: str, labels: list[str]) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def histogram(name: str, doc: str, labels: list[str], buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.running = gauge("tinyserve_running_sequences", "Sequences being decoded or prefilled", m)
        self.waiting = gauge("tinyserve_waiting_sequences", "Sequences in the wait queue", m)
        self.kv_used = gauge("tinyserve_kv_blocks_used", "KV cache blocks in use", m)
        self.kv_free = gauge("tinyserve_kv_blocks_free", "KV cache blocks free", m)
        self.kv_bytes = gauge("tinyserve_kv_cache_bytes", "Bytes of the KV cache arena", ["model", "kv_dtype"])
        self.kv_tokens = gauge(
            "tinyserve_kv_cache_tokens", "Positions the KV cache holds (blocks x block size)", ["model", "kv_dtype"]
        )
        self.batch_size = histogram("tinyserve_batch_size", "Sequences in one engine step", m, _BATCH_BUCKETS)
        self.prefill_tokens = histogram(
            "tinyserve_prefill_tokens_per_step", "Prompt tokens prefilled in one engine step", m, _TOKEN_BUCKETS
        )
        self.step_time = histogram("tinyserve_step_seconds", "Wall time of one engine step", m, _ITL_BUCKETS)
        self.ttft = histogram(
            "tinyserve_time_to_first_token_seconds", "Arrival to first generated token", m, _LATENCY_BUCKETS
        )
        self.itl = histogram(
            "tinyserve_inter_token_latency_seconds", "Time between generated tokens of one stream", m, _ITL_BUCKETS
        )
        self.e2e = histogram(
            "tinyserve_request_duration_seconds", "Arrival to the end of a generation request", m, _LATENCY_BUCKETS
        )
        self.requests = counter("tinyserve_requests", "Finished RPCs by final status", ["model", "method", "status"])
        self.prompt_tokens = counter("tinyserve_prompt_tokens", "Prompt tokens admitted", m)
        self.generated_tokens = counter("tinyserve_generated_tokens", "Tokens generated", m)
        # -- per tenant (the usage counters of tinyserve.tenancy.usage, mirrored) ----------------
        self.tenant_requests = counter("tinyserve_tenant_requests", "Requests admitted", t)
        self.tenant_prompt_tokens = counter("tinyserve_tenant_prompt_tokens", "Prompt tokens charged", t)
        self.tenant_cached_prompt_tokens = counter(
            "tinyserve_tenant_cached_prompt_tokens", "Prompt tokens served from the prefix cache", t
        )
        self.tenant_generated_tokens = counter("tinyserve_tenant_generated_tokens", "Tokens generated", t)
        self.tenant_rejections = counter(
            "tinyserve_tenant_rejections", "Requests refused by a tenant limit, by reason", ["tenant", "reason"]
        )
        self.tenant_finished = counter(
            "tinyserve_tenant_requests_finished", "Generation requests by final status", ["tenant", "status"]
        )
        self.tenant_ttft = histogram(
            "tinyserve_tenant_time_to_first_token_seconds", "Arrival to first generated token", t, _LATENCY_BUCKETS
        )
        self.unauthenticated = counter(
            "tinyserve_unauthenticated_requests",
            "RPCs refused before reaching a tenant (missing or unknown API key)",
            ["status"],
        )
        # -- the Kubernetes Gateway API Inference Extension's model-server protocol: the names
        # its endpoint picker reads by default (vLLM's), labelled as vLLM does (model_name) ------
        self.gw_waiting = gauge(
            "vllm:num_requests_waiting",
            "Requests in the wait queue (tinyserve_waiting_sequences, for the inference gateway)",
            g,
        )
        self.gw_running = gauge(
            "vllm:num_requests_running",
            "Requests being decoded or prefilled (tinyserve_running_sequences, for the inference gateway)",
            g,
        )
        self.gw_kv_usage = gauge(
            "vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use, 0 to 1 (for the inference gateway)", g
        )
        self.gw_cache_config = gauge(
            "vllm:cache_config_info",
            "KV cache configuration: "
            "block_size (positions per block) and num_gpu_blocks (blocks "
            "in the cache; CPU memory here); value 1",
            g + ["block_size", "num_gpu_blocks"],
        )
        self.quota_store_errors = counter(
            "tinyserve_quota_store_errors",
            "Calls to the shared quota store (Redis) that failed, "
            "by operation (admit: the --quota-store-policy applied)",
            ["operation"],
        )
        self._usage_counters = {
            "requests": self.tenant_requests,
            "prompt_tokens": self.tenant_prompt_tokens,
            "cached_prompt_tokens": self.tenant_cached_prompt_tokens,
            "generated_tokens": self.tenant_generated_tokens,
            "rejections": self.tenant_rejections,
        }
        if set(self._usage_counters) != set(usage.COUNTERS):  # a renamed counter fails here
            raise RuntimeError(f"metrics mirror {sorted(self._usage_counters)}, usage counts {sorted(usage.COUNTERS)}")

    def for_model(self, model: str, kv_dtype: str) -> ModelMetrics:
        return ModelMetrics(
            running=self.running.labels(model),
            waiting=self.waiting.labels(model),
            kv_used=self.kv_used.labels(model),
            kv_free=self.kv_free.labels(model),
            kv_bytes=self.kv_bytes.labels(model, kv_dtype),
            kv_tokens=self.kv_tokens.labels(model, kv_dtype),
            batch_size=self.batch_size.labels(model),
            prefill_tokens=self.prefill_tokens.labels(model),
            step_time=self.step_time.labels(model),
            ttft=self.ttft.labels(model),
            itl=self.itl.labels(model),
            e2e=self.e2e.labels(model),
            prompt_tokens=self.prompt_tokens.labels(model),
            generated_tokens=self.generated_tokens.labels(model),
            gw_waiting=self.gw_waiting.labels(model),
            gw_running=self.gw_running.labels(model),
            gw_kv_usage=self.gw_kv_usage.labels(model),
        )

    def set_cache_config(self, model: str, block_size: int, num_blocks: int) -> None:
        """The model's KV cache shape (vllm:cache_config_info), once at start."""
        self.gw_cache_config.labels(model, str(block_size), str(num_blocks)).set(1)

    def watch_memory(self, split: Callable[[], MemorySplit]) -> None:
        """Serve tinyserve_memory_bytes{part=rss|weights_mapped|weights_repacked|kv_arena|rest},
        read from `split()` at every scrape (tinyserve.memory)."""
        if self._memory is None:
            self._memory = _MemoryCollector(split)
            self.registry.register(self._memory)
        else:  # a second server on these metrics: the latest one's engines
            self._memory.split = split

    def count_request(self, model: str, method: str, status: str) -> None:
        self.requests.labels(model or "-", method, status).inc()

    def observe_usage(self, tenant: str, counter: str, amount: int, reason: str | None) -> None:
        """tinyserve.tenancy.usage observer: mirror one usage increment (any thread)."""
        if counter == "rejections":
            self.tenant_rejections.labels(tenant, reason or "unknown").inc(amount)
        else:
            self._usage_counters[counter].labels(tenant).inc(amount)

    def count_quota_store_error(self, operation: str) -> None:
        """tinyserve.tenancy.Quotas on_store_error: one failed store call (any thread)."""
        self.quota_store_errors.labels(operation).inc()

    def count_refused(self, status: str) -> None:
        """An RPC refused by authentication (no tenant to label it with)."""
        self.unauthenticated.labels(status).inc()

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)


class _MemoryCollector:
    """The process's memory split, computed when Prometheus scrapes."""

    def __init__(self, split: Callable[[], MemorySplit]):
        self.split = split

    def collect(self):
        g = GaugeMetricFamily(
            "tinyserve_memory_bytes",
            "Resident memory of the server process "
            "(rss) and its parts: weights mapped from the model files, the "
            "kernels' repacked weights, the KV arenas, the rest",
            labels=["part"],
        )
        for part, value in self.split().as_dict().items():
            g.add_metric([part], value)
        yield g


@dataclass
class ModelMetrics:
    """The metric children of one model (label already applied)."""

    running: Gauge
    waiting: Gauge
    kv_used: Gauge
    kv_free: Gauge
    kv_bytes: Gauge
    kv_tokens: Gauge
    batch_size: Histogram
    prefill_tokens: Histogram
    step_time: Histogram
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    prompt_tokens: Counter
    generated_tokens: Counter
    gw_waiting: Gauge
    gw_running: Gauge
    gw_kv_usage: Gauge

    def observe_kv_cache(self, stats: EngineStats) -> None:
        """The KV cache's blocks and size from LLMEngine.stats() (at load, and after every step)."""
        self.kv_used.set(stats.kv_blocks_used)
        self.kv_free.set(max(0, stats.kv_blocks_total - stats.kv_blocks_used))
        self.kv_bytes.set(stats.kv_bytes_total)
        self.kv_tokens.set(stats.kv_tokens_total)

    def observe_step(self, stats: EngineStats, step_seconds: float) -> None:
        """Feed one engine step's LLMEngine.stats() (called from the engine thread)."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.observe_kv_cache(stats)
        self.gw_running.set(stats.num_running)
        self.gw_waiting.set(stats.num_waiting)
        self.gw_kv_usage.set(stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0)
        self.batch_size.observe(stats.last_batch_size)
        self.prefill_tokens.observe(stats.last_prefill_tokens)
        self.step_time.observe(step_seconds)
