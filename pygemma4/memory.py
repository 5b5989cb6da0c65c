"""Host memory: how much is available, and the memory budgets users give as text (a size such
as `8GiB`, or a fraction of the memory available such as `0.5`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pygemma4.errors import Gemma4Error

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}  # fmt: skip


class MemoryBudgetError(Gemma4Error, ValueError):
    """A memory budget that is not a size or a fraction, or that cannot be resolved here."""


def memory_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where there is no such figure."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass  # not Linux, or not a figure: unknown
    return None


@dataclass(frozen=True)
class MemoryBudget:
    """A number of bytes, or a fraction (0, 1] of the memory available."""

    size: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str) -> MemoryBudget:
        """`8GiB`, `512MB`, `1073741824` (bytes), or `0.5` (of the memory available)."""
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
        if match is None or match.group(2).lower() not in _UNITS:
            raise MemoryBudgetError(
                f"{text!r} is not a memory size (such as 8GiB or 512MB) or a fraction (such as 0.5)"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
        if not unit and "." in match.group(1):
            if not 0 < number <= 1:
                raise MemoryBudgetError(
                    f"a fraction of the memory available must be in (0, 1], got {text!r}"
                )
            return cls(fraction=number)
        size = number * _UNITS[unit]
        if size < 1 or not math.isfinite(size):
            raise MemoryBudgetError(f"a memory size must be at least one byte, got {text!r}")
        return cls(size=int(size))

    def resolve(self, available: int | None) -> int:
        """The budget in bytes, given the memory `available` (None: unknown)."""
        if self.size is not None:
            return self.size
        assert self.fraction is not None
        if available is None:
            raise MemoryBudgetError(
                "the memory available is unknown here: give the budget as a size (such as 8GiB)"
            )
        return int(available * self.fraction)

    def __str__(self) -> str:
        return f"{self.size} bytes" if self.size is not None else f"{self.fraction} of available"
