"""ratebox-bridge: publishes the legacy table's pending rows to the stream, in id order.

Each row becomes an entry with ``legacy_id``, and the worker writes its verdict on that row
while it is still pending, so a row published twice (after a crash) is judged once.

What is published is remembered by a mark in PostgreSQL (``bridge_progress``): every
pending row at or below it has been published. The mark moves only after the XADDs, so a
crash re-publishes at most the rows above it. Ids are taken in id order, but a legacy
producer's transaction may commit a lower id after a higher one was read: the mark passes
a page only once every transaction running when the page was read has ended, and the rows
that committed late below it are published then.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ratebox import store, store_bridge, stream
from ratebox.config import Settings
from ratebox.errors import RateboxError
from ratebox.pipeline import OUTAGE_ERRORS, Outage
from ratebox.route import Router

log = logging.getLogger(__name__)

#: Rows read per query (and published in CHUNK-entry script calls, pipelined).
PAGE = 5000
#: Entries per XADD script call.
CHUNK = 1000
#: --follow: how often the table is looked at when nothing is pending.
POLL_S = 0.5
#: Without --follow: how long to wait, once nothing is left, for the last page to settle.
SETTLE_WAIT_S = 5.0
PRODUCER = "ratebox-bridge"


class BridgeBusy(RateboxError):
    """Another ratebox-bridge is publishing this table to this stream."""


@dataclass
class Counts:
    """What a run did."""

    published: int = 0
    #: Rows that committed after a higher id had been read, published when found.
    late: int = 0
    mark: int = 0
    started: float = 0.0


def entries(rows: Sequence[tuple[Any, ...]]) -> dict[str, list[Any]]:
    """Rows (id, data text, source) as the columns of their entries."""
    return {
        "data": [r[1] for r in rows],
        "source": [r[2] for r in rows],
        "legacy_id": [str(r[0]) for r in rows],
        "producer": [PRODUCER] * len(rows),
    }


class Bridge:
    """One bridge run: connections, the mark, and the ids published above it."""

    def __init__(
        self,
        settings: Settings,
        redis_url: str,
        dsn: str,
        keep_going: Callable[[], bool] = lambda: True,
        advance: Callable[[int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.dsn = dsn
        self.keep_going = keep_going
        self.advance = advance
        self.stream = settings.stream.name  # names the mark and the lock, whatever the partitions
        self.router = Router.of(settings)
        self.counts = Counts(started=time.monotonic())
        self.pg: Any = None
        self.redis: Any = None
        self.mark = 0
        self.cursor = 0
        self.above: set[int] = set()
        #: (cursor after a page, the snapshot the page was read in), oldest first.
        self.waiting: deque[tuple[int, str]] = deque()

    def connect(self) -> None:
        """Open both connections, take the one-bridge lock, start from the stored mark."""
        self.redis = stream.connect(self.redis_url, cluster=self.settings.redis.cluster)
        self.pg = store_bridge.bridge_connect(self.dsn)
        if not store_bridge.bridge_lock(self.pg, self.stream):
            raise BridgeBusy(f"another ratebox-bridge is already publishing to {self.stream}")
        self.mark = self.cursor = store_bridge.bridge_mark(self.pg, self.stream)
        self.counts.mark = self.mark
        self.above.clear()
        self.waiting.clear()

    def close(self) -> None:
        """Close both connections (the lock goes with the session)."""
        if self.pg is not None:
            store.close(self.pg)
        if self.redis is not None:
            try:
                self.redis.close()
            except Exception:  # a dead socket may refuse even to close
                pass
        self.pg = self.redis = None

    def to_publish(self) -> int:
        """Pending rows above the mark: the progress bar's total."""
        return store_bridge.count_pending_after(self.pg, self.mark)

    def _publish(self, rows: Sequence[tuple[Any, ...]]) -> None:
        # Routed like any producer's items: each partition gets its rows in id order.
        for target, columns in self.router.split_columns(entries(rows)).items():
            count = len(columns["data"])
            batches = (
                {key: values[i : i + CHUNK] for key, values in columns.items()}
                for i in range(0, count, CHUNK)
            )
            stream.publish_columns(self.redis, target, batches)
        self.above.update(r[0] for r in rows)
        self.counts.published += len(rows)
        if self.advance is not None:
            self.advance(len(rows))

    def step(self) -> int:
        """Publish one page above the cursor and move the mark as far as is settled."""
        rows, snapshot = store_bridge.pending_page(self.pg, self.cursor, PAGE)
        if rows:
            self._publish(rows)
            self.cursor = rows[-1][0]
            self.waiting.append((self.cursor, snapshot))
        self.settle()
        return len(rows)

    def settle(self) -> None:
        """Move the mark past every page whose concurrent transactions have all ended."""
        upto = None
        while self.waiting and store_bridge.settled(self.pg, self.waiting[0][1]):
            upto = self.waiting.popleft()[0]
        if upto is None or upto <= self.mark:
            return
        late = [
            i
            for i in store_bridge.pending_ids_between(self.pg, self.mark, upto)
            if i not in self.above
        ]
        if late:
            found = store_bridge.pending_rows(self.pg, late)
            self._publish(found)
            self.counts.late += len(found)
        store_bridge.set_bridge_mark(self.pg, self.stream, upto)
        self.mark = self.counts.mark = upto
        self.above = {i for i in self.above if i > upto}

    def run(self, follow: bool) -> Counts:
        """Publish until nothing is left (or, with follow, until told to stop)."""
        outage = Outage("bridge")
        idle_since: float | None = None
        while self.keep_going():
            try:
                if self.pg is None:
                    self.connect()
                found = self.step()
                outage.recovered()
            except OUTAGE_ERRORS as exc:
                self.close()
                time.sleep(outage.failed(exc))
                continue
            if found:
                idle_since = None
                continue
            if not follow:
                idle_since = idle_since or time.monotonic()
                if not self.waiting or time.monotonic() - idle_since > SETTLE_WAIT_S:
                    break
                time.sleep(0.05)
                continue
            time.sleep(POLL_S if not self.waiting else 0.05)
        return self.counts


def summary(counts: Counts, stream_name: str) -> str:
    """The one line printed when the bridge stops."""
    took = max(time.monotonic() - counts.started, 1e-9)
    return (
        f"published {counts.published} legacy rows to {stream_name} in {took:.2f} s "
        f"({counts.published / took:,.0f}/s; {counts.late} committed late); "
        f"every pending row up to id {counts.mark} is published"
    )
