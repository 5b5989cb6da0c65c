"""The one writer of the Gemma 4 GGUFs made here: a model shape's metadata (`model_metadata`)
and its tensors (`model_tensors`, from `pygemma4.config.tensor_shapes`), with random weights
(`RandomWeights`) drawn tensor by tensor in file order from one seeded generator.

The data is produced and written piece by piece, so memory use stays small at any model size;
the same arguments give the same bytes.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFEndian, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

from pygemma4.config import ARCH, tensor_shapes
from pygemma4.models.shapes import ModelShape
from pygemma4.models.vocabulary import Vocabulary, tokenizer_metadata

__all__ = ["RandomWeights", "TensorSpec", "model_metadata", "model_tensors", "write_model_file"]

T = GGMLQuantizationType

ALIGNMENT = 32  # GGUF's default, which GGUFWriter uses
# Random data is produced and written in pieces of about this size.
CHUNK_BYTES = 32 << 20


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a file: name, shape in GGUF ne order (row length first), type."""

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.type]
        return self.n_elements // block_size * type_size


def model_tensors(
    shape: ModelShape,
    types: Callable[[Mapping[str, tuple[int, ...]]], Mapping[str, GGMLQuantizationType]],
    order: Callable[[str], Any],
) -> list[TensorSpec]:
    """Every tensor of a file of `shape`: the tensor table of its configuration
    (`tensor_shapes`), each of the type `types` gives it (from all the names and shapes), in
    the order of the sort key `order` on names (ties keep the table's order)."""
    shapes = tensor_shapes(shape.model_config())
    tensor_types = types(shapes)
    return [
        TensorSpec(name, shapes[name], tensor_types[name]) for name in sorted(shapes, key=order)
    ]


def model_metadata(
    shape: ModelShape,
    *,
    general_name: str,
    vocabulary: Vocabulary,
    chat_template: str,
    file_type: int | None = None,
) -> dict[str, object]:
    """Every metadata key of a Gemma 4 GGUF of `shape` but general.architecture (which the
    writer puts first), in the order llama.cpp's converter writes them.

    Integers are written as uint32, floats as float32, lists as arrays; file_type
    (general.file_type, llama.cpp's LlamaFileType) is left out where None.
    """
    a = f"{ARCH}."
    experts = shape.n_expert > 0
    metadata: dict[str, object] = {
        "general.type": "model",
        "general.name": general_name,
        a + "block_count": shape.n_layer,
        a + "context_length": shape.context_length,
        a + "embedding_length": shape.n_embd,
        a + "feed_forward_length": _per_layer(shape.n_ff_per_layer),
        a + "attention.head_count": shape.n_head,
        a + "attention.head_count_kv": _per_layer(shape.n_head_kv_per_layer),
        a + "rope.freq_base": shape.rope_base_full,
        a + "rope.freq_base_swa": shape.rope_base_swa,
        a + "attention.layer_norm_rms_epsilon": shape.rms_eps,
    }
    if experts:
        metadata[a + "expert_count"] = shape.n_expert
        metadata[a + "expert_used_count"] = shape.n_expert_used
    metadata |= {
        a + "attention.key_length": shape.head_dim_full,
        a + "attention.value_length": shape.head_dim_full,
        a + "final_logit_softcapping": shape.final_logit_softcap,
        a + "attention.sliding_window": shape.sliding_window,
        a + "attention.shared_kv_layers": shape.n_shared_kv,
        a + "embedding_length_per_layer_input": shape.n_embd_per_layer,
        a + "attention.sliding_window_pattern": list(shape.sliding),
        a + "attention.key_length_swa": shape.head_dim_swa,
        a + "attention.value_length_swa": shape.head_dim_swa,
    }
    if experts:
        metadata[a + "expert_feed_forward_length"] = shape.n_ff_expert
    metadata |= {
        a + "rope.dimension_count": shape.head_dim_full,
        a + "rope.dimension_count_swa": shape.head_dim_swa,
        **tokenizer_metadata(vocabulary),
        "tokenizer.chat_template": chat_template,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.ggml.add_bos_token": True,
        "general.quantization_version": 2,
    }
    if file_type is not None:
        metadata["general.file_type"] = file_type
    return metadata


def _per_layer(values: tuple[int, ...]) -> int | list[int]:
    """A per-layer value as llama.cpp's converter writes it: one number where all layers
    agree, else an array."""
    return values[0] if len(set(values)) == 1 else list(values)


# -- random weights ----------------------------------------------------------------------------

# Where a block keeps its fp16 scale d and its fp16 dmin (or min) if it has one, the ratio of
# that second field to d, chosen so that blocks are about zero-mean, and the standard deviation
# of a block's values per unit of d when all other bytes are uniformly random (measured with
# gguf.quants.dequantize).
_BLOCK_SCALES: dict[T, tuple[int, int | None, float, float]] = {
    T.Q4_0: (0, None, 0.0, 4.61),
    T.Q4_1: (0, 2, -7.5, 4.61),  # value = d * q + m
    T.Q5_0: (0, None, 0.0, 9.23),
    T.Q5_1: (0, 2, -15.5, 9.23),
    T.Q8_0: (0, None, 0.0, 73.9),
    T.Q4_K: (0, 2, 7.5, 258.6),  # value = d * scale * q - dmin * min
    T.Q5_K: (0, 2, 15.5, 526.6),
    T.Q6_K: (208, None, 0.0, 1366.5),
}
_FLOAT_TYPES = (T.F32, T.F16, T.BF16)
# The smallest normal fp16: scales stay normal numbers.
_MIN_SCALE = 2.0**-14


@dataclass(frozen=True)
class RandomWeights:
    """How a file's random weights are drawn.

    Matrices: values of standard deviation about 1/sqrt(row length). Float types hold them as
    drawn; quantized types either hold them quantized (`quantize_values`: real blocks of real
    values, by gguf's Python quantizer, which is slow and knows only some types: for small
    models) or are random bytes with small positive fp16 scales (any type and size, in moments;
    every activation stays finite). Norms are near 1, their noise drawn in `norm_dtype` (each
    kind of file as its first generator drew it, so that files keep their bytes); layer output
    scales lie in [0.5, 1); the full layers' RoPE factors are exactly as llama.cpp's converter
    writes them.
    """

    quantize_values: bool
    norm_dtype: type[np.floating]

    def chunks(
        self, rng: np.random.Generator, spec: TensorSpec, shape: ModelShape
    ) -> Iterator[np.ndarray]:
        """The bytes of tensor `spec` of a model of `shape`, in pieces."""
        if len(spec.shape) > 1:
            yield from self._matrix_chunks(rng, spec)
            return
        if spec.type != T.F32:
            raise ValueError(f"vector tensor {spec.name!r} must be F32")
        yield self._vector(rng, spec, shape).view(np.uint8)

    def _vector(self, rng: np.random.Generator, spec: TensorSpec, shape: ModelShape) -> np.ndarray:
        (n,) = spec.shape
        if spec.name == "rope_freqs.weight":
            n_rot = int(shape.head_dim_full * shape.partial_rotary_full / 2)
            return np.array([1.0] * n_rot + [1e30] * (n - n_rot), dtype=np.float32)
        if spec.name.endswith("layer_output_scale.weight"):
            return rng.uniform(0.5, 1.0, size=n).astype(np.float32)
        noise = rng.standard_normal(n, dtype=self.norm_dtype)
        return (1.0 + noise * self.norm_dtype(0.1)).astype(np.float32)

    def _matrix_chunks(self, rng: np.random.Generator, spec: TensorSpec) -> Iterator[np.ndarray]:
        sigma = 1.0 / math.sqrt(spec.shape[0])
        block_size, type_size = GGML_QUANT_SIZES[spec.type]
        if spec.type in _FLOAT_TYPES or self.quantize_values:
            # Whole blocks per piece (CHUNK_BYTES // 4 is a multiple of every block size).
            for n in _chunks(spec.n_elements, CHUNK_BYTES // 4):
                values = rng.standard_normal(n, dtype=np.float32)
                values *= np.float32(sigma)
                yield _encoded(values, spec)
            return
        if spec.type not in _BLOCK_SCALES:
            raise ValueError(f"tensor {spec.name!r}: cannot make random {spec.type.name} blocks")
        d_at, dmin_at, dmin_ratio, spread = _BLOCK_SCALES[spec.type]
        for n in _chunks(spec.n_elements // block_size, max(1, CHUNK_BYTES // type_size)):
            blocks = _random_bytes(rng, n * type_size).reshape(n, type_size)
            d = rng.uniform(0.75, 1.25, size=n).astype(np.float32) * np.float32(sigma / spread)
            np.maximum(d, np.float32(_MIN_SCALE), out=d)
            blocks[:, d_at : d_at + 2] = d.astype(np.float16).view(np.uint8).reshape(n, 2)
            if dmin_at is not None:
                second = (d * np.float32(dmin_ratio)).astype(np.float16)
                blocks[:, dmin_at : dmin_at + 2] = second.view(np.uint8).reshape(n, 2)
            yield blocks.reshape(-1)


def _encoded(values: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The bytes of float32 `values` as tensor `spec`'s type."""
    if spec.type == T.F32:
        return values.view(np.uint8)
    if spec.type == T.F16:
        return values.astype(np.float16).view(np.uint8)
    if spec.type == T.BF16:  # the upper half of the float32, rounded
        bits = values.view(np.uint32)
        return ((bits + np.uint32(0x8000)) >> np.uint32(16)).astype(np.uint16).view(np.uint8)
    try:
        return quantize(values, spec.type).view(np.uint8).reshape(-1)
    except NotImplementedError:
        raise ValueError(
            f"tensor {spec.name!r}: gguf's Python quantizer cannot write {spec.type.name}"
        ) from None


def _chunks(total: int, per_chunk: int) -> Iterator[int]:
    done = 0
    while done < total:
        n = min(per_chunk, total - done)
        yield n
        done += n


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    words = rng.integers(0, 2**64 - 1, size=-(-n // 8), dtype=np.uint64, endpoint=True)
    return words.view(np.uint8)[:n]


# -- writing -----------------------------------------------------------------------------------

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Writer(GGUFWriter):
    """A GGUFWriter that packs long metadata arrays (a full-size vocabulary: 262,144 entries in
    each of four arrays) in one go instead of element by element; the bytes are the same."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None, **kwargs):  # type: ignore[no-untyped-def]
        if (
            vtype == GGUFValueType.ARRAY
            and sub_type is None
            and isinstance(val, list)
            and len(val) > 1024
            and self.endianess == GGUFEndian.LITTLE
        ):
            body = _pack_array(val)
            if body is not None:
                element_type, data = body
                head = _U32.pack(GGUFValueType.ARRAY) if add_vtype else b""
                return head + _U32.pack(element_type) + _U64.pack(len(val)) + data
        return super()._pack_val(val, vtype, add_vtype, sub_type, **kwargs)


def _pack_array(values: list) -> tuple[GGUFValueType, bytes] | None:  # type: ignore[type-arg]
    """The element type and little-endian bytes of a list of str, float or int (as GGUFWriter
    types them: STRING, FLOAT32, INT32), or None for anything else."""
    kind = type(values[0])
    if kind not in (str, float, int) or not all(type(v) is kind for v in values):
        return None
    if kind is str:
        encoded = [v.encode("utf-8") for v in values]
        return GGUFValueType.STRING, b"".join(_U64.pack(len(e)) + e for e in encoded)
    if kind is float:
        return GGUFValueType.FLOAT32, np.asarray(values, dtype="<f4").tobytes()
    return GGUFValueType.INT32, np.asarray(values, dtype="<i4").tobytes()


def _value_type(key: str, value: object) -> GGUFValueType:
    """How a metadata value is written: bool, uint32, float32, string or array."""
    for kind, value_type in (
        (bool, GGUFValueType.BOOL),
        (int, GGUFValueType.UINT32),
        (float, GGUFValueType.FLOAT32),
        (str, GGUFValueType.STRING),
        (list, GGUFValueType.ARRAY),
    ):
        if isinstance(value, kind):
            return value_type
    raise TypeError(f"metadata key {key!r}: cannot write a {type(value).__name__}")


def _pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def write_model_file(
    path: str | os.PathLike[str],
    shape: ModelShape,
    metadata: Mapping[str, object],
    tensors: Sequence[TensorSpec],
    weights: RandomWeights | None,
    seed: int,
) -> None:
    """Write a Gemma 4 GGUF of `shape` to `path`: general.architecture, then `metadata` in its
    order, then `tensors` in theirs, their data drawn by `weights` from a generator seeded with
    `seed` (weights None: the data is left a hole of zeros, a sparse file written in moments,
    for checking names, shapes and metadata rather than running)."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or len(tokens) != shape.vocab_size:
        raise ValueError(f"model {shape.name!r}: the vocabulary must have vocab_size tokens")
    path = Path(path)
    writer = _Writer(path, ARCH)
    for key, value in metadata.items():
        writer.add_key_value(key, value, _value_type(key, value))
    for spec in tensors:
        # With raw_dtype set, the shape is taken as element counts in numpy order.
        numpy_shape = tuple(reversed(spec.shape))
        writer.add_tensor_info(spec.name, numpy_shape, np.dtype(np.float32), spec.nbytes, spec.type)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()

    rng = np.random.default_rng(seed)
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        start = _pad(f.tell())
        if weights is None:
            f.truncate(start + sum(_pad(spec.nbytes) for spec in tensors))
            return
        f.write(b"\0" * (start - f.tell()))
        for spec in tensors:
            written = 0
            for chunk in weights.chunks(rng, spec, shape):
                f.write(memoryview(chunk))
                written += chunk.nbytes
            if written != spec.nbytes:
                raise AssertionError(f"{spec.name}: wrote {written} bytes, not {spec.nbytes}")
            f.write(b"\0" * (_pad(written) - written))
