"""The processing-time buckets: counted per batch, served cumulatively."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ratebox import buckets

times_ms = st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), max_size=200)


@given(times_ms)
def test_cumulative_counts_agree_with_every_bound(values: list[float]) -> None:
    served = buckets.cumulative(buckets.counts(values))
    assert served[-1] == ("+Inf", float(len(values)))
    for (le, count), bound in zip(served, buckets.BOUNDS_MS, strict=False):
        assert float(le) == bound / 1000
        assert count == sum(1 for v in values if v <= bound)


@given(times_ms, times_ms)
def test_counts_of_two_batches_add_up(first: list[float], second: list[float]) -> None:
    added = [a + b for a, b in zip(buckets.counts(first), buckets.counts(second), strict=True)]
    assert added == buckets.counts(first + second)


def test_a_short_or_empty_array_counts_as_zeros() -> None:
    assert buckets.cumulative([]) == [(le, 0.0) for le, _ in buckets.cumulative([0] * 15)]
    assert buckets.cumulative([2])[-1] == ("+Inf", 2.0)
    assert buckets.bucket_of(buckets.BOUNDS_MS[3]) == 3  # a value on a bound is "le" it
