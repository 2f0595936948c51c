"""The current rate of a growing counter, from samples over the last few seconds.

Per-minute history hides a burst (100,000 messages in 3 s read as ~1,700 msg/s for the
minute); a rate over the last ~10 s of the totals the workers commit cannot.
"""

from __future__ import annotations

from collections import deque

#: The span the current rate is measured over.
WINDOW_S = 10.0


class RateWindow:
    """Samples (time, total) of a counter; rate() is the growth per second over ~WINDOW_S."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, at: float, total: int) -> None:
        """Record the counter's total at monotonic time `at`."""
        if self.samples and (total < self.samples[-1][1] or at <= self.samples[-1][0]):
            self.samples.clear()  # a reset counter (a new table, a restore): start over
        self.samples.append((at, total))
        # Keep one sample at or beyond the window's start, so the span covers the window.
        while len(self.samples) > 2 and at - self.samples[1][0] >= self.window_s:
            self.samples.popleft()

    def rate(self) -> float | None:
        """Growth per second between the oldest and newest sample; None before two samples."""
        if len(self.samples) < 2:
            return None
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0)

    def span_s(self) -> float:
        """Seconds between the oldest and newest sample."""
        return self.samples[-1][0] - self.samples[0][0] if len(self.samples) > 1 else 0.0
