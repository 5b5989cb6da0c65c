"""A server's cost of images and audio, on the tiny multimodal fixture (`serve --mmproj`): what
preprocessing takes in the tokenizer worker and what it sends the decode worker, and the time
to first token over HTTP of a chat with a new image, of the same chat again (its KV cached, the
tower not run) and of the same text with another image of the same size (nothing shared past
the image's first position).

    python bench/serve_media.py [--fixtures ../shared/fixtures] [--threads 2] [--repetitions 3]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from pygemma4.media.kinds import AUDIO, IMAGE
from pygemma4.media.prepared import MediaPreprocessor
from pygemma4.mmproj import open_mmproj

BUDGET = 280


def photo(seed: int, width: int = 1024, height: int = 768) -> bytes:
    """A PNG of smooth random colour (compresses like a photo more than noise does)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def clip(seconds: float) -> bytes:
    """A WAV of a sweep at 16 kHz."""
    t = np.arange(int(16_000 * seconds)) / 16_000
    samples = (np.sin(2 * np.pi * (300 + 200 * t) * t) * 12_000).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(samples.tobytes())
    return out.getvalue()


def preprocessing(mm: Path, repetitions: int) -> None:
    """Time and size of what the tokenizer worker makes of one image and one 10 s clip."""
    pre = MediaPreprocessor(open_mmproj(mm / "mmproj-f32.gguf"), BUDGET)
    uri = "data:image/png;base64," + base64.b64encode(photo(0)).decode()
    wav = clip(10.0)
    for name, kind, source, given in (
        ("image 1024x768", IMAGE, uri, len(uri)),
        ("clip 10 s", AUDIO, wav, len(base64.b64encode(wav))),
    ):
        times = []
        for _ in range(repetitions):
            start = time.perf_counter()
            prepared = pre.prepare(kind, source)
            times.append(time.perf_counter() - start)
        print(
            f"{name}: preprocessing {statistics.median(times) * 1e3:.1f} ms (median of "
            f"{repetitions}), {prepared.n_tokens} soft tokens, features "
            f"{list(prepared.features.shape)} = {prepared.features.nbytes / 2**20:.2f} MiB in "
            f"their frame (request part: {given / 2**20:.2f} MiB base64)"
        )


def first_token_times(mm: Path, threads: int, repetitions: int) -> None:
    """Time to first token over HTTP: a new image, the same chat again, another image."""
    port = 18_000 + (int(time.time()) % 1000)
    with tempfile.TemporaryDirectory() as workdir:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pygemma4",
                "serve",
                str(mm / "model-f32.gguf"),
                "--mmproj",
                str(mm / "mmproj-f32.gguf"),
                "--max-image-tokens",
                str(BUDGET),
                "--threads",
                str(threads),
                "--endpoint",
                f"tcp://127.0.0.1:{port + 1}",
                "--http",
                f"127.0.0.1:{port}",
            ],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            while "pygemma4 serving" not in server.stdout.readline():
                if server.poll() is not None:
                    raise SystemExit("the server did not start")
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as http:
                rows: dict[str, list[float]] = {"new image": [], "same chat": [], "other": []}
                cached: dict[str, int] = {}
                for r in range(repetitions):
                    text = f"Describe picture number {r}."
                    for name, seed in (("new image", 2 * r), ("same chat", 2 * r)):
                        rows[name].append(request(http, seed, text, cached, name))
                    rows["other"].append(request(http, 2 * r + 1, text, cached, "other"))
            for name, times in rows.items():
                print(
                    f"{name}: time to first token {statistics.median(times) * 1e3:.0f} ms "
                    f"(median of {repetitions}), cached prompt tokens {cached[name]}"
                )
        finally:
            server.terminate()
            server.wait()


def request(http: httpx.Client, seed: int, text: str, cached: dict[str, int], name: str) -> float:
    uri = "data:image/png;base64," + base64.b64encode(photo(seed)).decode()
    body = {
        "model": "model-f32.gguf",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": text},
                ],
            }
        ],
        "max_tokens": 1,
        "temperature": 0,
    }
    start = time.perf_counter()
    reply = http.post("/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - start
    reply.raise_for_status()
    cached[name] = reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fixtures", type=Path, default=Path("../shared/fixtures"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repetitions", type=int, default=3)
    args = parser.parse_args()
    mm = args.fixtures.resolve() / "gemma4-tiny-mm"
    preprocessing(mm, args.repetitions)
    first_token_times(mm, args.threads, args.repetitions)


if __name__ == "__main__":
    main()
