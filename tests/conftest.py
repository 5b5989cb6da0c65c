"""Shared test fixtures: the reference models in ../shared/fixtures, the multimodal engine and
transformers' model of the tiny multimodal fixture, the demo model, the parity report printed
at the end of a run, and byte surgery on GGUF files."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from safetensors.numpy import load_file

from pygemma4.models.demo import demo_model_path

if TYPE_CHECKING:
    from pygemma4.engine import Engine

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = REPO_ROOT.parent / "shared" / "fixtures"

_parity_results: list[tuple[str, float]] = []


def require_fixtures() -> Path:
    """The reference fixture directory; skips the calling test where it is missing, and fails
    it instead under CI=true, where the fixtures must be present."""
    if not FIXTURES_DIR.is_dir():
        reason = f"reference fixtures not found at {FIXTURES_DIR}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true: the fixtures are required)")
        pytest.skip(reason)
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The reference fixture directory (skip where missing, fail under CI=true)."""
    return require_fixtures()


@pytest.fixture(scope="session")
def mm_dir(fixtures_dir: Path) -> Path:
    """The tiny multimodal fixture (a text model, its mmproj, images, clips, references)."""
    return fixtures_dir / "gemma4-tiny-mm"


@pytest.fixture(scope="module")
def mm_engine(mm_dir: Path) -> Engine:
    """The tiny multimodal fixture's engine: f32 weights and KV, its vision and audio towers,
    transformers' image budget of 70 soft tokens."""
    from pygemma4.engine import Engine

    return Engine(
        mm_dir / "model-f32.gguf",
        threads=2,
        kv_dtype="f32",
        mmproj=mm_dir / "mmproj-f32.gguf",
        max_image_tokens=70,
    )


def audio_scales_of(mmproj: Path) -> list[np.ndarray]:
    """Each audio layer's query scale as the mmproj file holds it: softplus(per_dim_scale),
    which llama.cpp's converter computes in the checkpoint's float16 and so rounds."""
    tensors = {t.name: t for t in GGUFReader(mmproj).tensors}
    scales = []
    while (name := f"a.blk.{len(scales)}.per_dim_scale.weight") in tensors:
        scales.append(np.array(tensors[name].data, dtype=np.float64))
    return scales


@pytest.fixture(scope="session")
def hf_mm_model(mm_dir: Path):
    """transformers' Gemma4ForConditionalGeneration of the tiny multimodal fixture in float32,
    holding the same weights as its GGUFs: every audio layer's per_dim_scale is set so that
    its softplus is the mmproj's float16-rounded value, the one weight the conversion changes
    (left as it is, its up to 4e-4 relative difference moves the clips' embeddings by 2e-5,
    which the random tiny model amplifies to 1e-2 in the logits at the clips' soft tokens)."""
    torch = pytest.importorskip("torch", reason="torch (CPU) runs transformers live")
    transformers = pytest.importorskip("transformers")
    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(
        mm_dir / "hf", dtype=torch.float32
    ).eval()
    layers = model.model.audio_tower.layers
    scales = audio_scales_of(mm_dir / "mmproj-f32.gguf")
    assert len(scales) == len(layers)
    with torch.no_grad():
        for layer, scale in zip(layers, scales, strict=True):
            # The inverse of softplus, in float64 so that softplus gives `scale` back.
            inverse = torch.log(torch.expm1(torch.from_numpy(scale)))
            layer.self_attn.per_dim_scale.copy_(inverse.float())
    return model


@pytest.fixture(scope="session")
def demo_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model, generated once per session into a private cache directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYGEMMA4_CACHE", str(tmp_path_factory.mktemp("cache")))
        return demo_model_path()


@pytest.fixture(scope="session")
def parity_report() -> Callable[[str, float], None]:
    """Records (label, worst |logit difference|) for the summary at the end of the run."""

    def record(label: str, worst: float) -> None:
        _parity_results.append((label, worst))

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _parity_results:
        terminalreporter.section("parity: worst |logit difference|")
        for label, worst in _parity_results:
            terminalreporter.write_line(f"{label:<45} {worst:.6f}")


class GGUFLayout:
    """Byte offsets of the metadata entries and tensor infos of a valid GGUF file, for
    corrupting copies of it in place."""

    def __init__(self, path: Path) -> None:
        reader = GGUFReader(path)
        self.data_offset: int = reader.data_offset
        self._keys = {k: f.offset for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        self._tensors = {t.name: (t.field.offset, len(t.shape)) for t in reader.tensors}

    def key(self, key: str) -> int:
        """Offset of the u64 length that starts the entry of `key`."""
        return self._keys[key]

    def key_type(self, key: str) -> int:
        """Offset of the u32 value type of `key`."""
        return self._keys[key] + 8 + len(key.encode())

    def value(self, key: str) -> int:
        """Offset of the value of `key` (for a string or array: of its length / element type)."""
        return self.key_type(key) + 4

    def tensor(self, name: str) -> int:
        """Offset of the u64 name length that starts the tensor info of `name`."""
        return self._tensors[name][0]

    def n_dims(self, name: str) -> int:
        return self.tensor(name) + 8 + len(name.encode())

    def dims(self, name: str) -> int:
        return self.n_dims(name) + 4

    def tensor_type(self, name: str) -> int:
        return self.dims(name) + 8 * self._tensors[name][1]

    def tensor_offset(self, name: str) -> int:
        return self.tensor_type(name) + 4


def put(data: bytearray, at: int, fmt: str, value: int) -> bytearray:
    """Overwrite `data` at `at` with `value` packed little-endian as `fmt`; returns `data`."""
    struct.pack_into("<" + fmt, data, at, value)
    return data


def rename(data: bytearray, at: int, old: str, new: str) -> bytearray:
    """Replace the string `old` that starts at `at` (after its u64 length) with `new`, a string
    of the same encoded length; returns `data`."""
    assert len(old.encode()) == len(new.encode())
    start = at + 8
    assert data[start : start + len(old.encode())] == old.encode()
    data[start : start + len(new.encode())] = new.encode()
    return data


def rewrite_gguf(
    source: Path,
    target: Path,
    overrides: dict[str, object],
    architecture: str | None = None,
    new_keys: dict[str, tuple[object, GGUFValueType]] | None = None,
    new_tensors: dict[str, np.ndarray] | None = None,
    drop_tensors: tuple[str, ...] = (),
) -> Path:
    """Copy the GGUF `source` to `target` with the metadata values in `overrides` replaced
    (each keeps its key's value type), and the architecture if given, the keys `new_keys`
    (value, type) and the tensors `new_tensors` (numpy shape, so GGUF ne reversed) added,
    without the tensors in `drop_tensors`; returns `target`."""
    reader = GGUFReader(source)
    arch = architecture or str(reader.fields["general.architecture"].contents())
    writer = GGUFWriter(target, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = overrides.get(key, field.contents())
        sub_type = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    for key, (value, value_type) in (new_keys or {}).items():
        writer.add_key_value(key, value, value_type)
    for tensor in reader.tensors:
        if tensor.name not in drop_tensors:
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    for name, data in (new_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def centroid_head_of(hf_assistant: Path) -> tuple[np.ndarray, np.ndarray]:
    """The centroid head of a transformers assistant checkpoint: its centroids (float32
    [n_centroids, n_embd]) and token ordering (int32 [vocab])."""
    weights = load_file(hf_assistant / "model.safetensors")
    return (
        weights["masked_embedding.centroids.weight"].astype(np.float32),
        weights["masked_embedding.token_ordering"].astype(np.int32),
    )


def with_centroid_head(
    source: Path,
    target: Path,
    centroids: np.ndarray | None,
    ordering: np.ndarray | None,
    top_k: int | None,
) -> Path:
    """The assistant GGUF `source` copied to `target` with a centroid head: `centroids` as
    masked_embd_centroids.weight, `ordering` as masked_embd_ordering, `top_k` as
    gemma4-assistant.centroid_top_k (each left out where None)."""
    tensors = {"masked_embd_centroids.weight": centroids, "masked_embd_ordering": ordering}
    return rewrite_gguf(
        source,
        target,
        {},
        new_keys={}
        if top_k is None
        else {"gemma4-assistant.centroid_top_k": (top_k, GGUFValueType.UINT32)},
        new_tensors={name: t for name, t in tensors.items() if t is not None},
    )


@pytest.fixture(scope="session")
def ordered_drafter(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny draft fixture's assistant GGUF with the centroid head of its checkpoint
    (llama.cpp's converter drops it; see the fixture's README) and its top-k."""
    draft_dir = fixtures_dir / "gemma4-tiny-draft"
    config = json.loads((draft_dir / "hf-assistant" / "config.json").read_text())
    return with_centroid_head(
        draft_dir / "assistant-f32.gguf",
        tmp_path_factory.mktemp("ordered") / "assistant-ordered-f32.gguf",
        *centroid_head_of(draft_dir / "hf-assistant"),
        config["centroid_intermediate_top_k"],
    )
