"""Prefix reuse: a sequence that begins with tokens an earlier sequence computed takes their KV
instead of computing it again.

Full-attention KV lives in blocks of `block_size` positions. A full block is named by a hash of
its tokens chained to the hash of the block before it, so equal names mean equal prefixes; it is
registered with the allocator once written, shared read-only by every sequence that looks it up,
and evicted least recently used once no sequence holds it (`BlockAllocator`). Chained hashes
rather than a radix tree: only whole blocks can be shared anyway, a lookup is one dictionary probe
per block, and the names mean the same in every process that knows the tokens.

Sliding-window layers keep only a ring of recent positions per sequence (its ring set), which no
other sequence can share, since its owner goes on overwriting it. So the cache also keeps
snapshots: ring sets of finished sequences, and copies of rings taken after long prompts, each
with the names of the blocks its sequence held. A sequence continuing a cached prefix up to a
block boundary takes the full blocks before the boundary and a copy of a snapshot's ring that
still holds the window before it, and computes from the boundary on.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pygemma4.config import ModelConfig
from pygemma4.kv import BlockAllocator, SequenceKv

SNAPSHOT_AFTER_PROMPT_TOKENS = 256
"""Prompts at least this long have their ring copied once computed, for other sequences that
share them (shorter ones are cheap to compute again)."""


@dataclass(frozen=True)
class MediaKey:
    """Positions [offset, offset + length) of a prompt hold the embeddings of the media whose
    content `digest` names (an image's or a clip's soft tokens): equal tokens there are not
    equal KV. With `bidirectional` they attend to each other in both directions, so a
    sequence never continues a cached prefix from inside them (the rest of them would need
    to see their first positions past the sliding window, which the ring no longer holds)."""

    offset: int
    length: int
    digest: str
    bidirectional: bool = False


def block_names(
    tokens: Sequence[int] | np.ndarray, block_size: int, media: Sequence[MediaKey] = ()
) -> list[bytes]:
    """The name of each full block of `tokens`: a hash of its tokens, and of the content of the
    media whose positions it holds, chained to the name of the block before."""
    ids = np.ascontiguousarray(tokens, dtype=np.int32)
    names, parent = [], b""
    for start in range(0, len(ids) - block_size + 1, block_size):
        stop = start + block_size
        content = b"".join(
            f"{m.digest}:{m.offset - start}:{m.length};".encode()
            for m in media
            if m.offset < stop and m.offset + m.length > start
        )
        parent = hashlib.blake2b(
            parent + ids[start:stop].tobytes() + content, digest_size=16
        ).digest()
        names.append(parent)
    return names


def _uncut_boundary(n_blocks: int, block_size: int, media: Sequence[MediaKey]) -> int:
    """The furthest block boundary at most `n_blocks` that lies inside none of the
    bidirectional `media` (at its first position at the latest)."""
    boundary = n_blocks
    for m in sorted(media, key=lambda m: m.offset, reverse=True):
        if m.bidirectional and m.offset < boundary * block_size < m.offset + m.length:
            boundary = m.offset // block_size
    return boundary


@dataclass
class _Snapshot:
    """A ring set kept for its sliding-window rows: those of the sequence whose full blocks
    were `names`, written up to `written_end`."""

    names: list[bytes]
    written_end: int


@dataclass
class PrefixStats:
    """Prompt tokens looked up in the cache, and how many of them it held."""

    looked_up: int = 0
    hit: int = 0

    @property
    def hit_rate(self) -> float:
        """The share of looked-up tokens the cache held (0 before any)."""
        return self.hit / self.looked_up if self.looked_up else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"looked_up": self.looked_up, "hit": self.hit, "hit_rate": self.hit_rate}


class PrefixCache:
    """The cached prefixes of one KV pool, for the process that owns its allocator. It keeps
    up to `max_snapshots` ring sets (taken from the allocator's) as snapshots."""

    def __init__(
        self, allocator: BlockAllocator, pool: Any, config: ModelConfig, max_snapshots: int
    ) -> None:
        self.allocator = allocator
        self.pool = pool
        self.block_size = allocator.layout.block_size
        sliding = any(layer.is_sliding and layer.has_kv for layer in config.layers)
        self.window = config.sliding_window if sliding else 0
        self.max_snapshots = max_snapshots if sliding else 0
        self.snapshots: OrderedDict[int, _Snapshot] = OrderedDict()
        """Ring set → snapshot, least recently used first."""
        self.stats = PrefixStats()

    def new_sequence(
        self, tokens: Sequence[int] | np.ndarray, media: Sequence[MediaKey] = ()
    ) -> tuple[SequenceKv, int]:
        """A new sequence's KV holding the longest cached prefix of `tokens` (with `media` at
        its positions) that ends on a block boundary, and that prefix's length (its blocks
        shared, its sliding window copied in); KvExhaustedError where no ring set is free."""
        if self.allocator.free_ring_sets == 0 and self.snapshots:
            self.allocator.free_ring_set(self.snapshots.popitem(last=False)[0])
        kv = SequenceKv(self.allocator)
        names = block_names(tokens, self.block_size, media)
        blocks = self.allocator.share(names)
        boundary, ring_set = _uncut_boundary(len(blocks), self.block_size, media), None
        if self.window:
            boundary, ring_set = self._snapshot_for(names, boundary, media)
        self.allocator.free(blocks[boundary:])
        if ring_set is not None:
            self.pool.copy_ring_set(ring_set, kv.ring_set)
            self.snapshots.move_to_end(ring_set)
        kv.block_table = blocks[:boundary]
        kv.advance(boundary * self.block_size)
        self.stats.looked_up += len(tokens)
        self.stats.hit += kv.length
        return kv, kv.length

    def _snapshot_for(
        self, names: list[bytes], n_blocks: int, media: Sequence[MediaKey]
    ) -> tuple[int, int | None]:
        """The furthest boundary (in blocks, at most `n_blocks`, inside none of the
        bidirectional `media`) with a snapshot that holds the window before it, and that
        snapshot's ring set (0 and None where there is none)."""
        ring_positions = self.pool.ring_blocks * self.block_size
        for boundary in range(n_blocks, 0, -1):
            if _uncut_boundary(boundary, self.block_size, media) != boundary:
                continue
            start = boundary * self.block_size
            oldest_needed = max(0, start - self.window + 1)
            for ring_set, snapshot in reversed(self.snapshots.items()):
                if (
                    len(snapshot.names) < boundary
                    or snapshot.names[boundary - 1] != names[boundary - 1]
                ):
                    continue
                # The ring holds the blocks of the last `ring_blocks` written.
                last_block = (snapshot.written_end - 1) // self.block_size
                if (
                    oldest_needed // self.block_size
                    > last_block - ring_positions // self.block_size
                ):
                    return boundary, ring_set
        return 0, None

    def remember(
        self, kv: SequenceKv, tokens: Sequence[int] | np.ndarray, media: Sequence[MediaKey] = ()
    ) -> None:
        """Register the full blocks of `kv`, whose first positions hold `tokens` (and `media`),
        for later sequences; after a long prompt, also copy its ring as a snapshot."""
        names = self._register(kv, tokens, media)
        if self.max_snapshots and len(tokens) >= SNAPSHOT_AFTER_PROMPT_TOKENS:
            ring_set = self._spare_ring_set()
            if ring_set is not None:
                self.pool.copy_ring_set(kv.ring_set, ring_set)
                self.snapshots[ring_set] = _Snapshot(names, kv.written_end)

    def release(
        self, kv: SequenceKv, tokens: Sequence[int] | np.ndarray, media: Sequence[MediaKey] = ()
    ) -> None:
        """End a sequence whose first positions hold `tokens` (and `media`): its full blocks
        stay cached and its ring set becomes a snapshot (the least recently used one making
        way)."""
        names = self._register(kv, tokens, media)
        ring_set, written_end = kv.ring_set, kv.written_end
        keep = self.max_snapshots > 0 and bool(names)
        kv.release(keep_ring_set=keep)
        if keep:
            while len(self.snapshots) >= self.max_snapshots:
                self.allocator.free_ring_set(self.snapshots.popitem(last=False)[0])
            self.snapshots[ring_set] = _Snapshot(names, written_end)

    def _register(
        self, kv: SequenceKv, tokens: Sequence[int] | np.ndarray, media: Sequence[MediaKey]
    ) -> list[bytes]:
        """Register the full blocks of `kv` (its first positions holding `tokens` and
        `media`); their names."""
        names = block_names(np.asarray(tokens)[: kv.length], self.block_size, media)
        for block, name in zip(kv.block_table, names, strict=False):
            self.allocator.register(block, name)
        return names

    def _spare_ring_set(self) -> int | None:
        """A ring set for a new snapshot: a free one, or the least recently used snapshot's;
        None where neither is (every ring set runs a sequence)."""
        if len(self.snapshots) < self.max_snapshots and self.allocator.free_ring_sets > 1:
            return self.allocator.allocate_ring_set()
        if self.snapshots:
            return self.snapshots.popitem(last=False)[0]
        return None
