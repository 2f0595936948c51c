"""The current rate: what a burst of the last seconds looks like, whatever came before."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ratebox.rate import WINDOW_S, RateWindow

gaps = st.lists(st.floats(min_value=0.1, max_value=3.0), min_size=2, max_size=60)


@given(gaps, st.integers(min_value=0, max_value=50_000))
def test_a_steady_counter_reads_its_own_rate_over_about_ten_seconds(gaps, per_s) -> None:
    window, at = RateWindow(), 0.0
    for gap in gaps:
        at += gap
        window.add(at, int(at * per_s))
    rate = window.rate()
    assert rate is not None and abs(rate - per_s) <= per_s * 0.05 + 2
    # Never much older than the window: one sample before it at most.
    assert window.span_s() < WINDOW_S + 3.0


@given(st.integers(min_value=1, max_value=1_000_000), st.integers(min_value=60, max_value=600))
def test_a_burst_after_a_quiet_spell_is_not_hidden(burst, quiet_s) -> None:
    window = RateWindow()
    for second in range(quiet_s):  # a long quiet spell, sampled every 2 s
        if second % 2 == 0:
            window.add(float(second), 1_000)
    window.add(quiet_s + 2.0, 1_000 + burst)  # then the burst within one refresh
    rate = window.rate()
    assert rate is not None and rate >= burst / (WINDOW_S + 2.0)


def test_one_sample_has_no_rate_and_a_counter_that_went_back_starts_over() -> None:
    window = RateWindow()
    window.add(0.0, 100)
    assert window.rate() is None
    window.add(2.0, 300)
    assert window.rate() == 100.0
    window.add(4.0, 50)  # the totals were reset
    assert window.rate() is None
    window.add(6.0, 250)
    assert window.rate() == 100.0
