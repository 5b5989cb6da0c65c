"""GGUF reading: agreement with the gguf package on valid files, a clear error for every kind
of damaged file, and no other exception on randomly mutated files."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import GGUFLayout, put, rename, require_fixtures
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from pygemma4 import _core
from pygemma4.config import open_model
from pygemma4.errors import Gemma4Error, GGUFError, UnsupportedModelError
from pygemma4.gguf_file import SUPPORTED_TENSOR_TYPES, TENSOR_FORMATS, read_gguf

FIXTURE_MODELS = [
    f"gemma4-tiny-e/model-{t}.gguf" for t in ("f32", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
] + [f"gemma4-tiny-moe/model-{t}.gguf" for t in ("Q8_0", "Q4_K_M")]


def assert_matches_gguf_reader(path: Path) -> None:
    ours = read_gguf(path)
    reader = GGUFReader(path)
    assert ours.file_size == path.stat().st_size
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        value = ours.metadata[key]
        if ours.metadata_types[key] == (GGUFValueType.ARRAY, GGUFValueType.ARRAY):
            value = [v for inner in value for v in inner]  # the reader flattens nested arrays
        assert value == field.contents(), key
        assert ours.metadata_types[key] == tuple(field.types[:2]), key
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert info.name == t.name
        assert info.type_id == t.tensor_type
        assert info.shape == tuple(int(d) for d in t.shape)
        assert info.offset == t.data_offset
        assert info.nbytes == t.n_bytes


@pytest.mark.parametrize("relpath", FIXTURE_MODELS)
def test_fixture_matches_gguf_reader(relpath: str) -> None:
    assert_matches_gguf_reader(require_fixtures() / relpath)


def test_demo_model_matches_gguf_reader(demo_model_file: Path) -> None:
    assert_matches_gguf_reader(demo_model_file)


def test_tensor_formats_agree_with_gguf_package_and_the_core() -> None:
    assert {0, 1, 30, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14} == SUPPORTED_TENSOR_TYPES
    assert {int(t) for t in TENSOR_FORMATS} == SUPPORTED_TENSOR_TYPES
    for type_id, fmt in TENSOR_FORMATS.items():
        qtype = GGMLQuantizationType(type_id)
        assert fmt.name == qtype.name
        # The core's block structs (quant/blocks.h), by their sizes.
        assert _core.block_geometry(type_id) == GGML_QUANT_SIZES[qtype], fmt.name


# -- a small generic GGUF ----------------------------------------------------------------------


def write_small_gguf(path: Path) -> None:
    """A valid GGUF with a few values of each kind and three tensors; t.c ends the file."""
    writer = GGUFWriter(path, "test")
    writer.add_custom_alignment(32)
    writer.add_string("test.key_a", "hello")
    writer.add_uint32("test.key_b", 7)
    writer.add_array("test.words", ["alpha", "beta", "gamma"])
    writer.add_array("test.floats", [0.5, 1.5])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_bool("test.flag", True)
    writer.add_float64("test.double", 2.25)
    writer.add_int64("test.negative", -5)
    writer.add_tensor("t.a", np.arange(64, dtype=np.float32))
    rows = np.random.default_rng(0).standard_normal((2, 64), dtype=np.float32)
    writer.add_tensor(
        "t.b", quantize(rows, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0
    )
    writer.add_tensor("t.c", np.ones((2, 8), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("small") / "small.gguf"
    write_small_gguf(path)
    return path


def test_small_gguf_values(small_gguf: Path) -> None:
    g = read_gguf(small_gguf)
    assert g.metadata == {
        "general.architecture": "test",
        "general.alignment": 32,
        "test.key_a": "hello",
        "test.key_b": 7,
        "test.words": ["alpha", "beta", "gamma"],
        "test.floats": [0.5, 1.5],
        "test.nested": [[1, 2], [3]],
        "test.flag": True,
        "test.double": 2.25,
        "test.negative": -5,
    }
    assert g.metadata_types["test.nested"] == (GGUFValueType.ARRAY, GGUFValueType.ARRAY)
    assert g.metadata_types["test.key_b"] == (GGUFValueType.UINT32,)
    assert {n: (t.type_id, t.shape, t.nbytes) for n, t in g.tensors.items()} == {
        "t.a": (0, (64,), 256),
        "t.b": (8, (64, 2), 136),
        "t.c": (1, (8, 2), 32),
    }
    assert g.tensors["t.c"].offset + g.tensors["t.c"].nbytes == g.file_size
    assert all(t.offset % 32 == 0 for t in g.tensors.values())
    assert_matches_gguf_reader(small_gguf)


# -- one corruption per case -------------------------------------------------------------------

Mutation = Callable[[bytearray, GGUFLayout], bytes]

SMALL_CASES: list[tuple[str, Mutation, type[Exception], str]] = [
    ("bad magic", lambda d, lay: b"GGML" + d[4:], GGUFError, "not a GGUF file"),
    ("bad version", lambda d, lay: put(d, 4, "I", 7), GGUFError, "unsupported GGUF version 7"),
    ("version 1", lambda d, lay: put(d, 4, "I", 1), GGUFError, "unsupported GGUF version 1"),
    ("big-endian", lambda d, lay: put(d, 4, "I", 3 << 24), GGUFError, "big-endian"),
    (
        "truncated header",
        lambda d, lay: d[:12],
        GGUFError,
        "truncated file: the tensor count extends past the end",
    ),
    (
        "truncated metadata",
        lambda d, lay: d[: lay.value("test.words") + 12 + 13 + 12 + 8 + 2],
        GGUFError,
        "truncated file: element 2 of metadata key 'test.words' extends past the end",
    ),
    (
        "truncated tensor data",
        lambda d, lay: d[:-8],
        GGUFError,
        "truncated file: data of tensor 't.c'",
    ),
    (
        "string length past EOF",
        lambda d, lay: put(d, lay.key("test.key_b"), "Q", 1 << 40),
        GGUFError,
        "truncated file: the key of metadata entry 3 extends past the end",
    ),
    (
        "huge array count",
        lambda d, lay: put(d, lay.value("test.words") + 4, "Q", 1 << 62),
        GGUFError,
        "metadata key 'test.words' claims 4611686018427387904 elements",
    ),
    (
        "huge tensor count",
        lambda d, lay: put(d, 8, "Q", 1 << 60),
        GGUFError,
        "tensor count 1152921504606846976 is over the limit of 65536",
    ),
    (
        "tensor count beyond the file",
        lambda d, lay: put(d, 8, "Q", 1000),
        GGUFError,
        "tensor count 1000 is more than the",
    ),
    (
        "huge key count",
        lambda d, lay: put(d, 16, "Q", 1 << 60),
        GGUFError,
        "metadata key count 1152921504606846976 is over the limit of 65536",
    ),
    (
        "key count beyond the file",
        lambda d, lay: put(d, 16, "Q", 1000),
        GGUFError,
        "metadata key count 1000 is more than the",
    ),
    (
        "duplicate key",
        lambda d, lay: rename(d, lay.key("test.key_b"), "test.key_b", "test.key_a"),
        GGUFError,
        "duplicate metadata key 'test.key_a'",
    ),
    (
        "duplicate tensor name",
        lambda d, lay: rename(d, lay.tensor("t.b"), "t.b", "t.a"),
        GGUFError,
        "duplicate tensor name 't.a'",
    ),
    (
        "alignment not a power of two",
        lambda d, lay: put(d, lay.value("general.alignment"), "I", 48),
        GGUFError,
        "general.alignment is 48, not a power of two",
    ),
    (
        "alignment zero",
        lambda d, lay: put(d, lay.value("general.alignment"), "I", 0),
        GGUFError,
        "general.alignment is 0, not a power of two",
    ),
    (
        "alignment of the wrong type",
        lambda d, lay: put(d, lay.key_type("general.alignment"), "I", GGUFValueType.INT32),
        GGUFError,
        "general.alignment must be a UINT32, found INT32",
    ),
    (
        "5 dimensions",
        lambda d, lay: put(d, lay.n_dims("t.a"), "I", 5),
        GGUFError,
        "tensor 't.a' has 5 dimensions (1 to 4 are allowed)",
    ),
    (
        "0 dimensions",
        lambda d, lay: put(d, lay.n_dims("t.a"), "I", 0),
        GGUFError,
        "tensor 't.a' has 0 dimensions",
    ),
    (
        "zero dimension",
        lambda d, lay: put(d, lay.dims("t.c") + 8, "Q", 0),
        GGUFError,
        "tensor 't.c' has a zero dimension: shape [8, 0]",
    ),
    (
        "unknown tensor type",
        lambda d, lay: put(d, lay.tensor_type("t.a"), "I", 99),
        GGUFError,
        "tensor 't.a' has unknown type id 99",
    ),
    (
        "unsupported tensor type",
        lambda d, lay: put(d, lay.tensor_type("t.b"), "I", GGMLQuantizationType.IQ2_XXS),
        UnsupportedModelError,
        "tensor 't.b' has type IQ2_XXS, which pygemma4 cannot compute with",
    ),
    (
        "row length not a multiple of the block size",
        lambda d, lay: put(d, lay.dims("t.b"), "Q", 48),
        GGUFError,
        "tensor 't.b' of type Q8_0 has rows of 48 elements, not a multiple of its block size 32",
    ),
    (
        "tensor data offset outside the file",
        lambda d, lay: put(d, lay.tensor_offset("t.c"), "Q", 1 << 40),
        GGUFError,
        "data offset of tensor 't.c' points outside the file",
    ),
    (
        "misaligned tensor data offset",
        lambda d, lay: put(d, lay.tensor_offset("t.b"), "Q", 256 + 4),
        GGUFError,
        "data offset 260 of tensor 't.b' is not a multiple of the alignment 32",
    ),
    (
        "overlapping tensors",
        lambda d, lay: put(d, lay.tensor_offset("t.b"), "Q", 0),
        GGUFError,
        "data of tensors 't.a' and 't.b' overlap",
    ),
    (
        "unknown value type",
        lambda d, lay: put(d, lay.key_type("test.key_b"), "I", 99),
        GGUFError,
        "metadata key 'test.key_b' has unknown value type 99",
    ),
    (
        "unknown array element type",
        lambda d, lay: put(d, lay.value("test.words"), "I", 99),
        GGUFError,
        "metadata key 'test.words' is an array of unknown value type 99",
    ),
    (
        "invalid bool",
        lambda d, lay: put(d, lay.value("test.flag"), "B", 2),
        GGUFError,
        "metadata key 'test.flag' holds the invalid bool byte 2",
    ),
    (
        "key not UTF-8",
        lambda d, lay: put(d, lay.key("test.key_a") + 8, "B", 0xFF),
        GGUFError,
        "the key of metadata entry 2 is not valid UTF-8",
    ),
    (
        "string value not UTF-8",
        lambda d, lay: put(d, lay.value("test.words") + 12 + 8, "B", 0xC3),
        GGUFError,
        "element 0 of metadata key 'test.words' is not valid UTF-8",
    ),
]

DEMO_CASES: list[tuple[str, Mutation, type[Exception], str]] = [
    (
        "wrong architecture",
        lambda d, lay: rename(d, lay.value("general.architecture"), "gemma4", "gemma3"),
        UnsupportedModelError,
        "architecture is 'gemma3', not 'gemma4'",
    ),
    (
        "wrong metadata value type",
        lambda d, lay: put(d, lay.key_type("gemma4.block_count"), "I", GGUFValueType.INT32),
        GGUFError,
        "metadata key 'gemma4.block_count' must be an unsigned integer, found INT32",
    ),
    (
        "pattern of the wrong element type",
        lambda d, lay: put(
            d, lay.value("gemma4.attention.sliding_window_pattern"), "I", GGUFValueType.UINT8
        ),
        GGUFError,
        "'gemma4.attention.sliding_window_pattern' must be a bool array, found an array of UINT8",
    ),
    (
        "absurd block_count",
        lambda d, lay: put(d, lay.value("gemma4.block_count"), "I", 1 << 30),
        UnsupportedModelError,
        "gemma4.block_count is 1073741824, not within 1..512",
    ),
    (
        "pattern length contradicting block_count",
        lambda d, lay: put(d, lay.value("gemma4.block_count"), "I", 7),
        GGUFError,
        "'gemma4.attention.sliding_window_pattern' has 8 entries, but gemma4.block_count is 7",
    ),
    (
        "missing metadata key",
        lambda d, lay: rename(
            d,
            lay.key("gemma4.attention.sliding_window"),
            "gemma4.attention.sliding_window",
            "gemma4.attention.sliding_windox",
        ),
        UnsupportedModelError,
        "required metadata key 'gemma4.attention.sliding_window' is missing",
    ),
    (
        "missing required tensor",
        lambda d, lay: rename(
            d, lay.tensor("blk.3.attn_q.weight"), "blk.3.attn_q.weight", "blk.3.attn_q.weighs"
        ),
        UnsupportedModelError,
        "missing tensor 'blk.3.attn_q.weight'",
    ),
    (
        "unexpected tensor",
        lambda d, lay: rename(
            d,
            lay.tensor("blk.0.layer_output_scale.weight"),
            "blk.0.layer_output_scale.weight",
            "blk.0.layer_output_scalx.weight",
        ),
        UnsupportedModelError,
        "unexpected tensor 'blk.0.layer_output_scalx.weight'",
    ),
    (
        "shape contradicting metadata",
        lambda d, lay: put(d, lay.dims("blk.2.attn_q_norm.weight"), "Q", 16),
        UnsupportedModelError,
        "tensor 'blk.2.attn_q_norm.weight' has shape [16], but the metadata implies [32]",
    ),
    (
        "vector tensor not F32",
        lambda d, lay: put(d, lay.tensor_type("output_norm.weight"), "I", 1),
        UnsupportedModelError,
        "vector tensor 'output_norm.weight' has type F16",
    ),
    (
        "token id outside the vocabulary",
        lambda d, lay: put(d, lay.value("tokenizer.ggml.eos_token_id"), "I", 100000),
        UnsupportedModelError,
        "tokenizer.ggml.eos_token_id is 100000, outside the vocabulary",
    ),
]


def _check_case(
    tmp_path: Path,
    base: Path,
    mutate: Mutation,
    error: type[Exception],
    fragment: str,
) -> None:
    corrupted = tmp_path / "corrupted.gguf"
    corrupted.write_bytes(mutate(bytearray(base.read_bytes()), GGUFLayout(base)))
    with pytest.raises(error) as info:
        open_model(corrupted)
    message = str(info.value)
    assert fragment in message
    assert message.startswith(f"{corrupted}: ")


@pytest.mark.parametrize(
    ("mutate", "error", "fragment"),
    [case[1:] for case in SMALL_CASES],
    ids=[case[0] for case in SMALL_CASES],
)
def test_corrupted_small_gguf(
    tmp_path: Path, small_gguf: Path, mutate: Mutation, error: type[Exception], fragment: str
) -> None:
    _check_case(tmp_path, small_gguf, mutate, error, fragment)


@pytest.mark.parametrize(
    ("mutate", "error", "fragment"),
    [case[1:] for case in DEMO_CASES],
    ids=[case[0] for case in DEMO_CASES],
)
def test_corrupted_gemma4_model(
    tmp_path: Path, demo_model_file: Path, mutate: Mutation, error: type[Exception], fragment: str
) -> None:
    _check_case(tmp_path, demo_model_file, mutate, error, fragment)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(tmp_path / "missing.gguf")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="is a directory"):
        read_gguf(tmp_path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(GGUFError, match="empty file"):
        read_gguf(path)


def test_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    with pytest.raises(GGUFError, match="not a regular file"):
        read_gguf(fifo)


def test_deeply_nested_array(tmp_path: Path) -> None:
    writer = GGUFWriter(tmp_path / "nested.gguf", "test")
    writer.add_array("test.deep", [[[[[1]]]]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="nests arrays more than 4 deep"):
        read_gguf(tmp_path / "nested.gguf")


def test_errors_are_value_errors() -> None:
    assert issubclass(GGUFError, ValueError) and issubclass(GGUFError, Gemma4Error)
    assert issubclass(UnsupportedModelError, ValueError)
    assert issubclass(UnsupportedModelError, Gemma4Error)


# -- fuzzing -----------------------------------------------------------------------------------

INTERESTING = (0, 1, 2, 3, 4, 5, 8, 9, 12, 31, 32, 33, 255, 1 << 31, (1 << 32) - 1, 1 << 62)


def mutate_randomly(rng: random.Random, data: bytes, hot_end: int) -> bytes:
    """One random damage to `data`, mostly within its first `hot_end` bytes (the header)."""
    out = bytearray(data)
    at = rng.randrange(hot_end)
    kind = rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(hot_end)] ^= 1 << rng.randrange(8)
    elif kind == 1:
        out = out[: rng.randrange(len(out))]
    elif kind == 2:
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 3:
        del out[at : at + rng.randint(1, 16)]
    else:
        size = rng.choice((4, 8))
        value = rng.choice(INTERESTING) % (1 << (8 * size))
        out[at : at + size] = value.to_bytes(size, "little")
    return bytes(out)


@pytest.mark.parametrize(("base", "runs"), [("small", 400), ("demo", 200)])
def test_fuzzed_files_fail_cleanly(
    tmp_path: Path, small_gguf: Path, demo_model_file: Path, base: str, runs: int
) -> None:
    source = small_gguf if base == "small" else demo_model_file
    original = source.read_bytes()
    hot_end = GGUFLayout(source).data_offset
    rng = random.Random(20240607)
    path = tmp_path / "fuzzed.gguf"
    outcomes = {"ok": 0, "error": 0}
    slowest = 0.0
    for _ in range(runs):
        path.write_bytes(mutate_randomly(rng, original, hot_end))
        start = time.perf_counter()
        try:
            open_model(path) if base == "demo" else read_gguf(path)
            outcomes["ok"] += 1
        except Gemma4Error:
            outcomes["error"] += 1
        slowest = max(slowest, time.perf_counter() - start)
    assert outcomes["error"] > runs // 2, outcomes
    assert slowest < 1.0, f"slowest read took {slowest:.2f} s"
