"""Paged KV memory on the Python side: a pool's dimensions, and which sequence owns what.

The core's `KvPool` stores keys and values in blocks of `block_size` positions. A sequence keeps
its full-attention KV in the blocks its block table lists (position p in block `table[p //
block_size]`), and its sliding-window KV in a ring of `ring_blocks` blocks: its ring set. The
model holds no sequence state; each forward call brings the tables. So one process can own a
`BlockAllocator`, reserve blocks for its sequences, and send their tables to other processes that
run the model over the same pool memory (a shared mapping).

Entries are stored as one of `KV_DTYPES` (the pool's `kv_dtype`); attention converts them to
float as it reads them.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pygemma4 import _core
from pygemma4.config import ModelConfig
from pygemma4.errors import Gemma4Error, require_positive

DEFAULT_BLOCK_SIZE = 16

KV_DTYPES: dict[str, int] = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8}
"""The types KV entries can be stored as, by name, with their GGUF type ids (the core's).
q8_0 is blocks of 32 entries with an f16 scale, as in GGUF files."""

_BLOCK_BYTES = {"f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34)}
"""Entries per block, and bytes per block, of each KV type."""


# The core counts blocks in 32-bit integers.
_MAX_BLOCKS = 2**31 - 1


class KvExhaustedError(Gemma4Error, RuntimeError):
    """The pool has fewer free blocks or ring sets than were asked for."""


class KvDtypeError(Gemma4Error, ValueError):
    """A KV entry type that is not one of KV_DTYPES, or that the backend does not store."""


def default_kv_dtype(backend: str) -> str:
    """The KV entry type used where none is given: f16 on the CPU (as llama.cpp), f32 on CUDA
    (the only type its kernels read)."""
    return "f32" if backend == "cuda" else "f16"


def resolve_kv_dtype(kv_dtype: str | None, backend: str) -> str:
    """`kv_dtype`, or the backend's default for None; KvDtypeError, naming the accepted values,
    for any other name, and for another type than f32 on CUDA."""
    if kv_dtype is None:
        return default_kv_dtype(backend)
    if kv_dtype not in KV_DTYPES:
        raise KvDtypeError(f"unknown KV type {kv_dtype!r}: expected one of {', '.join(KV_DTYPES)}")
    if backend == "cuda" and kv_dtype != "f32":
        raise KvDtypeError(
            f"the CUDA backend stores KV entries as f32 only, not {kv_dtype!r}: "
            "use --kv-dtype f32 (kv_dtype='f32') with --backend cuda"
        )
    return kv_dtype


def kv_row_bytes(kv_dtype: str, n_entries: int) -> int:
    """Bytes of `n_entries` KV entries (a whole number of blocks) of type `kv_dtype`."""
    per_block, block_bytes = _BLOCK_BYTES[kv_dtype]
    return n_entries // per_block * block_bytes


@dataclass(frozen=True)
class KvFootprint:
    """What one position costs in a model's KV pool, by layer kind, from the model's shapes and
    the entry type: K and V rows of every KV-owning layer (layers sharing another's KV cost
    nothing). Full-attention layers cost this per position of a sequence; sliding-window layers
    per position of a ring."""

    kv_dtype: str
    full_layers: int
    sliding_layers: int
    full_bytes_per_token: int
    sliding_bytes_per_token: int

    @classmethod
    def of(cls, config: ModelConfig, kv_dtype: str) -> KvFootprint:
        """The footprint of `config`'s KV-owning layers with entries of `kv_dtype`."""
        full = sliding = full_bytes = sliding_bytes = 0
        for layer in config.layers:
            if not layer.has_kv:
                continue
            row = 2 * kv_row_bytes(kv_dtype, layer.n_head_kv * layer.head_dim)  # K and V
            if layer.is_sliding:
                sliding, sliding_bytes = sliding + 1, sliding_bytes + row
            else:
                full, full_bytes = full + 1, full_bytes + row
        return cls(kv_dtype, full, sliding, full_bytes, sliding_bytes)

    def predicted_bytes(self, layout: KvLayout) -> int:
        """The pool's size by these numbers: every full-attention block and every ring
        position (the core adds at most 63 bytes of alignment per store)."""
        full_positions = layout.n_blocks * layout.block_size
        ring_positions = layout.n_ring_sets * layout.ring_blocks * layout.block_size
        return (
            self.full_bytes_per_token * full_positions
            + self.sliding_bytes_per_token * ring_positions
        )

    def describe(self, layout: KvLayout) -> str:
        """The prediction for `layout`, by layer kind, in words."""
        full_positions = layout.n_blocks * layout.block_size
        ring_positions = layout.ring_blocks * layout.block_size
        return (
            f"KV entries {self.kv_dtype}: {self.full_layers} full-attention layers "
            f"{self.full_bytes_per_token} bytes per token x {full_positions} positions = "
            f"{self.full_bytes_per_token * full_positions / 2**30:.2f} GiB; "
            f"{self.sliding_layers} sliding-window layers {self.sliding_bytes_per_token} "
            f"bytes per token x {layout.n_ring_sets} rings of {ring_positions} positions = "
            f"{self.sliding_bytes_per_token * layout.n_ring_sets * ring_positions / 2**30:.2f} "
            f"GiB; predicted {self.predicted_bytes(layout) / 2**30:.2f} GiB, "
            f"laid out {layout.nbytes / 2**30:.2f} GiB"
        )


@dataclass(frozen=True)
class KvLayout:
    """The dimensions of a KV pool, its entries' type (`kv_dtype`, one of KV_DTYPES; f32
    unless asked), and the bytes it lays out (`nbytes`, the core's figure)."""

    block_size: int
    n_blocks: int
    n_ring_sets: int
    ring_blocks: int
    nbytes: int
    kv_dtype: str = "f32"

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        n_ctx: int,
        max_sequences: int,
        max_chunk: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        n_blocks: int | None = None,
        kv_dtype: str = "f32",
    ) -> KvLayout:
        """A layout for `max_sequences` sequences (one ring set each) of up to `n_ctx` positions,
        fed at most `max_chunk` tokens per forward call, with entries of `kv_dtype`.

        By default there are blocks for every sequence to reach `n_ctx`; the rings are the
        smallest that the core accepts a chunk of `max_chunk` tokens into at any position.
        """
        for name, value in (
            ("n_ctx", n_ctx),
            ("max_sequences", max_sequences),
            ("max_chunk", max_chunk),
            ("block_size", block_size),
        ):
            require_positive(name, value)
        blocks_per_sequence = _ceil_div(n_ctx, block_size)
        if n_blocks is None:
            n_blocks = max_sequences * blocks_per_sequence
        require_positive("n_blocks", n_blocks)
        ring_blocks = 1
        if any(layer.is_sliding and layer.has_kv for layer in config.layers):
            # A chunk's rows attend back to sliding_window - 1 positions before its first one, and
            # every block from there to its last row needs a place of its own in the ring. A span
            # of `span` positions touches the most blocks when it starts on a block's last row.
            # No ring needs more blocks than n_ctx positions fill: it then never wraps.
            span = config.sliding_window + max_chunk - 1
            ring_blocks = min((span + block_size - 2) // block_size + 1, blocks_per_sequence)
        return cls.of(config, block_size, n_blocks, max_sequences, ring_blocks, kv_dtype)

    @classmethod
    def for_memory(
        cls,
        config: ModelConfig,
        budget_bytes: int,
        max_sequences: int,
        max_chunk: int,
        max_positions: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        kv_dtype: str = "f32",
    ) -> KvLayout:
        """The layout of `for_model` with as many full-attention blocks of `kv_dtype` entries
        as `budget_bytes` holds beside the rings of `max_sequences` sequences, up to
        `max_positions` positions in all; KvExhaustedError, with the numbers, where the rings
        leave no room for one block."""
        capped = _ceil_div(max_positions, block_size)
        one = cls.for_model(
            config, max_positions, max_sequences, max_chunk, block_size, 1, kv_dtype
        )
        per_block = block_size * KvFootprint.of(config, kv_dtype).full_bytes_per_token
        n_blocks = min(capped, 1 + max(0, budget_bytes - one.nbytes) // max(1, per_block))
        layout = cls.of(config, block_size, n_blocks, one.n_ring_sets, one.ring_blocks, kv_dtype)
        while layout.nbytes > budget_bytes and n_blocks > 1:  # alignment padding
            n_blocks -= 1
            layout = cls.of(
                config, block_size, n_blocks, one.n_ring_sets, one.ring_blocks, kv_dtype
            )
        if layout.nbytes > budget_bytes:
            raise KvExhaustedError(
                f"a KV budget of {budget_bytes} bytes holds no block of {block_size} positions "
                f"beside the sliding-window rings of {max_sequences} sequences "
                f"({one.nbytes - per_block} bytes)"
            )
        return layout

    @classmethod
    def of(
        cls,
        config: ModelConfig,
        block_size: int,
        n_blocks: int,
        n_ring_sets: int,
        ring_blocks: int,
        kv_dtype: str = "f32",
    ) -> KvLayout:
        """The layout of these dimensions and entry type for a model of `config` (its `nbytes`
        from the core); KvDtypeError for an unknown `kv_dtype`, KvExhaustedError for dimensions
        past what the core addresses."""
        kv_dtype = resolve_kv_dtype(kv_dtype, "cpu")
        for name, value in (("blocks", n_blocks), ("ring blocks", ring_blocks)):
            if value > _MAX_BLOCKS:
                raise KvExhaustedError(
                    f"a KV pool of {value} {name} of {block_size} positions is more than the "
                    f"core addresses ({_MAX_BLOCKS}); ask for a smaller context or pool"
                )
        nbytes = _core.KvPool.bytes_needed(
            config, block_size, n_blocks, n_ring_sets, ring_blocks, KV_DTYPES[kv_dtype]
        )
        return cls(block_size, n_blocks, n_ring_sets, ring_blocks, nbytes, kv_dtype)

    def blocks_for(self, n_positions: int) -> int:
        """How many full-attention blocks hold `n_positions` positions of a sequence."""
        return _ceil_div(n_positions, self.block_size)

    def new_pool(
        self,
        config: ModelConfig,
        buffer: object = None,
        device: int = -1,
        ipc_handle: bytes | None = None,
    ) -> _core.KvPool:
        """A pool of this layout for a model of `config`: in `buffer` (any writable buffer of
        at least `nbytes` bytes, such as an mmap of shared memory), or in memory of its own,
        on CUDA device `device` where that is >= 0 (the pool another process exported, given
        its `ipc_handle`); KvExhaustedError where its memory cannot be had."""
        try:
            return _core.KvPool(
                config,
                self.block_size,
                self.n_blocks,
                self.n_ring_sets,
                self.ring_blocks,
                buffer,
                device,
                ipc_handle,
                KV_DTYPES[self.kv_dtype],
            )
        except RuntimeError as e:
            if not str(e).startswith("cannot allocate"):
                raise
            raise KvExhaustedError(f"{e}; ask for a smaller context or pool") from None


class _IdPool:
    """Ids 0..n-1 handed out lowest first and taken back, each at most once."""

    def __init__(self, n: int, what: str) -> None:
        self._what = what
        self._free = list(range(n - 1, -1, -1))  # taken from the end
        self._free_set = set(self._free)
        self._n = n

    @property
    def n_free(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int]:
        if count > len(self._free):
            raise KvExhaustedError(
                f"{count} {self._what}s wanted, {len(self._free)} of {self._n} free"
            )
        ids = self._free[len(self._free) - count :][::-1]
        del self._free[len(self._free) - count :]
        self._free_set.difference_update(ids)
        return ids

    def give_back(self, ids: list[int]) -> None:
        for i in ids:
            if not (isinstance(i, int) and 0 <= i < self._n):
                raise ValueError(f"{i!r} is not a {self._what} id of this pool")
        if len(set(ids)) != len(ids) or not self._free_set.isdisjoint(ids):
            raise ValueError(f"{self._what} freed twice")
        self._free.extend(reversed(ids))
        self._free_set.update(ids)


class BlockAllocator:
    """Hands out a pool's full-attention blocks and ring sets, and takes them back.

    A block handed out may be registered under the hash of the tokens it holds (see
    `prefix_cache`): it is then shared, read-only, by every sequence that looks it up, and once
    none uses it, it stays cached until its place is needed, least recently used first."""

    def __init__(self, layout: KvLayout) -> None:
        self.layout = layout
        self._blocks = _IdPool(layout.n_blocks, "KV block")
        self._ring_sets = _IdPool(layout.n_ring_sets, "ring set")
        self._users: dict[int, int] = {}
        """Registered blocks in use: how many sequences hold each."""
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()
        """Registered blocks no sequence holds, least recently used first."""

    @property
    def free_blocks(self) -> int:
        """Blocks that can be handed out (unused ones, and cached ones no sequence holds)."""
        return self._blocks.n_free + len(self._idle)

    @property
    def cached_blocks(self) -> int:
        """Registered blocks, in use or not."""
        return len(self._hash_of)

    @property
    def free_ring_sets(self) -> int:
        """Ring sets not handed out (one per sequence)."""
        return self._ring_sets.n_free

    def can_allocate(self, n_blocks: int) -> bool:
        """Whether `allocate(n_blocks)` would succeed."""
        return n_blocks <= self.free_blocks

    def allocate(self, n_blocks: int) -> list[int]:
        """`n_blocks` block ids (unused ones first, then the least recently used cached ones,
        forgotten); KvExhaustedError when fewer are free."""
        if n_blocks > self.free_blocks:
            raise KvExhaustedError(
                f"{n_blocks} KV blocks wanted, {self.free_blocks} of {self.layout.n_blocks} free"
            )
        evicted = max(0, n_blocks - self._blocks.n_free)
        for _ in range(evicted):
            block, _ = self._idle.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
            self._blocks.give_back([block])
        return self._blocks.take(n_blocks)

    def free(self, block_ids: Iterable[int]) -> None:
        """Take blocks back (a registered one stays cached until no sequence holds it);
        ValueError (freeing none of them) for an id that is not this pool's or not handed
        out."""
        ids = list(block_ids)
        private = [b for b in ids if b not in self._hash_of]
        shared = Counter(b for b in ids if b in self._hash_of)
        if any(self._users.get(b, 0) < n for b, n in shared.items()):
            raise ValueError("KV block freed twice")
        self._blocks.give_back(private)
        for block, n in shared.items():
            self._users[block] -= n
            if self._users[block] == 0:
                del self._users[block]
                self._idle[block] = None

    def register(self, block: int, block_hash: bytes) -> None:
        """Record that `block`, handed out and full, holds the tokens `block_hash` names, so
        that later sequences can share it (nothing changes where another block holds them, or
        where the block is registered already)."""
        if block_hash in self._by_hash or block in self._hash_of:
            return
        self._by_hash[block_hash] = block
        self._hash_of[block] = block_hash
        self._users[block] = 1  # its owner's hold

    def share(self, block_hashes: Sequence[bytes]) -> list[int]:
        """The blocks of the longest run of `block_hashes`, from the first, that are cached,
        each now held once more (free them as any other)."""
        blocks = []
        for block_hash in block_hashes:
            block = self._by_hash.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            self._idle.pop(block, None)
            self._users[block] = self._users.get(block, 0) + 1
        return blocks

    def allocate_ring_set(self) -> int:
        """A ring set id; KvExhaustedError when none is free."""
        return self._ring_sets.take(1)[0]

    def free_ring_set(self, ring_set: int) -> None:
        """Take a ring set back; ValueError when it is not this pool's or not handed out."""
        self._ring_sets.give_back([ring_set])


class SequenceKv:
    """One sequence's place in the pool: a ring set, a block table (block ids, position p in
    `block_table[p // block_size]`) grown on demand, and how many positions it holds.

    With an allocator the sequence owns its place, a ring set taken from it and blocks as it
    grows. Without one it writes into `block_table` and `ring_set` of a place another process
    owns (holding `length` positions already), which it can neither grow nor release."""

    def __init__(
        self,
        allocator: BlockAllocator | None = None,
        *,
        block_table: Iterable[int] = (),
        ring_set: int = -1,
        length: int = 0,
    ) -> None:
        self.allocator = allocator
        self.ring_set = ring_set if allocator is None else allocator.allocate_ring_set()
        self.block_table: list[int] = list(block_table)
        self.length = length
        """Positions of the sequence in the pool."""
        self.written_end = length
        """One past the furthest position ever written (rolled-back ones included): what the
        sliding-window rings may have overwritten."""
        self._released = False

    def advance(self, n_positions: int) -> None:
        """Count `n_positions` more positions as written after the last."""
        self.length += n_positions
        self.written_end = max(self.written_end, self.length)

    def ensure(self, n_positions: int) -> None:
        """Grow the block table to hold `n_positions` positions (KvExhaustedError, taking no
        blocks, when the allocator has too few). Without an allocator the table is its owner's
        to size: the core refuses a call that writes past it."""
        if self._released:
            raise Gemma4Error("the sequence's KV was released")
        if self.allocator is None:
            return
        missing = self.allocator.layout.blocks_for(n_positions) - len(self.block_table)
        if missing > 0:
            self.block_table.extend(self.allocator.allocate(missing))

    def release(self, keep_ring_set: bool = False) -> None:
        """Give the blocks and the ring set back to the allocator (once; later calls do
        nothing); with `keep_ring_set`, the caller keeps the ring set (to free later)."""
        if not self._released:
            self._released = True
            if self.allocator is not None:
                self.allocator.free(self.block_table)
                if not keep_ring_set:
                    self.allocator.free_ring_set(self.ring_set)
            self.block_table = []

    def table_array(self, width: int) -> np.ndarray:
        """The block table as int32 [width], padded with -1 (no block)."""
        if width < len(self.block_table):
            raise ValueError(f"a table of width {width} cannot hold {len(self.block_table)} blocks")
        table = np.full(width, -1, dtype=np.int32)
        table[: len(self.block_table)] = self.block_table
        return table


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
