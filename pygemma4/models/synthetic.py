"""Full-size Gemma 4 GGUFs with random weights, for measuring speed without a download.

**The numerics are noise: these files exist to be timed.** Each file has exactly the tensor
names, shapes and metadata of a real Gemma 4 text model (E2B, E4B, 26B-A4B, 31B) and the tensor
types llama.cpp's quantizer gives it for Q4_K_M, so every matrix the engine streams through has
the real size and block format. The weights are random: quantized blocks hold random bytes with
small positive fp16 scales (so every activation stays finite), norms are random near 1. The
tokenizer is a synthetic byte-fallback BPE vocabulary of the real size (262,144 tokens).

Architectures, from the Hugging Face checkpoints' configurations (transformers'
`models/gemma4/convert_gemma4_weights.py` variants with `configuration_gemma4.py` defaults;
cross-checked with the GGUF metadata of published Q4_K_M files) and laid out in GGUF as llama.cpp's
`convert_hf_to_gguf.py` (class Gemma4Model) writes them:

    model    layers  width  heads  KV heads sl/full  MLP                      window  PLE  shared
    e2b          35   1536      8  1 / 1             6144 (12288 if sharing)     512  256      20
    e4b          42   2560      8  2 / 2             10240                       512  256      18
    26b-a4b      30   2816     16  8 / 2, K = V      2112 + 128 x 704, top 8    1024    -       -
    31b          60   5376     32  16 / 4, K = V     21504                      1024    -       -

Every 5th layer of e2b and every 6th of the others is a full-attention layer, and the last.
All: head dims 256 (sliding) / 512 (full), RoPE bases 10,000 / 1,000,000 (full layers rotate
a quarter of their dimensions), vocabulary 262,144, final logit softcap 30, tied embeddings.

    python -m pygemma4.models.synthetic e4b OUT.gguf

writes one (without OUT: into the cache, see `synthetic_model_path`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import os
import struct
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
from gguf import GGMLQuantizationType, GGUFEndian, GGUFValueType, GGUFWriter, TokenType
from gguf.constants import GGML_QUANT_SIZES

from pygemma4.chat import GEMMA4_TEMPLATE
from pygemma4.config import ARCH, LayerConfig, ModelConfig, tensor_shapes
from pygemma4.model_info import decode_read_share
from pygemma4.models.demo import SPACE, Vocabulary, add_tokenizer_metadata, base_vocabulary
from pygemma4.models.file_cache import cache_root, cached_file, write_atomically

__all__ = [
    "SYNTHETIC_MODELS",
    "SyntheticModel",
    "TensorSpec",
    "cache_file_name",
    "main",
    "q4_k_m_tensor_types",
    "resolve_model",
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
ALIGNMENT = 32  # GGUF's default, which GGUFWriter uses
# Random data is produced and written in pieces of about this size.
CHUNK_BYTES = 32 << 20


@dataclass(frozen=True)
class SyntheticModel:
    """The architecture of a Gemma 4 text model, in the terms of its Hugging Face config.

    Per-layer values (attention kind, MLP width, KV heads, KV sharing) derive from these the
    way transformers and llama.cpp's converter derive them; see the properties.
    """

    name: str
    hf_repo: str
    n_layer: int  # num_hidden_layers
    n_embd: int  # hidden_size
    n_head: int  # num_attention_heads
    n_head_kv_swa: int  # num_key_value_heads
    n_head_kv_full: int  # num_global_key_value_heads (or num_key_value_heads)
    head_dim_swa: int  # head_dim
    head_dim_full: int  # global_head_dim
    n_ff: int  # intermediate_size (the dense MLP; beside the experts in MoE models)
    double_wide_mlp: bool  # use_double_wide_mlp: MLP twice as wide in KV-sharing layers
    sliding_period: int  # every sliding_period-th layer is full attention, and the last
    sliding_window: int
    n_embd_per_layer: int  # hidden_size_per_layer_input; 0: no per-layer embeddings
    n_shared_kv: int  # num_kv_shared_layers: the last layers reuse earlier layers' KV
    full_has_v: bool  # not attention_k_eq_v: full layers have their own V projection
    context_length: int  # max_position_embeddings
    vocab_size: int = 262_144
    n_expert: int = 0  # num_experts; 0: no mixture of experts
    n_expert_used: int = 0  # top_k_experts
    n_ff_expert: int = 0  # moe_intermediate_size
    rope_base_swa: float = 10_000.0
    rope_base_full: float = 1_000_000.0
    partial_rotary_full: float = 0.25  # proportional RoPE on full layers
    final_logit_softcap: float = 30.0
    rms_eps: float = 1e-6

    @property
    def sliding(self) -> tuple[bool, ...]:
        """Per layer: sliding-window (True) or full attention (False)."""
        return tuple(
            (il + 1) % self.sliding_period != 0 and il != self.n_layer - 1
            for il in range(self.n_layer)
        )

    @property
    def first_shared_layer(self) -> int:
        return self.n_layer - self.n_shared_kv

    @property
    def n_ff_per_layer(self) -> tuple[int, ...]:
        """The dense MLP's width in each layer."""
        wide = self.n_ff * (2 if self.double_wide_mlp else 1)
        return tuple(
            wide if self.n_shared_kv and il >= self.first_shared_layer else self.n_ff
            for il in range(self.n_layer)
        )

    @property
    def n_head_kv_per_layer(self) -> tuple[int, ...]:
        return tuple(self.n_head_kv_swa if s else self.n_head_kv_full for s in self.sliding)

    @property
    def head_dim_per_layer(self) -> tuple[int, ...]:
        return tuple(self.head_dim_swa if s else self.head_dim_full for s in self.sliding)

    def model_config(self) -> ModelConfig:
        """The configuration pygemma4.config derives from this model's file."""

        def f32(value: float) -> float:  # the file holds these as float32
            return float(np.float32(value))

        sliding = self.sliding
        has_kv = [il < self.first_shared_layer for il in range(self.n_layer)]
        layers = tuple(
            LayerConfig(
                index=il,
                is_sliding=sliding[il],
                n_head=self.n_head,
                n_head_kv=self.n_head_kv_per_layer[il],
                head_dim=self.head_dim_per_layer[il],
                # Every dimension is rotated; full layers' partial rotation is in rope_freqs.
                n_rot=self.head_dim_per_layer[il],
                rope_base=f32(self.rope_base_swa if sliding[il] else self.rope_base_full),
                n_ff=self.n_ff_per_layer[il],
                has_kv=has_kv[il],
                kv_source=max(j for j in range(il + 1) if has_kv[j] and sliding[j] == sliding[il]),
                has_v_proj=has_kv[il] and (sliding[il] or self.full_has_v),
                is_moe=self.n_expert > 0,
            )
            for il in range(self.n_layer)
        )
        return ModelConfig(
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            vocab_size=self.vocab_size,
            n_ctx_train=self.context_length,
            rms_eps=f32(self.rms_eps),
            final_logit_softcap=f32(self.final_logit_softcap),
            sliding_window=self.sliding_window,
            n_embd_per_layer=self.n_embd_per_layer,
            n_expert=self.n_expert,
            n_expert_used=self.n_expert_used,
            n_ff_expert=self.n_ff_expert,
            has_output=False,  # tied embeddings
            layers=layers,
        )


SYNTHETIC_MODELS: Mapping[str, SyntheticModel] = MappingProxyType(
    {
        "e2b": SyntheticModel(
            name="e2b",
            hf_repo="google/gemma-4-E2B",
            n_layer=35,
            n_embd=1536,
            n_head=8,
            n_head_kv_swa=1,
            n_head_kv_full=1,
            head_dim_swa=256,
            head_dim_full=512,
            n_ff=6144,
            double_wide_mlp=True,
            sliding_period=5,
            sliding_window=512,
            n_embd_per_layer=256,
            n_shared_kv=20,
            full_has_v=True,
            context_length=131_072,
        ),
        "e4b": SyntheticModel(
            name="e4b",
            hf_repo="google/gemma-4-E4B",
            n_layer=42,
            n_embd=2560,
            n_head=8,
            n_head_kv_swa=2,
            n_head_kv_full=2,
            head_dim_swa=256,
            head_dim_full=512,
            n_ff=10240,
            double_wide_mlp=False,
            sliding_period=6,
            sliding_window=512,
            n_embd_per_layer=256,
            n_shared_kv=18,
            full_has_v=True,
            context_length=131_072,
        ),
        "26b-a4b": SyntheticModel(
            name="26b-a4b",
            hf_repo="google/gemma-4-26B-A4B",
            n_layer=30,
            n_embd=2816,
            n_head=16,
            n_head_kv_swa=8,
            n_head_kv_full=2,
            head_dim_swa=256,
            head_dim_full=512,
            n_ff=2112,
            double_wide_mlp=False,
            sliding_period=6,
            sliding_window=1024,
            n_embd_per_layer=0,
            n_shared_kv=0,
            full_has_v=False,
            context_length=262_144,
            n_expert=128,
            n_expert_used=8,
            n_ff_expert=704,
        ),
        "31b": SyntheticModel(
            name="31b",
            hf_repo="google/gemma-4-31B",
            n_layer=60,
            n_embd=5376,
            n_head=32,
            n_head_kv_swa=16,
            n_head_kv_full=4,
            head_dim_swa=256,
            head_dim_full=512,
            n_ff=21504,
            double_wide_mlp=False,
            sliding_period=6,
            sliding_window=1024,
            n_embd_per_layer=0,
            n_shared_kv=0,
            full_has_v=False,
            context_length=262_144,
        ),
    }
)


def resolve_model(name: str, **overrides: object) -> SyntheticModel:
    """The architecture `name`, with fields replaced by `overrides` (e.g. a smaller n_layer or
    vocab_size for tests; any field of SyntheticModel may be given).

    Where n_layer changes and n_shared_kv is not given, the KV-sharing layers keep their share
    of the model, as far as every sharing layer still finds an earlier layer of its own kind.
    """
    try:
        base = SYNTHETIC_MODELS[name]
    except KeyError:
        known = ", ".join(SYNTHETIC_MODELS)
        raise ValueError(f"unknown synthetic model {name!r} (known: {known})") from None
    fields = {f.name for f in dataclasses.fields(SyntheticModel)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown SyntheticModel field(s): {', '.join(unknown)}")
    model = dataclasses.replace(base, **overrides)  # type: ignore[arg-type]
    if "n_layer" in overrides and "n_shared_kv" not in overrides and base.n_shared_kv:
        shared = base.n_shared_kv * model.n_layer // base.n_layer
        while shared and not _sharing_is_valid(dataclasses.replace(model, n_shared_kv=shared)):
            shared -= 1
        model = dataclasses.replace(model, n_shared_kv=shared)
    _validate(model)
    return model


def _sharing_is_valid(model: SyntheticModel) -> bool:
    if not 0 <= model.n_shared_kv < model.n_layer:
        return False
    sliding = model.sliding
    own = set(sliding[: model.first_shared_layer])
    return all(kind in own for kind in sliding[model.first_shared_layer :])


def _validate(model: SyntheticModel) -> None:
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"synthetic model {model.name!r}: {message}")

    for field in ("n_layer", "n_embd", "n_head", "n_head_kv_swa", "n_head_kv_full"):
        require(getattr(model, field) >= 1, f"{field} must be at least 1")
    for field in ("head_dim_swa", "head_dim_full", "n_ff", "sliding_period", "sliding_window"):
        require(getattr(model, field) >= 1, f"{field} must be at least 1")
    require(model.n_head % model.n_head_kv_swa == 0, "n_head must be a multiple of n_head_kv_swa")
    require(model.n_head % model.n_head_kv_full == 0, "n_head must be a multiple of n_head_kv_full")
    require(model.head_dim_full % 8 == 0, "head_dim_full must be a multiple of 8")
    require(
        _sharing_is_valid(model),
        f"n_shared_kv {model.n_shared_kv} leaves a KV-sharing layer without an earlier layer "
        "of its own attention kind",
    )
    if model.n_expert:
        require(
            1 <= model.n_expert_used <= model.n_expert and model.n_ff_expert >= 1,
            "experts need 1 <= n_expert_used <= n_expert and n_ff_expert >= 1",
        )
    require(
        model.vocab_size >= MIN_VOCAB,
        f"vocab_size must be at least {MIN_VOCAB} (special, byte and character tokens)",
    )


# -- tensors -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a synthetic file: name, shape in GGUF ne order (row length first), type."""

    name: str
    ne: tuple[int, ...]
    type: GGMLQuantizationType

    @property
    def n_elements(self) -> int:
        return math.prod(self.ne)

    @property
    def nbytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.type]
        return self.n_elements // block_size * type_size


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
    model: SyntheticModel | str, mix: str = "Q4_K_M", float_type: T = T.BF16
) -> list[TensorSpec]:
    """Every tensor of the model with its type, in file order.

    mix "Q4_K_M" gives llama.cpp's Q4_K_M types (`q4_k_m_tensor_types`) of a model converted to
    `float_type` first (BF16: `convert_hf_to_gguf.py --outtype auto` of the BF16 checkpoints);
    "F32" gives every tensor in F32, for llama.cpp's own quantizer to work on.
    """
    if isinstance(model, str):
        model = resolve_model(model)
    shapes = dict(
        sorted(tensor_shapes(model.model_config()).items(), key=lambda item: _llama_order(item[0]))
    )
    if mix == "Q4_K_M":
        types = q4_k_m_tensor_types(
            shapes, n_layer=model.n_layer, n_expert=model.n_expert, float_type=float_type
        )
    elif mix == "F32":
        types = dict.fromkeys(shapes, T.F32)
    else:
        raise ValueError(f"unknown tensor type mix {mix!r} (known: {', '.join(FILE_TYPES)})")
    return [TensorSpec(name, ne, types[name]) for name, ne in shapes.items()]


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


# -- vocabulary --------------------------------------------------------------------------------

# Merged pieces are spelled with these: spaces and lower-case letters.
_PIECE_ALPHABET = (SPACE, *"abcdefghijklmnopqrstuvwxyz")
MIN_VOCAB = len(base_vocabulary()[0])


def _vocabulary(size: int) -> Vocabulary:
    """Tokens, scores, token types and merges of a vocabulary of exactly `size` tokens.

    Control tokens, the 256 byte tokens, printable ASCII (`base_vocabulary`), then pieces over
    spaces and lower-case letters, each the merge of a shorter piece and one letter (every pair,
    then every triple, ...), so that every piece is reachable by the merges, shortest first.
    """
    tokens, types = base_vocabulary()
    n_pieces = size - len(tokens)
    pieces: list[str] = []
    merges: list[str] = []
    level: Sequence[str] = _PIECE_ALPHABET
    while len(pieces) < n_pieces:
        longer = []
        for left in level:
            for right in _PIECE_ALPHABET:
                if len(pieces) == n_pieces:
                    break
                pieces.append(left + right)
                merges.append(f"{left} {right}")
                longer.append(left + right)
        level = longer
    scores = [0.0] * len(tokens) + [-float(rank + 1) for rank in range(len(pieces))]
    return tokens + pieces, scores, types + [int(TokenType.NORMAL)] * len(pieces), merges


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


def _chunks(total: int, per_chunk: int) -> Iterator[int]:
    done = 0
    while done < total:
        n = min(per_chunk, total - done)
        yield n
        done += n


def _random_bytes(rng: np.random.Generator, n: int) -> np.ndarray:
    words = rng.integers(0, 2**64 - 1, size=-(-n // 8), dtype=np.uint64, endpoint=True)
    return words.view(np.uint8)[:n]


def _matrix_chunks(rng: np.random.Generator, spec: TensorSpec) -> Iterator[np.ndarray]:
    """The data of a random matrix: values of standard deviation about 1/sqrt(row length)."""
    sigma = 1.0 / math.sqrt(spec.ne[0])
    if spec.type in _FLOAT_TYPES:
        for n in _chunks(spec.n_elements, CHUNK_BYTES // 4):
            values = rng.standard_normal(n, dtype=np.float32)
            values *= np.float32(sigma)
            if spec.type == T.F32:
                yield values.view(np.uint8)
            elif spec.type == T.F16:
                yield values.astype(np.float16).view(np.uint8)
            else:  # BF16: the upper half of the float32, rounded
                bits = values.view(np.uint32)
                yield ((bits + np.uint32(0x8000)) >> np.uint32(16)).astype(np.uint16).view(np.uint8)
        return
    if spec.type not in _BLOCK_SCALES:
        raise ValueError(f"tensor {spec.name!r}: cannot make random {spec.type.name} blocks")
    d_at, dmin_at, dmin_ratio, spread = _BLOCK_SCALES[spec.type]
    block_size, type_size = GGML_QUANT_SIZES[spec.type]
    for n in _chunks(spec.n_elements // block_size, max(1, CHUNK_BYTES // type_size)):
        blocks = _random_bytes(rng, n * type_size).reshape(n, type_size)
        d = rng.uniform(0.75, 1.25, size=n).astype(np.float32) * np.float32(sigma / spread)
        np.maximum(d, np.float32(_MIN_SCALE), out=d)
        blocks[:, d_at : d_at + 2] = d.astype(np.float16).view(np.uint8).reshape(n, 2)
        if dmin_at is not None:
            second = (d * np.float32(dmin_ratio)).astype(np.float16)
            blocks[:, dmin_at : dmin_at + 2] = second.view(np.uint8).reshape(n, 2)
        yield blocks.reshape(-1)


def _vector(rng: np.random.Generator, spec: TensorSpec, model: SyntheticModel) -> np.ndarray:
    """Norms and scales near 1; the full layers' RoPE frequency factors exactly as converted."""
    (n,) = spec.ne
    if spec.name == "rope_freqs.weight":
        n_rot = int(model.head_dim_full * model.partial_rotary_full / 2)
        return np.array([1.0] * n_rot + [1e30] * (n - n_rot), dtype=np.float32)
    if spec.name.endswith("layer_output_scale.weight"):
        return rng.uniform(0.5, 1.0, size=n).astype(np.float32)
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)


def _tensor_chunks(
    rng: np.random.Generator, spec: TensorSpec, model: SyntheticModel
) -> Iterator[np.ndarray]:
    if len(spec.ne) == 1:
        vector = _vector(rng, spec, model)
        if spec.type != T.F32:
            raise ValueError(f"vector tensor {spec.name!r} must be F32")
        yield vector.view(np.uint8)
    else:
        yield from _matrix_chunks(rng, spec)


# -- writing -----------------------------------------------------------------------------------


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Writer(GGUFWriter):
    """A GGUFWriter that packs long metadata arrays (the vocabulary, 262,144 entries in each of
    four arrays) in one go instead of element by element; the bytes are the same."""

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


def _metadata(writer: GGUFWriter, model: SyntheticModel, mix: str) -> None:
    a = f"{ARCH}."
    w = writer
    w.add_string("general.type", "model")
    w.add_string("general.name", f"pygemma4 synthetic {model.name} (random weights)")
    w.add_uint32(a + "block_count", model.n_layer)
    w.add_uint32(a + "context_length", model.context_length)
    w.add_uint32(a + "embedding_length", model.n_embd)
    n_ff = model.n_ff_per_layer
    if len(set(n_ff)) == 1:
        w.add_uint32(a + "feed_forward_length", n_ff[0])
    else:
        w.add_array(a + "feed_forward_length", list(n_ff))
    w.add_uint32(a + "attention.head_count", model.n_head)
    if model.n_head_kv_swa == model.n_head_kv_full:
        w.add_uint32(a + "attention.head_count_kv", model.n_head_kv_swa)
    else:
        w.add_array(a + "attention.head_count_kv", list(model.n_head_kv_per_layer))
    w.add_float32(a + "rope.freq_base", model.rope_base_full)
    w.add_float32(a + "rope.freq_base_swa", model.rope_base_swa)
    w.add_float32(a + "attention.layer_norm_rms_epsilon", model.rms_eps)
    if model.n_expert:
        w.add_uint32(a + "expert_count", model.n_expert)
        w.add_uint32(a + "expert_used_count", model.n_expert_used)
    w.add_uint32(a + "attention.key_length", model.head_dim_full)
    w.add_uint32(a + "attention.value_length", model.head_dim_full)
    w.add_float32(a + "final_logit_softcapping", model.final_logit_softcap)
    w.add_uint32(a + "attention.sliding_window", model.sliding_window)
    w.add_uint32(a + "attention.shared_kv_layers", model.n_shared_kv)
    w.add_uint32(a + "embedding_length_per_layer_input", model.n_embd_per_layer)
    w.add_array(a + "attention.sliding_window_pattern", list(model.sliding))
    w.add_uint32(a + "attention.key_length_swa", model.head_dim_swa)
    w.add_uint32(a + "attention.value_length_swa", model.head_dim_swa)
    if model.n_expert:
        w.add_uint32(a + "expert_feed_forward_length", model.n_ff_expert)
    w.add_uint32(a + "rope.dimension_count", model.head_dim_full)
    w.add_uint32(a + "rope.dimension_count_swa", model.head_dim_swa)

    add_tokenizer_metadata(w, _vocabulary(model.vocab_size))
    w.add_string("tokenizer.chat_template", GEMMA4_TEMPLATE)
    w.add_bool("tokenizer.ggml.add_space_prefix", False)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_uint32("general.quantization_version", 2)
    w.add_uint32("general.file_type", FILE_TYPES[mix])


def _pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _write(
    path: Path, model: SyntheticModel, specs: list[TensorSpec], mix: str, seed: int, layout: bool
) -> None:
    writer = _Writer(path, ARCH)
    _metadata(writer, model, mix)
    for spec in specs:
        # With raw_dtype set, the shape is taken as element counts in numpy order.
        shape = tuple(reversed(spec.ne))
        writer.add_tensor_info(spec.name, shape, np.dtype(np.float32), spec.nbytes, spec.type)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()

    rng = np.random.default_rng(seed)
    with open(path, "r+b") as f:
        f.seek(0, os.SEEK_END)
        start = _pad(f.tell())
        if layout:  # a hole the size of the data: shapes without weights
            f.truncate(start + sum(_pad(spec.nbytes) for spec in specs))
            return
        f.write(b"\0" * (start - f.tell()))
        for spec in specs:
            written = 0
            for chunk in _tensor_chunks(rng, spec, model):
                f.write(memoryview(chunk))
                written += chunk.nbytes
            if written != spec.nbytes:
                raise AssertionError(f"{spec.name}: wrote {written} bytes, not {spec.nbytes}")
            f.write(b"\0" * (_pad(written) - written))


def write_synthetic_model(
    name: str,
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    mix: str = "Q4_K_M",
    layout_only: bool = False,
    **overrides: object,
) -> Path:
    """Write the synthetic model `name` (a key of SYNTHETIC_MODELS) to `path`; returns it.

    The same name, overrides and seed give the same bytes. The file is written under a
    temporary name beside `path` and renamed into place, so `path` is never half-written.
    Tensor data is produced and written piece by piece: memory use stays small at any size.

    overrides: fields of SyntheticModel to change (e.g. n_layer=4, vocab_size=1024) for a
    smaller model of the same family. mix: "Q4_K_M" (llama.cpp's types) or "F32" (every tensor
    F32, for llama.cpp's quantizer). layout_only: leave the tensor data a hole of zeros (a
    sparse file, written in moments) — for checking names, shapes and metadata, not for running.
    """
    model = resolve_model(name, **overrides)
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
    model = resolve_model(name, **overrides)
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
    model = resolve_model(name, **overrides)
    return cached_file(
        path, lambda tmp: _write(tmp, model, synthetic_tensors(model, mix), mix, seed, False)
    )


# -- summary -----------------------------------------------------------------------------------


def synthetic_model_summary(name: str, mix: str = "Q4_K_M", **overrides: object) -> dict:
    """Sizes of the synthetic model `name`, without writing it.

    - parameters / tensor_bytes: every tensor (the file is tensor_bytes plus the metadata);
    - decode_parameters / decode_bytes: what one decode step of one sequence reads, for
      bandwidth figures (`model_info.decode_read_share`: every matrix but the gathered
      per-layer embeddings, the tied embedding once as the LM head, the routed experts only);
    - bytes_by_type: tensor bytes per tensor type.
    """
    model = resolve_model(name, **overrides)
    specs = synthetic_tensors(model, mix)
    decode_parameters = 0
    decode_bytes = 0.0
    by_type: dict[str, int] = {}
    for spec in specs:
        by_type[spec.type.name] = by_type.get(spec.type.name, 0) + spec.nbytes
        share = decode_read_share(
            spec.name, len(spec.ne), False, model.n_expert_used, model.n_expert
        )
        decode_parameters += round(spec.n_elements * share)
        decode_bytes += spec.nbytes * share
    return {
        "name": model.name,
        "hf_repo": model.hf_repo,
        "mix": mix,
        "tensors": len(specs),
        "parameters": sum(spec.n_elements for spec in specs),
        "tensor_bytes": sum(spec.nbytes for spec in specs),
        "decode_parameters": decode_parameters,
        "decode_bytes": round(decode_bytes),
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
