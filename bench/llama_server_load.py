"""`pygemma4 bench serve`'s load against llama.cpp's own llama-server, for a comparison on the
same prompts: the same random token ids (`pygemma4.benchmark.load.make_prompts`), each request
streamed from llama-server's /completion asking for exactly `--output-tokens` greedy tokens
(end-of-generation ignored, no prompt cache), at most `--concurrency` in flight, after
`--warmup` unmeasured requests; the same figures and report as `pygemma4 bench serve`.

    llama-server -m MODEL -t 2 -np 8 -c 8192 --port 8090 &
    python bench/llama_server_load.py MODEL --url http://127.0.0.1:8090 --requests 16 \
        --concurrency 8 --prompt-tokens 400 --output-tokens 32

MODEL is the GGUF llama-server serves (read for its vocabulary size, which the prompts are
drawn from).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx
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


async def request(
    client: httpx.AsyncClient,
    url: str,
    index: int,
    prompt: list[int],
    spec: LoadSpec,
    origin: float,
) -> RequestRecord:
    """Stream one completion and record its timings (an error recorded, never raised)."""
    body = {
        "prompt": prompt,
        "n_predict": spec.output_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "cache_prompt": False,
        "return_tokens": True,
    }
    arrivals: list[tuple[float, int]] = []
    tokens, error = 0, None
    sent = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/completion", json=body) as reply:
            reply.raise_for_status()
            async for line in reply.aiter_lines():
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[len("data: ") :])
                count = len(chunk.get("tokens") or [])
                arrivals.append((time.perf_counter(), count))
                tokens += count
        if tokens < spec.output_tokens:
            error = f"ended after {tokens} of {spec.output_tokens} tokens"
    except Exception as e:  # one failed request is a figure of the load, not its end
        error = f"{type(e).__name__}: {e}"
    ended = time.perf_counter()
    ttft, itl = token_latencies(sent, arrivals)
    return RequestRecord(
        index=index,
        ok=error is None,
        error=error,
        ttft_s=ttft,
        itl_s=itl,
        output_tokens=tokens,
        latency_s=ended - sent,
        start_s=sent - origin,
        end_s=ended - origin,
    )


async def run(url: str, spec: LoadSpec, server: ServerInfo) -> LoadResult:
    """The load against llama-server at `url`."""
    prompts = make_prompts(spec, server.vocab_size)
    pending = iter(range(spec.requests))
    records: list[RequestRecord] = []
    origin = time.perf_counter()

    async def worker() -> None:
        async with httpx.AsyncClient(timeout=spec.timeout) as client:
            for index in pending:
                records.append(await request(client, url, index, prompts[index], spec, origin))

    await asyncio.gather(*(worker() for _ in range(min(spec.concurrency, spec.requests))))
    records.sort(key=lambda r: r.index)
    wall_s = max(r.end_s for r in records) - min(r.start_s for r in records)
    return LoadResult(spec=spec, endpoint=url, server=server, wall_s=wall_s, records=tuple(records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--url", default="http://127.0.0.1:8090")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=400)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, help="[default: --concurrency]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    config = open_model(args.model).config
    server = ServerInfo(
        id=0,
        model=f"{args.model.name} (llama-server)",
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
        asyncio.run(run(args.url, warm, server))
    result = asyncio.run(run(args.url, spec, server))
    print_load(result, warmup, Console())
    if args.json_path is not None:
        write_json(args.json_path, {**result.to_json(records=True), "warmup_requests": warmup})


if __name__ == "__main__":
    main()
