"""The bounds every chat template render stays within.

A model file's chat template is code that runs on every chat request, so a hostile file must not
be able to take the process's time or memory. Each render may take at most `RENDER_SECONDS`,
create values of at most `ALLOCATION_BYTES` in all (every string, list or number the template
computes counts, also when it is dropped again), nest calls (macros calling macros, recursive
loops) at most `CALL_DEPTH` deep, compute integers of at most `INTEGER_BITS` bits, and produce at
most `OUTPUT_CHARACTERS` of text; a template source may be at most `SOURCE_CHARACTERS` long.
Going past any of them fails the render with a `ChatTemplateLimitError` naming the limit.
"""

from __future__ import annotations

RENDER_SECONDS = 1.5
"""Wall-clock time one render may take."""

ALLOCATION_BYTES = 128 * 2**20
"""Bytes of values one render may create, counted as they are created."""

OUTPUT_CHARACTERS = 8 * 2**20
"""Characters of text one render (or any block or macro inside it) may produce."""

CALL_DEPTH = 64
"""How deep calls may nest: a macro calling itself, a recursive loop."""

INTEGER_BITS = 2**16
"""Bits of the largest integer a template may compute (with `*` or `**`)."""

SOURCE_CHARACTERS = 2**20
"""Characters of the largest chat template source that is compiled."""
