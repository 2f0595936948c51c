"""One consumer: its own pending entries first, then new ones, one batch per loop turn.

Lifecycle in the huey shape: ``Worker(...)`` touches nothing, ``initialize()`` does the
post-fork setup, ``loop()`` does one batch (tests call it directly), ``run()`` ties them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ratebox import stream
from ratebox.config import Settings
from ratebox.pipeline import OUTAGE_ERRORS, Pipeline
from ratebox.role import Role
from ratebox.rules import Engine, compile_rules
from ratebox.stream import Entry

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Entries in hand: kept across an outage until committed and acknowledged."""

    entries: list[Entry]
    deliveries: dict[str, int] = field(default_factory=dict)
    #: Redelivered entries are processed in growing chunks from one, so a poison pill at the
    #: head of the list takes down only itself.
    suspect: bool = False


class Worker(Role):
    """A consumer of the group, named once and for all (its pending entries belong to the name)."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        redis_url: str,
        dsn: str,
        engine: Engine | None = None,
        beat: Callable[[], None] = lambda: None,
        parent_pid: int | None = None,
    ) -> None:
        self.title = f"worker {name}"
        super().__init__(beat, parent_pid)
        self.settings = settings
        self.name = name
        self.pipeline = Pipeline(
            settings, name, redis_url, dsn, engine or compile_rules(settings.rules)
        )
        self.cursor: str | None = "0"  # reading own pending history until it is exhausted
        self.batch: Batch | None = None
        self.group_ready = False
        self.processed = 0

    # -- lifecycle (the loop itself is Role.run) ------------------------------------------------

    def initialize(self) -> None:
        """Post-fork setup: signal handlers (connections open lazily in the loop)."""
        super().initialize()
        log.info(
            "started, reading %s as %s/%s",
            self.settings.stream.name,
            self.settings.stream.group,
            self.name,
        )

    def on_outage(self) -> None:
        """Drop both connections; the batch in hand is kept and retried."""
        self.pipeline.reset()

    def on_group_lost(self) -> None:
        """Start again from this name's pending entries once the group exists again."""
        self.cursor, self.group_ready, self.batch = "0", False, None

    def shutdown(self) -> None:
        """Close connections; whatever was not acknowledged stays pending for the next start."""
        log.info(
            "stopping after %d entries%s",
            self.processed,
            " (batch in hand stays pending)" if self.batch else "",
        )
        self.pipeline.reset()

    # -- sweeper: keep the batch in hand fresh during an outage ---------------------------------
    #: When the batch in hand is next touched (time.monotonic()).
    _touch_due = 0.0

    def outage_tick(self) -> None:
        """Beat, and keep the batch in hand from looking abandoned while an outage lasts."""
        self.beat()
        if self.batch is None or not self.batch.entries or time.monotonic() < self._touch_due:
            return
        # An outage is not the messages' fault: left idle, they would be claimed by the sweeper
        # with a delivery counted each time, and a long outage would dead-letter good messages.
        # XCLAIM JUSTID to ourselves resets their idle time without counting a delivery.
        self._touch_due = time.monotonic() + self.settings.sweeper.min_idle_ms / 4000
        s = self.settings
        ids = [entry_id for entry_id, _ in self.batch.entries]
        # Redis down as well is fine: then nobody can claim them either.
        with contextlib.suppress(*OUTAGE_ERRORS):
            stream.touch(self.pipeline.redis, s.stream.name, s.stream.group, self.name, ids)

    # -- end of sweeper section -----------------------------------------------------------------

    # -- one turn --------------------------------------------------------------------------

    def loop(self) -> int:
        """Read (or keep) one batch, commit its rows, acknowledge it. Returns entries handled."""
        if self.batch is None:
            self.batch = self._next_batch()
        batch = self.batch
        if batch.suspect:
            # Growing chunks (1, 2, 4, ...): a poison pill at the head is tried alone, and a
            # page of innocent redeliveries still commits in a handful of transactions.
            size = 1
            while batch.entries:
                self.pipeline.process(batch.entries[:size], batch.deliveries)
                self.processed += len(batch.entries[:size])
                del batch.entries[:size]
                size *= 2
                self.beat()
            handled = 0
        else:
            self.pipeline.process(batch.entries, batch.deliveries)
            handled = len(batch.entries)
            self.processed += handled
        self.batch = None
        return handled

    def _next_batch(self) -> Batch:
        s = self.settings
        if not self.group_ready:
            # Register this process (pid, start) now, not at its first batch: an idle worker
            # restarted under its old name must not show the dead one's pid meanwhile. During a
            # database outage it registers with its first commit instead.
            with contextlib.suppress(*OUTAGE_ERRORS):
                _ = self.pipeline.pg
            stream.ensure_group(self.pipeline.redis, s.stream.name, s.stream.group)
            self.group_ready = True
        if self.cursor is not None:
            entries = stream.read(
                self.pipeline.redis,
                s.stream.name,
                s.stream.group,
                self.name,
                s.workers.batch_size,
                self.cursor,
            )
            if entries:
                batch = self._own_pending(entries, head=self.cursor == "0")
                self.cursor = entries[-1][0]  # only once the whole page is dealt with
                return batch
            self.cursor = None
        entries = stream.read(
            self.pipeline.redis,
            s.stream.name,
            s.stream.group,
            self.name,
            s.workers.batch_size,
            ">",
            s.workers.block_ms,
        )
        return Batch(entries)

    def _own_pending(self, entries: list[Entry], head: bool) -> Batch:
        """Entries this name held when it last stopped: drop the gone, dead-letter the hopeless.

        Only the head of the pending list can be hopeless: it is the one tried alone first
        after every restart, so its delivery count counts its own failures. Entries behind it
        were merely waiting when the process died, and their counts prove nothing.
        """
        s = self.settings
        counts = stream.delivery_counts(
            self.pipeline.redis,
            s.stream.name,
            s.stream.group,
            entries[0][0],
            entries[-1][0],
            len(entries),
            self.name,
        )
        gone = [entry_id for entry_id, fields in entries if not fields]
        self.pipeline.forget(gone)
        keep = [entry for entry in entries if entry[1]]
        if head and keep and counts.get(keep[0][0], 1) > s.workers.max_retries:
            first = keep.pop(0)
            self.pipeline.dead_letter(
                first, counts[first[0]], "processing failed on every delivery"
            )
        return Batch(keep, counts, suspect=any(counts.get(e[0], 1) > 1 for e in keep))


def run(
    settings: Settings,
    name: str,
    redis_url: str,
    dsn: str,
    engine: Engine | None = None,
    beat: Callable[[], None] = lambda: None,
    parent_pid: int | None = None,
) -> int:
    """Entry point of a worker process (after fork or from ratebox-worker)."""
    return Worker(settings, name, redis_url, dsn, engine, beat, parent_pid).run()
