"""The autoscale decision, hammered: bounds, no flapping, growth never cut, idle reaches min."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ratebox.autoscale import Decision, Policy, Sample, decide

INTERVAL = 5.0

policies = st.builds(
    lambda lo, span, per, down: Policy(lo, lo + span, per, down),
    st.integers(1, 4),
    st.integers(0, 12),
    st.integers(1, 20_000),
    st.sampled_from([10.0, 30.0, 300.0]),
)


def run(policy: Policy, start: int, backlogs: list[int | None], pending: int = 0) -> list[int]:
    """The count after each sample, the supervisor's way: every decision is carried out."""
    samples: list[Sample] = []
    count, counts = start, []
    for i, backlog in enumerate(backlogs):
        samples.append(Sample(i * INTERVAL, backlog, pending))
        # The supervisor keeps the samples of the longest window it needs.
        samples = [s for s in samples if s.at >= samples[-1].at - policy.scale_down_after_s - 60]
        count = decide(samples, count, policy).count
        counts.append(count)
    return counts


@given(policies, st.integers(1, 16), st.lists(st.none() | st.integers(0, 500_000), max_size=80))
def test_the_count_never_leaves_min_max(policy: Policy, start: int, backlogs: list) -> None:
    assert all(policy.min <= c <= policy.max for c in run(policy, start, backlogs))


@given(policies, st.integers(1, 16), st.integers(0, 500_000))
def test_a_constant_backlog_never_flaps(policy: Policy, start: int, backlog: int) -> None:
    start = min(max(start, policy.min), policy.max)  # a start outside the bounds is moved first
    counts = run(policy, start, [backlog] * 200)
    changes = [b - a for a, b in zip([start, *counts], counts, strict=False) if b != a]
    ups = [c for c in changes if c > 0]
    # At most one step up (straight to the wish), and never both directions.
    assert len(ups) <= 1
    assert not (ups and any(c < 0 for c in changes[changes.index(ups[0]) :]))
    # It settles: the last window sees no change.
    assert len(set(counts[-int(policy.scale_down_after_s / INTERVAL) - 1 :])) == 1


@given(policies, st.integers(1, 16), st.lists(st.integers(0, 5_000), min_size=2, max_size=80))
def test_a_growing_backlog_never_scales_down(policy: Policy, start: int, steps: list) -> None:
    backlogs, total = [], 0
    for step in steps:
        total += step
        backlogs.append(total)
    counts = run(policy, start, backlogs)
    bounded = min(max(start, policy.min), policy.max)
    assert all(b >= a for a, b in zip([bounded, *counts], counts, strict=False))


@given(policies, st.integers(1, 16), st.lists(st.integers(0, 500_000), max_size=40))
def test_idle_long_enough_always_reaches_min(policy: Policy, start: int, busy: list) -> None:
    quiet = int(policy.scale_down_after_s / INTERVAL) + 2 + 2 * (policy.max + 16)
    assert run(policy, start, [*busy, *([0] * quiet)])[-1] == policy.min


def test_the_reason_says_what_was_seen_and_what_changes() -> None:
    policy = Policy(1, 8, 5000, 300.0)
    samples = [Sample(0.0, 40_000, 0), Sample(5.0, 48_210, 0)]
    assert decide(samples, 4, policy) == Decision(
        8, "backlog 48,210 for 4 workers > 5,000 each: 4 → 8"
    )
    assert decide(samples[:1], 4, policy) == Decision(4)  # one sample is not a trend


def test_an_unknown_backlog_changes_nothing() -> None:
    policy = Policy(1, 8, 10, 10.0)
    samples = [Sample(i * 5.0, None, 0) for i in range(10)]
    assert decide(samples, 3, policy) == Decision(3)
