"""SQL that writes verdicts on a legacy raw_items table's rows, and replay's view of them.

Only ratebox.store and its store_* siblings speak SQL (store_adopt adopts the table,
store_bridge serves the bridge and compare).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg2

from ratebox import store, verdict
from ratebox.legacy import Target
from ratebox.store import (
    _COLUMNS,
    _CREATE_STAGE,
    _FROM_STAGE,
    _RECORD_STATS,
    _copy_text,
    _now,
    _stats,
)
from ratebox.verdict import Row

# -- verdicts on legacy rows ----------------------------------------------------------------

_CREATE_LEGACY_STAGE = """
CREATE TEMPORARY TABLE IF NOT EXISTS ratebox_legacy (
    legacy_id bigint, status text, error_code integer, error_message text, errors jsonb,
    stream_id text, delivery_count integer, processing_ms double precision
) ON COMMIT DELETE ROWS
"""
_LEGACY_COLUMNS = (
    "legacy_id, status, error_code, error_message, errors, stream_id, delivery_count, processing_ms"
)

# The first verdict stands: a row a poller (or an earlier entry) judged is not pending any
# more, and is left as it is. RETURNING says which entries wrote a verdict, for the stats.
_UPDATE_LEGACY = """
UPDATE raw_items r
SET status = s.status, error_code = s.error_code, error_message = s.error_message,
    errors = s.errors, processed_at = %(now)s, stream_name = %(stream)s,
    stream_id = s.stream_id, consumer_name = %(consumer)s,
    delivery_count = s.delivery_count, processing_ms = s.processing_ms
FROM ratebox_legacy s
WHERE r.id = s.legacy_id AND r.status = 'pending'
RETURNING s.stream_id
"""
# Entries naming no row at all: they get a row of their own (code 904).
_NO_ROW = """
SELECT s.stream_id FROM ratebox_legacy s
WHERE NOT EXISTS (SELECT 1 FROM raw_items r WHERE r.id = s.legacy_id)
"""


def _legacy_copy(rows: Sequence[Row], ids: Mapping[str, Target]) -> io.StringIO:
    text = store._text
    return io.StringIO(
        "".join(
            f"{ids[r.stream_id][0]}\t{r.status}\t{store.NULL if r.error_code is None else r.error_code}"
            f"\t{text(r.error_message)}\t{store._json(r.errors)}\t{r.stream_id}"
            f"\t{r.delivery_count}\t{r.processing_ms:.4f}\n"
            for r in rows
        )
    )


def write_legacy_batch(
    conn: Any,
    consumer: store.Consumer,
    rows: Sequence[Row],
    legacy: Mapping[str, Target],
    no_row: Callable[[Row, str], Row],
) -> int:
    """Verdicts onto the pending legacy rows named, new rows for the rest, and the stats of
    the verdicts actually written, in one transaction; returns how many were written.

    ``legacy`` maps stream IDs to the row each names; ``no_row(row, text)`` gives the 904
    row of an entry naming no row. A batch the database refuses is retried in halves, and
    a single refused entry is recorded with code 903, like any other.
    """
    if not rows:
        return 0
    try:
        return _write_legacy(conn, consumer, rows, legacy, no_row)
    except store.OUTAGE_ERRORS:
        raise
    except psycopg2.errors.InsufficientPrivilege as exc:
        # The role's fault, not the rows': as on the ordinary path, never recorded as 903.
        raise store._permission(conn, exc) from None
    except (psycopg2.Error, UnicodeError) as exc:
        conn.rollback()
        if len(rows) == 1:
            # The first line only (DETAIL and CONTEXT quote row data); the ordinary path
            # then stores it, or its bare row of last resort.
            reason = (getattr(exc, "pgerror", None) or str(exc)).strip().splitlines()[0][:200]
            return store.write_batch(conn, consumer, [verdict.rejected(rows[0], reason)])
        middle = len(rows) // 2
        return write_legacy_batch(
            conn, consumer, rows[:middle], legacy, no_row
        ) + write_legacy_batch(conn, consumer, rows[middle:], legacy, no_row)


def _write_legacy(
    conn: Any,
    consumer: store.Consumer,
    rows: Sequence[Row],
    legacy: Mapping[str, Target],
    no_row: Callable[[Row, str], Row],
) -> int:
    targeted = [r for r in rows if r.stream_id in legacy and legacy[r.stream_id][0] is not None]
    orphans = {r.stream_id for r in rows if r.stream_id in legacy} - {r.stream_id for r in targeted}
    others = [r for r in rows if r.stream_id not in legacy]
    with conn.cursor() as cur:
        now = _now(cur)
        updated: set[str] = set()
        if targeted:
            cur.execute(_CREATE_LEGACY_STAGE)
            cur.copy_expert(
                f"COPY ratebox_legacy ({_LEGACY_COLUMNS}) FROM STDIN",
                _legacy_copy(targeted, legacy),
            )
            cur.execute(
                _UPDATE_LEGACY, {"now": now, "stream": consumer.stream, "consumer": consumer.name}
            )
            updated = {stream_id for (stream_id,) in cur.fetchall()}
            cur.execute(_NO_ROW)
            orphans |= {stream_id for (stream_id,) in cur.fetchall()}
        inserts = others + [
            no_row(r, legacy[r.stream_id][1]) for r in rows if r.stream_id in orphans
        ]
        new: list[Row] = []
        if inserts:
            cur.execute(_CREATE_STAGE)
            cur.copy_expert(
                f"COPY ratebox_batch ({_COLUMNS}) FROM STDIN", _copy_text(inserts, consumer, now)
            )
            cur.execute(_FROM_STAGE)
            inserted = {stream_id for (stream_id,) in cur.fetchall()}
            new = [r for r in inserts if r.stream_id in inserted]
        judged = [r for r in targeted if r.stream_id in updated] + new
        cur.execute(_RECORD_STATS, _stats(consumer, judged))
    conn.commit()
    return len(judged)


# -- replay ---------------------------------------------------------------------------------


def judged_by_another(conn: Any, stream: str, named: Sequence[tuple[str, int]]) -> int:
    """How many of these (stream ID, legacy row id) entries have no row of their own while
    their legacy row holds another verdict: a poller's, or an earlier entry's. Replay leaves
    those rows alone; they are not rows a worker has yet to write."""
    if not named:
        return 0
    with conn.cursor() as cur:
        cur.execute(
            """
            SELECT count(*) FROM unnest(%s::text[], %s::bigint[]) AS e (stream_id, legacy_id)
            JOIN raw_items r ON r.id = e.legacy_id
            WHERE r.status IS DISTINCT FROM 'pending'
              AND NOT EXISTS (SELECT 1 FROM raw_items m
                              WHERE m.stream_name = %s AND m.stream_id = e.stream_id)
            """,
            ([entry_id for entry_id, _ in named], [row_id for _, row_id in named], stream),
        )
        found = int(cur.fetchone()[0])
    conn.rollback()
    return found
