"""The HTTP front end's Prometheus metrics, named as vLLM users look for them (with the
`pygemma4:` prefix where vLLM has `vllm:`)."""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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

        self.server = _ServerState()
        registry.register(self.server)

    def observe_server(self, status: HealthStatus | None) -> None:
        """Take the server's health, read at this scrape (None: it did not answer)."""
        self.server.status = status

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)


class _ServerState:
    """The metrics read from the server's health at each scrape: KV usage (NaN while the server
    does not answer), the prefix cache's lookups and hits and, where it drafts, speculative
    decoding's counts (vLLM's names)."""

    def __init__(self) -> None:
        self.status: HealthStatus | None = None

    def collect(self) -> Iterator[Metric]:
        status = self.status
        known = status is not None and status.kv_blocks_total > 0
        yield GaugeMetricFamily(
            "pygemma4:kv_cache_usage_perc",
            "Fraction of the KV pool's blocks held by sequences (1 = full; NaN while the "
            "server does not answer).",
            value=status.kv_blocks_used / status.kv_blocks_total if known else math.nan,
        )
        yield GaugeMetricFamily(
            "pygemma4:kv_cache_blocks_total",
            "Blocks in the server's KV pool (NaN while the server does not answer).",
            value=status.kv_blocks_total if known else math.nan,
        )
        if status is not None:
            yield CounterMetricFamily(
                "pygemma4:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                value=status.prefix_looked_up,
            )
            yield CounterMetricFamily(
                "pygemma4:prefix_cache_hits",
                "Prompt tokens the prefix cache held (not computed again).",
                value=status.prefix_hit,
            )
        speculation = None if status is None else status.speculation
        if speculation is None:
            return
        for name, help_text, value in (
            ("num_drafts", "Verification steps that carried drafts.", speculation.steps),
            ("num_draft_tokens", "Draft tokens proposed.", speculation.proposed),
            ("num_accepted_tokens", "Draft tokens accepted.", speculation.accepted),
        ):
            yield CounterMetricFamily(f"pygemma4:spec_decode_{name}", help_text, value=value)
        per_position = CounterMetricFamily(
            "pygemma4:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by draft position (0: the first after the token fed).",
            labels=["position"],
        )
        for position, accepted in enumerate(speculation.accepted_at):
            per_position.add_metric([str(position)], accepted)
        yield per_position
