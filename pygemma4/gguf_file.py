"""Strict, bounded reading of a GGUF file: header, metadata and tensor directory.

Nothing in the file is trusted. Every count, length, value type, shape, tensor type and offset
is checked against the bytes the file really holds before it is used, so a damaged or crafted
file ends in a GGUFError (or UnsupportedModelError) that names the problem, never in a crash,
a hang, or an allocation out of proportion to the file. The tensor data itself is not read.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import GGUFError, UnsupportedModelError, located

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# ggml keeps tensor names in 64-byte buffers that end with a terminator.
MAX_TENSOR_NAME_BYTES = 63
MAX_ARRAY_NESTING = 4
# Far above any real model (a few thousand tensors, a few dozen keys), far below what would
# let a crafted file make us build millions of Python objects from a small file.
MAX_TENSORS = 1 << 16
MAX_METADATA_KEYS = 1 << 16
# All metadata arrays together; a real tokenizer (262k tokens + merges) needs about 1.5M.
MAX_METADATA_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class TensorFormat:
    """The data layout of one GGML tensor type: elements per block and bytes per block."""

    name: str
    block_size: int
    block_bytes: int


# The tensor types the core reads; their block geometry is the gguf package's.
TENSOR_FORMATS: dict[int, TensorFormat] = {
    qtype: TensorFormat(qtype.name, *GGML_QUANT_SIZES[qtype])
    for qtype in (
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q4_1,
        GGMLQuantizationType.Q5_0,
        GGMLQuantizationType.Q5_1,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q2_K,
        GGMLQuantizationType.Q3_K,
        GGMLQuantizationType.Q4_K,
        GGMLQuantizationType.Q5_K,
        GGMLQuantizationType.Q6_K,
    )
}
SUPPORTED_TENSOR_TYPES: frozenset[int] = frozenset(int(t) for t in TENSOR_FORMATS)
# Tensors of integers the loader reads as data and never computes with (the token ordering of
# an assistant drafter's centroid head); a model's configuration says where one may appear.
INDEX_TENSOR_FORMATS: dict[int, TensorFormat] = {
    GGMLQuantizationType.I32: TensorFormat("I32", *GGML_QUANT_SIZES[GGMLQuantizationType.I32])
}

# struct / numpy format code of each fixed-size metadata value type.
_FIXED_CODES: dict[int, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Smallest possible encodings, used to bound counts by the bytes left in the file.
_MIN_STRING_BYTES = 8  # the u64 length of an empty string
_MIN_ARRAY_BYTES = 12  # u32 element type + u64 count of an empty array
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one dim, type, offset


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: name, GGML type id, shape and where its data lies."""

    name: str
    type_id: int
    shape: tuple[int, ...]  # GGUF ne order: innermost (row length) first
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    """A structurally valid GGUF file: its metadata and tensor directory."""

    path: Path
    file_size: int
    metadata: dict[str, object]  # scalars as int / float / bool / str, arrays as lists
    tensors: dict[str, TensorInfo]
    # The GGUF value type of each metadata key: (type,) for a scalar, (ARRAY, element type)
    # for an array, (ARRAY, ARRAY) for an array of arrays.
    metadata_types: dict[str, tuple[GGUFValueType, ...]]


def type_name(type_id: int) -> str:
    """A readable name for a GGML tensor type id."""
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type id {type_id}"


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Read and fully validate the structure of the GGUF file at `path`.

    Raises GGUFError for a missing or unreadable path and for anything structurally wrong with
    the file, and UnsupportedModelError for a tensor of a GGML type the engine cannot compute
    with. Messages start with the path.
    """
    file_path = Path(path)
    with located(file_path):
        _check_regular_file(file_path)
        try:
            f = open(file_path, "rb")  # noqa: SIM115 - closed by the with block below
        except OSError as e:
            raise GGUFError(f"cannot open the file: {e.strerror or e}") from None
        with f:
            try:
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:  # ValueError: the file became empty
                raise GGUFError(f"cannot map the file: {e}") from None
            with buf:
                return _Parser(file_path, buf).parse()


def _check_regular_file(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise GGUFError("no such file") from None
    except OSError as e:
        raise GGUFError(f"cannot access the file: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise GGUFError("is a directory, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        raise GGUFError("not a regular file")
    if st.st_size == 0:
        raise GGUFError("empty file, not a GGUF file")


class _Parser:
    """A cursor over the mapped file that checks every read against the end of the file."""

    def __init__(self, path: Path, buf: mmap.mmap) -> None:
        self.path = path
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.elements_left = MAX_METADATA_ELEMENTS

    def parse(self) -> GGUFFile:
        self._read_preamble()
        n_tensors = self._u64("the tensor count")
        n_kv = self._u64("the metadata key count")
        if n_tensors > MAX_TENSORS:
            raise GGUFError(f"tensor count {n_tensors} is over the limit of {MAX_TENSORS}")
        if n_kv > MAX_METADATA_KEYS:
            raise GGUFError(f"metadata key count {n_kv} is over the limit of {MAX_METADATA_KEYS}")
        left = self.size - self.pos
        if n_tensors * _MIN_TENSOR_INFO_BYTES > left:
            raise GGUFError(
                f"tensor count {n_tensors} is more than the {left} bytes after the header can hold"
            )
        if n_kv * _MIN_KV_BYTES > left:
            raise GGUFError(
                f"metadata key count {n_kv} is more than the {left} bytes after the header can hold"
            )
        metadata, types = self._read_metadata(n_kv)
        alignment = _alignment(metadata, types)
        raw = [self._read_tensor_info(i) for i in range(n_tensors)]
        data_start = -(-self.pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, dims, type_id, rel_offset in raw:
            if name in tensors:
                raise GGUFError(f"duplicate tensor name '{name}'")
            tensors[name] = self._place_tensor(
                name, dims, type_id, rel_offset, data_start, alignment
            )
        _check_no_overlap(tensors.values())
        return GGUFFile(self.path, self.size, metadata, tensors, types)

    # -- primitive reads -------------------------------------------------------------------

    def _take(self, n: int, what: str) -> int:
        """Reserve the next `n` bytes and return where they start."""
        if n > self.size - self.pos:
            raise GGUFError(
                f"truncated file: {what} extends past the end of the file "
                f"(needs {n} bytes at offset {self.pos}, the file has {self.size})"
            )
        start = self.pos
        self.pos += n
        return start

    def _u32(self, what: str) -> int:
        value: int = _U32.unpack_from(self.buf, self._take(4, what))[0]
        return value

    def _u64(self, what: str) -> int:
        value: int = _U64.unpack_from(self.buf, self._take(8, what))[0]
        return value

    def _string(self, what: str) -> str:
        n = self._u64(f"the length of {what}")
        start = self._take(n, what)
        try:
            return self.buf[start : start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{what} is not valid UTF-8") from None

    # -- header ----------------------------------------------------------------------------

    def _read_preamble(self) -> None:
        head = self.buf[: len(GGUF_MAGIC)]
        if head != GGUF_MAGIC[: len(head)]:
            raise GGUFError(f"not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})")
        self._take(len(GGUF_MAGIC), "the GGUF magic")
        version = self._u32("the GGUF version")
        if version not in SUPPORTED_VERSIONS:
            if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
                raise GGUFError("big-endian GGUF files are not supported")
            supported = " and ".join(str(v) for v in SUPPORTED_VERSIONS)
            raise GGUFError(f"unsupported GGUF version {version} (supported: {supported})")

    def _read_metadata(
        self, n_kv: int
    ) -> tuple[dict[str, object], dict[str, tuple[GGUFValueType, ...]]]:
        metadata: dict[str, object] = {}
        types: dict[str, tuple[GGUFValueType, ...]] = {}
        for i in range(n_kv):
            key = self._string(f"the key of metadata entry {i}")
            if not key:
                raise GGUFError(f"metadata entry {i} has an empty key")
            if key in metadata:
                raise GGUFError(f"duplicate metadata key '{key}'")
            vtype = self._u32(f"the value type of metadata key '{key}'")
            metadata[key], types[key] = self._read_value(vtype, f"metadata key '{key}'", 0)
        return metadata, types

    def _read_value(
        self, vtype: int, what: str, depth: int
    ) -> tuple[object, tuple[GGUFValueType, ...]]:
        code = _FIXED_CODES.get(vtype)
        if code is not None:
            fmt = "<" + code
            start = self._take(struct.calcsize(fmt), what)
            if vtype == GGUFValueType.BOOL and self.buf[start] > 1:
                raise GGUFError(f"{what} holds the invalid bool byte {self.buf[start]}")
            return struct.unpack_from(fmt, self.buf, start)[0], (GGUFValueType(vtype),)
        if vtype == GGUFValueType.STRING:
            return self._string(what), (GGUFValueType.STRING,)
        if vtype == GGUFValueType.ARRAY:
            return self._read_array(what, depth)
        raise GGUFError(f"{what} has unknown value type {vtype}")

    def _read_array(self, what: str, depth: int) -> tuple[list[object], tuple[GGUFValueType, ...]]:
        if depth >= MAX_ARRAY_NESTING:
            raise GGUFError(f"{what} nests arrays more than {MAX_ARRAY_NESTING} deep")
        etype = self._u32(f"the element type of {what}")
        count = self._u64(f"the element count of {what}")
        code = _FIXED_CODES.get(etype)
        if code is not None:
            min_size = struct.calcsize("<" + code)
        elif etype == GGUFValueType.STRING:
            min_size = _MIN_STRING_BYTES
        elif etype == GGUFValueType.ARRAY:
            min_size = _MIN_ARRAY_BYTES
        else:
            raise GGUFError(f"{what} is an array of unknown value type {etype}")
        left = self.size - self.pos
        if count * min_size > left:
            raise GGUFError(
                f"truncated file: {what} claims {count} elements, more than the {left} bytes "
                "left in the file can hold"
            )
        if count > self.elements_left:
            raise GGUFError(
                f"{what}: the metadata arrays hold more than {MAX_METADATA_ELEMENTS} elements "
                "in all, more than any model needs"
            )
        self.elements_left -= count
        element = GGUFValueType(etype)
        if code is not None:
            return self._fixed_array(code, element, count, what), (GGUFValueType.ARRAY, element)
        if element == GGUFValueType.STRING:
            return self._string_array(count, what), (GGUFValueType.ARRAY, element)
        items: list[object] = [
            self._read_array(f"element {i} of {what}", depth + 1)[0] for i in range(count)
        ]
        return items, (GGUFValueType.ARRAY, GGUFValueType.ARRAY)

    def _fixed_array(
        self, code: str, element: GGUFValueType, count: int, what: str
    ) -> list[object]:
        dtype = np.dtype("<" + code)
        start = self._take(count * dtype.itemsize, what)
        data = self.buf[start : start + count * dtype.itemsize]
        if element == GGUFValueType.BOOL and data and max(data) > 1:
            raise GGUFError(f"{what} holds an invalid bool byte {max(data)}")
        values: list[object] = np.frombuffer(data, dtype=dtype).tolist()
        return values

    def _string_array(self, count: int, what: str) -> list[object]:
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        items: list[object] = []
        for i in range(count):
            if size - pos < 8:
                self.pos = pos
                self._take(8, f"the length of element {i} of {what}")
            n = unpack(buf, pos)[0]
            pos += 8
            if n > size - pos:
                self.pos = pos
                self._take(n, f"element {i} of {what}")
            try:
                items.append(buf[pos : pos + n].decode("utf-8"))
            except UnicodeDecodeError:
                raise GGUFError(f"element {i} of {what} is not valid UTF-8") from None
            pos += n
        self.pos = pos
        return items

    # -- tensor directory ------------------------------------------------------------------

    def _read_tensor_info(self, index: int) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string(f"the name of tensor {index}")
        if not name:
            raise GGUFError(f"tensor {index} has an empty name")
        if len(name.encode("utf-8")) > MAX_TENSOR_NAME_BYTES:
            raise GGUFError(f"tensor name '{name}' is longer than {MAX_TENSOR_NAME_BYTES} bytes")
        n_dims = self._u32(f"the dimension count of tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(
                f"tensor '{name}' has {n_dims} dimensions (1 to {MAX_DIMS} are allowed)"
            )
        dims = tuple(self._u64(f"the shape of tensor '{name}'") for _ in range(n_dims))
        if 0 in dims:
            raise GGUFError(f"tensor '{name}' has a zero dimension: shape {list(dims)}")
        type_id = self._u32(f"the type of tensor '{name}'")
        offset = self._u64(f"the data offset of tensor '{name}'")
        return name, dims, type_id, offset

    def _place_tensor(
        self,
        name: str,
        dims: tuple[int, ...],
        type_id: int,
        rel_offset: int,
        data_start: int,
        alignment: int,
    ) -> TensorInfo:
        fmt = TENSOR_FORMATS.get(type_id) or INDEX_TENSOR_FORMATS.get(type_id)
        if fmt is None:
            try:
                GGMLQuantizationType(type_id)
            except ValueError:
                raise GGUFError(f"tensor '{name}' has unknown type id {type_id}") from None
            supported = ", ".join(f.name for f in TENSOR_FORMATS.values())
            raise UnsupportedModelError(
                f"tensor '{name}' has type {type_name(type_id)}, which pygemma4 cannot compute "
                f"with (supported: {supported})"
            )
        if dims[0] % fmt.block_size:
            raise GGUFError(
                f"tensor '{name}' of type {fmt.name} has rows of {dims[0]} elements, not a "
                f"multiple of its block size {fmt.block_size}"
            )
        n_elements = 1
        for d in dims:
            n_elements *= d
        nbytes = n_elements // fmt.block_size * fmt.block_bytes
        if rel_offset % alignment:
            raise GGUFError(
                f"data offset {rel_offset} of tensor '{name}' is not a multiple of the "
                f"alignment {alignment}"
            )
        start = data_start + rel_offset
        if start >= self.size:
            raise GGUFError(
                f"data offset of tensor '{name}' points outside the file "
                f"(byte {start}, the file has {self.size})"
            )
        if nbytes > self.size - start:
            raise GGUFError(
                f"truncated file: data of tensor '{name}' ({nbytes} bytes at offset {start}) "
                f"extends past the end of the file ({self.size} bytes)"
            )
        return TensorInfo(name, type_id, dims, start, nbytes)


def _alignment(metadata: dict[str, object], types: dict[str, tuple[GGUFValueType, ...]]) -> int:
    key = "general.alignment"
    if key not in metadata:
        return DEFAULT_ALIGNMENT
    if types[key] != (GGUFValueType.UINT32,):
        raise GGUFError(f"{key} must be a UINT32, found {describe_type(types[key])}")
    value = metadata[key]
    assert isinstance(value, int)
    if value <= 0 or value & (value - 1):
        raise GGUFError(f"{key} is {value}, not a power of two")
    return value


def describe_type(signature: tuple[GGUFValueType, ...]) -> str:
    """A readable name for a metadata type signature, as GGUFFile.metadata_types holds them."""
    if signature[0] == GGUFValueType.ARRAY:
        return f"an array of {signature[1].name}"
    return signature[0].name


def _check_no_overlap(tensors: Iterable[TensorInfo]) -> None:
    ordered = sorted(tensors, key=lambda t: (t.offset, t.name))
    for prev, cur in zip(ordered, ordered[1:], strict=False):
        if cur.offset < prev.offset + prev.nbytes:
            raise GGUFError(
                f"data of tensors '{prev.name}' and '{cur.name}' overlap "
                f"(bytes {prev.offset}..{prev.offset + prev.nbytes} and "
                f"{cur.offset}..{cur.offset + cur.nbytes})"
            )
