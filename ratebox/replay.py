"""Re-validates retained entries of the main stream with the current rules and updates their rows.

Used after a rules change: the entries still in the stream (see ``stream.retention``) are
judged again and the raw_items rows whose verdict differs are updated, page by page.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ratebox import legacy, route, store, store_legacy, stream, verdict
from ratebox.config import Settings
from ratebox.rules import Engine, compile_rules

log = logging.getLogger(__name__)

#: Entries judged and written per transaction.
PAGE = 500


@dataclass
class Counts:
    """What a replay did, entry by entry."""

    #: Entries read from the stream and judged again.
    read: int = 0
    #: Rows whose verdict differed under the current rules, and were updated.
    changed: int = 0
    #: Rows whose verdict is the same under the current rules.
    unchanged: int = 0
    #: Rows holding a pipeline verdict (903 rejected, 910 dead-lettered, ...): not re-judged here.
    skipped: int = 0
    #: Entries without a row yet: not processed so far, a worker will judge them.
    missing: int = 0
    #: Entries from ratebox-bridge whose legacy row a poller (or another entry) judged first:
    #: that verdict stands, and is not re-judged here.
    judged_by_another: int = 0


_U64 = 2**64 - 1


def is_entry_id(text: str, seq_optional: bool = False) -> bool:
    """``ms-seq`` of ASCII digits, each part within 64 bits, as Redis accepts it."""
    ms, dash, seq = text.partition("-")
    if not dash and seq_optional:
        seq = "0"
    elif not dash:
        return False
    return all(
        part.isascii() and part.isdigit() and len(part) <= 20 and int(part) <= _U64
        for part in (ms, seq)
    )


def to_stream_id(text: str) -> str:
    """An XRANGE bound from an entry ID (``1718000000000-0``, ``1718000000000``, ``-``, ``+``)
    or an ISO 8601 time (``2024-06-08T00:13:03+07:00``; without an offset it is UTC).

    A time becomes its millisecond, which XRANGE reads as the first entry of that millisecond
    when it starts a range and as the last one when it ends it. Raises ValueError.
    """
    text = text.strip()
    if text in ("-", "+"):
        return text
    if is_entry_id(text, seq_optional=True):
        return text
    if text[:1].isdigit() and text.replace("-", "").isascii() and text.replace("-", "").isdigit():
        raise ValueError(f"not an entry ID (each part at most {_U64:,}): {text[:40]!r}")
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an entry ID or an ISO 8601 time: {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    ms = int(when.timestamp() * 1000)
    if ms < 0:
        raise ValueError(f"time before 1970: {text!r}")
    return str(ms)


def replay_range(
    settings: Settings,
    redis_url: str,
    dsn: str,
    start: str,
    end: str = "+",
    engine: Engine | None = None,
) -> Counts:
    """Judge the entries between ``start`` and ``end`` (IDs or times) again; update changed rows."""
    first, last = to_stream_id(start), to_stream_id(end)
    engine = engine or compile_rules(settings.rules)
    name = settings.stream.name
    client = stream.connect(redis_url, cluster=settings.redis.cluster)
    conn = store.connect(dsn, application_name="ratebox replay")
    counts = Counts()
    try:
        for partition in route.stream_names(settings):
            _replay_one(settings, client, conn, engine, partition, first, last, counts)
    finally:
        store.close(conn)
        client.close()
    log.info(
        "re-validated %d entries of %s from %s to %s: %d changed verdict, %d unchanged, "
        "%d skipped (pipeline verdicts), %d without a row yet%s",
        counts.read,
        name,
        first,
        last,
        counts.changed,
        counts.unchanged,
        counts.skipped,
        counts.missing,
        another(counts),
    )
    return counts


def another(counts: Counts) -> str:
    """The end of the summary line for legacy rows judged by another (nothing when none)."""
    if not counts.judged_by_another:
        return ""
    return f", {counts.judged_by_another} legacy rows judged by another (left alone)"


def _replay_one(
    settings: Settings,
    client: Any,
    conn: Any,
    engine: Engine,
    name: str,
    first: str,
    last: str,
    counts: Counts,
) -> None:
    """Judge one partition's entries between two IDs again, adding to ``counts``."""
    cursor = first
    while True:
        entries = stream.entries_between(client, name, cursor, last, PAGE)
        # A trimmed or deleted entry has no payload left to judge.
        judged = [e for e in entries if e[1]]
        if judged:
            rows = verdict.judge_all(judged, engine, settings.limits.max_message_bytes)
            found = store.update_verdicts(conn, name, rows)
            counts.read += len(rows)
            counts.changed += found["changed"]
            counts.unchanged += found["unchanged"]
            counts.skipped += found["skipped"]
            missing = len(rows) - sum(found.values())
            if missing:
                named = [
                    (entry_id, row_id)
                    for entry_id, (row_id, _) in legacy.targets(judged).items()
                    if row_id is not None
                ]
                other = store_legacy.judged_by_another(conn, name, named)
                counts.judged_by_another += other
                missing -= other
            counts.missing += missing
        if len(entries) < PAGE:
            break
        cursor = "(" + entries[-1][0]
