"""`pygemma4 bench serve`'s load through the `openai` SDK, against any OpenAI-compatible server
(`pygemma4 serve --http`, llama.cpp's llama-server, ...), so that two servers are measured by the
same client on the same requests.

Each request is one streamed `/v1/completions` call (`AsyncOpenAI`) whose prompt is a list of
token ids (`pygemma4.benchmark.load.make_prompts`: BOS, then random ids, different for every
request, so no prompt shares a cached prefix with another), greedy (`temperature` 0), asking for
exactly `--output-tokens` tokens with end-of-generation ignored (`ignore_eos`, which both
pygemma4 and llama-server accept). At most `--concurrency` are in flight, after `--warmup`
unmeasured requests. A request counts as completed only where the server's usage says it
produced exactly `--output-tokens` tokens; the report is `pygemma4 bench serve`'s.

    pygemma4 serve MODEL --threads 2 --http 127.0.0.1:8000 &
    python bench/openai_load.py MODEL --base-url http://127.0.0.1:8000/v1
    llama-server -m MODEL -t 2 -np 8 -c 8192 --port 8090 &
    python bench/openai_load.py MODEL --base-url http://127.0.0.1:8090/v1 \
        --extra-body '{"cache_prompt": false}'

MODEL is the GGUF the server serves (read for its vocabulary size, which the prompts are drawn
from). `--extra-body` adds server-specific fields to every request (llama-server's
`cache_prompt`; pygemma4 refuses fields it does not know). `bench/openai_compare.sh` runs both
servers one after the other, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI
from rich.console import Console

from pygemma4.benchmark.load import (
    LoadResult,
    LoadSpec,
    RequestRecord,
    make_prompts,
    token_latencies,
)
from pygemma4.benchmark.report import print_load, write_json
from pygemma4.config import ARCH, open_model
from pygemma4.protocol import ServerInfo


def chunk_tokens(chunk: Any, counted: int) -> int:
    """The generated tokens a streamed chunk carries, `counted` having come before it: from
    llama-server's running count where it sends one (`"timings_per_token": true`), else one
    per choice that carries a token (a server may stream a token whose text is empty; the choice
    that ends a stream carries none unless it holds text)."""
    timings = (chunk.model_extra or {}).get("timings")
    if isinstance(timings, dict) and isinstance(timings.get("predicted_n"), int):
        return timings["predicted_n"] - counted
    return sum(bool(choice.text) or choice.finish_reason is None for choice in chunk.choices)


async def request(
    client: AsyncOpenAI,
    model: str,
    index: int,
    prompt: list[int],
    spec: LoadSpec,
    extra_body: dict[str, Any],
    origin: float,
) -> tuple[RequestRecord, int, int]:
    """Stream one completion and record its timings (an error recorded, never raised), with
    the prompt tokens the server says it took from a cache and the tokens counted in the
    stream."""
    arrivals: list[tuple[float, int]] = []
    usage: Any = None
    error: str | None = None
    counted = 0
    sent = time.perf_counter()
    try:
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=spec.output_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, **extra_body},
        )
        async for chunk in stream:
            arrived = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
            tokens = chunk_tokens(chunk, counted)
            if tokens > 0:
                arrivals.append((arrived, tokens))
                counted += tokens
        if usage is None:
            error = "the stream ended without usage"
        elif usage.completion_tokens != spec.output_tokens:
            error = f"usage says {usage.completion_tokens} of {spec.output_tokens} tokens"
    except Exception as e:  # one failed request is a figure of the load, not its end
        error = f"{type(e).__name__}: {e}"
    ended = time.perf_counter()
    ttft, itl = token_latencies(sent, arrivals)
    details = getattr(usage, "prompt_tokens_details", None)
    cached = (getattr(details, "cached_tokens", None) or 0) if details is not None else 0
    record = RequestRecord(
        index=index,
        ok=error is None,
        error=error,
        ttft_s=ttft,
        itl_s=itl,
        output_tokens=usage.completion_tokens if usage is not None else counted,
        latency_s=ended - sent,
        start_s=sent - origin,
        end_s=ended - origin,
    )
    return record, cached, counted


async def run(
    base_url: str, spec: LoadSpec, server: ServerInfo, extra_body: dict[str, Any]
) -> tuple[LoadResult, int, int]:
    """The load against the server at `base_url`, with the prompt tokens taken from a cache and
    the tokens counted in the streams, over all requests."""
    prompts = make_prompts(spec, server.vocab_size)
    pending = iter(range(spec.requests))
    outcomes: list[tuple[RequestRecord, int, int]] = []
    async with AsyncOpenAI(
        base_url=base_url, api_key="none", max_retries=0, timeout=spec.timeout
    ) as client:
        model = (await client.models.list()).data[0].id
        origin = time.perf_counter()

        async def worker() -> None:
            for index in pending:
                outcomes.append(
                    await request(client, model, index, prompts[index], spec, extra_body, origin)
                )

        await asyncio.gather(*(worker() for _ in range(min(spec.concurrency, spec.requests))))
    records = tuple(sorted((outcome[0] for outcome in outcomes), key=lambda r: r.index))
    wall_s = max(r.end_s for r in records) - min(r.start_s for r in records)
    cached = sum(outcome[1] for outcome in outcomes)
    streamed = sum(outcome[2] for outcome in outcomes)
    result = LoadResult(spec=spec, endpoint=base_url, server=server, wall_s=wall_s, records=records)
    return result, cached, streamed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="the GGUF the server serves")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=400)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, help="[default: --concurrency]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra-body", type=json.loads, default={}, help="a JSON object")
    parser.add_argument("--label", help="what to call the server in the report")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    config = open_model(args.model).config
    server = ServerInfo(
        id=0,
        model=f"{args.model.name} ({args.label or args.base_url})",
        architecture=ARCH,
        vocab_size=config.vocab_size,
        n_ctx=config.n_ctx_train,
        max_batch=args.concurrency,
        max_pending=args.requests,
        max_message_bytes=0,
    )
    spec = LoadSpec(
        args.requests, args.concurrency, args.prompt_tokens, args.output_tokens, args.seed
    )
    warmup = args.concurrency if args.warmup is None else args.warmup
    if warmup:
        warm = LoadSpec(warmup, warmup, args.prompt_tokens, args.output_tokens, args.seed + 1)
        asyncio.run(run(args.base_url, warm, server, args.extra_body))
    result, cached, streamed = asyncio.run(run(args.base_url, spec, server, args.extra_body))
    console = Console()
    print_load(result, warmup, console)
    console.print(
        f"prompt tokens taken from a cache: {cached} · output tokens counted in the streams: "
        f"{streamed}, in the usage: {sum(r.output_tokens for r in result.records)}",
        highlight=False,
    )
    if args.json_path is not None:
        write_json(
            args.json_path,
            {
                **result.to_json(records=True),
                "warmup_requests": warmup,
                "cached_prompt_tokens": cached,
                "streamed_tokens": streamed,
                "extra_body": args.extra_body,
            },
        )


if __name__ == "__main__":
    main()
