"""Full-size Gemma 4 GGUFs with random weights, for measuring speed without a download.

**The numerics are noise: these files exist to be timed.** Each file has exactly the tensor
names, shapes and metadata of a real Gemma 4 text model (E2B, E4B, 26B-A4B, 31B: the published
models of `MODEL_SHAPES`, shapes.py) and the tensor types llama.cpp's quantizer gives it for
Q4_K_M, so every matrix the engine streams through has the real size and block format. The
weights are random: quantized blocks hold random bytes with small positive fp16 scales (so
every activation stays finite), norms are random near 1. The tokenizer is a synthetic
byte-fallback BPE vocabulary of the real size (262,144 tokens). Tensors are laid out in GGUF as
llama.cpp's `convert_hf_to_gguf.py` (class Gemma4Model) writes them, in the order of its
quantized files.

    python -m pygemma4.models.synthetic e4b OUT.gguf

writes one (without OUT: into the cache, see `synthetic_model_path`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES

from pygemma4.chat import GEMMA4_TEMPLATE
from pygemma4.model_info import decode_read
from pygemma4.models.file_cache import cache_root, cached_file, write_atomically
from pygemma4.models.gguf_writer import (
    RandomWeights,
    TensorSpec,
    model_metadata,
    model_tensors,
    write_model_file,
)
from pygemma4.models.shapes import MODEL_SHAPES, ModelShape, model_shape
from pygemma4.models.vocabulary import enumerated_vocabulary

__all__ = [
    "SYNTHETIC_MODELS",
    "cache_file_name",
    "main",
    "q4_k_m_tensor_types",
    "synthetic_model_path",
    "synthetic_model_summary",
    "synthetic_tensors",
    "write_synthetic_model",
]

T = GGMLQuantizationType

# Bump when the bytes written for the same model and seed change (it is part of cache names).
FORMAT_VERSION = 1
# llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M and LLAMA_FTYPE_ALL_F32 (general.file_type).
FILE_TYPES = {"Q4_K_M": 15, "F32": 0}
# The published models: what `--synthetic` offers.
SYNTHETIC_MODELS: Mapping[str, ModelShape] = MappingProxyType(
    {name: shape for name, shape in MODEL_SHAPES.items() if shape.hf_repo}
)
# Quantized blocks of random bytes; norms drawn in float64.
_WEIGHTS = RandomWeights(quantize_values=False, norm_dtype=np.float64)


# -- tensors -----------------------------------------------------------------------------------


def _llama_order(name: str) -> tuple[int, str]:
    """llama.cpp's tensor order (its loader's weight_name_comparer): by block number, tensors
    outside blocks first, then by name. Quantized files are written in this order, and the
    Q4_K_M rule counts attn_v tensors in it."""
    if name.startswith("blk."):
        number = name.split(".", 2)[1]
        if number.isdigit():
            return int(number), name
    return -1, name


def synthetic_tensors(
    model: ModelShape | str, mix: str = "Q4_K_M", float_type: T = T.BF16
) -> list[TensorSpec]:
    """Every tensor of the model with its type, in file order (llama.cpp's).

    mix "Q4_K_M" gives llama.cpp's Q4_K_M types (`q4_k_m_tensor_types`) of a model converted to
    `float_type` first (BF16: `convert_hf_to_gguf.py --outtype auto` of the BF16 checkpoints);
    "F32" gives every tensor in F32, for llama.cpp's own quantizer to work on.
    """
    shape = model_shape(model) if isinstance(model, str) else model
    if mix == "Q4_K_M":
        return model_tensors(
            shape,
            lambda shapes: q4_k_m_tensor_types(
                shapes, n_layer=shape.n_layer, n_expert=shape.n_expert, float_type=float_type
            ),
            _llama_order,
        )
    if mix == "F32":
        return model_tensors(shape, lambda shapes: dict.fromkeys(shapes, T.F32), _llama_order)
    raise ValueError(f"unknown tensor type mix {mix!r} (known: {', '.join(FILE_TYPES)})")


# -- llama.cpp's Q4_K_M type mix ---------------------------------------------------------------


def q4_k_m_tensor_types(
    shapes: Mapping[str, Sequence[int]],
    *,
    n_layer: int,
    n_expert: int = 0,
    float_type: T = T.BF16,
) -> dict[str, T]:
    """The tensor types llama.cpp's quantizer (src/llama-quant.cpp) gives a Gemma 4 model for
    LLAMA_FTYPE_MOSTLY_Q4_K_M, from the tensors' names and ne shapes.

    The input is what llama.cpp's converter writes: vectors, norms, tensors whose names do not
    end in ".weight" and the expert router (ffn_gate_inp.weight) in F32, other matrices in
    `float_type`. The quantizer then keeps vectors, norms, the router and per_layer_model_proj
    as they are and gives every other matrix Q4_K, except:

    - token_embd (tied to the output, as in Gemma) and per_layer_token_embd: Q6_K, or Q8_0
      where rows are not a multiple of 256;
    - attn_v: Q6_K for the i-th of n attn_v tensors (in llama.cpp's tensor order) where
      use_more_bits(i, n): i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2;
    - ffn_down and ffn_down_exps: Q6_K where use_more_bits(layer, n_layer);
    - with exactly 8 experts: attn_v and attn_k Q8_0, attn_output Q5_K;
    - a row length that is not a multiple of the type's block falls back: Q4_K to Q5_0, Q5_K
      to Q5_1, Q6_K to Q8_0, and to F16 where even that block does not divide it.
    """
    order = sorted(shapes, key=_llama_order)
    categories = {name: _category(name) for name in order}
    n_attn_v = sum(1 for c in categories.values() if c == "attn_v")
    tied = "output" not in categories.values()
    n_expert = max(1, n_expert)
    i_attn_v = 0
    i_ffn_down = 0
    types: dict[str, T] = {}
    for name in order:
        ne = tuple(int(d) for d in shapes[name])
        if not _quantizable(name, ne):
            types[name] = _converted_type(name, ne, float_type)
            continue
        category = categories[name]
        new = T.Q4_K
        if category == "output" or (tied and category == "token_embd"):
            new = T.Q8_0 if ne[0] % GGML_QUANT_SIZES[T.Q4_K][0] else T.Q6_K
        elif category == "attn_v":
            if _use_more_bits(i_attn_v, n_attn_v):
                new = T.Q6_K
            if n_expert == 8:
                new = T.Q8_0
            i_attn_v += 1
        elif category == "attn_k":
            if n_expert == 8:
                new = T.Q8_0
        elif category == "ffn_down":
            layer = _block_number(name) if n_expert > 1 else i_ffn_down
            if _use_more_bits(layer, n_layer):
                new = T.Q6_K
            i_ffn_down += 1
        elif category == "attn_output" and n_expert == 8:
            new = T.Q5_K
        types[name] = _fallback(name, ne[0], new)
    return {name: types[name] for name in shapes}


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for needle, category in (
        ("attn_qkv.weight", "attn_v"),
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if needle in name:
            return category
    return "other"


def _quantizable(name: str, ne: tuple[int, ...]) -> bool:
    """llama.cpp's tensor_allows_quantization, for the tensors a Gemma model has."""
    n_dims = len(ne)
    while n_dims > 1 and ne[n_dims - 1] == 1:
        n_dims -= 1
    return (
        n_dims >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and "ffn_gate_inp.weight" not in name
        and "per_layer_model_proj" not in name
        and "altup" not in name
        and "laurel" not in name
    )


def _converted_type(name: str, ne: tuple[int, ...], float_type: T) -> T:
    """The type llama.cpp's converter writes a tensor in, for a 16- or 32-bit outtype."""
    if (
        len(ne) <= 1
        or name.endswith("_norm.weight")
        or not name.endswith(".weight")
        or "ffn_gate_inp.weight" in name
    ):
        return T.F32
    return float_type


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _block_number(name: str) -> int:
    layer, _ = _llama_order(name)
    if layer < 0:
        raise ValueError(f"cannot tell the layer of tensor {name!r}")
    return layer


_FALLBACKS = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0}


def _fallback(name: str, row: int, wanted: T) -> T:
    if row % GGML_QUANT_SIZES[wanted][0] == 0:
        return wanted
    if wanted not in _FALLBACKS:
        raise ValueError(f"tensor {name!r}: rows of {row} fit no block of {wanted.name}")
    fallback = _FALLBACKS[wanted]
    return fallback if row % GGML_QUANT_SIZES[fallback][0] == 0 else T.F16


# -- writing -----------------------------------------------------------------------------------


def _write(
    path: Path, shape: ModelShape, specs: list[TensorSpec], mix: str, seed: int, layout_only: bool
) -> None:
    metadata = model_metadata(
        shape,
        general_name=f"pygemma4 synthetic {shape.name} (random weights)",
        vocabulary=enumerated_vocabulary(shape.vocab_size),
        chat_template=GEMMA4_TEMPLATE,
        file_type=FILE_TYPES[mix],
    )
    write_model_file(path, shape, metadata, specs, None if layout_only else _WEIGHTS, seed)


def write_synthetic_model(
    name: str,
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    mix: str = "Q4_K_M",
    layout_only: bool = False,
    **overrides: object,
) -> Path:
    """Write the synthetic model `name` (a key of MODEL_SHAPES) to `path`; returns it.

    The same name, overrides and seed give the same bytes. The file is written under a
    temporary name beside `path` and renamed into place, so `path` is never half-written.
    Tensor data is produced and written piece by piece: memory use stays small at any size.

    overrides: fields of ModelShape to change (e.g. n_layer=4, vocab_size=1024) for a
    smaller model of the same family. mix: "Q4_K_M" (llama.cpp's types) or "F32" (every tensor
    F32, for llama.cpp's quantizer). layout_only: leave the tensor data a hole of zeros (a
    sparse file, written in moments) — for checking names, shapes and metadata, not for running.
    """
    model = model_shape(name, **overrides)
    specs = synthetic_tensors(model, mix)
    path = Path(path)
    # Left to the system to flush, as any file a command writes; the cache, which trusts a file
    # by its name alone, flushes its own (synthetic_model_path).
    write_atomically(
        path, lambda tmp: _write(tmp, model, specs, mix, seed, layout_only), durable=False
    )
    return path


def cache_file_name(name: str, seed: int = 0, mix: str = "Q4_K_M", **overrides: object) -> str:
    """The cache's file name for a synthetic model: it names the model and carries a digest of
    everything that decides its bytes, so a changed definition never reuses an old file."""
    model = model_shape(name, **overrides)
    key = repr((FORMAT_VERSION, dataclasses.astuple(model), seed, mix))
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return f"gemma4-{name}-synthetic-{mix}-{digest}.gguf"


def synthetic_model_path(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    mix: str = "Q4_K_M",
    **overrides: object,
) -> Path:
    """The synthetic model `name` in the cache, written there first if it is not there yet.

    The cache is `cache_dir`, or $PYGEMMA4_CACHE/synthetic, or ~/.cache/pygemma4/synthetic.
    The file is written under a temporary name, flushed to disk and renamed into place, so an
    interrupted write never leaves a file that could be taken for the model.
    """
    cache = Path(cache_dir) if cache_dir is not None else cache_root() / "synthetic"
    path = cache / cache_file_name(name, seed, mix, **overrides)
    model = model_shape(name, **overrides)
    return cached_file(
        path, lambda tmp: _write(tmp, model, synthetic_tensors(model, mix), mix, seed, False)
    )


# -- summary -----------------------------------------------------------------------------------


def synthetic_model_summary(name: str, mix: str = "Q4_K_M", **overrides: object) -> dict:
    """Sizes of the synthetic model `name`, without writing it.

    - parameters / tensor_bytes: every tensor (the file is tensor_bytes plus the metadata);
    - decode_parameters / decode_bytes: what one decode step of one sequence reads, for
      bandwidth figures (`model_info.decode_read`: every matrix but the gathered
      per-layer embeddings, the tied embedding once as the LM head, the routed experts only);
    - bytes_by_type: tensor bytes per tensor type.
    """
    model = model_shape(name, **overrides)
    specs = synthetic_tensors(model, mix)
    read = decode_read(specs, model.model_config())
    by_type: dict[str, int] = {}
    for spec in specs:
        by_type[spec.type.name] = by_type.get(spec.type.name, 0) + spec.nbytes
    return {
        "name": model.name,
        "hf_repo": model.hf_repo,
        "mix": mix,
        "tensors": len(specs),
        "parameters": sum(spec.n_elements for spec in specs),
        "tensor_bytes": sum(spec.nbytes for spec in specs),
        "decode_parameters": read.parameters,
        "decode_bytes": read.bytes,
        "bytes_by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
    }


# -- command line ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pygemma4.models.synthetic",
        description="Write a full-size Gemma 4 GGUF with random weights (noise, for timing).",
    )
    parser.add_argument("model", choices=list(SYNTHETIC_MODELS))
    parser.add_argument(
        "out", type=Path, nargs="?", help="file to write (default: the cached file)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mix", choices=list(FILE_TYPES), default="Q4_K_M")
    parser.add_argument("--n-layer", type=int, help="fewer layers (a smaller model)")
    parser.add_argument("--vocab-size", type=int, help="a smaller vocabulary")
    parser.add_argument("--summary", action="store_true", help="print the sizes, write nothing")
    args = parser.parse_args(argv)
    overrides: dict[str, object] = {}
    if args.n_layer is not None:
        overrides["n_layer"] = args.n_layer
    if args.vocab_size is not None:
        overrides["vocab_size"] = args.vocab_size
    try:
        if args.summary:
            for key, value in synthetic_model_summary(args.model, args.mix, **overrides).items():
                print(f"{key}: {value}")
            return
        start = time.perf_counter()
        if args.out is None:
            path = synthetic_model_path(args.model, seed=args.seed, mix=args.mix, **overrides)
        else:
            path = write_synthetic_model(
                args.model, args.out, seed=args.seed, mix=args.mix, **overrides
            )
        seconds = time.perf_counter() - start
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    size = path.stat().st_size
    print(f"{path} {size} bytes ({size / 1e9:.2f} GB) in {seconds:.1f} s", file=sys.stdout)


if __name__ == "__main__":
    main()
