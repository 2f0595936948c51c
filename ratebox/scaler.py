"""The supervisor's autoscaling glue: sample the backlog now and then, ask ratebox.autoscale.

Each sample costs one XINFO GROUPS per partition (Redis 7 and Valkey report the lag there);
only a server without lag adds XINFO STREAM and a count that a LagCounter keeps cheap.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from ratebox import autoscale, config, route, stream
from ratebox.autoscale import Decision, Policy, Sample
from ratebox.config import Settings
from ratebox.stream_lag import LagCounter, group_backlog

log = logging.getLogger(__name__)

#: Samples are kept this much longer than the down window needs.
KEEP_EXTRA_S = 60.0


def policy_of(settings: Settings) -> Policy:
    """The decision's bounds and windows from ``workers.autoscale``."""
    return Policy(
        min=settings.get("workers.autoscale.min"),
        max=config.autoscale_max(settings.values),
        lag_per_worker=settings.get("workers.autoscale.lag_per_worker"),
        scale_down_after_s=settings.get("workers.autoscale.scale_down_after_s"),
    )


class Scaler:
    """Samples on its own clock and returns a Decision when one is due."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.samples: deque[Sample] = deque()
        self.counter = LagCounter()
        self.due = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.settings.get("workers.autoscale.enabled"))

    def reconfigure(self, settings: Settings) -> None:
        """After a reload: new bounds and windows apply to the samples already taken."""
        self.settings = settings

    def sample(self, client: Any, now: float) -> Sample:
        """The group's backlog and pending summed over the partitions."""
        backlog: int | None = 0
        pending = 0
        for name in route.stream_names(self.settings):
            lag, held = group_backlog(client, name, self.settings.stream.group, self.counter)
            backlog = None if backlog is None or lag is None else backlog + lag
            pending += held
        return Sample(now, backlog, pending)

    def step(self, client: Any, now: float, current: int) -> Decision | None:
        """A decision when a sample is due (None otherwise, or when Redis does not answer)."""
        if not self.enabled or now < self.due:
            return None
        self.due = now + self.settings.get("workers.autoscale.interval_s")
        try:
            self.samples.append(self.sample(client, now))
        except stream.OUTAGE_ERRORS as exc:
            log.debug("autoscale sample skipped: %s", stream.reason(exc))
            return None
        policy = policy_of(self.settings)
        while self.samples and self.samples[0].at < now - policy.scale_down_after_s - KEEP_EXTRA_S:
            self.samples.popleft()
        return autoscale.decide(list(self.samples), current, policy)
