"""SQL of ratebox-bridge (its reads of pending legacy rows and its progress mark) and of
ratebox-compare (read-only pages of judged rows)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from psycopg2.extensions import connection as Connection

from ratebox import store

# -- the bridge -----------------------------------------------------------------------------

#: Advisory lock class of the bridge (one bridge per stream; the key is the stream's hash).
BRIDGE_LOCK_CLASS = int.from_bytes(b"rbbr", "big")


def bridge_connect(dsn: str) -> Connection:
    """A connection for the bridge, autocommit: it never keeps a transaction (or a lock) open."""
    conn = store.connect(dsn, application_name="ratebox-bridge")
    conn.autocommit = True
    return conn


def bridge_lock(conn: Any, stream: str) -> bool:
    """Take the one-bridge-per-stream session lock; False when another bridge holds it."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (BRIDGE_LOCK_CLASS, stream))
        return bool(cur.fetchone()[0])


def bridge_mark(conn: Any, stream: str) -> int:
    """The id below which every pending row has been published (0 at first)."""
    with conn.cursor() as cur:
        cur.execute("SELECT last_id FROM bridge_progress WHERE stream_name = %s", (stream,))
        found = cur.fetchone()
    return int(found[0]) if found else 0


def set_bridge_mark(conn: Any, stream: str, last_id: int) -> None:
    """Move the mark forward (never back)."""
    with conn.cursor() as cur:
        cur.execute(
            """
            INSERT INTO bridge_progress AS p (stream_name, last_id) VALUES (%s, %s)
            ON CONFLICT (stream_name) DO UPDATE
                SET last_id = greatest(p.last_id, EXCLUDED.last_id), updated_at = now()
            """,
            (stream, last_id),
        )


def pending_page(conn: Any, after: int, limit: int) -> tuple[list[tuple[Any, ...]], str]:
    """Pending rows above ``after`` in id order (id, data text, source), and the snapshot.

    A plain read: no row lock, so the legacy pollers' FOR UPDATE SKIP LOCKED never meets
    the bridge. The snapshot (pg_current_snapshot) tells later when every transaction that
    might still commit a lower id has ended.
    """
    with conn.cursor() as cur:
        cur.execute(
            "SELECT id, data::text, coalesce(source, ''), pg_current_snapshot()::text"
            " FROM raw_items WHERE status = 'pending' AND id > %s ORDER BY id LIMIT %s",
            (after, limit),
        )
        found = cur.fetchall()
        if not found:
            cur.execute("SELECT pg_current_snapshot()::text")
            return [], cur.fetchone()[0]
    return [row[:3] for row in found], found[0][3]


def pending_ids_between(conn: Any, low: int, high: int) -> list[int]:
    """Ids of the rows still pending with low < id <= high (an index-only read)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT id FROM raw_items WHERE status = 'pending' AND id > %s AND id <= %s",
            (low, high),
        )
        return [i for (i,) in cur.fetchall()]


def pending_rows(conn: Any, ids: Sequence[int]) -> list[tuple[Any, ...]]:
    """(id, data text, source) of the rows named that are still pending, in id order."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT id, data::text, coalesce(source, '') FROM raw_items"
            " WHERE id = ANY(%s) AND status = 'pending' ORDER BY id",
            (list(ids),),
        )
        return list(cur.fetchall())


def settled(conn: Any, snapshot: str) -> bool:
    """Whether every transaction running when ``snapshot`` was taken has ended."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= pg_snapshot_xmax(%s::pg_snapshot)",
            (snapshot,),
        )
        return bool(cur.fetchone()[0])


def count_pending_after(conn: Any, after: int) -> int:
    """How many rows are pending above ``after`` (the partial index keeps this cheap)."""
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM raw_items WHERE status = 'pending' AND id > %s", (after,))
        return int(cur.fetchone()[0])


# -- compare --------------------------------------------------------------------------------

#: Rows fetched per round trip of compare's server-side cursor.
COMPARE_PAGE = 20_000


def _window(since: Any, until: Any) -> tuple[str, dict[str, Any]]:
    where = ""
    params: dict[str, Any] = {"since": since, "until": until}
    if since is not None:
        where += " AND processed_at >= %(since)s"
    if until is not None:
        where += " AND processed_at < %(until)s"
    return where, params


def legacy_verdicts(
    dsn: str, since: Any = None, until: Any = None, limit: int | None = None
) -> Iterator[list[tuple[Any, ...]]]:
    """Pages of rows the legacy system judged: (id, data text, status, error_code,
    latency s, epoch minute of processed_at), read through a server-side cursor in a
    read-only transaction."""
    where, params = _window(since, until)
    params["limit"] = limit
    conn = store.connect(dsn, application_name="ratebox-compare")
    try:
        conn.set_session(readonly=True)
        with conn.cursor(name="ratebox_compare") as cur:
            cur.itersize = COMPARE_PAGE
            cur.execute(
                "SELECT id, data::text, status, error_code,"
                " extract(epoch FROM processed_at - created_at)::float8,"
                " (extract(epoch FROM processed_at) / 60)::bigint"
                " FROM raw_items WHERE status IN ('done', 'error') AND consumer_name IS NULL"
                f"{where}" + (" LIMIT %(limit)s" if limit is not None else ""),
                params,
            )
            while page := cur.fetchmany(COMPARE_PAGE):
                yield page
        conn.rollback()
    finally:
        store.close(conn)


def ratebox_figures(dsn: str, since: Any = None, until: Any = None) -> dict[str, Any]:
    """RateBox's side on the same table: rows, latency p50/p99 (s) and peak rows per minute."""
    where, params = _window(since, until)
    conn: Any = store.connect(dsn, application_name="ratebox-compare")
    try:
        conn.set_session(readonly=True)
        with conn.cursor() as cur:
            cur.execute(
                f"""
                WITH r AS (
                    SELECT processed_at, extract(epoch FROM processed_at - created_at) AS s
                    FROM raw_items WHERE consumer_name IS NOT NULL{where}
                )
                SELECT (SELECT count(*) FROM r),
                       (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s) FROM r),
                       (SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY s) FROM r),
                       (SELECT max(n) FROM (SELECT count(*) AS n FROM r
                                            GROUP BY date_trunc('minute', processed_at)) AS m)
                """,
                params,
            )
            rows, p50, p99, peak = cur.fetchone()
        conn.rollback()
    finally:
        store.close(conn)
    return {"rows": int(rows), "p50_s": p50, "p99_s": p99, "peak_per_minute": int(peak or 0)}


def estimate_rows(dsn: str) -> int | None:
    """The planner's estimate of raw_items' rows (for a progress bar), or None."""
    conn = store.connect(dsn, application_name="ratebox-compare")
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass('raw_items')"
            )
            found = cur.fetchone()
        conn.rollback()
    finally:
        store.close(conn)
    return int(found[0]) if found and found[0] is not None and found[0] > 0 else None
