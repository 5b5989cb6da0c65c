"""Gemma 4 multimodal projector files: `clip` GGUFs (llama.cpp's `--mmproj` conversion) holding
the vision tower (projector type `gemma4v`) and/or the audio tower (`gemma4a`), validated on
their own and against the text model they feed.

Every tensor the metadata implies must be present with exactly the implied shape and no other
tensor may be, so the core computes from the file without checks of its own. A tower's
projection into the language model must produce rows of the text model's hidden size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from gguf import GGMLQuantizationType

from .config import ModelFile, _check_tensors, _Kind, _Metadata, _require
from .errors import Gemma4Error, GGUFError, UnsupportedModelError, located
from .gguf_file import GGUFFile, read_gguf

__all__ = [
    "AudioConfig",
    "MmprojFile",
    "MmprojMismatchError",
    "VisionConfig",
    "open_mmproj",
]

MMPROJ_ARCH = "clip"
VISION_PROJECTOR = "gemma4v"
AUDIO_PROJECTOR = "gemma4a"
# Gemma 4's fixed vision hyperparameters, which the converter does not write (llama.cpp uses
# the same values): the 2-D RoPE base and the side of the average-pooling window.
VISION_ROPE_BASE = 100.0
DEFAULT_POOLING = 3
# The widest tower the checks accept: far above Gemma 4's (768 / 1152), far below what would let
# a crafted file size scratch memory by its metadata alone.
MAX_TOWER_WIDTH = 1 << 14
MAX_TOWER_LAYERS = 256
# The clamp range tensors that may come with a clipped linear layer's weight.
CLAMP_SUFFIXES = ("input_min", "input_max", "output_min", "output_max")

_V = "clip.vision."
_AU = "clip.audio."
_KINDS: dict[str, _Kind] = {
    "general.architecture": _Kind.STRING,
    "clip.has_vision_encoder": _Kind.BOOL,
    "clip.has_audio_encoder": _Kind.BOOL,
    _V + "projector_type": _Kind.STRING,
    _V + "projection_dim": _Kind.UINT,
    _V + "image_size": _Kind.UINT,
    _V + "patch_size": _Kind.UINT,
    _V + "embedding_length": _Kind.UINT,
    _V + "feed_forward_length": _Kind.UINT,
    _V + "block_count": _Kind.UINT,
    _V + "attention.head_count": _Kind.UINT,
    _V + "attention.layer_norm_epsilon": _Kind.FLOAT,
    _V + "image_mean": _Kind.FLOAT_ARRAY,
    _V + "image_std": _Kind.FLOAT_ARRAY,
    _V + "projector.scale_factor": _Kind.UINT,
    _AU + "projector_type": _Kind.STRING,
    _AU + "projection_dim": _Kind.UINT,
    _AU + "embedding_length": _Kind.UINT,
    _AU + "feed_forward_length": _Kind.UINT,
    _AU + "block_count": _Kind.UINT,
    _AU + "attention.head_count": _Kind.UINT,
    _AU + "attention.layer_norm_epsilon": _Kind.FLOAT,
    _AU + "num_mel_bins": _Kind.UINT,
}


class MmprojMismatchError(Gemma4Error, ValueError):
    """The projector file does not belong to the text model it was paired with."""


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower: its transformer (`n_layer` layers of width `n_embd`, `n_head` heads of
    `head_dim`), `patch_size`² pixel patches, 2-D position tables of `n_pos` entries per axis,
    `pooling`² patches averaged per soft token, and the projection to `projection_dim`."""

    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    head_dim: int
    patch_size: int
    n_pos: int
    pooling: int
    eps: float
    rope_base: float
    projection_dim: int
    clipped: tuple[str, ...]  # the linear weights that come with clamp ranges
    standardize: bool  # v.std_bias / v.std_scale after pooling


@dataclass(frozen=True)
class AudioConfig:
    """The audio tower's shape as the file states it and its projection to `projection_dim`."""

    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_mel: int
    eps: float
    output_dim: int  # the tower's output rows (before the projection)
    projection_dim: int


@dataclass(frozen=True)
class MmprojFile:
    """A validated projector GGUF with the towers it holds (None for one it lacks)."""

    gguf: GGUFFile
    vision: VisionConfig | None
    audio: AudioConfig | None

    def tensor_names(self, prefix: str) -> list[str]:
        """The names of the file's tensors that start with `prefix` ('v.', 'a.', 'mm.')."""
        return [name for name in self.gguf.tensors if name.startswith(prefix)]


def open_mmproj(path: str | os.PathLike[str], target: ModelFile | None = None) -> MmprojFile:
    """Read and validate the projector GGUF at `path`, for the text model `target` when given.

    GGUFError for a file that is not a valid GGUF, UnsupportedModelError for a GGUF that is not a
    Gemma 4 projector, MmprojMismatchError (naming both files) for one whose projections do not
    produce `target`'s hidden size. Every message names the file.
    """
    gguf = read_gguf(path)
    with located(gguf.path):
        meta = _Metadata(gguf, _KINDS)
        arch = meta.get("general.architecture")
        if arch != MMPROJ_ARCH:
            raise UnsupportedModelError(
                f"architecture is '{arch}', not '{MMPROJ_ARCH}': not a multimodal projector file"
            )
        meta.check_types()
        vision = _vision_config(meta, gguf) if meta.get("clip.has_vision_encoder") else None
        audio = _audio_config(meta, gguf) if meta.get("clip.has_audio_encoder") else None
        if vision is None and audio is None:
            raise UnsupportedModelError("the file holds neither a vision nor an audio encoder")
        expected: dict[str, tuple[int, ...]] = {}
        if vision is not None:
            expected |= _vision_tensors(vision)
        if audio is not None:
            expected |= _audio_tensors(audio, gguf)
        _check_tensors(expected, gguf.tensors)
        _check_clamp_types(gguf, expected)
    mmproj = MmprojFile(gguf, vision, audio)
    if target is not None:
        check_pairing(mmproj, target)
    return mmproj


def check_pairing(mmproj: MmprojFile, target: ModelFile) -> None:
    """MmprojMismatchError unless every tower of `mmproj` projects into `target`'s width."""
    check_widths(
        mmproj.gguf.path,
        target,
        {
            name: None if tower is None else tower.projection_dim
            for name, tower in (("vision", mmproj.vision), ("audio", mmproj.audio))
        },
    )


def check_widths(
    path: str | os.PathLike[str], target: ModelFile, widths: dict[str, int | None]
) -> None:
    """MmprojMismatchError unless each input of the projector at `path` (by name: the width of
    the rows it produces, None where the file lacks it) fits `target`'s hidden size."""
    width = target.config.n_embd
    for name, produced in widths.items():
        if produced is not None and produced != width:
            raise MmprojMismatchError(
                f"projector {path} does not fit model {target.gguf.path}: its {name} "
                f"projection produces rows of {produced}, the model's hidden size is {width}"
            )


def positive_int(meta: dict[str, object], key: str) -> int:
    """The metadata value at `key`, which must be a positive integer (UnsupportedModelError
    naming the key otherwise)."""
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedModelError(f"{key} is {value!r}, not a positive integer")
    return value


def layer_norm_eps(meta: dict[str, object], key: str) -> float:
    """The metadata epsilon at `key` (1e-6 where absent), which must lie in (0, 1)."""
    eps = meta.get(key, 1e-6)
    if not isinstance(eps, float) or not 0 < eps < 1:
        raise UnsupportedModelError(f"{key} is {eps!r}")
    return eps


def _tower_shape(meta: _Metadata, prefix: str) -> tuple[int, int, int, int, float]:
    n_embd = meta.uint(prefix + "embedding_length")
    n_ff = meta.uint(prefix + "feed_forward_length")
    n_layer = meta.uint(prefix + "block_count")
    n_head = meta.uint(prefix + "attention.head_count")
    eps = meta.number(prefix + "attention.layer_norm_epsilon")
    _require(1 <= n_embd <= MAX_TOWER_WIDTH, f"{prefix}embedding_length {n_embd} is out of range")
    _require(
        1 <= n_ff <= 8 * MAX_TOWER_WIDTH, f"{prefix}feed_forward_length {n_ff} is out of range"
    )
    _require(
        1 <= n_layer <= MAX_TOWER_LAYERS,
        f"{prefix}block_count {n_layer} is not within 1..{MAX_TOWER_LAYERS}",
    )
    _require(
        n_head >= 1 and n_embd % n_head == 0,
        f"{prefix}attention.head_count {n_head} does not divide the width {n_embd}",
    )
    _require(eps > 0, f"{prefix}attention.layer_norm_epsilon is {eps}, not positive")
    return n_embd, n_ff, n_layer, n_head, eps


def _projector_type(meta: _Metadata, prefix: str, expected: str) -> None:
    kind = meta.get(prefix + "projector_type")
    if kind is None:
        raise UnsupportedModelError(f"required metadata key '{prefix}projector_type' is missing")
    _require(
        kind == expected,
        f"{prefix}projector_type is '{kind}'; pygemma4 runs Gemma 4's '{expected}' only",
    )


def _vision_config(meta: _Metadata, gguf: GGUFFile) -> VisionConfig:
    _projector_type(meta, _V, VISION_PROJECTOR)
    n_embd, n_ff, n_layer, n_head, eps = _tower_shape(meta, _V)
    head_dim = n_embd // n_head
    _require(
        head_dim % 4 == 0,
        f"vision head dimension {head_dim} is not a multiple of 4, which 2-D RoPE needs",
    )
    patch_size = meta.uint(_V + "patch_size")
    _require(1 <= patch_size <= 64, f"{_V}patch_size {patch_size} is out of range")
    pooling = meta.uint(_V + "projector.scale_factor", DEFAULT_POOLING)
    _require(1 <= pooling <= 8, f"{_V}projector.scale_factor {pooling} is out of range")
    for key, identity in (("image_mean", 0.0), ("image_std", 1.0)):
        values = meta.get(_V + key)
        _require(
            values is None or values == [identity] * 3,
            f"{_V}{key} is {values}; Gemma 4 images are not normalised (expected {[identity] * 3})",
        )
    table = gguf.tensors.get("v.position_embd.weight")
    if table is None or len(table.shape) != 3 or table.shape[0] != n_embd or table.shape[2] != 2:
        raise UnsupportedModelError(
            f"tensor 'v.position_embd.weight' is missing or not [{n_embd}, positions, 2]"
        )
    return VisionConfig(
        n_embd=n_embd,
        n_ff=n_ff,
        n_layer=n_layer,
        n_head=n_head,
        head_dim=head_dim,
        patch_size=patch_size,
        n_pos=table.shape[1],
        pooling=pooling,
        eps=eps,
        rope_base=VISION_ROPE_BASE,
        projection_dim=meta.uint(_V + "projection_dim"),
        clipped=_clipped(gguf, "v.blk."),
        standardize="v.std_bias" in gguf.tensors,
    )


def _clipped(gguf: GGUFFile, prefix: str) -> tuple[str, ...]:
    """The linear weights under `prefix` that have clamp ranges in the file."""
    return tuple(
        sorted(
            name
            for name in gguf.tensors
            if name.startswith(prefix)
            and name.endswith(".weight")
            and any(name[: -len("weight")] + s in gguf.tensors for s in CLAMP_SUFFIXES)
        )
    )


def _clamps(weight: str) -> dict[str, tuple[int, ...]]:
    stem = weight[: -len("weight")]
    return {stem + suffix: (1,) for suffix in CLAMP_SUFFIXES}


VISION_LINEARS = (
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_out",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


def vision_layer_shapes(v: VisionConfig, il: int) -> dict[str, tuple[int, ...]]:
    """The tensors of vision layer `il` (GGUF ne order) without clamp ranges."""
    p = f"v.blk.{il}."
    e, f, d = v.n_embd, v.n_ff, v.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        p + "attn_q.weight": (e, e),
        p + "attn_k.weight": (e, e),
        p + "attn_v.weight": (e, e),
        p + "attn_out.weight": (e, e),
        p + "attn_q_norm.weight": (d,),
        p + "attn_k_norm.weight": (d,),
        p + "ffn_gate.weight": (e, f),
        p + "ffn_up.weight": (e, f),
        p + "ffn_down.weight": (f, e),
    }
    for norm in ("ln1", "ln2", "attn_post_norm", "ffn_post_norm"):
        shapes[p + norm + ".weight"] = (e,)
    return shapes


def _vision_tensors(v: VisionConfig) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "v.patch_embd.weight": (v.patch_size, v.patch_size, 3, v.n_embd),
        "v.position_embd.weight": (v.n_embd, v.n_pos, 2),
        "mm.input_projection.weight": (v.n_embd, v.projection_dim),
    }
    if v.standardize:
        shapes |= {"v.std_bias": (v.n_embd,), "v.std_scale": (v.n_embd,)}
    for il in range(v.n_layer):
        shapes |= vision_layer_shapes(v, il)
    for weight in v.clipped:
        _require(
            weight in shapes and weight.split(".")[-2] in VISION_LINEARS,
            f"tensor '{weight}' has clamp ranges but is not a linear layer of the vision tower",
        )
        shapes |= _clamps(weight)
    return shapes


def _audio_config(meta: _Metadata, gguf: GGUFFile) -> AudioConfig:
    _projector_type(meta, _AU, AUDIO_PROJECTOR)
    n_embd, n_ff, n_layer, n_head, eps = _tower_shape(meta, _AU)
    n_mel = meta.uint(_AU + "num_mel_bins")
    _require(1 <= n_mel <= 1024, f"{_AU}num_mel_bins {n_mel} is out of range")
    out = gguf.tensors.get("a.pre_encode.out.weight")
    if out is None or len(out.shape) != 2 or out.shape[0] != n_embd:
        raise UnsupportedModelError(
            f"tensor 'a.pre_encode.out.weight' is missing or not [{n_embd}, output width]"
        )
    return AudioConfig(
        n_embd=n_embd,
        n_ff=n_ff,
        n_layer=n_layer,
        n_head=n_head,
        n_mel=n_mel,
        eps=eps,
        output_dim=out.shape[1],
        projection_dim=meta.uint(_AU + "projection_dim"),
    )


AUDIO_LINEARS = (
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_out",
    "ffn_up",
    "ffn_down",
    "ffn_up_1",
    "ffn_down_1",
    "conv_pw1",
    "conv_pw2",
)


def _audio_tensors(a: AudioConfig, gguf: GGUFFile) -> dict[str, tuple[int, ...]]:
    e, f = a.n_embd, a.n_ff
    head_dim = e // a.n_head
    conv0 = gguf.tensors.get("a.conv1d.0.weight")
    conv1 = gguf.tensors.get("a.conv1d.1.weight")
    if conv0 is None or conv1 is None or len(conv0.shape) != 4 or len(conv1.shape) != 4:
        raise UnsupportedModelError("the audio subsampling convolutions are missing or not 4-D")
    c0, c1 = conv0.shape[3], conv1.shape[3]
    kernel = gguf.tensors.get("a.blk.0.conv_dw.weight")
    k = kernel.shape[0] if kernel is not None else 0
    shapes: dict[str, tuple[int, ...]] = {
        "a.conv1d.0.weight": (3, 3, 1, c0),
        "a.conv1d.0.norm.weight": (c0,),
        "a.conv1d.1.weight": (3, 3, c0, c1),
        "a.conv1d.1.norm.weight": (c1,),
        "a.input_projection.weight": (c1 * (a.n_mel // 4), e),
        "a.pre_encode.out.weight": (e, a.output_dim),
        "a.pre_encode.out.bias": (a.output_dim,),
        "mm.a.input_projection.weight": (a.output_dim, a.projection_dim),
    }
    for il in range(a.n_layer):
        p = f"a.blk.{il}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out", "attn_k_rel", "conv_pw2"):
            shapes[p + name + ".weight"] = (e, e)
        shapes[p + "conv_pw1.weight"] = (e, 2 * e)
        shapes[p + "conv_dw.weight"] = (k, e)
        shapes[p + "per_dim_scale.weight"] = (head_dim,)
        for suffix in ("", "_1"):
            shapes[p + f"ffn_up{suffix}.weight"] = (e, f)
            shapes[p + f"ffn_down{suffix}.weight"] = (f, e)
            shapes[p + f"ffn_norm{suffix}.weight"] = (e,)
            shapes[p + f"ffn_post_norm{suffix}.weight"] = (e,)
        for norm in ("norm_conv", "conv_norm", "ln2", "attn_pre_norm", "attn_post_norm"):
            shapes[p + norm + ".weight"] = (e,)
    for weight in _clipped(gguf, "a.blk."):
        _require(
            weight in shapes and weight.split(".")[-2] in AUDIO_LINEARS,
            f"tensor '{weight}' has clamp ranges but is not a linear layer of the audio tower",
        )
        shapes |= _clamps(weight)
    return shapes


def _check_clamp_types(gguf: GGUFFile, expected: dict[str, tuple[int, ...]]) -> None:
    for name in expected:
        if name.rsplit(".", 1)[-1] in CLAMP_SUFFIXES:
            info = gguf.tensors[name]
            if info.type_id != GGMLQuantizationType.F32:
                raise GGUFError(f"clamp range tensor '{name}' must be F32")
