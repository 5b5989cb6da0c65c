"""Gemma 4 assistant (speculative-decoding drafter) files: `gemma4-assistant` GGUFs as llama.cpp's
converter writes them, validated on their own and against the target model they draft for.

A drafter has no K/V projections: each of its layers reads the KV of the target's last layer of
the same kind (full or sliding) that stores KV, so its head shapes must equal that layer's. It
continues from the target's final hidden state (`embedding_length_out` = the target's width)
and shares the target's vocabulary and token embedding table.

The E2B/E4B drafters score tokens through a centroid-masked head: the vocabulary is cut into
clusters of equal size, listed by a permutation of the token ids; the drafter's output picks the
clusters whose centroids score highest and only their tokens are scored. llama.cpp's converter
drops that head, so its files carry the plain (full-vocabulary) head; a file that carries the
centroid head holds the tensors `masked_embd_centroids.weight` (llama.cpp's name, [n_embd,
n_centroids]) and `masked_embd_ordering` (I32 [vocab], the permutation) and the key
`gemma4-assistant.centroid_top_k` (how many clusters are scored).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType

from .config import (
    ARCH,
    KEY_KINDS,
    MAX_LAYERS,
    LayerConfig,
    ModelConfig,
    ModelFile,
    _check_tensors,
    _expected_tensors,
    _Kind,
    _Metadata,
    _require,
)
from .errors import Gemma4Error, UnsupportedModelError, located
from .gguf_file import GGUFFile, TensorInfo, read_gguf, type_name

__all__ = [
    "ASSISTANT_ARCH",
    "CENTROIDS_TENSOR",
    "CENTROID_TOP_K_KEY",
    "ORDERING_TENSOR",
    "AssistantConfig",
    "AssistantFile",
    "AssistantMismatchError",
    "CentroidHead",
]

ASSISTANT_ARCH = "gemma4-assistant"
_A = f"{ASSISTANT_ARCH}."
CENTROIDS_TENSOR = "masked_embd_centroids.weight"
ORDERING_TENSOR = "masked_embd_ordering"
CENTROID_TOP_K_KEY = _A + "centroid_top_k"
_KINDS: dict[str, _Kind] = {
    key.replace(f"{ARCH}.", _A, 1): kind for key, kind in KEY_KINDS.items()
} | {
    _A + "embedding_length_out": _Kind.UINT,
    _A + "nextn_predict_layers": _Kind.UINT,
    CENTROID_TOP_K_KEY: _Kind.UINT,
}


class AssistantMismatchError(Gemma4Error, ValueError):
    """The drafter file does not belong to the target model it was paired with."""


@dataclass(frozen=True, eq=False)
class CentroidHead:
    """The centroid-masked output head: the `top_k` clusters of the `n_centroids` whose centroids
    score highest are scored, cluster c being the tokens in row c of
    `token_ordering.reshape(n_centroids, -1)` (int32 [vocab], a permutation of the token ids);
    every other token gets the lowest of those scores minus 1."""

    n_centroids: int
    top_k: int
    token_ordering: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class AssistantConfig:
    """A drafter's configuration: its layers as a Gemma 4 model (`model`, whose layers have no
    KV of their own and name the target layer they read as `kv_source`), the width of the
    target hidden state it continues from, and its centroid head where the file carries one
    (None: the plain head, every token scored)."""

    model: ModelConfig
    n_embd_target: int
    centroid_head: CentroidHead | None = None


@dataclass(frozen=True)
class AssistantFile:
    """A validated assistant GGUF, configured for the target it was checked against."""

    gguf: GGUFFile
    config: AssistantConfig

    @property
    def weights(self) -> list[TensorInfo]:
        """The tensors the core computes with: all but the token ordering, which the
        configuration carries."""
        return list(_computed(self.gguf.tensors).values())


def _computed(tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """`tensors` without the token ordering, the one tensor of integers."""
    return {name: t for name, t in tensors.items() if name != ORDERING_TENSOR}


def open_assistant(path: str | os.PathLike[str], target: ModelFile) -> AssistantFile:
    """Read and validate the assistant GGUF at `path` as a drafter for `target`.

    GGUFError for a file that is not a valid GGUF (truncated, corrupt), UnsupportedModelError
    for a GGUF that is not a Gemma 4 assistant, AssistantMismatchError for an assistant that
    does not fit `target`; every message names both files.
    """
    try:
        gguf = read_gguf(path)
        with located(gguf.path):
            return AssistantFile(gguf, _assistant_config(gguf, target))
    except AssistantMismatchError:
        raise
    except Gemma4Error as e:
        raise type(e)(f"{e} (drafter for target {target.gguf.path})") from None


def _assistant_config(gguf: GGUFFile, target: ModelFile) -> AssistantConfig:
    meta = _Metadata(gguf, _KINDS)
    arch = meta.get("general.architecture")
    if arch != ASSISTANT_ARCH:
        raise UnsupportedModelError(f"architecture is '{arch}', not '{ASSISTANT_ARCH}'")
    meta.check_types()
    n_layer = meta.uint(_A + "block_count")
    _require(
        1 <= n_layer <= MAX_LAYERS, f"{_A}block_count is {n_layer}, not within 1..{MAX_LAYERS}"
    )
    n_embd = meta.uint(_A + "embedding_length")
    _require(n_embd >= 1, f"{_A}embedding_length is 0")
    for key in ("nextn_predict_layers", "attention.shared_kv_layers"):
        value = meta.uint(_A + key, n_layer)
        _require(
            value == n_layer,
            f"{_A}{key} is {value}: every one of the {n_layer} drafter layers must read the "
            "target's KV",
        )
    _require(
        meta.uint(_A + "embedding_length_per_layer_input", 0) == 0,
        "a drafter has no per-layer embeddings",
    )
    sliding = meta.pattern(_A + "attention.sliding_window_pattern", n_layer)
    n_head = meta.per_layer(_A + "attention.head_count", n_layer)
    n_head_kv = meta.per_layer(_A + "attention.head_count_kv", n_layer, default=tuple(n_head))
    n_ff = meta.per_layer(_A + "feed_forward_length", n_layer)
    _require(all(f >= 1 for f in n_ff), f"{_A}feed_forward_length holds 0")
    head_dim = {
        False: meta.uint(_A + "attention.key_length"),
        True: meta.uint(_A + "attention.key_length_swa"),
    }
    n_rot = {
        False: meta.uint(_A + "rope.dimension_count", head_dim[False]),
        True: meta.uint(_A + "rope.dimension_count_swa", head_dim[True]),
    }
    rope_base = {
        False: meta.number(_A + "rope.freq_base", 10000.0),
        True: meta.number(_A + "rope.freq_base_swa", 10000.0),
    }
    for kind in set(sliding):
        _require(
            2 <= n_rot[kind] <= head_dim[kind] and n_rot[kind] % 2 == 0 and rope_base[kind] > 0,
            f"{_A}rope dimensions/base of {'sliding' if kind else 'full'} layers are unusable",
        )
    rms_eps = meta.number(_A + "attention.layer_norm_rms_epsilon")
    _require(rms_eps > 0, f"{_A}attention.layer_norm_rms_epsilon is {rms_eps}, not positive")
    sliding_window = meta.uint(_A + "attention.sliding_window")
    n_embd_target = meta.uint(_A + "embedding_length_out")
    token_embd = gguf.tensors.get("token_embd.weight")
    if token_embd is None or len(token_embd.shape) != 2 or token_embd.shape[0] != n_embd:
        raise UnsupportedModelError(
            f"tensor 'token_embd.weight' is missing or not [{n_embd}, vocab size]"
        )

    t = target.config
    mismatch = _Mismatch(gguf, target)
    mismatch.check(
        n_embd_target == t.n_embd,
        f"it continues from hidden states of width "
        f"{n_embd_target} ({_A}embedding_length_out), the target's are {t.n_embd}",
    )
    mismatch.check(
        token_embd.shape[1] == t.vocab_size,
        f"its vocabulary has {token_embd.shape[1]} tokens, the target's {t.vocab_size}",
    )
    mismatch.check(
        sliding_window == t.sliding_window,
        f"its sliding window is {sliding_window}, the target's {t.sliding_window}",
    )
    layers = []
    for il in range(n_layer):
        kind = sliding[il]
        name = "sliding" if kind else "full"
        sources = [layer for layer in t.layers if layer.has_kv and layer.is_sliding == kind]
        mismatch.check(
            bool(sources),
            f"its layer {il} reads {name}-attention KV, which the target does not store",
        )
        source = sources[-1]
        mismatch.check(
            source.head_dim == head_dim[kind] and source.n_head_kv == n_head_kv[il],
            f"its layer {il} ({name} attention) reads {n_head_kv[il]} KV heads of "
            f"{head_dim[kind]}, but target layer {source.index} stores {source.n_head_kv} of "
            f"{source.head_dim}",
        )
        _require(
            n_head[il] >= 1 and n_head[il] % n_head_kv[il] == 0,
            f"layer {il}: {n_head[il]} query heads cannot be grouped over {n_head_kv[il]} KV heads",
        )
        layers.append(
            LayerConfig(
                index=il,
                is_sliding=kind,
                n_head=n_head[il],
                n_head_kv=n_head_kv[il],
                head_dim=head_dim[kind],
                n_rot=n_rot[kind],
                rope_base=rope_base[kind],
                n_ff=n_ff[il],
                has_kv=False,
                kv_source=source.index,
                has_v_proj=False,
                is_moe=False,
            )
        )
    model = ModelConfig(
        n_layer=n_layer,
        n_embd=n_embd,
        vocab_size=token_embd.shape[1],
        n_ctx_train=meta.uint(_A + "context_length"),
        rms_eps=rms_eps,
        final_logit_softcap=0.0,
        sliding_window=sliding_window,
        n_embd_per_layer=0,
        n_expert=0,
        n_expert_used=0,
        n_ff_expert=0,
        has_output=False,
        layers=tuple(layers),
    )
    expected = _expected_tensors(model, gguf.tensors) | {
        "nextn.pre_projection.weight": (2 * n_embd_target, n_embd),
        "nextn.post_projection.weight": (n_embd, n_embd_target),
    }
    head = _centroid_head(gguf, meta, n_embd, model.vocab_size)
    if head is not None:
        expected[CENTROIDS_TENSOR] = (n_embd, head.n_centroids)
    _check_tensors(expected, _computed(gguf.tensors))
    return AssistantConfig(model, n_embd_target, head)


def _centroid_head(gguf: GGUFFile, meta: _Metadata, n_embd: int, vocab: int) -> CentroidHead | None:
    """The file's centroid head, checked against the drafter's width and vocabulary; None for
    a file without one. UnsupportedModelError for a part missing, a wrong shape, an ordering
    that is not a permutation of the token ids, or a top-k out of range."""
    centroids = gguf.tensors.get(CENTROIDS_TENSOR)
    ordering = gguf.tensors.get(ORDERING_TENSOR)
    has_top_k = CENTROID_TOP_K_KEY in gguf.metadata
    parts = {
        f"tensor '{CENTROIDS_TENSOR}'": centroids is not None,
        f"tensor '{ORDERING_TENSOR}'": ordering is not None,
        f"key '{CENTROID_TOP_K_KEY}'": has_top_k,
    }
    if not any(parts.values()):
        return None
    missing = [part for part, present in parts.items() if not present]
    _require(
        not missing,
        f"the centroid head lacks {' and '.join(missing)} (it needs {', '.join(parts)})",
    )
    assert centroids is not None and ordering is not None
    _require(
        len(centroids.shape) == 2 and centroids.shape[0] == n_embd,
        f"tensor '{CENTROIDS_TENSOR}' has shape {list(centroids.shape)}, not [{n_embd} (the "
        "drafter's width), number of centroids]",
    )
    n_centroids = centroids.shape[1]
    _require(
        vocab % n_centroids == 0,
        f"tensor '{CENTROIDS_TENSOR}' holds {n_centroids} centroids, which do not cut the "
        f"{vocab} tokens into clusters of one size",
    )
    top_k = meta.uint(CENTROID_TOP_K_KEY)
    _require(
        1 <= top_k <= n_centroids,
        f"{CENTROID_TOP_K_KEY} is {top_k}, not within 1..{n_centroids} (the number of centroids)",
    )
    _require(
        ordering.type_id == int(GGMLQuantizationType.I32) and ordering.shape == (vocab,),
        f"tensor '{ORDERING_TENSOR}' is {type_name(ordering.type_id)} {list(ordering.shape)}, "
        f"not I32 [{vocab}] (one entry per token)",
    )
    token_ordering = np.fromfile(gguf.path, dtype="<i4", count=vocab, offset=ordering.offset)
    in_range = token_ordering[(token_ordering >= 0) & (token_ordering < vocab)]
    counts = np.bincount(in_range, minlength=vocab)
    if not (counts == 1).all():
        raise UnsupportedModelError(
            f"tensor '{ORDERING_TENSOR}' is not a permutation of the token ids 0..{vocab - 1}: "
            + _permutation_fault(token_ordering, counts)
        )
    return CentroidHead(n_centroids, top_k, token_ordering.astype(np.int32))


def _permutation_fault(ordering: np.ndarray, counts: np.ndarray) -> str:
    """What keeps `ordering` (with `counts`, how often each valid id occurs) from being a
    permutation: the first id out of range, repeated or absent."""
    outside = np.flatnonzero((ordering < 0) | (ordering >= counts.size))
    if outside.size:
        return f"entry {outside[0]} is {ordering[outside[0]]}, outside the vocabulary"
    repeated = np.flatnonzero(counts > 1)
    return (
        f"token {repeated[0]} appears {counts[repeated[0]]} times, token "
        f"{np.flatnonzero(counts == 0)[0]} never"
    )


class _Mismatch:
    """Raises AssistantMismatchError naming both files."""

    def __init__(self, gguf: GGUFFile, target: ModelFile) -> None:
        self.prefix = f"drafter {gguf.path} does not fit target {target.gguf.path}: "

    def check(self, condition: bool, message: str) -> None:
        if not condition:
            raise AssistantMismatchError(self.prefix + message)
