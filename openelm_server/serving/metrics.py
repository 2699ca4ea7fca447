"""Prometheus metrics of the server, in a registry of its own (one per app)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, engine_stats: Callable):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "openelm_http_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter("openelm_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.generation_tokens = Counter("openelm_generation_tokens", "Tokens generated", registry=self.registry)
        self.time_to_first_token = Histogram(
            "openelm_time_to_first_token_seconds",
            "Time to first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "openelm_time_per_output_token_seconds",
            "Time between output tokens after the first",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "openelm_e2e_request_latency_seconds",
            "End-to-end generation latency",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        waiting = Gauge("openelm_requests_waiting", "Requests waiting to run", registry=self.registry)
        running = Gauge("openelm_requests_running", "Requests generating", registry=self.registry)
        kv_usage = Gauge("openelm_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", registry=self.registry)
        waiting.set_function(lambda: engine_stats().waiting)
        running.set_function(lambda: engine_stats().running)
        kv_usage.set_function(lambda: engine_stats().kv_blocks_used / engine_stats().kv_blocks_total)
        self.registry.register(_EngineCounters(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_generation(
        self, prompt_tokens: int, completion_tokens: int, start: float, first_token: float | None, end: float
    ) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.request_latency.observe(end - start)
        if first_token is not None:
            self.time_to_first_token.observe(first_token - start)
            if completion_tokens > 1:
                self.time_per_output_token.observe((end - first_token) / (completion_tokens - 1))


class _EngineCounters:
    """The engine's running totals, read at each scrape (the engine keeps them, not Prometheus)."""

    def __init__(self, engine_stats: Callable):
        self.engine_stats = engine_stats

    def collect(self):
        stats = self.engine_stats()
        for name, help_text, value in (
            ("openelm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", stats.prefix_cache_queries),
            ("openelm_prefix_cache_hits", "Prompt tokens found in the prefix cache", stats.prefix_cache_hits),
            (
                "openelm_preemptions",
                "Requests preempted (recomputed later) when the KV cache ran out",
                stats.preemptions,
            ),
            (
                "openelm_spec_decode_num_draft_tokens",
                "Tokens proposed by speculative decoding for the model to verify",
                stats.spec_draft_tokens,
            ),
            (
                "openelm_spec_decode_num_accepted_tokens",
                "Proposed tokens the model confirmed (speculative decoding)",
                stats.spec_accepted_tokens,
            ),
        ):
            counter = CounterMetricFamily(name, help_text)
            counter.add_metric([], value)
            yield counter
