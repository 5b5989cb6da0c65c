"""A description of a Gemma 4 GGUF file for people and programs: architecture, shapes, tensor
types and sizes, tokenizer and chat template."""

from __future__ import annotations

import dataclasses
import math
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from pygemma4.config import ModelConfig, ModelFile, open_model
from pygemma4.errors import TokenizerError
from pygemma4.gguf_file import GGUFFile, type_name
from pygemma4.tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    Tokenizer,
    carries_tokenizer,
)

TOKEN_TYPE_NAMES = {
    NORMAL: "normal",
    UNKNOWN: "unknown",
    CONTROL: "control",
    USER_DEFINED: "user-defined",
    UNUSED: "unused",
    BYTE: "byte",
}


class SizedTensor(Protocol):
    """A tensor's name, shape (GGUF ne order) and size in bytes: a file's TensorInfo, or a
    TensorSpec of a file to be written."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class DecodeRead:
    """What one decode step of one sequence reads of a model's weights (see decode_read_share):
    parameters and bytes."""

    parameters: int
    bytes: int


def decode_read_share(
    name: str, n_dims: int, has_output: bool, n_expert_used: int, n_expert: int
) -> float:
    """The share of tensor `name` that one decode step of one sequence reads, for bandwidth
    figures: all of every matrix (2-D and 3-D tensors), except the gathered embedding tables
    (per_layer_token_embd always; token_embd where a separate `output` matrix is the LM head,
    else it is the tied LM head and read whole) and, of expert tensors (3-D), the
    n_expert_used experts a token is routed to. Vectors (norms, scales: a few hundred KB) are
    left out."""
    if n_dims < 2 or name == "per_layer_token_embd.weight":
        return 0.0
    if name == "token_embd.weight" and has_output:
        return 0.0
    return n_expert_used / n_expert if n_dims == 3 else 1.0


def decode_read(tensors: Iterable[SizedTensor], config: ModelConfig) -> DecodeRead:
    """What one decode step of one sequence reads of `tensors`, the tensors of a model of
    `config` (each counted by decode_read_share)."""
    parameters = 0
    nbytes = 0.0
    for tensor in tensors:
        share = decode_read_share(
            tensor.name, len(tensor.shape), config.has_output, config.n_expert_used, config.n_expert
        )
        parameters += round(math.prod(tensor.shape) * share)
        nbytes += tensor.nbytes * share
    return DecodeRead(parameters, round(nbytes))


def decode_read_bytes(model: ModelFile) -> int:
    """Bytes of weights one decode step of one sequence reads from the open model file
    `model` (see decode_read_share)."""
    return decode_read(model.gguf.tensors.values(), model.config).bytes


def describe_model(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything `pygemma4 inspect` shows about the file, as JSON-compatible values.

    Raises GGUFError / UnsupportedModelError for files that are not Gemma 4 GGUFs.
    """
    model = open_model(path)
    gguf, config = model.gguf, model.config
    summary = dataclasses.asdict(config)
    layers = summary.pop("layers")
    return _describe_file(gguf) | {
        "config": summary,
        "layers": layers,
        "tokenizer": _describe_tokenizer(gguf.metadata),
    }


def describe_mmproj(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What `pygemma4 inspect` shows about a projector (mmproj) file: its towers' shapes and
    its tensors, as JSON-compatible values (GGUFError / UnsupportedModelError for bad files)."""
    # Imported here: the media modules load the core, which describing a text model needs not.
    from pygemma4.media.prepared import read_projector

    projector = read_projector(path)
    mmproj = projector.mmproj
    vision = projector.blocks if mmproj is None else mmproj.vision
    audio = projector.audio if mmproj is None else mmproj.audio
    return _describe_file(projector.gguf) | {
        "vision": None if vision is None else dataclasses.asdict(vision),
        "audio": None if audio is None else dataclasses.asdict(audio),
    }


def _describe_file(gguf: GGUFFile) -> dict[str, Any]:
    """The file's identity and its tensors, by type and one by one."""
    by_type: dict[str, dict[str, int]] = defaultdict(
        lambda: {"tensors": 0, "parameters": 0, "bytes": 0}
    )
    tensors = []
    for tensor in gguf.tensors.values():
        name = type_name(tensor.type_id)
        count = math.prod(tensor.shape)
        entry = by_type[name]
        entry["tensors"] += 1
        entry["parameters"] += count
        entry["bytes"] += tensor.nbytes
        tensors.append(
            {"name": tensor.name, "type": name, "shape": list(tensor.shape), "bytes": tensor.nbytes}
        )
    return {
        "path": str(gguf.path),
        "file_bytes": gguf.file_size,
        "name": gguf.metadata.get("general.name"),
        "architecture": gguf.metadata.get("general.architecture"),
        "parameters": sum(t["parameters"] for t in by_type.values()),
        "tensor_bytes": sum(t["bytes"] for t in tensors),
        "tensor_types": dict(sorted(by_type.items(), key=lambda kv: -kv[1]["bytes"])),
        "tensors": tensors,
    }


def _describe_tokenizer(metadata: dict[str, object]) -> dict[str, Any] | None:
    if not carries_tokenizer(metadata):
        return None
    try:
        tokenizer = Tokenizer.from_metadata(metadata)
    except TokenizerError as e:
        return {"error": str(e)}
    types: dict[str, int] = defaultdict(int)
    for kind in tokenizer.token_types:
        types[TOKEN_TYPE_NAMES.get(kind, f"type {kind}")] += 1
    merges = metadata.get("tokenizer.ggml.merges")
    return {
        "model": metadata.get("tokenizer.ggml.model"),
        "vocab_size": tokenizer.vocab_size,
        "merges": len(merges) if isinstance(merges, list) else 0,
        "token_types": dict(types),
        "bos": _token(tokenizer, tokenizer.bos_id),
        "eos": _token(tokenizer, tokenizer.eos_id),
        "end_of_generation": [
            _token(tokenizer, i) for i in sorted(tokenizer.end_of_generation_ids)
        ],
        "special_tokens": [
            _token(tokenizer, i)
            for i, kind in enumerate(tokenizer.token_types)
            if kind in (CONTROL, USER_DEFINED, UNKNOWN)
        ],
        "chat_template": {
            "source": "file" if tokenizer.has_own_chat_template else "built-in",
            "text": tokenizer.chat_template.source,
        },
    }


def _token(tokenizer: Tokenizer, token_id: int | None) -> dict[str, Any] | None:
    if token_id is None:
        return None
    return {"id": token_id, "text": tokenizer.tokens[token_id]}
