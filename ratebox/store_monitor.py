"""SQL of the monitor: read-only figures, one short transaction, no scan of raw_items."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions

# -- monitor queries ----------------------------------------------------------------------------
# Read-only figures for ratebox.monitor, all in one short read-only transaction. Each query
# reads small tables (one row per consumer, per minute, per error code) or an index of a few
# kB, never a scan of raw_items: EXPLAIN ANALYZE on 1,000,000 rows in bench/monitor_report.py.

#: A report that cannot be had in this time is better shown as unavailable than waited for.
MONITOR_TIMEOUT_MS = 5000
#: Minutes of per-minute throughput returned for the dashboard's history.
THROUGHPUT_MINUTES = 15

# done/error from the per-consumer counters (processed counts every verdict, errors is a
# subset), so totals cost O(consumers) however large raw_items grows.
_TOTALS = """
SELECT coalesce(sum(processed), 0)::bigint,
       coalesce(sum(errors), 0)::bigint,
       coalesce(sum(dead_lettered), 0)::bigint
FROM stream_consumer_stats WHERE stream_name = ANY(%s)
"""
# Index-only scan of raw_items_pending_idx (002), which is small because pending rows are few.
# Not filtered by stream: that would need the heap; a schema serves one stream in practice.
_PENDING = "SELECT count(*) FROM raw_items WHERE status = 'pending'"

_CONSUMERS = """
SELECT s.consumer_name AS name, s.group_name AS "group", s.processed, s.errors, s.dead_lettered,
       coalesce(s.errors::float8 / NULLIF(s.processed, 0), 0) AS error_rate,
       s.avg_processing_ms AS avg_ms, m.max_ms AS max_ms_1h, s.total_processing_ms AS total_ms,
       s.last_active, s.hostname, s.pid, s.started_at, s.processing_buckets AS buckets
FROM stream_consumer_stats AS s
LEFT JOIN LATERAL (
    SELECT max(max_processing_ms) AS max_ms
    FROM stream_processing_metrics AS p
    WHERE p.minute >= now() - interval '1 hour'
      AND p.stream_name = s.stream_name AND p.consumer_name = s.consumer_name
) AS m ON true
WHERE s.stream_name = ANY(%s)
ORDER BY s.consumer_name
"""

# The two views of SPEC §6 cover every stream in the schema (one, in practice).
_RECENT = "SELECT status, count, avg_processing_ms AS avg_ms FROM v_recent_activity ORDER BY status"

_TOP_ERRORS = """
SELECT error_code AS code, field, count, sample_message AS sample FROM v_top_errors LIMIT %s
"""

_THROUGHPUT = """
SELECT minute, sum(processed)::bigint, sum(errors)::bigint
FROM stream_processing_metrics
WHERE stream_name = ANY(%s) AND minute >= date_trunc('minute', now()) - make_interval(mins => %s)
GROUP BY minute
ORDER BY minute
"""
# Messages per second from the start of the minute N minutes ago until now: the current,
# partial minute counts, and the divisor is the time really covered.
_RATES = """
SELECT coalesce(sum(processed) FILTER (WHERE minute >= w.m1), 0)
           / extract(epoch FROM now() - w.m1)::float8,
       coalesce(sum(processed), 0) / extract(epoch FROM now() - w.m5)::float8
FROM (SELECT date_trunc('minute', now()) - interval '1 minute' AS m1,
             date_trunc('minute', now()) - interval '5 minutes' AS m5) AS w
LEFT JOIN stream_processing_metrics AS p ON p.stream_name = ANY(%s) AND p.minute >= w.m5
GROUP BY w.m1, w.m5
"""


def monitor_figures(conn: Any, stream_name: str | Sequence[str], top: int = 10) -> dict[str, Any]:
    """Every database figure of the monitor report, read in one read-only transaction.

    ``stream_name`` may be several streams (the partitions of one): figures cover them all.
    """
    stream_name = [stream_name] if isinstance(stream_name, str) else list(stream_name)
    try:
        with conn.cursor() as cur:
            cur.execute("SET TRANSACTION READ ONLY")
            cur.execute("SET LOCAL statement_timeout = %s", (MONITOR_TIMEOUT_MS,))
            cur.execute("SELECT now()")
            now = cur.fetchone()[0]
            return {
                "now": now,
                "totals": _status_totals(cur, stream_name),
                "consumers": _consumer_performance(cur, stream_name),
                "recent": _recent_activity(cur),
                "top_errors": _top_errors(cur, top),
                "throughput": _throughput(cur, stream_name),
            }
    finally:
        # Never keep a snapshot open between refreshes: it would hold back vacuum.
        if not conn.closed:
            with contextlib.suppress(psycopg2.Error):
                conn.rollback()


def _status_totals(cur: Any, stream_name: list[str]) -> dict[str, int]:
    cur.execute(_TOTALS, (stream_name,))
    processed, errors, dead = cur.fetchone()
    cur.execute(_PENDING)
    (pending,) = cur.fetchone()
    return {
        "done": processed - errors,
        "error": errors,
        "pending": pending,
        "dead_lettered": dead,
        "processed": processed,
    }


def _consumer_performance(cur: Any, stream_name: list[str]) -> list[dict[str, Any]]:
    cur.execute(_CONSUMERS, (stream_name,))
    return _dicts(cur)


def _recent_activity(cur: Any) -> list[dict[str, Any]]:
    cur.execute(_RECENT)
    return _dicts(cur)


def _top_errors(cur: Any, top: int) -> list[dict[str, Any]]:
    cur.execute(_TOP_ERRORS, (top,))
    return _dicts(cur)


def _dicts(cur: Any) -> list[dict[str, Any]]:
    names = [column.name for column in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur]


def _throughput(cur: Any, stream_name: list[str]) -> dict[str, Any]:
    cur.execute(_THROUGHPUT, (stream_name, THROUGHPUT_MINUTES))
    minutes = [{"minute": m, "processed": p, "errors": e} for m, p, e in cur]
    cur.execute(_RATES, (stream_name,))
    per_s_1m, per_s_5m = cur.fetchone()
    return {"minutes": minutes, "per_s_1m": float(per_s_1m), "per_s_5m": float(per_s_5m)}


# -- end of monitor queries ---------------------------------------------------------------------
