"""Summaries of repeated measurements."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Spread:
    """Repeated measurements of one figure: their mean, sample standard deviation and count."""

    mean: float
    std: float
    runs: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        """The spread of `values` (at least one); one value has a standard deviation of 0."""
        if not values:
            raise ValueError("a spread needs at least one measurement")
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, len(values))

    def ratio(self, other: Spread) -> float:
        """This mean over `other`'s (nan where `other`'s is 0)."""
        return self.mean / other.mean if other.mean else math.nan

    def to_json(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "runs": self.runs}


@dataclass(frozen=True)
class Percentiles:
    """The 50th, 90th and 99th percentiles of a sample (linear interpolation), and its size."""

    p50: float
    p90: float
    p99: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles | None:
        """The percentiles of `values`, or None where there are none."""
        if not values:
            return None
        ordered = sorted(values)
        p50, p90, p99 = (_interpolated(ordered, q / 100) for q in PERCENTILES)
        return cls(p50, p90, p99, len(ordered))

    def to_json(self) -> dict[str, float | int]:
        return {"p50": self.p50, "p90": self.p90, "p99": self.p99, "count": self.count}


def _interpolated(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, interpolating between neighbours (numpy's default)."""
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)
