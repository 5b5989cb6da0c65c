"""Decode and prefill speed of the CUDA backend, against the card's memory bandwidth.

    python bench/cuda_speed.py MODEL.gguf [--device 0] [--runs 5] [--json OUT.json]

Decode: greedy generation of --decode tokens after a --prompt token prompt (the token chosen on
the device, as `Engine.generate` does there), timed from the first generated token to the last;
the rate is set against the bytes of weights one step reads (every tensor but the
per-layer-embedding table, of which a step gathers one row per token) to give the bandwidth it
achieves. Prefill: one --prefill token prompt in a single step. Both after a warm-up run (which
also captures the step's CUDA graph), mean and standard deviation over --runs runs. The card's
bandwidth is measured here as a device-to-device copy through PyTorch (bytes read plus written).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import multiprocessing
import statistics
import time
from pathlib import Path

import numpy as np

from pygemma4 import Engine
from pygemma4.config import open_model

PLE_TABLE = "per_layer_token_embd.weight"


def copy_bandwidth(device: int) -> tuple[str, float] | None:
    """(card name, GB/s of a large device-to-device copy), or None without PyTorch; measured in
    a process of its own, so that PyTorch's memory and context are gone before the engine's."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_copy_bandwidth, (device,))


def _copy_bandwidth(device: int) -> tuple[str, float] | None:
    try:
        import torch
    except ImportError:
        return None
    src = torch.empty(2 << 30, dtype=torch.uint8, device=f"cuda:{device}")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    repeats = 20
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    return torch.cuda.get_device_name(device), 2 * repeats * (2 << 30) / seconds / 1e9


def step_bytes(path: Path) -> int:
    """Bytes of weights one decode step reads."""
    tensors = open_model(path).gguf.tensors
    return sum(t.nbytes for name, t in tensors.items() if name != PLE_TABLE)


def decode_rate(engine: Engine, prompt: np.ndarray, n_tokens: int) -> float:
    """Generated tokens per second after the first one."""
    stamps = []
    for _ in engine.stream(prompt, n_tokens, stop_tokens=()):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def prefill_rate(engine: Engine, prompt: np.ndarray) -> float:
    with engine.new_sequence() as seq:
        start = time.perf_counter()
        seq.append(prompt)  # returns the last row's logits, so the step has finished
        return len(prompt) / (time.perf_counter() - start)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    faulthandler.dump_traceback_later(60, repeat=True)  # where a stalled run is stuck

    card = copy_bandwidth(args.device)
    print(f"card {card}", flush=True)
    start = time.perf_counter()
    engine = Engine(
        args.model,
        backend="cuda",
        device=args.device,
        n_ctx=max(args.prompt + args.decode, args.prefill) + 16,
        n_batch=max(args.prefill, args.prompt),
    )
    load_seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, engine.vocab_size, args.prompt).astype(np.int32)
    long_prompt = rng.integers(0, engine.vocab_size, args.prefill).astype(np.int32)

    print(f"loaded in {load_seconds:.1f} s", flush=True)
    print(f"warm-up decode {decode_rate(engine, prompt, args.decode):.1f} tokens/s", flush=True)
    decode = [decode_rate(engine, prompt, args.decode) for _ in range(args.runs)]
    prefill_rate(engine, long_prompt)
    prefill = [prefill_rate(engine, long_prompt) for _ in range(args.runs)]

    bytes_per_token = step_bytes(args.model)
    decode_mean, decode_std = mean_std(decode)
    prefill_mean, prefill_std = mean_std(prefill)
    achieved = bytes_per_token * decode_mean / 1e9
    result = {
        "model": str(args.model),
        "card": card[0] if card else None,
        "copy_bandwidth_GBps": card[1] if card else None,
        "load_seconds": load_seconds,
        "weights_read_per_token_GB": bytes_per_token / 1e9,
        "decode_tokens_per_s": [decode_mean, decode_std],
        "decode_bandwidth_GBps": achieved,
        "decode_fraction_of_copy_bandwidth": achieved / card[1] if card else None,
        f"prefill_{args.prefill}_tokens_per_s": [prefill_mean, prefill_std],
        "runs": args.runs,
    }
    print(f"card               {result['card']}")
    if card:
        print(f"copy bandwidth     {card[1]:.0f} GB/s")
    print(f"load               {load_seconds:.1f} s")
    print(f"weights per token  {bytes_per_token / 1e9:.3f} GB")
    print(
        f"decode             {decode_mean:.1f} ± {decode_std:.1f} tokens/s "
        f"({args.prompt}-token prompt, {args.decode} tokens, {args.runs} runs)"
    )
    line = f"decode bandwidth   {achieved:.0f} GB/s"
    if card:
        line += f" = {100 * achieved / card[1]:.1f}% of the measured copy bandwidth"
    print(line)
    print(f"prefill            {prefill_mean:.0f} ± {prefill_std:.0f} tokens/s", end=" ")
    print(f"({args.prefill} tokens)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
