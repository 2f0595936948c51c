"""The reclaim sweeper: takes over entries left idle by any consumer, retries or dead-letters them,
trims acknowledged history past the retention, and removes ghost consumers.

Lifecycle in the huey shape, like ratebox.worker: ``Sweeper(...)`` touches nothing,
``initialize()`` installs the signal handlers, ``loop()`` does one sweep (tests call it
directly), ``run()`` repeats it every ``sweeper.interval_s``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ratebox import route, store, stream
from ratebox.config import Settings
from ratebox.pipeline import OUTAGE_ERRORS, Pipeline, sleep
from ratebox.role import Role
from ratebox.rules import Engine, compile_rules
from ratebox.stream import Entry

log = logging.getLogger(__name__)

#: The consumer name entries are claimed under (also the process title's last word).
NAME = "sweeper"
#: Idle entries looked at per sweep: a sweep ends, and trimming, ghost removal and the
#: heartbeat come around, even behind a backlog of millions.
MAX_PER_SWEEP = 1000


@dataclass
class Sweep:
    """What one sweep did; a Sweeper also keeps the running totals in one."""

    processed: int = 0
    dead_lettered: int = 0
    #: Entries whose payload was trimmed or deleted: acknowledged, nothing left to judge.
    gone: int = 0
    #: Entries whose processing raised: left pending, retried (and counted) next time.
    failed: int = 0
    trimmed: int = 0
    ghosts: list[str] = field(default_factory=list)

    def add(self, other: Sweep) -> None:
        """Add another sweep's figures to these."""
        self.processed += other.processed
        self.dead_lettered += other.dead_lettered
        self.gone += other.gone
        self.failed += other.failed
        self.trimmed += other.trimmed
        self.ghosts.extend(other.ghosts)

    def __bool__(self) -> bool:
        return any(
            (self.processed, self.dead_lettered, self.gone, self.failed, self.trimmed, self.ghosts)
        )


class Sweeper(Role):
    """The one process that claims other consumers' entries; it runs beside the workers."""

    def __init__(
        self,
        settings: Settings,
        redis_url: str,
        dsn: str,
        engine: Engine | None = None,
        beat: Callable[[], None] = lambda: None,
        parent_pid: int | None = None,
    ) -> None:
        super().__init__(beat, parent_pid)
        self.settings = settings
        self.pipeline = Pipeline(
            settings, NAME, redis_url, dsn, engine or compile_rules(settings.rules)
        )
        self.group_ready = False
        #: An entry claimed but not yet committed when an outage struck: finished first, without
        #: claiming it again (a claim counts a delivery, and the outage was not its fault).
        self.in_hand: tuple[Entry, int] | None = None
        #: Every partition (stream, dead-letter stream), each swept in turn.
        self.partitions = route.settings_streams(settings)
        #: The partition of the entry in hand.
        self.in_hand_partition = self.partitions[0]
        self.totals = Sweep()
        prefix = settings.consumer_name(1).rsplit("_", 1)[0]
        self._ours = re.compile(rf"^(?:{re.escape(prefix)}_\d{{3,}}|{NAME})$")

    # -- lifecycle -------------------------------------------------------------------------

    def initialize(self) -> None:
        """Post-fork setup: signal handlers (connections open lazily in the loop)."""
        super().initialize()
        s = self.settings
        log.info(
            "started on %s/%s: every %gs, claiming entries idle over %d ms",
            ", ".join(name for name, _ in self.partitions),
            s.stream.group,
            s.sweeper.interval_s,
            s.sweeper.min_idle_ms,
        )

    def between_turns(self) -> None:
        """Wait for the next sweep, beating meanwhile."""
        sleep(self.settings.sweeper.interval_s, self.keep_going, self.beat)

    def on_outage(self) -> None:
        """Drop both connections; an entry in hand is finished once the servers are back."""
        self.pipeline.reset()

    def on_group_lost(self) -> None:
        """Nothing claimed survives a lost group."""
        self.group_ready, self.in_hand = False, None

    def shutdown(self) -> None:
        """Close connections; an entry in hand stays pending and is claimed again later."""
        t = self.totals
        log.info(
            "stopping: %d processed, %d dead-lettered, %d gone, %d failed, %d trimmed, %d ghosts removed",
            t.processed,
            t.dead_lettered,
            t.gone,
            t.failed,
            t.trimmed,
            len(t.ghosts),
        )
        self.pipeline.reset()

    # -- one sweep -------------------------------------------------------------------------

    def loop(self) -> Sweep:
        """One sweep of every partition: trim, remove ghosts, then reclaim idle entries.

        Outages propagate."""
        sweep = Sweep()
        try:
            if not self.group_ready:
                s = self.settings
                for name, _ in self.partitions:
                    stream.ensure_group(self.pipeline.redis, name, s.stream.group)
                self.group_ready = True
            if self.in_hand is not None:
                # Finished first, on its own partition, before anything is claimed again.
                self.pipeline.use(self.in_hand_partition)
                self._settle(*self.in_hand, sweep)
            for partition in self.partitions:
                self.pipeline.use(partition)
                # Redis-only steps first: they are safe, and useful, while PostgreSQL is down.
                if self.keep_going():
                    sweep.trimmed += self.trim()
                if self.keep_going():
                    sweep.ghosts += self.remove_ghosts()
                if self.keep_going():
                    self.reclaim(sweep)
        finally:
            self.totals.add(sweep)
            if sweep:
                log.info(
                    "swept: %d processed, %d dead-lettered, %d gone, %d failed, %d trimmed, %d ghosts",
                    sweep.processed,
                    sweep.dead_lettered,
                    sweep.gone,
                    sweep.failed,
                    sweep.trimmed,
                    len(sweep.ghosts),
                )
        return sweep

    def reclaim(self, sweep: Sweep) -> None:
        """Claim entries idle over min_idle_ms from any consumer, one at a time, and settle each."""
        s = self.settings
        if self.in_hand is not None:
            self._settle(*self.in_hand, sweep)
        name = self.pipeline.stream
        # A claim counts a delivery: with PostgreSQL down the claimed entry could only fail,
        # and a long outage would walk good messages to the dead-letter stream. So nothing is
        # claimed until the database answers.
        store.ping(self.pipeline.pg)
        candidates = stream.pending_idle(
            self.pipeline.redis, name, s.stream.group, s.sweeper.min_idle_ms, MAX_PER_SWEEP
        )
        # Least-delivered first, and claimed one at a time: if a poison pill kills or hangs the
        # sweeper, only the pill has had a delivery counted; the entries behind it were not
        # claimed yet, and a pill that keeps failing sorts last on the next sweep.
        candidates.sort(key=lambda c: (c["deliveries"], _id_key(c["id"])))
        for candidate in candidates:
            if not self.keep_going():
                return
            self.beat()
            outcome, entry = stream.claim_one(
                self.pipeline.redis,
                name,
                s.stream.group,
                NAME,
                s.sweeper.min_idle_ms,
                candidate["id"],
            )
            if outcome == stream.GONE:
                # Redis 6.2 keeps a deleted entry pending (now ours): ack it so it stops coming back.
                self.pipeline.forget([candidate["id"]])
                sweep.gone += 1
            elif outcome == stream.CLAIMED and entry is not None:
                self._settle(entry, candidate["deliveries"] + 1, sweep)
            # TAKEN: a live consumer touched or finished it since XPENDING listed it.

    def _settle(self, entry: Entry, deliveries: int, sweep: Sweep) -> None:
        """Process a claimed entry, or dead-letter it when it has failed max_retries deliveries."""
        self.in_hand, self.in_hand_partition = (
            (entry, deliveries),
            (
                self.pipeline.stream,
                self.pipeline.dead,
            ),
        )
        if deliveries > self.settings.workers.max_retries:
            self.pipeline.dead_letter(
                entry, deliveries, f"processing failed on {deliveries - 1} deliveries"
            )
            sweep.dead_lettered += 1
        else:
            try:
                self.pipeline.process([entry], {entry[0]: deliveries})
                sweep.processed += 1
            except OUTAGE_ERRORS:
                raise
            except Exception:
                # Only this entry is at fault (one at a time): it stays pending to the sweeper,
                # is claimed again after min_idle_ms, and ends in the dead-letter stream if it
                # keeps failing. The connections may be mid-transaction: start afresh.
                log.exception(
                    "processing %s failed on delivery %d; it will be retried", entry[0], deliveries
                )
                self.pipeline.reset()
                sweep.failed += 1
        self.in_hand = None

    def trim(self) -> int:
        """Trim acknowledged entries older than stream.retention; returns how many went."""
        s = self.settings
        name = self.pipeline.stream
        trimmed, bound = stream.trim_acknowledged(
            self.pipeline.redis, name, int(s.stream.retention * 1000)
        )
        if trimmed:
            log.info("trimmed %d acknowledged entries of %s before %s", trimmed, name, bound)
        return trimmed

    def remove_ghosts(self) -> list[str]:
        """Remove our consumers that hold nothing and have been idle over sweeper.ghost_idle_s."""
        s = self.settings
        idle_ms = int(s.sweeper.ghost_idle_s * 1000)
        removed: list[str] = []
        where = self.pipeline.stream
        for consumer in stream.consumers(self.pipeline.redis, where, s.stream.group):
            name = _text(consumer["name"])
            # A live worker's idle time resets on every read (from Redis 7.2; before, on every
            # read that returns entries), so a long idle time is the sign of a name no process
            # uses any more. Removing a live but starved one is harmless: it holds nothing (that
            # is checked atomically) and its next read creates it again. Names that are not
            # ours belong to someone else's tooling and are left alone.
            if (
                not self._ours.match(name)
                or int(consumer["pending"])
                or int(consumer["idle"]) < idle_ms
            ):
                continue
            if stream.remove_idle_consumer(
                self.pipeline.redis, where, s.stream.group, name, idle_ms
            ):
                log.info(
                    "removed ghost consumer %s (idle %.0f s, nothing pending)",
                    name,
                    int(consumer["idle"]) / 1000,
                )
                removed.append(name)
        return removed


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)


def run(
    settings: Settings,
    redis_url: str,
    dsn: str,
    beat: Callable[[], None] = lambda: None,
    parent_pid: int | None = None,
    engine: Engine | None = None,
) -> int:
    """Entry point of the sweeper process (after fork or from ratebox-sweeper)."""
    return Sweeper(settings, redis_url, dsn, engine, beat, parent_pid).run()
