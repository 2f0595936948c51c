"""Processing-time histogram buckets: fixed bounds, counted per batch, served cumulatively."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

#: Upper bounds in milliseconds. Judging one item takes microseconds, a slow batch write
#: shows as milliseconds. Fixed for good: stream_consumer_stats.processing_buckets holds one
#: count per bound plus one for "above the last", by position.
BOUNDS_MS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 50.0, 100.0, 1000.0,
)  # fmt: skip


def bucket_of(ms: float) -> int:
    """Index of the bucket holding ms: the first bound not below it, or the overflow one."""
    return bisect_left(BOUNDS_MS, ms)


def counts(values_ms: Iterable[float]) -> list[int]:
    """Per-bucket (not cumulative) counts of values, len(BOUNDS_MS) + 1 of them."""
    out = [0] * (len(BOUNDS_MS) + 1)
    for ms in values_ms:
        out[bisect_left(BOUNDS_MS, ms)] += 1
    return out


def cumulative(per_bucket: Sequence[int]) -> list[tuple[str, float]]:
    """Prometheus buckets: (le in seconds as text, cumulative count), ending with +Inf.

    A shorter array (rows written before the column existed, or never) counts as zeros.
    """
    padded = list(per_bucket[: len(BOUNDS_MS) + 1])
    padded += [0] * (len(BOUNDS_MS) + 1 - len(padded))
    out, running = [], 0
    for bound, n in zip((*BOUNDS_MS, None), padded, strict=True):
        running += n
        out.append(("+Inf" if bound is None else _le(bound), float(running)))
    return out


def _le(bound_ms: float) -> str:
    return repr(round(bound_ms / 1000, 9))
