"""The HTTP front end's Prometheus metrics, named as vLLM users look for them (with the
`pygemma4:` prefix where vLLM has `vllm:`)."""

from __future__ import annotations

import math

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from pygemma4.protocol import HealthStatus

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip


class Metrics:
    """One front end's metrics, in a registry of its own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.running = Gauge(
            "pygemma4:num_requests_running",
            "Sequences generating tokens.",
            registry=registry,
        )
        self.waiting = Gauge(
            "pygemma4:num_requests_waiting",
            "Sequences sent to the server that have no token yet (queued or in prefill).",
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "pygemma4:prompt_tokens", "Prompt tokens processed.", registry=registry
        )
        self.generation_tokens = Counter(
            "pygemma4:generation_tokens", "Tokens generated.", registry=registry
        )
        self.time_to_first_token = Histogram(
            "pygemma4:time_to_first_token_seconds",
            "Seconds from a sequence's request to its first token.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "pygemma4:inter_token_latency_seconds",
            "Seconds between a sequence's tokens.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.end_to_end_latency = Histogram(
            "pygemma4:e2e_request_latency_seconds",
            "Seconds from a sequence's request to its end.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.finished = Counter(
            "pygemma4:request_success",
            "Sequences finished, by endpoint and finish reason.",
            ["endpoint", "finished_reason"],
            registry=registry,
        )
        self.errors = Counter(
            "pygemma4:request_errors",
            "Generations that failed, by the kind of failure (the server's error code).",
            ["kind"],
            registry=registry,
        )
        self.http_errors = Counter(
            "pygemma4:http_errors",
            "HTTP error replies, by status.",
            ["status"],
            registry=registry,
        )

        self.kv_usage = Gauge(
            "pygemma4:kv_cache_usage_perc",
            "Fraction of the KV pool's blocks held by sequences (1 = full; NaN while the "
            "server does not answer).",
            registry=registry,
        )
        self.kv_blocks_total = Gauge(
            "pygemma4:kv_cache_blocks_total",
            "Blocks in the server's KV pool (NaN while the server does not answer).",
            registry=registry,
        )

    def observe_server(self, status: HealthStatus | None) -> None:
        """Set the gauges read from the server's health (None: it did not answer)."""
        if status is None or status.kv_blocks_total == 0:
            self.kv_usage.set(math.nan)
            self.kv_blocks_total.set(math.nan)
            return
        self.kv_usage.set(status.kv_blocks_used / status.kv_blocks_total)
        self.kv_blocks_total.set(status.kv_blocks_total)

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
