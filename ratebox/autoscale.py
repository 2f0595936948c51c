"""How many workers the backlog asks for: a pure decision over recent samples, no I/O.

The signal is the group's backlog (entries not yet delivered, summed over partitions) plus the
entries pending (delivered, not yet acknowledged): both are work no worker has finished. One
worker is meant to carry ``lag_per_worker`` of it.

- Up at once, but not on one sample: the wish must hold for two samples in a row, so a burst
  that the running workers swallow within one interval does not count as a trend.
- Down only when every wish of the last ``scale_down_after_s`` was lower (the stabilization
  window Kubernetes uses) and the backlog did not grow over that window, one worker per sample.
  The window is over the wishes themselves, not counted from the last scale-up (Celery's
  keep-alive), so work that keeps arriving keeps the workers it needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    """The ``workers.autoscale`` settings the decision needs."""

    min: int
    max: int
    lag_per_worker: int
    scale_down_after_s: float


@dataclass(frozen=True)
class Sample:
    """One look at the group: when, entries not yet delivered, entries delivered not acked."""

    at: float
    backlog: int | None  # None: Redis could not say this time
    pending: int


@dataclass(frozen=True)
class Decision:
    """The count wanted, and why it changed (None when it stays)."""

    count: int
    reason: str | None = None


def wish(sample: Sample, policy: Policy) -> int | None:
    """Workers this one sample asks for, within [min, max]; None when the backlog is unknown."""
    if sample.backlog is None:
        return None
    work = sample.backlog + sample.pending
    return min(max(math.ceil(work / policy.lag_per_worker), policy.min), policy.max)


def decide(samples: Sequence[Sample], current: int, policy: Policy) -> Decision:
    """The count wanted after the newest sample (samples oldest first)."""
    clamped = min(max(current, policy.min), policy.max)
    if clamped != current:
        return Decision(clamped, f"outside autoscale bounds {policy.min}..{policy.max}")
    if not samples:
        return Decision(current)
    newest = samples[-1]
    wishes = [(s, wish(s, policy)) for s in samples]
    last_two = [w for _, w in wishes[-2:]]
    if len(last_two) == 2 and None not in last_two:
        up = min(w for w in last_two if w is not None)
        if up > current:
            return Decision(up, _reason(newest, current, up, policy))
    since = newest.at - policy.scale_down_after_s
    window = [(s, w) for s, w in wishes if s.at >= since]
    # Down needs a full window of known wishes, every one of them below the current count, and
    # a backlog that did not grow over it: work arriving faster than it drains keeps workers.
    if samples[0].at > since or any(w is None or w >= current for _, w in window):
        return Decision(current)
    if _work(window[-1][0]) > _work(window[0][0]):
        return Decision(current)
    return Decision(current - 1, _reason(newest, current, current - 1, policy))


def _work(sample: Sample) -> int:
    return (sample.backlog or 0) + sample.pending


def _reason(sample: Sample, current: int, wanted: int, policy: Policy) -> str:
    work = _work(sample)
    if wanted > current:
        return (
            f"backlog {work:,} for {current} workers > {policy.lag_per_worker:,} each: "
            f"{current} → {wanted}"
        )
    return (
        f"backlog {work:,} for {current} workers, below {policy.lag_per_worker:,} each for "
        f"{policy.scale_down_after_s:g} s: {current} → {wanted}"
    )
