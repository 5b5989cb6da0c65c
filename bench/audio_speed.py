"""Speed of the audio input: log-mel features and the Conformer encoder on a full-size
synthetic mmproj (random weights at the shapes of Gemma 4's audio encoder: width 1024, 12
layers, 8 heads, feed-forward 4096, subsampling channels 128 and 32, output 1536), F16 matrices.

    python bench/audio_speed.py --seconds 1,10,30 --threads 2 \
        [--llama-mtmd-cli BUILD/bin/llama-mtmd-cli]

Each figure is the median of several repetitions after a warm-up. With `--llama-mtmd-cli`,
llama.cpp's encoder time for the same samples (a float WAV) through the same mmproj file is
printed beside it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from llama_mtmd import mtmd_encode, write_text_model
from scipy.io import wavfile

from pygemma4.media.audio import SAMPLE_RATE, log_mel
from pygemma4.media.audio_encoder import AudioEncoder

WIDTH, LAYERS, HEADS, FF, CHANNELS, OUTPUT, LM_WIDTH, N_MEL = (
    1024,
    12,
    8,
    4096,
    (128, 32),
    1536,
    1536,
    128,
)


def write_mmproj(path: Path, seed: int = 0) -> None:
    """A gemma4a mmproj of random weights at full size."""
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(path, "clip")
    writer.add_bool("clip.has_audio_encoder", True)
    writer.add_string("clip.audio.projector_type", "gemma4a")
    writer.add_uint32("clip.audio.num_mel_bins", N_MEL)
    writer.add_uint32("clip.audio.block_count", LAYERS)
    writer.add_uint32("clip.audio.attention.head_count", HEADS)
    writer.add_uint32("clip.audio.embedding_length", WIDTH)
    writer.add_uint32("clip.audio.feed_forward_length", FF)
    writer.add_uint32("clip.audio.projection_dim", LM_WIDTH)
    writer.add_float32("clip.audio.attention.layer_norm_epsilon", 1e-6)

    def matrix(name: str, rows: int, cols: int) -> None:
        values = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float16)
        writer.add_tensor(name, values, raw_dtype=GGMLQuantizationType.F16)

    def vector(name: str, *shape: int, around: float = 1.0) -> None:
        values = (around + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        writer.add_tensor(name, values)

    vector("a.conv1d.0.weight", CHANNELS[0], 1, 3, 3, around=0.0)
    vector("a.conv1d.0.norm.weight", CHANNELS[0])
    vector("a.conv1d.1.weight", CHANNELS[1], CHANNELS[0], 3, 3, around=0.0)
    vector("a.conv1d.1.norm.weight", CHANNELS[1])
    matrix("a.input_projection.weight", WIDTH, (N_MEL // 4) * CHANNELS[1])
    for il in range(LAYERS):
        p = f"a.blk.{il}."
        for s in ("", "_1"):
            matrix(f"{p}ffn_up{s}.weight", FF, WIDTH)
            matrix(f"{p}ffn_down{s}.weight", WIDTH, FF)
            vector(f"{p}ffn_norm{s}.weight", WIDTH)
            vector(f"{p}ffn_post_norm{s}.weight", WIDTH)
        for name in ("attn_q", "attn_k", "attn_v", "attn_out", "attn_k_rel", "conv_pw2"):
            matrix(f"{p}{name}.weight", WIDTH, WIDTH)
        matrix(f"{p}conv_pw1.weight", 2 * WIDTH, WIDTH)
        for name in ("attn_pre_norm", "attn_post_norm", "conv_norm", "norm_conv", "ln2"):
            vector(f"{p}{name}.weight", WIDTH)
        vector(f"{p}per_dim_scale.weight", WIDTH // HEADS, around=0.7)
        vector(f"{p}conv_dw.weight", WIDTH, 5, around=0.0)
    matrix("a.pre_encode.out.weight", OUTPUT, WIDTH)
    vector("a.pre_encode.out.bias", OUTPUT, around=0.0)
    matrix("mm.a.input_projection.weight", LM_WIDTH, OUTPUT)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def median_seconds(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", default="1,10,30", help="clip lengths, comma-separated")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--llama-mtmd-cli", type=Path, help="also time llama.cpp's encoder")
    args = parser.parse_args()
    threads = args.threads or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mmproj-synthetic.gguf"
        write_mmproj(path)
        encoder = AudioEncoder(path, threads=threads)
        rng = np.random.default_rng(1)
        llama = args.llama_mtmd_cli
        if llama is not None:
            text_model = write_text_model(Path(tmp) / "text.gguf", LM_WIDTH)
        print(
            f"{'clip':>6} {'tokens':>6} {'log-mel ms':>11} {'encoder ms':>11} {'x real time':>11}"
            + ("" if llama is None else f" {'llama.cpp tokens':>16} {'llama.cpp ms':>12}")
        )
        for seconds in (float(s) for s in args.seconds.split(",")):
            samples = (0.3 * rng.standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)
            features = encoder.features(samples)
            mel = median_seconds(lambda s=samples: log_mel(s), args.repeat)
            run = median_seconds(lambda f=features: encoder.encode_features(f), args.repeat)
            tokens = encoder.n_tokens(samples.size)
            line = (
                f"{seconds:>5}s {tokens:>6} {mel * 1e3:>11.1f} {run * 1e3:>11.1f} "
                f"{seconds / (mel + run):>11.1f}"
            )
            if llama is not None:
                clip = Path(tmp) / f"clip-{seconds}s.wav"
                wavfile.write(clip, SAMPLE_RATE, samples)
                theirs = mtmd_encode(llama, text_model, path, clip, threads, args.repeat)
                line += f" {theirs.tokens:>16} {theirs.median_s * 1e3:>12.1f}"
            print(line)


if __name__ == "__main__":
    main()
