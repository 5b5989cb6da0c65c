"""Time of the vision tower per image at E2B/E4B's vision shape (width 768, 16 layers, 12 heads,
ffn 3072, position tables of 10240, F16 random weights written to a temporary mmproj file), for
each soft-token budget asked for; with `--llama-mtmd-cli`, llama.cpp's encoder time for the same
image through the same mmproj file beside it (`--image-max-tokens` = the budget).

    python bench/vision_speed.py [--budgets 70,280] [--threads N] [--repetitions 3] \
        [--llama-mtmd-cli BUILD/bin/llama-mtmd-cli]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from llama_mtmd import mtmd_encode, write_text_model
from PIL import Image

from pygemma4.mmproj import open_mmproj
from pygemma4.vision import VisionTower

WIDTH, FFN, LAYERS, HEADS, POSITIONS, TEXT_WIDTH = 768, 3072, 16, 12, 10240, 2560


def write_mmproj(path: Path) -> None:
    """A `gemma4v` projector of E4B's vision shape with random F16 weights."""
    rng = np.random.default_rng(0)
    writer = GGUFWriter(path, "clip")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.vision.projector_type", "gemma4v")
    for key, value in (
        ("projection_dim", TEXT_WIDTH),
        ("image_size", 224),
        ("patch_size", 16),
        ("embedding_length", WIDTH),
        ("feed_forward_length", FFN),
        ("block_count", LAYERS),
        ("attention.head_count", HEADS),
    ):
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    # What Gemma 4's converter writes (pixels are scaled to [0, 1] and not normalised);
    # llama.cpp's loader requires the keys.
    writer.add_array("clip.vision.image_mean", [0.0, 0.0, 0.0])
    writer.add_array("clip.vision.image_std", [1.0, 1.0, 1.0])

    def matrix(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float16)

    def norm(n: int) -> np.ndarray:
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    writer.add_tensor("v.patch_embd.weight", matrix(WIDTH, 3, 16, 16))
    writer.add_tensor("v.position_embd.weight", matrix(2, POSITIONS, WIDTH))
    writer.add_tensor("mm.input_projection.weight", matrix(TEXT_WIDTH, WIDTH))
    for il in range(LAYERS):
        p = f"v.blk.{il}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(p + name + ".weight", matrix(WIDTH, WIDTH))
        writer.add_tensor(p + "ffn_gate.weight", matrix(FFN, WIDTH))
        writer.add_tensor(p + "ffn_up.weight", matrix(FFN, WIDTH))
        writer.add_tensor(p + "ffn_down.weight", matrix(WIDTH, FFN))
        for name in ("ln1", "ln2", "attn_post_norm", "ffn_post_norm"):
            writer.add_tensor(p + name + ".weight", norm(WIDTH))
        writer.add_tensor(p + "attn_q_norm.weight", norm(WIDTH // HEADS))
        writer.add_tensor(p + "attn_k_norm.weight", norm(WIDTH // HEADS))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="70,280")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--llama-mtmd-cli", type=Path, help="also time llama.cpp's encoder")
    args = parser.parse_args()
    threads = args.threads or os.cpu_count() or 1
    budgets = [int(b) for b in args.budgets.split(",")]
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mmproj-e4b-shape.gguf"
        write_mmproj(path)
        mmproj = open_mmproj(path)
        if args.llama_mtmd_cli is not None:
            image_file = Path(tmp) / "image.png"
            Image.fromarray(image).save(image_file)
            text_model = write_text_model(Path(tmp) / "text.gguf", TEXT_WIDTH)
        for budget in budgets:
            tower = VisionTower(mmproj, budget, threads=threads)
            times = []
            for _ in range(args.repetitions):
                start = time.perf_counter()
                out = tower.embed(image)
                times.append(time.perf_counter() - start)
            rows, cols = out.grid
            print(
                f"budget {budget}: {rows}x{cols} patches -> {out.n_tokens} soft tokens, "
                f"best {min(times):.2f} s, median {sorted(times)[len(times) // 2]:.2f} s "
                f"({args.repetitions} runs)"
            )
            if args.llama_mtmd_cli is not None:
                llama = mtmd_encode(
                    args.llama_mtmd_cli,
                    text_model,
                    path,
                    image_file,
                    threads,
                    args.repetitions,
                    ("--image-max-tokens", str(budget)),
                )
                print(
                    f"budget {budget}, llama.cpp: {llama.tokens} soft tokens, "
                    f"best {min(llama.seconds):.2f} s, median {llama.median_s:.2f} s "
                    f"({args.repetitions} runs)"
                )


if __name__ == "__main__":
    main()
