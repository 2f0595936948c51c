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

from ratebox import message, route, stream
from ratebox.config import Settings
from ratebox.pipeline import OUTAGE_ERRORS, Pipeline
from ratebox.role import Role
from ratebox.rules import Engine, compile_rules
from ratebox.stream import Entry

log = logging.getLogger(__name__)

#: With several partitions, the block on one when all were empty: short, so that entries
#: arriving on another are read within this long.
SHORT_BLOCK_MS = 100


def partitions_of(settings: Settings, name: str) -> list[tuple[str, str]]:
    """The partitions (stream, dead-letter stream) the worker called ``name`` reads."""
    every = route.settings_streams(settings)
    if len(every) == 1:
        return every
    digits = name.rsplit("_", 1)[-1]
    k = int(digits) if digits.isdigit() and int(digits) > 0 else 1
    # A name above the count (one TTIN more, before the others restart with the new count)
    # reads the partition it would read as one of more workers than partitions.
    mine = route.assigned(k, settings.workers.count, len(every)) or [(k - 1) % len(every)]
    return [every[p] for p in mine]


@dataclass
class Batch:
    """Entries in hand: kept across an outage until committed and acknowledged."""

    entries: list[Entry]
    #: Delivery counts for the rows of redelivered entries (absent: a first delivery).
    deliveries: dict[str, int] = field(default_factory=dict)
    #: Index into Worker.partitions of the partition the entries came from.
    partition: int = 0
    #: This name's own pending entries, left by a process that died or stopped holding them:
    #: processed in growing chunks from one, so a poison pill takes down only itself, and
    #: only an entry tried alone has a delivery counted against it.
    suspect: bool = False
    #: Redis's delivery count of each suspect entry, and those counted by this process.
    counts: dict[str, int] = field(default_factory=dict)
    counted: set[str] = field(default_factory=set)


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
        #: The partitions this name reads (stream, dead-letter stream); one when not partitioned.
        self.partitions = partitions_of(settings, name)
        #: Per partition: reading own pending history after this ID until it is exhausted.
        self.cursors: list[str | None] = ["0"] * len(self.partitions)
        #: The partition the next read for new entries starts with (round robin).
        self.turn = 0
        self.batch: Batch | None = None
        #: What read_new and own_pending let through whole, and what they keep of the rest.
        self.bounds = (settings.limits.max_message_bytes, message.RAW_KEEP_BYTES)
        self.group_ready = False
        self.processed = 0

    # -- lifecycle (the loop itself is Role.run) ------------------------------------------------

    def initialize(self) -> None:
        """Post-fork setup: signal handlers (connections open lazily in the loop)."""
        super().initialize()
        log.info(
            "started, reading %s as %s/%s",
            ", ".join(stream_name for stream_name, _ in self.partitions),
            self.settings.stream.group,
            self.name,
        )

    def on_outage(self) -> None:
        """Drop both connections; the batch in hand is kept and retried."""
        self.pipeline.reset()

    def on_group_lost(self) -> None:
        """Start again from this name's pending entries once the group exists again."""
        self.cursors, self.group_ready, self.batch = ["0"] * len(self.partitions), False, None

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
            name = self.partitions[self.batch.partition][0]
            stream.touch(self.pipeline.redis, name, s.stream.group, self.name, ids)

    # -- end of sweeper section -----------------------------------------------------------------

    # -- one turn --------------------------------------------------------------------------

    def loop(self) -> int:
        """Read (or keep) one batch, commit its rows, acknowledge it. Returns entries handled."""
        if self.batch is None:
            self.batch = self._next_batch()
        batch = self.batch
        self.pipeline.use(self.partitions[batch.partition])
        if batch.suspect:
            # Growing chunks (1, 2, 4, ...): the head is tried alone, and a page of innocent
            # redeliveries still commits in a handful of transactions.
            size = 1
            while batch.entries:
                chunk = batch.entries[:size] if size > 1 or self._try_alone(batch) else []
                self.pipeline.process(chunk, batch.deliveries)
                self.processed += len(chunk)
                del batch.entries[: max(size, 1)]
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
        redis_ = self.pipeline.redis
        if not self.group_ready:
            # Register this process (pid, start) now, not at its first batch: an idle worker
            # restarted under its old name must not show the dead one's pid meanwhile. During a
            # database outage it registers with its first commit instead.
            with contextlib.suppress(*OUTAGE_ERRORS):
                _ = self.pipeline.pg
            for name, _ in self.partitions:
                stream.ensure_group(redis_, name, s.stream.group)
                stream.join_group(redis_, name, s.stream.group, self.name)
            self.group_ready = True
        # Own pending entries first, partition after partition.
        for i, cursor in enumerate(self.cursors):
            if cursor is None:
                continue
            self.pipeline.use(self.partitions[i])
            name = self.partitions[i][0]
            found = stream.own_pending(
                redis_, name, s.stream.group, self.name, cursor, s.workers.batch_size, *self.bounds
            )
            if found:
                batch = self._own_pending(found, partition=i)
                self.cursors[i] = found[-1][0][0]  # only once the whole page is dealt with
                return batch
            self.cursors[i] = None
        return self._read_new()

    def _read_new(self) -> Batch:
        """New entries: each partition in turn without blocking, and only when all are empty a
        block on the next (short with several), so no partition with entries waits behind an
        empty one. The reads that fill a batch go through a script that shrinks an entry
        over limits.max_message_bytes to what stands for it: only the block's one entry
        leaves Redis whole, so a batch holds at most that entry and batch_size x the limit."""
        s = self.settings
        count, size = len(self.partitions), s.workers.batch_size
        redis_, group = self.pipeline.redis, s.stream.group
        for step in range(count):
            i = (self.turn + step) % count
            name = self.partitions[i][0]
            entries = stream.read_new(redis_, name, group, self.name, size, *self.bounds)
            if entries:
                self.turn = (i + 1) % count
                return Batch(entries, partition=i)
        i = self.turn
        self.turn = (i + 1) % count
        name = self.partitions[i][0]
        block = s.workers.block_ms if count == 1 else min(s.workers.block_ms, SHORT_BLOCK_MS)
        entries = stream.read(redis_, name, group, self.name, 1, ">", block)
        if entries and size > 1:
            entries += stream.read_new(redis_, name, group, self.name, size - 1, *self.bounds)
        return Batch(entries, partition=i)

    def _own_pending(self, found: list[tuple[Entry, int]], partition: int = 0) -> Batch:
        """Entries this name held when it last stopped: the gone are acknowledged, the rest
        are suspects (see Batch); reading them counted no delivery."""
        gone = [entry_id for (entry_id, fields), _ in found if not fields]
        self.pipeline.forget(gone)
        keep = [entry for entry, _ in found if entry[1]]
        counts = {entry[0]: count for entry, count in found}
        # Each is at least a second delivery, whatever Redis counted: its row may exist.
        deliveries = {entry_id: max(2, count) for entry_id, count in counts.items()}
        return Batch(keep, deliveries, partition, suspect=True, counts=counts)

    def _try_alone(self, batch: Batch) -> bool:
        """Count a delivery of the head, about to be tried alone, and dead-letter it instead
        once it has had max_retries; True when it is to be processed."""
        entry_id = batch.entries[0][0]
        name = self.partitions[batch.partition][0]
        if entry_id not in batch.counted:
            # Once per process: a retry of the same head after an outage is not its fault.
            if not stream.count_delivery(
                self.pipeline.redis, name, self.settings.stream.group, self.name, entry_id
            ):
                self.pipeline.forget([entry_id])
                return False
            batch.counted.add(entry_id)
            batch.counts[entry_id] = batch.counts.get(entry_id, 1) + 1
            batch.deliveries[entry_id] = batch.counts[entry_id]
        deliveries = batch.counts[entry_id]
        if deliveries > self.settings.workers.max_retries:
            self.pipeline.dead_letter(
                batch.entries[0], deliveries, f"processing failed on {deliveries - 1} deliveries"
            )
            return False
        return True


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
