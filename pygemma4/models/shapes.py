"""The shapes of the Gemma 4 models pygemma4 writes, from the tiny demo to the largest, in one
table: `MODEL_SHAPES`.

A shape is the architecture of a Gemma 4 text model in the terms of its Hugging Face config;
per-layer values (attention kind, MLP width, KV heads, KV sharing) derive from it the way
transformers and llama.cpp's converter derive them, and `ModelShape.model_config` is the
configuration `pygemma4.config` derives from a file of that shape.

The published models, from the Hugging Face checkpoints' configurations (transformers'
`models/gemma4/convert_gemma4_weights.py` variants with `configuration_gemma4.py` defaults;
cross-checked with the GGUF metadata of published Q4_K_M files), beside the demo model:

    model    layers  width  heads  KV heads sl/full  MLP                      window  PLE  shared
    demo          8    256      4  2 / 2             256 (512 if sharing)         16   16       2
    e2b          35   1536      8  1 / 1             6144 (12288 if sharing)     512  256      20
    e4b          42   2560      8  2 / 2             10240                       512  256      18
    26b-a4b      30   2816     16  8 / 2, K = V      2112 + 128 x 704, top 8    1024    -       -
    31b          60   5376     32  16 / 4, K = V     21504                      1024    -       -

Every 5th layer of e2b and every 6th of the others is a full-attention layer, and the last.
The published models: head dims 256 (sliding) / 512 (full), vocabulary 262,144 (the demo's
are 32 / 64 and its own small vocabulary). All: RoPE bases 10,000 / 1,000,000 (full layers
rotate a quarter of their dimensions), final logit softcap 30, tied embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from pygemma4.config import LayerConfig, ModelConfig
from pygemma4.errors import Gemma4Error
from pygemma4.models.vocabulary import MIN_VOCAB

__all__ = ["MODEL_SHAPES", "ModelShape", "ModelShapeError", "model_shape"]


class ModelShapeError(Gemma4Error, ValueError):
    """An unknown model name, or a shape that is not a valid Gemma 4 architecture."""


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The architecture of a Gemma 4 text model, in the terms of its Hugging Face config."""

    name: str
    hf_repo: str | None = None  # the published checkpoint; None for the demo
    n_layer: int  # num_hidden_layers
    n_embd: int  # hidden_size
    n_head: int  # num_attention_heads
    n_head_kv_swa: int  # num_key_value_heads
    n_head_kv_full: int  # num_global_key_value_heads (or num_key_value_heads)
    head_dim_swa: int = 256  # head_dim
    head_dim_full: int = 512  # global_head_dim
    n_ff: int  # intermediate_size (the dense MLP; beside the experts in MoE models)
    double_wide_mlp: bool = False  # use_double_wide_mlp: MLP twice as wide in KV-sharing layers
    sliding_period: int = 6  # every sliding_period-th layer is full attention, and the last
    sliding_window: int
    n_embd_per_layer: int = 0  # hidden_size_per_layer_input; 0: no per-layer embeddings
    n_shared_kv: int = 0  # num_kv_shared_layers: the last layers reuse earlier layers' KV
    full_has_v: bool = True  # not attention_k_eq_v: full layers have their own V projection
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
        """The configuration pygemma4.config derives from a file of this shape."""

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


# The table, smallest first: each model's fields that differ from ModelShape's defaults.
# fmt: off
_SHAPE_FIELDS: dict[str, dict[str, Any]] = {
    # Shaped like E2B/E4B in miniature (per-layer embeddings, KV sharing, both attention kinds
    # with their own head sizes, double-width MLPs where KV is shared): every code path of an
    # E-style model in a few MB. Its vocabulary is the one demo.py learns from a page of text.
    "demo": dict(
        n_layer=8, n_embd=256, n_head=4, n_head_kv_swa=2, n_head_kv_full=2, head_dim_swa=32,
        head_dim_full=64, n_ff=256, double_wide_mlp=True, sliding_window=16,
        n_embd_per_layer=16, n_shared_kv=2, context_length=4096, vocab_size=660,
    ),
    "e2b": dict(
        hf_repo="google/gemma-4-E2B", n_layer=35, n_embd=1536, n_head=8, n_head_kv_swa=1,
        n_head_kv_full=1, n_ff=6144, double_wide_mlp=True, sliding_period=5,
        sliding_window=512, n_embd_per_layer=256, n_shared_kv=20, context_length=131_072,
    ),
    "e4b": dict(
        hf_repo="google/gemma-4-E4B", n_layer=42, n_embd=2560, n_head=8, n_head_kv_swa=2,
        n_head_kv_full=2, n_ff=10240, sliding_window=512, n_embd_per_layer=256,
        n_shared_kv=18, context_length=131_072,
    ),
    "26b-a4b": dict(
        hf_repo="google/gemma-4-26B-A4B", n_layer=30, n_embd=2816, n_head=16,
        n_head_kv_swa=8, n_head_kv_full=2, n_ff=2112, sliding_window=1024, full_has_v=False,
        context_length=262_144, n_expert=128, n_expert_used=8, n_ff_expert=704,
    ),
    "31b": dict(
        hf_repo="google/gemma-4-31B", n_layer=60, n_embd=5376, n_head=32, n_head_kv_swa=16,
        n_head_kv_full=4, n_ff=21504, sliding_window=1024, full_has_v=False,
        context_length=262_144,
    ),
}
# fmt: on

MODEL_SHAPES: Mapping[str, ModelShape] = MappingProxyType(
    {name: ModelShape(name=name, **fields) for name, fields in _SHAPE_FIELDS.items()}
)


def model_shape(name: str, **overrides: object) -> ModelShape:
    """The shape `name` of MODEL_SHAPES, with fields replaced by `overrides` (e.g. a smaller
    n_layer or vocab_size for tests; any field of ModelShape may be given).

    Where n_layer changes and n_shared_kv is not given, the KV-sharing layers keep their share
    of the model, as far as every sharing layer still finds an earlier layer of its own kind.
    ModelShapeError names an unknown model or field, or what makes the result invalid.
    """
    try:
        base = MODEL_SHAPES[name]
    except KeyError:
        known = ", ".join(MODEL_SHAPES)
        raise ModelShapeError(f"unknown model {name!r} (known: {known})") from None
    fields = {f.name for f in dataclasses.fields(ModelShape)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ModelShapeError(f"unknown ModelShape field(s): {', '.join(unknown)}")
    shape = dataclasses.replace(base, **overrides)  # type: ignore[arg-type]
    if "n_layer" in overrides and "n_shared_kv" not in overrides and base.n_shared_kv:
        shared = base.n_shared_kv * shape.n_layer // base.n_layer
        while shared and not _sharing_is_valid(dataclasses.replace(shape, n_shared_kv=shared)):
            shared -= 1
        shape = dataclasses.replace(shape, n_shared_kv=shared)
    _validate(shape)
    return shape


def _sharing_is_valid(shape: ModelShape) -> bool:
    if not 0 <= shape.n_shared_kv < shape.n_layer:
        return False
    sliding = shape.sliding
    own = set(sliding[: shape.first_shared_layer])
    return all(kind in own for kind in sliding[shape.first_shared_layer :])


def _validate(shape: ModelShape) -> None:
    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ModelShapeError(f"model {shape.name!r}: {message}")

    for field in ("n_layer", "n_embd", "n_head", "n_head_kv_swa", "n_head_kv_full"):
        require(getattr(shape, field) >= 1, f"{field} must be at least 1")
    for field in ("head_dim_swa", "head_dim_full", "n_ff", "sliding_period", "sliding_window"):
        require(getattr(shape, field) >= 1, f"{field} must be at least 1")
    require(shape.n_head % shape.n_head_kv_swa == 0, "n_head must be a multiple of n_head_kv_swa")
    require(shape.n_head % shape.n_head_kv_full == 0, "n_head must be a multiple of n_head_kv_full")
    require(shape.head_dim_full % 8 == 0, "head_dim_full must be a multiple of 8")
    require(
        _sharing_is_valid(shape),
        f"n_shared_kv {shape.n_shared_kv} leaves a KV-sharing layer without an earlier layer "
        "of its own attention kind",
    )
    if shape.n_expert:
        require(
            1 <= shape.n_expert_used <= shape.n_expert and shape.n_ff_expert >= 1,
            "experts need 1 <= n_expert_used <= n_expert and n_ff_expert >= 1",
        )
    require(
        shape.vocab_size >= MIN_VOCAB,
        f"vocab_size must be at least {MIN_VOCAB} (special, byte and character tokens)",
    )
