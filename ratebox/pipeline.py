"""The batch path shared by worker and sweeper: judge, commit rows and stats, then acknowledge.

It owns one Redis client and one PostgreSQL connection, opened lazily so that an outage
at start is waited out like any other.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import redis

from ratebox import legacy, route, store, store_legacy, stream, stream_dead, verdict
from ratebox.config import Settings
from ratebox.errors import ServerUnavailable
from ratebox.rules import Engine
from ratebox.stream import Entry

log = logging.getLogger(__name__)

#: An outage of either server: wait it out, never blame the message.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    *stream.OUTAGE_ERRORS,
    *store.OUTAGE_ERRORS,
    ServerUnavailable,
)


#: A worker's or sweeper's transaction idle this long is ended by PostgreSQL.
IDLE_IN_TRANSACTION_S = 10.0


class Pipeline:
    """Connections plus the one way a batch becomes rows and acknowledgements."""

    def __init__(
        self, settings: Settings, consumer: str, redis_url: str, dsn: str, engine: Engine
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.redis_url = redis_url
        self.dsn = dsn
        self.engine = engine
        #: The partition the next batch comes from and goes to (see use()).
        self.stream, self.dead = route.settings_streams(settings)[0]
        self.group = settings.stream.group
        self.started_at = datetime.now(timezone.utc)
        self._redis: redis.Redis | None = None
        self._pg: Any = None

    @property
    def redis(self) -> redis.Redis:
        """The Redis client, connected on first use."""
        if self._redis is None:
            self._redis = stream.connect(
                self.redis_url,
                self.settings.workers.block_ms,
                check=False,
                cluster=self.settings.redis.cluster,
            )
        return self._redis

    @property
    def pg(self) -> Any:
        """The PostgreSQL connection, opened (and the consumer registered) on first use."""
        if self._pg is None:
            conn = store.connect(
                self.dsn,
                application_name=f"ratebox {self.consumer}",
                # A batch's transaction never waits on anything but the database. One left
                # idle is a worker frozen or cut off mid-commit, whose row locks (the unique
                # key, the shared per-minute error counters) would stall every other worker.
                idle_in_transaction_s=IDLE_IN_TRANSACTION_S,
                # A database that is locked or slow is an outage too: the statement is
                # cancelled well inside workers.timeout_s, and the wait that follows beats,
                # so the supervisor never takes a worker blocked in PostgreSQL for a dead one.
                statement_timeout_s=self.settings.workers.timeout_s / 8,
            )
            store.register_consumer(conn, self._ident())
            self._pg = conn
        return self._pg

    def _ident(self) -> store.Consumer:
        return store.Consumer(
            stream=self.stream,
            group=self.group,
            name=self.consumer,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            started_at=self.started_at,
        )

    def use(self, partition: tuple[str, str]) -> None:
        """Work on this partition (stream, dead-letter stream): its rows carry its name."""
        self.stream, self.dead = partition

    def reset(self) -> None:
        """Drop both connections after an outage; the next use reconnects."""
        if self._redis is not None:
            try:
                self._redis.close()
            except Exception:  # a dead socket may refuse even to close
                pass
        if self._pg is not None:
            store.close(self._pg)
        self._redis, self._pg = None, None

    def process(self, entries: Sequence[Entry], deliveries: Mapping[str, int] | None = None) -> int:
        """Judge, commit in one transaction, then ack in one round trip; safe to repeat."""
        if not entries:
            return 0
        rows = verdict.judge_all(
            entries, self.engine, self.settings.limits.max_message_bytes, deliveries
        )
        written = self._write(entries, rows)
        stream.ack(self.redis, self.stream, self.group, [entry_id for entry_id, _ in entries])
        return written

    def dead_letter(self, entry: Entry, deliveries: int, reason: str) -> None:
        """Record an entry with code 910, then move it to the dead-letter stream and ack it."""
        entry_id, fields = entry
        row = verdict.dead_lettered(
            entry_id, fields, self.settings.limits.max_message_bytes, deliveries, reason
        )
        self._write([entry], [row])
        extra = {
            "original_id": entry_id,
            "original_stream": self.stream,
            "reason": reason,
            "delivery_count": str(deliveries),
            "consumer": self.consumer,
            "dead_lettered_at": datetime.now(timezone.utc).isoformat(),
        }
        moved = stream_dead.move_to_dead_letter(
            self.redis,
            self.stream,
            self.group,
            self.dead,
            entry_id,
            fields,
            extra,
        )
        if moved:
            log.warning("dead-lettered %s after %d deliveries: %s", entry_id, deliveries, reason)

    def _write(self, entries: Sequence[Entry], rows: Sequence[verdict.Row]) -> int:
        # Entries from ratebox-bridge name a legacy row: their verdict goes on that row.
        targets = legacy.targets(entries)
        if targets:
            return store_legacy.write_legacy_batch(
                self.pg, self._ident(), rows, targets, legacy.no_row
            )
        return store.write_batch(self.pg, self._ident(), rows)

    def forget(self, entry_ids: Sequence[str]) -> None:
        """Ack entries whose payload is gone (trimmed or deleted): nothing is left to judge."""
        if entry_ids:
            stream.ack(self.redis, self.stream, self.group, entry_ids)
            log.warning(
                "acknowledged %d entries whose payload was trimmed or deleted: %s",
                len(entry_ids),
                ", ".join(entry_ids[:5]),
            )


class Outage:
    """Waits out an outage: one log line per state change, capped exponential backoff with jitter."""

    def __init__(self, what: str, cap_s: float = 30.0, first_s: float = 0.2) -> None:
        self.what = what
        self.cap_s = cap_s
        self.first_s = first_s
        self.failures = 0
        self.since = 0.0

    def failed(self, exc: BaseException) -> float:
        """Note a failure; returns how long to wait before the next try."""
        if self.failures == 0:
            self.since = time.monotonic()
            log.error("%s: server unavailable, waiting: %s", self.what, _reason(exc))
        self.failures += 1
        delay = min(self.cap_s, self.first_s * 2 ** min(self.failures - 1, 16))
        return delay * random.uniform(0.5, 1.0)

    def recovered(self) -> None:
        """Note a success; logs the recovery once."""
        if self.failures:
            log.warning(
                "%s: servers back after %.1f s, resuming", self.what, time.monotonic() - self.since
            )
            self.failures = 0


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def sleep(seconds: float, keep_going: Callable[[], bool], tick: Callable[[], None]) -> None:
    """Sleep in short steps, calling ``tick`` (heartbeat) and stopping early when told."""
    deadline = time.monotonic() + seconds
    while keep_going():
        tick()
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.2))
