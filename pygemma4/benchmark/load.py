"""A load of concurrent streamed requests against a running pygemma4 server, and what it
measured: time to first token, inter-token latency, request latency and throughput.

`run_load(endpoint, LoadSpec(...))` sends `requests` greedy completions of `prompt_tokens`
random token ids each, every one asking for exactly `output_tokens` tokens (end-of-generation
ignored), with at most `concurrency` of them in flight at once, and returns a `LoadResult`
holding one `RequestRecord` per request. A request that fails is recorded as an error with
its reason; the others go on.
"""

from __future__ import annotations

import asyncio
import math
import numbers
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pygemma4.benchmark.stats import Percentiles
from pygemma4.benchmark.tokens import BOS, random_ids
from pygemma4.client import AsyncClient, RequestTimeoutError
from pygemma4.errors import Gemma4Error, require_positive
from pygemma4.protocol import ServerInfo

__all__ = [
    "INFO_TIMEOUT_S",
    "LoadResult",
    "LoadSpec",
    "NoServerError",
    "RequestRecord",
    "make_prompts",
    "run_load",
    "run_load_async",
    "token_latencies",
]

INFO_TIMEOUT_S = 10.0
"""How long `run_load` waits for the server's info before deciding that none answers."""


class NoServerError(Gemma4Error):
    """No pygemma4 server answered at the endpoint (or it refused to say what it serves)."""


# --- What to send ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadSpec:
    """A load: `requests` requests, at most `concurrency` in flight, each a prompt of
    `prompt_tokens` token ids (from `seed`; the first `shared_prefix_tokens` the same in every
    prompt) asking for `output_tokens` tokens, each given `timeout` seconds to finish."""

    requests: int
    concurrency: int
    prompt_tokens: int
    output_tokens: int
    seed: int = 0
    timeout: float = 600.0
    shared_prefix_tokens: int = 0

    def __post_init__(self) -> None:
        for name in ("requests", "concurrency", "prompt_tokens", "output_tokens"):
            require_positive(name, getattr(self, name))
        shared = self.shared_prefix_tokens
        if (
            not isinstance(shared, int)
            or isinstance(shared, bool)
            or not (0 <= shared < self.prompt_tokens)
        ):
            raise ValueError(
                f"shared_prefix_tokens must be an integer in [0, prompt_tokens), got {shared!r}"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an integer ≥ 0, got {self.seed!r}")
        timeout = self.timeout
        if (
            not isinstance(timeout, numbers.Real)
            or isinstance(timeout, bool)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_prompts(spec: LoadSpec, vocab_size: int) -> list[list[int]]:
    """The prompts of the load, one per request: BOS, then `prompt_tokens - 1` ids drawn
    uniformly from `tokens.prompt_id_range(vocab_size)`, the first `shared_prefix_tokens` of
    them (BOS included) the same in every prompt; the same for the same seed."""
    rng = np.random.default_rng(spec.seed)
    shared = random_ids(rng, vocab_size, max(0, spec.shared_prefix_tokens - 1)).tolist()
    unique = spec.prompt_tokens - 1 - len(shared)
    drawn = random_ids(rng, vocab_size, (spec.requests, unique))
    return [[BOS, *shared, *row.tolist()] for row in drawn]


# --- What one request measured ---------------------------------------------------------------


def token_latencies(
    sent_s: float, arrivals: Sequence[tuple[float, int]]
) -> tuple[float | None, tuple[float, ...]]:
    """The time to first token and the inter-token latencies of a stream sent at `sent_s`
    whose chunks arrived as (time, tokens carried).

    Chunks without tokens do not count. A chunk of k tokens arriving g seconds after the
    previous token-carrying one contributes k latencies of g/k; the tokens of the first such
    chunk have no predecessor, so they contribute none.
    """
    ttft: float | None = None
    itl: list[float] = []
    previous = 0.0
    for arrived_s, tokens in arrivals:
        if tokens <= 0:
            continue
        if ttft is None:
            ttft = arrived_s - sent_s
        else:
            itl.extend([(arrived_s - previous) / tokens] * tokens)
        previous = arrived_s
    return ttft, tuple(itl)


@dataclass(frozen=True)
class RequestRecord:
    """One request of a load: whether it got all the tokens it asked for (else `error`
    says why) and its timings in seconds.

    `start_s` and `end_s` are when it was sent and ended, from the start of the load.
    """

    index: int
    """Which request of the load (its prompt's position in `make_prompts`)."""
    ok: bool
    error: str | None
    """The exception's type name and message, or the shortfall; None where ok."""
    ttft_s: float | None
    """From sending to the first chunk carrying a token; None where none came."""
    itl_s: tuple[float, ...]
    """The gaps between successive token arrivals (see `token_latencies`)."""
    output_tokens: int
    latency_s: float
    """From sending to the end (the last reply, or the failure)."""
    start_s: float
    end_s: float

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["itl_s"] = list(self.itl_s)
        return record


# --- What the load measured ------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    """A load that ran: its spec, the server's info and one record per request (in request
    order), with the summaries of the requests that succeeded."""

    spec: LoadSpec
    endpoint: str
    server: ServerInfo
    wall_s: float
    """From the first request sent to the last one ended."""
    records: tuple[RequestRecord, ...]

    @property
    def succeeded(self) -> tuple[RequestRecord, ...]:
        """The records of the requests that got every token they asked for."""
        return tuple(r for r in self.records if r.ok)

    @property
    def completed(self) -> int:
        """Requests that got every token they asked for."""
        return len(self.succeeded)

    @property
    def errors(self) -> int:
        """Requests that failed."""
        return len(self.records) - self.completed

    @property
    def error_messages(self) -> dict[str, int]:
        """Each distinct error with how many requests ended in it, most frequent first."""
        counts = Counter(r.error or "unknown error" for r in self.records if not r.ok)
        return dict(counts.most_common())

    @property
    def output_tokens(self) -> int:
        """Tokens received by the requests that succeeded."""
        return sum(r.output_tokens for r in self.succeeded)

    @property
    def ttft(self) -> Percentiles | None:
        """Time to first token of the requests that succeeded (None where none did)."""
        return Percentiles.of([r.ttft_s for r in self.succeeded if r.ttft_s is not None])

    @property
    def itl(self) -> Percentiles | None:
        """Inter-token latency over every gap of the requests that succeeded."""
        return Percentiles.of([gap for r in self.succeeded for gap in r.itl_s])

    @property
    def latency(self) -> Percentiles | None:
        """Whole-request latency of the requests that succeeded."""
        return Percentiles.of([r.latency_s for r in self.succeeded])

    @property
    def mean_latency_s(self) -> float | None:
        """Mean whole-request latency of the requests that succeeded."""
        succeeded = self.succeeded
        return sum(r.latency_s for r in succeeded) / len(succeeded) if succeeded else None

    @property
    def output_tokens_per_s(self) -> float:
        """Tokens of the requests that succeeded over the wall time."""
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        """Requests that succeeded over the wall time."""
        return self.completed / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self, *, records: bool = False) -> dict[str, Any]:
        """Everything above as plain JSON values (None for what was not measured); with
        `records`, every request's record too."""

        def summary(percentiles: Percentiles | None) -> dict[str, float | int] | None:
            return None if percentiles is None else percentiles.to_json()

        result: dict[str, Any] = {
            "endpoint": self.endpoint,
            "server": {
                "model": self.server.model,
                "architecture": self.server.architecture,
                "vocab_size": self.server.vocab_size,
                "n_ctx": self.server.n_ctx,
                "max_batch": self.server.max_batch,
            },
            "spec": self.spec.to_json(),
            "wall_s": self.wall_s,
            "requests": len(self.records),
            "completed": self.completed,
            "errors": self.errors,
            "error_messages": self.error_messages,
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": self.output_tokens_per_s,
            "requests_per_s": self.requests_per_s,
            "ttft_s": summary(self.ttft),
            "itl_s": summary(self.itl),
            "latency_s": summary(self.latency),
            "mean_latency_s": self.mean_latency_s,
        }
        if records:
            result["records"] = [r.to_json() for r in self.records]
        return result


# --- Running it ------------------------------------------------------------------------------


class _Progress:
    """What a request has got so far; kept outside its task so that a request stopped by its
    deadline still reports what arrived before."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, int]] = []
        self.tokens = 0


async def _stream(
    client: AsyncClient, prompt: list[int], spec: LoadSpec, progress: _Progress
) -> str | None:
    """Run one streamed request, noting each chunk's arrival; the shortfall, if any."""
    stream = client.stream(prompt, spec.output_tokens, ignore_eos=True, temperature=0)
    async with stream:
        async for chunk in stream:
            progress.arrivals.append((time.perf_counter(), len(chunk.token_ids)))
            progress.tokens += len(chunk.token_ids)
    if progress.tokens < spec.output_tokens:
        reason = stream.result.finish_reason if stream.result is not None else "no result"
        return (
            f"ended after {progress.tokens} of {spec.output_tokens} tokens "
            f"(finish reason: {reason})"
        )
    return None


async def _request(
    client: AsyncClient, index: int, prompt: list[int], spec: LoadSpec, origin: float
) -> RequestRecord:
    """Send request `index` and record how it went, whatever happens to it."""
    progress = _Progress()
    sent = time.perf_counter()
    error: str | None
    try:
        # The client's timeout bounds each wait for a reply; this bounds the whole request.
        error = await asyncio.wait_for(_stream(client, prompt, spec, progress), spec.timeout)
    except Gemma4Error as e:
        # A server error, a reply that did not come, a bad reply, a closed connection: what
        # the load measures. Caught before TimeoutError, which RequestTimeoutError also is.
        error = f"{type(e).__name__}: {e}"
    except asyncio.TimeoutError:
        error = f"TimeoutError: the request did not finish within {spec.timeout:g} s"
    except Exception as e:
        # Anything else that ends one request (a socket error) must not end the others.
        error = f"{type(e).__name__}: {e}"
    ended = time.perf_counter()
    ttft, itl = token_latencies(sent, progress.arrivals)
    return RequestRecord(
        index=index,
        ok=error is None,
        error=error,
        ttft_s=ttft,
        itl_s=itl,
        output_tokens=progress.tokens,
        latency_s=ended - sent,
        start_s=sent - origin,
        end_s=ended - origin,
    )


async def _server_info(endpoint: str, timeout: float, client_options: dict[str, Any]) -> ServerInfo:
    """The server's info, or NoServerError when none answers within `timeout` seconds."""
    client = AsyncClient(endpoint, timeout=timeout, **client_options)
    try:
        return await client.info()
    except RequestTimeoutError:
        # ZeroMQ connects lazily: where nothing listens, the request just waits.
        raise NoServerError(
            f"no pygemma4 server answers at {endpoint} within {timeout:g} s"
        ) from None
    except Gemma4Error as e:
        raise NoServerError(f"the server at {endpoint} did not say what it serves: {e}") from e
    finally:
        await client.close()


async def run_load_async(
    endpoint: str,
    spec: LoadSpec,
    on_request_done: Callable[[RequestRecord], None] | None = None,
    *,
    info_timeout: float = INFO_TIMEOUT_S,
    **client_options: Any,
) -> LoadResult:
    """`run_load`, in the running event loop."""
    server = await _server_info(endpoint, info_timeout, client_options)
    prompts = make_prompts(spec, server.vocab_size)
    records: list[RequestRecord | None] = [None] * spec.requests
    # Shared by the workers: each takes the next request when it is free, so that at most
    # `concurrency` are in flight and none waits while a worker is idle.
    pending = iter(range(spec.requests))
    origin = time.perf_counter()

    async def worker() -> None:
        # A connection of its own per worker, as independent users would have: each request's
        # replies travel on their own socket, and the server sees `concurrency` clients.
        client = AsyncClient(endpoint, timeout=spec.timeout, **client_options)
        try:
            for index in pending:
                record = await _request(client, index, prompts[index], spec, origin)
                records[index] = record
                if on_request_done is not None:
                    on_request_done(record)
        finally:
            await client.close()

    tasks = [asyncio.ensure_future(worker()) for _ in range(min(spec.concurrency, spec.requests))]
    try:
        await asyncio.gather(*tasks)
    finally:
        # Where one worker failed (its callback raised) or the load was interrupted, the
        # others stop too, cancelling their requests on the server as their clients close.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    done = tuple(r for r in records if r is not None)
    wall_s = max(r.end_s for r in done) - min(r.start_s for r in done)
    return LoadResult(spec=spec, endpoint=endpoint, server=server, wall_s=wall_s, records=done)


def run_load(
    endpoint: str,
    spec: LoadSpec,
    on_request_done: Callable[[RequestRecord], None] | None = None,
    *,
    info_timeout: float = INFO_TIMEOUT_S,
    **client_options: Any,
) -> LoadResult:
    """Run the load `spec` against the server at `endpoint` and return what it measured.

    Asks the server what it serves first (raising NoServerError where none answers within
    `info_timeout` seconds); then runs every request, calling `on_request_done` with each
    request's record as it ends (an exception it raises stops the load). `client_options`
    go to each `AsyncClient` (CURVE keys).
    """
    return asyncio.run(
        run_load_async(endpoint, spec, on_request_done, info_timeout=info_timeout, **client_options)
    )
