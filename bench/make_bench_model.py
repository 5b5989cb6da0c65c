"""Write the random-weight benchmark model that bench/RESULTS.md measures.

    python bench/make_bench_model.py OUT.gguf [--type Q4_K_M]

An E-style Gemma 4 (per-layer embeddings, shared KV, sliding and full layers) scaled up to
8 layers of width 2048 and MLP 8192, about 0.5 B parameters, written in F32 by the demo model's
generator and then quantized by llama.cpp's own quantizer (through llama-cpp-python), so the
tensor-type mix is exactly llama.cpp's. Its output is noise; it exists to be timed.
"""

from __future__ import annotations

import argparse
import ctypes
import tempfile
from pathlib import Path

import llama_cpp

from pygemma4.models.demo import ModelShape, write_random_model

BENCH_SHAPE = ModelShape(
    n_layer=8,
    n_embd=2048,
    n_embd_per_layer=16,
    n_head=8,
    n_head_kv=2,
    head_dim_swa=256,
    head_dim_full=512,
    n_ff=8192,
    n_shared_kv=2,
    sliding=(True, True, True, True, True, False, True, False),
    sliding_window=512,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", default="Q4_K_M", help="llama.cpp file type, e.g. Q8_0, Q4_0")
    args = parser.parse_args()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{args.type}", None)
    if ftype is None:
        parser.error(f"unknown llama.cpp file type {args.type}")
    with tempfile.TemporaryDirectory() as tmp:
        f32 = Path(tmp) / "model-f32.gguf"
        write_random_model(f32, BENCH_SHAPE, seed=11, float_matrices=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        rc = llama_cpp.llama_model_quantize(
            str(f32).encode(), str(args.out).encode(), ctypes.byref(params)
        )
    if rc != 0:
        raise SystemExit(f"llama.cpp's quantizer failed with code {rc}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
