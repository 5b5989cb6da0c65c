"""llama.cpp's encoder time for one image or clip through an mmproj, for the tower benchmarks
(`vision_speed.py`, `audio_speed.py`) to set beside their own.

`llama-mtmd-cli` (llama.cpp's tools/mtmd, built with `cmake --build BUILD --target
llama-mtmd-cli`) loads a text model and the mmproj, encodes the media once and prints how long
the encoder took ("mtmd batch encoding done in N ms": the encoder alone; the media's
preprocessing comes before it, the text model's pass over the soft tokens after). Its text
model only has to exist and be as wide as the projector's output (mtmd checks that);
`write_text_model` writes a two-layer one.
"""

from __future__ import annotations

import re
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pygemma4.models.synthetic import write_synthetic_model

_ENCODED = re.compile(r"mtmd batch encoding done in (\d+) ms")
_TOKENS = re.compile(r"encoding batch with \d+ entries and total (\d+) tokens")


class MtmdRunError(RuntimeError):
    """llama-mtmd-cli failed, or printed no encoder time."""


@dataclass(frozen=True)
class MtmdEncode:
    """llama.cpp's encoder over one medium: its soft tokens and each run's time."""

    tokens: int
    seconds: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)


def write_text_model(path: Path, n_embd: int) -> Path:
    """A two-layer synthetic Gemma 4 text model `n_embd` wide (random weights, small
    vocabulary): what mtmd needs beside an mmproj projecting to `n_embd`."""
    return write_synthetic_model(
        "e4b",
        path,
        n_layer=2,
        n_embd=n_embd,
        n_ff=512,
        n_embd_per_layer=16,
        n_shared_kv=0,
        vocab_size=660,
    )


def mtmd_encode(
    cli: Path,
    text_model: Path,
    mmproj: Path,
    media: Path,
    threads: int,
    runs: int,
    extra: tuple[str, ...] = (),
) -> MtmdEncode:
    """Encode `media` (an image or audio file) with llama.cpp `runs` times, each in a fresh
    `llama-mtmd-cli` on `threads` threads (its encoder warms up at load, before the timed
    encode)."""
    seconds: list[float] = []
    tokens = 0
    for _ in range(runs):
        command = [
            str(cli),
            "-m",
            str(text_model),
            "--mmproj",
            str(mmproj),
            "--image",
            str(media),
            "-p",
            "describe",
            "-n",
            "1",
            "-t",
            str(threads),
            "--chat-template",
            "gemma",
            "-v",  # the debug log says how many soft tokens the encoder made
            *extra,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        log = done.stdout + done.stderr
        encoded = _ENCODED.search(log)
        if done.returncode != 0 or encoded is None:
            raise MtmdRunError(f"{' '.join(command)} (exit {done.returncode}):\n{log[-3000:]}")
        seconds.append(int(encoded.group(1)) / 1e3)
        tokens = sum(int(m.group(1)) for m in _TOKENS.finditer(log))
    return MtmdEncode(tokens=tokens, seconds=tuple(seconds))
