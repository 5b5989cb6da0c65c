"""Gemma 4 model configuration, derived from GGUF metadata and checked against every tensor.

The keys and tensor names are those llama.cpp's converter writes for the `gemma4`
architecture; a key the converter may leave out takes the default llama.cpp uses. Every tensor
the configuration implies must be present with exactly the implied shape, and no other tensor
may be, so that the C++ core can compute from the file without any check of its own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from gguf import GGMLQuantizationType, GGUFValueType

from .errors import GGUFError, UnsupportedModelError, located
from .gguf_file import (
    SUPPORTED_TENSOR_TYPES,
    GGUFFile,
    TensorInfo,
    describe_type,
    read_gguf,
    type_name,
)

__all__ = [
    "SUPPORTED_TENSOR_TYPES",
    "LayerConfig",
    "ModelConfig",
    "ModelFile",
    "model_config",
    "open_model",
    "tensor_shapes",
]

ARCH = "gemma4"
# llama.cpp's default for rope.freq_base, which its loader treats as optional.
DEFAULT_ROPE_FREQ_BASE = 10000.0
# llama.cpp's LLAMA_MAX_LAYERS; also bounds what a crafted block_count makes us allocate.
MAX_LAYERS = 512
# The core holds every integer of the configuration as a C++ int.
MAX_CORE_INT = 2**31 - 1
# At most this many tensor names are spelled out in one error message.
MAX_NAMES_IN_MESSAGE = 8


@dataclass(frozen=True)
class LayerConfig:
    """The hyperparameters of one transformer block."""

    index: int
    is_sliding: bool
    n_head: int
    n_head_kv: int
    head_dim: int  # attention.key_length_swa (sliding) / attention.key_length (full)
    n_rot: int  # rope.dimension_count_swa / rope.dimension_count
    rope_base: float  # rope.freq_base_swa / rope.freq_base
    n_ff: int
    has_kv: bool  # False for the last `attention.shared_kv_layers` layers
    kv_source: int  # layer whose K/V cache this layer reads (itself when has_kv)
    has_v_proj: bool  # False: V = K
    is_moe: bool


@dataclass(frozen=True)
class ModelConfig:
    """The hyperparameters of a whole Gemma 4 model."""

    n_layer: int
    n_embd: int
    vocab_size: int
    n_ctx_train: int
    rms_eps: float
    final_logit_softcap: float  # 0.0: no softcapping
    sliding_window: int
    n_embd_per_layer: int  # 0: no per-layer embeddings
    n_expert: int  # 0: no mixture of experts
    n_expert_used: int
    n_ff_expert: int
    has_output: bool  # separate output.weight; otherwise tied to token_embd.weight
    layers: tuple[LayerConfig, ...]


@dataclass(frozen=True)
class ModelFile:
    """A validated Gemma 4 GGUF file and the configuration derived from it."""

    gguf: GGUFFile
    config: ModelConfig


def open_model(path: str | os.PathLike[str]) -> ModelFile:
    """Read, validate and configure the Gemma 4 GGUF at `path`.

    Raises GGUFError for a file that is not a valid GGUF, UnsupportedModelError for a valid
    GGUF that is not a Gemma 4 model this engine can run.
    """
    gguf = read_gguf(path)
    return ModelFile(gguf, model_config(gguf))


def model_config(gguf: GGUFFile) -> ModelConfig:
    """The configuration of a Gemma 4 model, after checking its metadata and every tensor."""
    with located(gguf.path):
        meta = _Metadata(gguf)
        arch = meta.get("general.architecture")
        if arch is None:
            raise UnsupportedModelError("general.architecture is missing: not a model file")
        if isinstance(arch, str) and arch != ARCH:
            raise UnsupportedModelError(f"architecture is '{arch}', not '{ARCH}'")
        meta.check_types()
        config = _build_config(meta, gguf.tensors)
        _check_tensors(_expected_tensors(config, gguf.tensors), gguf.tensors)
        _check_tokenizer(meta, config.vocab_size)
        return config


# -- metadata ----------------------------------------------------------------------------------

_UNSIGNED = (
    GGUFValueType.UINT8,
    GGUFValueType.UINT16,
    GGUFValueType.UINT32,
    GGUFValueType.UINT64,
)
_INTEGER = (
    *_UNSIGNED,
    GGUFValueType.INT8,
    GGUFValueType.INT16,
    GGUFValueType.INT32,
    GGUFValueType.INT64,
)
_FLOAT = (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64)
_ARRAY = GGUFValueType.ARRAY


class _Kind(Enum):
    """What a metadata key must hold: a description and the type signatures that qualify."""

    UINT = ("an unsigned integer", frozenset((t,) for t in _UNSIGNED))
    FLOAT = ("a float", frozenset((t,) for t in _FLOAT))
    BOOL = ("a bool", frozenset({(GGUFValueType.BOOL,)}))
    STRING = ("a string", frozenset({(GGUFValueType.STRING,)}))
    UINT_PER_LAYER = (
        "an unsigned integer or an integer array",
        frozenset((t,) for t in _UNSIGNED) | frozenset((_ARRAY, t) for t in _INTEGER),
    )
    BOOL_ARRAY = ("a bool array", frozenset({(_ARRAY, GGUFValueType.BOOL)}))
    STRING_ARRAY = ("a string array", frozenset({(_ARRAY, GGUFValueType.STRING)}))
    FLOAT_ARRAY = ("a float array", frozenset((_ARRAY, t) for t in _FLOAT))
    INT_ARRAY = ("an integer array", frozenset((_ARRAY, t) for t in _INTEGER))


_A = f"{ARCH}."
KEY_KINDS: dict[str, _Kind] = {
    "general.architecture": _Kind.STRING,
    "general.name": _Kind.STRING,
    _A + "block_count": _Kind.UINT,
    _A + "context_length": _Kind.UINT,
    _A + "embedding_length": _Kind.UINT,
    _A + "feed_forward_length": _Kind.UINT_PER_LAYER,
    _A + "attention.head_count": _Kind.UINT_PER_LAYER,
    _A + "attention.head_count_kv": _Kind.UINT_PER_LAYER,
    _A + "attention.key_length": _Kind.UINT,
    _A + "attention.value_length": _Kind.UINT,
    _A + "attention.key_length_swa": _Kind.UINT,
    _A + "attention.value_length_swa": _Kind.UINT,
    _A + "attention.layer_norm_rms_epsilon": _Kind.FLOAT,
    _A + "attention.sliding_window": _Kind.UINT,
    _A + "attention.sliding_window_pattern": _Kind.BOOL_ARRAY,
    _A + "attention.shared_kv_layers": _Kind.UINT,
    _A + "rope.freq_base": _Kind.FLOAT,
    _A + "rope.freq_base_swa": _Kind.FLOAT,
    _A + "rope.dimension_count": _Kind.UINT,
    _A + "rope.dimension_count_swa": _Kind.UINT,
    _A + "final_logit_softcapping": _Kind.FLOAT,
    _A + "embedding_length_per_layer_input": _Kind.UINT,
    _A + "expert_count": _Kind.UINT,
    _A + "expert_used_count": _Kind.UINT,
    _A + "expert_feed_forward_length": _Kind.UINT,
    "tokenizer.ggml.model": _Kind.STRING,
    "tokenizer.ggml.pre": _Kind.STRING,
    "tokenizer.ggml.tokens": _Kind.STRING_ARRAY,
    "tokenizer.ggml.scores": _Kind.FLOAT_ARRAY,
    "tokenizer.ggml.token_type": _Kind.INT_ARRAY,
    "tokenizer.ggml.merges": _Kind.STRING_ARRAY,
    "tokenizer.ggml.add_bos_token": _Kind.BOOL,
    "tokenizer.ggml.add_eos_token": _Kind.BOOL,
    "tokenizer.ggml.add_space_prefix": _Kind.BOOL,
    "tokenizer.chat_template": _Kind.STRING,
}
TOKEN_ID_KEYS = tuple(
    f"tokenizer.ggml.{name}_token_id"
    for name in ("bos", "eos", "unknown", "padding", "separator", "cls", "mask", "eot", "eom")
)
KEY_KINDS.update(dict.fromkeys(TOKEN_ID_KEYS, _Kind.UINT))


class _Metadata:
    """Typed access to a GGUF file's metadata."""

    def __init__(self, gguf: GGUFFile, kinds: dict[str, _Kind] | None = None) -> None:
        self.values = gguf.metadata
        self.types = gguf.metadata_types
        self.kinds = KEY_KINDS if kinds is None else kinds

    def check_types(self) -> None:
        """Every key this module knows holds a value of the type it requires (GGUFError)."""
        for key, kind in self.kinds.items():
            signature = self.types.get(key)
            description, allowed = kind.value
            if signature is not None and signature not in allowed:
                raise GGUFError(
                    f"metadata key '{key}' must be {description}, found {describe_type(signature)}"
                )

    def get(self, key: str) -> object:
        return self.values.get(key)

    def uint(self, key: str, default: int | None = None) -> int:
        value = self.values.get(key, default)
        if value is None:
            raise UnsupportedModelError(f"required metadata key '{key}' is missing")
        assert isinstance(value, int)
        _require(
            value <= MAX_CORE_INT,
            f"metadata key '{key}' is {value}, more than the largest the core takes "
            f"({MAX_CORE_INT})",
        )
        return value

    def number(self, key: str, default: float | None = None) -> float:
        value = self.values.get(key, default)
        if value is None:
            raise UnsupportedModelError(f"required metadata key '{key}' is missing")
        assert isinstance(value, float)
        if not math.isfinite(value):
            raise UnsupportedModelError(f"metadata key '{key}' is {value}, not a finite number")
        return value

    def per_layer(
        self, key: str, n_layer: int, default: tuple[int, ...] | None = None
    ) -> list[int]:
        """A per-layer integer: one value for all layers, or an array of one per layer.

        `n_layer` must already be validated: a scalar is repeated that many times.
        """
        value = self.values.get(key)
        if value is None:
            if default is None:
                raise UnsupportedModelError(f"required metadata key '{key}' is missing")
            return list(default)
        if isinstance(value, int):
            value = [value] * n_layer
        assert isinstance(value, list)
        _check_length(key, value, n_layer)
        for il, v in enumerate(value):
            _require(
                0 <= v <= MAX_CORE_INT,
                f"metadata key '{key}' is {v} for layer {il}, not within 0..{MAX_CORE_INT}",
            )
        return value

    def pattern(self, key: str, n_layer: int) -> list[bool]:
        value = self.values.get(key)
        if value is None:
            raise UnsupportedModelError(f"required metadata key '{key}' is missing")
        assert isinstance(value, list)
        _check_length(key, value, n_layer)
        return value


def _check_length(key: str, value: list[object], n_layer: int) -> None:
    if len(value) != n_layer:
        raise GGUFError(
            f"metadata key '{key}' has {len(value)} entries, but {ARCH}.block_count is {n_layer}"
        )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UnsupportedModelError(message)


# -- configuration -----------------------------------------------------------------------------


def _build_config(meta: _Metadata, tensors: dict[str, TensorInfo]) -> ModelConfig:
    n_layer = meta.uint(_A + "block_count")
    n_embd = meta.uint(_A + "embedding_length")
    n_ctx_train = meta.uint(_A + "context_length")
    _require(
        1 <= n_layer <= MAX_LAYERS, f"{_A}block_count is {n_layer}, not within 1..{MAX_LAYERS}"
    )
    _require(n_embd >= 1, f"{_A}embedding_length is 0")
    _require(n_ctx_train >= 1, f"{_A}context_length is 0")

    sliding = meta.pattern(_A + "attention.sliding_window_pattern", n_layer)
    n_head = meta.per_layer(_A + "attention.head_count", n_layer)
    _require(all(h >= 1 for h in n_head), f"{_A}attention.head_count holds 0")
    n_head_kv = meta.per_layer(_A + "attention.head_count_kv", n_layer, default=tuple(n_head))
    n_ff = meta.per_layer(_A + "feed_forward_length", n_layer)
    _require(all(f >= 1 for f in n_ff), f"{_A}feed_forward_length holds 0")

    head_dim_full = meta.uint(_A + "attention.key_length", n_embd // n_head[0])
    head_dim_swa = meta.uint(_A + "attention.key_length_swa")
    n_rot_full = meta.uint(_A + "rope.dimension_count", head_dim_full)
    n_rot_swa = meta.uint(_A + "rope.dimension_count_swa", n_rot_full)
    rope_base_full = meta.number(_A + "rope.freq_base", DEFAULT_ROPE_FREQ_BASE)
    rope_base_swa = meta.number(_A + "rope.freq_base_swa", rope_base_full)
    for is_sliding, head_dim, n_rot, rope_base, suffix in (
        (False, head_dim_full, n_rot_full, rope_base_full, ""),
        (True, head_dim_swa, n_rot_swa, rope_base_swa, "_swa"),
    ):
        value_dim = meta.uint(_A + "attention.value_length" + suffix, head_dim)
        _require(
            value_dim == head_dim,
            f"{_A}attention.value_length{suffix} is {value_dim}, but Gemma 4 needs it equal to "
            f"{_A}attention.key_length{suffix} ({head_dim})",
        )
        if is_sliding not in sliding:
            continue  # no layer of this kind: its remaining values are never used
        _require(head_dim >= 1, f"{_A}attention.key_length{suffix} is 0")
        _require(
            2 <= n_rot <= head_dim and n_rot % 2 == 0,
            f"{_A}rope.dimension_count{suffix} is {n_rot}; it must be even and at most the "
            f"head dimension {head_dim}",
        )
        _require(rope_base > 0, f"{_A}rope.freq_base{suffix} is {rope_base}, not positive")

    rms_eps = meta.number(_A + "attention.layer_norm_rms_epsilon")
    _require(rms_eps > 0, f"{_A}attention.layer_norm_rms_epsilon is {rms_eps}, not positive")
    softcap = meta.number(_A + "final_logit_softcapping", 0.0)
    _require(softcap >= 0, f"{_A}final_logit_softcapping is {softcap}, negative")
    sliding_window = meta.uint(_A + "attention.sliding_window")
    _require(sliding_window >= 1, f"{_A}attention.sliding_window is 0")
    n_shared = meta.uint(_A + "attention.shared_kv_layers", 0)
    _require(
        n_shared < n_layer,
        f"{_A}attention.shared_kv_layers is {n_shared}, but the model has only {n_layer} layers",
    )
    n_embd_per_layer = meta.uint(_A + "embedding_length_per_layer_input", 0)

    n_expert = meta.uint(_A + "expert_count", 0)
    n_expert_used = meta.uint(_A + "expert_used_count", 0)
    n_ff_expert = meta.uint(_A + "expert_feed_forward_length", 0)
    if n_expert:
        _require(
            1 <= n_expert_used <= n_expert,
            f"{_A}expert_used_count is {n_expert_used}; it must be between 1 and "
            f"{_A}expert_count ({n_expert})",
        )
        _require(n_ff_expert >= 1, f"the model has experts but {_A}expert_feed_forward_length is 0")
    else:
        _require(n_expert_used == 0, f"{_A}expert_used_count is set but {_A}expert_count is 0")

    layers = []
    last_with_kv: dict[bool, int] = {}
    for il in range(n_layer):
        is_sliding = sliding[il]
        has_kv = il < n_layer - n_shared
        _require(
            n_head_kv[il] >= 1 and n_head[il] % n_head_kv[il] == 0,
            f"layer {il}: {n_head[il]} query heads cannot be grouped over {n_head_kv[il]} KV heads",
        )
        if has_kv:
            last_with_kv[is_sliding] = il
        kind = "sliding-window" if is_sliding else "full"
        source = last_with_kv.get(is_sliding)
        if source is None:
            raise UnsupportedModelError(
                f"layer {il} reuses the KV cache of an earlier {kind} attention layer, "
                "but there is none"
            )
        _require(
            n_head_kv[source] == n_head_kv[il],
            f"layer {il} reuses the KV cache of layer {source}, which has "
            f"{n_head_kv[source]} KV heads instead of {n_head_kv[il]}",
        )
        is_moe = f"blk.{il}.ffn_gate_inp.weight" in tensors
        _require(
            not is_moe or n_expert > 0,
            f"layer {il} has an expert router but {_A}expert_count is 0 or missing",
        )
        layers.append(
            LayerConfig(
                index=il,
                is_sliding=is_sliding,
                n_head=n_head[il],
                n_head_kv=n_head_kv[il],
                head_dim=head_dim_swa if is_sliding else head_dim_full,
                n_rot=n_rot_swa if is_sliding else n_rot_full,
                rope_base=rope_base_swa if is_sliding else rope_base_full,
                n_ff=n_ff[il],
                has_kv=has_kv,
                kv_source=source,
                has_v_proj=has_kv and f"blk.{il}.attn_v.weight" in tensors,
                is_moe=is_moe,
            )
        )

    token_embd = tensors.get("token_embd.weight")
    if token_embd is None:
        raise UnsupportedModelError("missing tensor 'token_embd.weight'")
    if len(token_embd.shape) != 2 or token_embd.shape[0] != n_embd:
        raise UnsupportedModelError(
            f"tensor 'token_embd.weight' has shape {list(token_embd.shape)}, but the metadata "
            f"implies [{n_embd}, vocab size]"
        )
    return ModelConfig(
        n_layer=n_layer,
        n_embd=n_embd,
        vocab_size=token_embd.shape[1],
        n_ctx_train=n_ctx_train,
        rms_eps=rms_eps,
        final_logit_softcap=softcap,
        sliding_window=sliding_window,
        n_embd_per_layer=n_embd_per_layer,
        n_expert=n_expert,
        n_expert_used=n_expert_used,
        n_ff_expert=n_ff_expert,
        has_output="output.weight" in tensors,
        layers=tuple(layers),
    )


# -- tensors -----------------------------------------------------------------------------------


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Gemma 4 model with this configuration, named as llama.cpp's converter
    names it, with its shape in GGUF ne order (row length first).

    output.weight and attn_v are included where the configuration has them (has_output,
    has_v_proj); the optional layer_output_scale.weight is included for every layer.
    """
    E, V, P, L = config.n_embd, config.vocab_size, config.n_embd_per_layer, config.n_layer
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (E, V),
        "output_norm.weight": (E,),
    }
    if config.has_output:
        shapes["output.weight"] = (E, V)
    full = [layer for layer in config.layers if not layer.is_sliding]
    if full:
        shapes["rope_freqs.weight"] = (full[0].n_rot // 2,)
    if P:
        shapes["per_layer_token_embd.weight"] = (P * L, V)
        shapes["per_layer_model_proj.weight"] = (E, P * L)
        shapes["per_layer_proj_norm.weight"] = (P,)
    for layer in config.layers:
        b = f"blk.{layer.index}."
        hd = layer.head_dim
        q_dim, kv_dim = layer.n_head * hd, layer.n_head_kv * hd
        shapes |= {
            b + "attn_norm.weight": (E,),
            b + "attn_q.weight": (E, q_dim),
            b + "attn_q_norm.weight": (hd,),
            b + "attn_output.weight": (q_dim, E),
            b + "post_attention_norm.weight": (E,),
            b + "ffn_norm.weight": (E,),
            b + "ffn_gate.weight": (E, layer.n_ff),
            b + "ffn_up.weight": (E, layer.n_ff),
            b + "ffn_down.weight": (layer.n_ff, E),
            b + "post_ffw_norm.weight": (E,),
        }
        if layer.has_kv:
            shapes[b + "attn_k.weight"] = (E, kv_dim)
            shapes[b + "attn_k_norm.weight"] = (hd,)
        if layer.has_v_proj:
            shapes[b + "attn_v.weight"] = (E, kv_dim)
        if layer.is_moe:
            X, F = config.n_expert, config.n_ff_expert
            shapes |= {
                b + "ffn_gate_inp.weight": (E, X),
                b + "ffn_gate_inp.scale": (E,),
                b + "ffn_gate_up_exps.weight": (E, 2 * F, X),
                b + "ffn_down_exps.weight": (F, E, X),
                b + "ffn_down_exps.scale": (X,),
                b + "pre_ffw_norm_2.weight": (E,),
                b + "post_ffw_norm_1.weight": (E,),
                b + "post_ffw_norm_2.weight": (E,),
            }
        if P:
            shapes |= {
                b + "inp_gate.weight": (E, P),
                b + "proj.weight": (P, E),
                b + "post_norm.weight": (E,),
            }
        shapes[b + "layer_output_scale.weight"] = (1,)
    return shapes


def _expected_tensors(
    config: ModelConfig, tensors: dict[str, TensorInfo]
) -> dict[str, tuple[int, ...]]:
    """Every tensor the file must hold, with its shape in GGUF ne order: `tensor_shapes`, with
    layer_output_scale only where the file has it."""
    return {
        name: shape
        for name, shape in tensor_shapes(config).items()
        if not name.endswith(".layer_output_scale.weight") or name in tensors
    }


def _check_tensors(expected: dict[str, tuple[int, ...]], tensors: dict[str, TensorInfo]) -> None:
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise UnsupportedModelError(f"missing {_names('tensor', missing)}")
    unexpected = [name for name in tensors if name not in expected]
    if unexpected:
        raise UnsupportedModelError(
            f"unexpected {_names('tensor', unexpected)}: not part of a Gemma 4 model with this "
            "metadata"
        )
    for name, shape in expected.items():
        info = tensors[name]
        if info.shape != shape:
            raise UnsupportedModelError(
                f"tensor '{name}' has shape {list(info.shape)}, but the metadata implies "
                f"{list(shape)}"
            )
        if info.type_id not in SUPPORTED_TENSOR_TYPES:
            raise UnsupportedModelError(
                f"tensor '{name}' has type {type_name(info.type_id)}, which pygemma4 cannot "
                "compute with"
            )
        if len(shape) == 1 and info.type_id != GGMLQuantizationType.F32:
            raise UnsupportedModelError(
                f"vector tensor '{name}' has type {type_name(info.type_id)}; norms, scales and "
                "rope factors must be F32"
            )


def _names(noun: str, names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(f"'{n}'" for n in names[:MAX_NAMES_IN_MESSAGE])
    if len(names) > MAX_NAMES_IN_MESSAGE:
        shown += f" and {len(names) - MAX_NAMES_IN_MESSAGE} more"
    return f"{noun}{'s' if len(names) > 1 else ''} {shown}"


# -- tokenizer ---------------------------------------------------------------------------------


def _check_tokenizer(meta: _Metadata, vocab_size: int) -> None:
    """The tokenizer metadata, where present, agrees with the model's vocabulary."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None:
        assert isinstance(tokens, list)
        _require(
            len(tokens) == vocab_size,
            f"tokenizer.ggml.tokens lists {len(tokens)} tokens, but token_embd.weight has "
            f"{vocab_size} rows",
        )
        for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            values = meta.get(key)
            if values is not None:
                assert isinstance(values, list)
                if len(values) != len(tokens):
                    raise GGUFError(
                        f"metadata key '{key}' has {len(values)} entries for {len(tokens)} tokens"
                    )
    for key in TOKEN_ID_KEYS:
        token_id = meta.get(key)
        if token_id is not None:
            assert isinstance(token_id, int)
            _require(
                token_id < vocab_size,
                f"{key} is {token_id}, outside the vocabulary of {vocab_size} tokens",
            )
