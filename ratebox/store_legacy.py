"""SQL for a legacy raw_items table: adopting it, writing verdicts on its rows, the bridge's
reads and progress mark, and compare's read-only pages.

Only this module and ratebox.store speak SQL. Adoption never holds a lock that stops the
legacy system for long: indexes are built CONCURRENTLY outside any transaction, catalog
changes take their brief exclusive lock under a short lock_timeout and are retried.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import psycopg2
from psycopg2.extensions import connection as Connection

from ratebox import store, verdict
from ratebox.legacy import Target
from ratebox.store import (
    _COLUMNS,
    _CREATE_STAGE,
    _FROM_STAGE,
    _RECORD_STATS,
    Migration,
    MigrationError,
    _copy_text,
    _first_line,
    _now,
    _stats,
)
from ratebox.verdict import Row

# -- the migration lock ---------------------------------------------------------------------

#: Seconds between two tries of the migration lock.
LOCK_POLL_S = 0.2
#: How often (ms) the server checks, while a statement runs, that ratebox-migrate is there.
CLIENT_CHECK_MS = 1000


@contextlib.contextmanager
def migration_lock(conn: Any) -> Iterator[None]:
    """Hold the migrations' advisory lock (session level) for the block.

    Taken with pg_try_advisory_lock in a loop, not pg_advisory_lock: a session blocked in
    a statement holds a snapshot, and CREATE INDEX CONCURRENTLY in the session that has the
    lock would wait for that snapshot while it waits for the lock -- a deadlock.

    The session also ends soon after its client dies (PostgreSQL 14 and later). A backend
    otherwise notices a dead client only when it next talks to it: a ratebox-migrate killed
    while CREATE INDEX CONCURRENTLY waits for an old transaction would leave its session
    waiting, holding this lock (the next run would wait on a dead one), and finishing the
    build whenever that transaction ends. With the check the session ends within a second or
    so, leaving the index invalid, and the next run rebuilds it.
    """
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            if conn.server_version >= 140000:
                cur.execute(f"SET client_connection_check_interval = {CLIENT_CHECK_MS}")
            while True:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (store.MIGRATION_LOCK_KEY,))
                if cur.fetchone()[0]:
                    break
                time.sleep(LOCK_POLL_S)
    except psycopg2.Error as exc:
        conn.autocommit = False
        raise store.ServerUnavailable(
            f"cannot lock the database for migrations: {_first_line(exc)}"
        ) from exc
    conn.autocommit = False
    try:
        yield
    finally:
        with contextlib.suppress(psycopg2.Error):
            conn.rollback()
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", (store.MIGRATION_LOCK_KEY,))
        with contextlib.suppress(psycopg2.Error):
            conn.autocommit = False


# -- adoption -------------------------------------------------------------------------------

#: The numbered files whose effect adoption reproduces on an existing raw_items (001-003).
ADOPTS_THROUGH = 3
#: schema_migrations.version of the adoption record (not digits: the file plan ignores it).
ADOPTED_VERSION = "legacy"
#: Each catalog change waits at most this long for its lock, then gives way and retries, so
#: the legacy pollers queued behind it never wait longer.
LOCK_TIMEOUT_MS = 200
#: How long to keep retrying a catalog change that keeps meeting busy transactions.
LOCK_RETRY_S = 120.0

#: The columns of the database contract a legacy table may lack, as added to it: nullable
#: (legacy rows have no stream entry) and without volatile defaults (no table rewrite).
ADDED_COLUMNS = (
    ("source", "text"),
    ("error_code", "integer"),
    ("error_message", "text"),
    ("errors", "jsonb NOT NULL DEFAULT '[]'::jsonb"),
    ("created_at", "timestamptz"),
    ("processed_at", "timestamptz"),
    ("stream_name", "text"),
    ("stream_id", "text"),
    ("consumer_name", "text"),
    ("delivery_count", "integer"),
    ("batch_id", "text"),
    ("producer", "text"),
    ("produced_at", "timestamptz"),
    ("processing_ms", "double precision"),
)

#: Indexes of the contract, built CONCURRENTLY: (name, definition after ON).
INDEXES = (
    ("raw_items_stream_entry_key", "UNIQUE INDEX", "raw_items (stream_name, stream_id)"),
    (
        "raw_items_recent_errors_idx",
        "INDEX",
        "raw_items (processed_at, error_code) WHERE status = 'error'",
    ),
    ("raw_items_pending_idx", "INDEX", "raw_items (id) WHERE status = 'pending'"),
    ("raw_items_processed_at_brin", "INDEX", "raw_items USING brin (processed_at)"),
)

_INTEGER_TYPES = ("smallint", "integer", "bigint")
_TEXT_TYPES = ("text", "character varying")

# The other tables and views of the contract, as 001 creates them; IF NOT EXISTS, so a
# second run after a crash half-way finds them and goes on.
_OTHER_TABLES = """
CREATE TABLE IF NOT EXISTS stream_consumer_stats (
    stream_name          text NOT NULL,
    consumer_name        text NOT NULL,
    group_name           text,
    processed            bigint NOT NULL DEFAULT 0,
    errors               bigint NOT NULL DEFAULT 0,
    dead_lettered        bigint NOT NULL DEFAULT 0,
    total_processing_ms  double precision NOT NULL DEFAULT 0,
    avg_processing_ms    double precision
                         GENERATED ALWAYS AS (total_processing_ms / NULLIF(processed, 0)) STORED,
    last_active          timestamptz,
    hostname             text,
    pid                  integer,
    started_at           timestamptz,
    PRIMARY KEY (stream_name, consumer_name)
);
CREATE TABLE IF NOT EXISTS stream_processing_metrics (
    minute               timestamptz NOT NULL,
    stream_name          text NOT NULL,
    consumer_name        text NOT NULL,
    processed            bigint NOT NULL DEFAULT 0,
    errors               bigint NOT NULL DEFAULT 0,
    dead_lettered        bigint NOT NULL DEFAULT 0,
    total_processing_ms  double precision NOT NULL DEFAULT 0,
    avg_processing_ms    double precision
                         GENERATED ALWAYS AS (total_processing_ms / NULLIF(processed, 0)) STORED,
    max_processing_ms    double precision NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, stream_name, consumer_name)
);
CREATE TABLE IF NOT EXISTS stream_error_metrics (
    minute          timestamptz NOT NULL,
    stream_name     text NOT NULL,
    error_code      integer NOT NULL,
    field           text NOT NULL DEFAULT '',
    count           bigint NOT NULL DEFAULT 0,
    sample_message  text,
    PRIMARY KEY (minute, stream_name, error_code, field)
);
CREATE TABLE IF NOT EXISTS bridge_progress (
    stream_name  text PRIMARY KEY,
    last_id      bigint NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
"""

_VIEWS = {
    "v_stream_status": "SELECT status, count(*) AS count FROM raw_items GROUP BY status",
    "v_recent_activity": """
SELECT s.status, s.count, s.avg_processing_ms
FROM (
    SELECT sum(processed)::bigint AS processed,
           sum(errors)::bigint AS errors,
           sum(total_processing_ms) / NULLIF(sum(processed), 0) AS avg_processing_ms
    FROM stream_processing_metrics
    WHERE minute >= now() - interval '1 hour'
) AS m
CROSS JOIN LATERAL (
    VALUES ('done', m.processed - m.errors, m.avg_processing_ms),
           ('error', m.errors, m.avg_processing_ms)
) AS s (status, count, avg_processing_ms)
WHERE s.count > 0""",
    "v_top_errors": """
SELECT error_code,
       field,
       sum(count)::bigint AS count,
       (array_agg(sample_message ORDER BY minute DESC)
            FILTER (WHERE sample_message IS NOT NULL))[1] AS sample_message
FROM stream_error_metrics
WHERE minute >= now() - interval '1 hour'
GROUP BY error_code, field
ORDER BY count DESC, error_code, field""",
}


def legacy_table(conn: Any) -> bool:
    """Whether raw_items exists but the first migration was never recorded: a table to adopt."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT to_regclass('raw_items') IS NOT NULL,"
            " to_regclass('schema_migrations') IS NOT NULL"
        )
        table, recorded = cur.fetchone()
        first = None
        if table and recorded:
            cur.execute("SELECT 1 FROM schema_migrations WHERE version ~ '^0*1$'")
            first = cur.fetchone()
    conn.rollback()
    return bool(table) and first is None


def _columns(cur: Any) -> dict[str, tuple[str, str | None]]:
    cur.execute(
        """
        SELECT a.attname, format_type(a.atttypid, NULL), pg_get_expr(d.adbin, d.adrelid)
        FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = 'raw_items'::regclass AND a.attnum > 0 AND NOT a.attisdropped
        """
    )
    return {name: (kind, default) for name, kind, default in cur.fetchall()}


def _identity(cur: Any) -> bool:
    cur.execute(
        "SELECT attidentity <> '' FROM pg_attribute"
        " WHERE attrelid = 'raw_items'::regclass AND attname = 'id'"
    )
    found = cur.fetchone()
    return bool(found and found[0])


def check_adoptable(conn: Any) -> None:
    """Refuse, before any change, a raw_items that RateBox cannot share: one line per reason."""
    with conn.cursor() as cur:
        columns = _columns(cur)
        identity = _identity(cur)
    conn.rollback()
    need = (("id", _INTEGER_TYPES, "an integer"), ("data", ("jsonb",), "jsonb"))
    for name, kinds, what in need:
        if name not in columns:
            raise MigrationError(f"cannot adopt raw_items: it has no {name} column ({what})")
        if columns[name][0] not in kinds:
            raise MigrationError(
                f"cannot adopt raw_items: column {name} is {columns[name][0]}, not {what}"
            )
    if "status" not in columns:
        raise MigrationError("cannot adopt raw_items: it has no status column (text)")
    if columns["status"][0] not in _TEXT_TYPES:
        raise MigrationError(
            f"cannot adopt raw_items: column status is {columns['status'][0]}, not text"
        )
    if columns["id"][1] is None and not identity:
        raise MigrationError(
            "cannot adopt raw_items: column id has no default (a sequence or identity), so "
            "RateBox's own rows would have no id"
        )


def _retrying(conn: Any, statements: Sequence[str]) -> None:
    """Run statements in one short transaction under LOCK_TIMEOUT_MS, retried while busy."""
    deadline = time.monotonic() + LOCK_RETRY_S
    while True:
        try:
            with conn.cursor() as cur:
                cur.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
                for sql in statements:
                    cur.execute(sql)
            conn.commit()
            return
        except psycopg2.errors.LockNotAvailable:
            conn.rollback()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _concurrently(conn: Any, sql: str) -> None:
    """One statement outside any transaction (CREATE/DROP INDEX CONCURRENTLY)."""
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.autocommit = False


def _index_state(conn: Any, name: str) -> bool | None:
    """True: a valid index of that name; False: an invalid one (a crashed build); None: none."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)", (name,)
        )
        found = cur.fetchone()
    conn.rollback()
    return None if found is None else bool(found[0])


def _has_constraint(conn: Any, name: str) -> bool:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT 1 FROM pg_constraint WHERE conrelid = 'raw_items'::regclass AND conname = %s",
            (name,),
        )
        found = cur.fetchone() is not None
    conn.rollback()
    return found


def _build_index(conn: Any, name: str, kind: str, definition: str) -> None:
    state = _index_state(conn, name)
    if state is False:
        # Left INVALID by a build that crashed or was cancelled: it costs every write and
        # serves no read. Dropped and built again.
        _concurrently(conn, f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    if state is not True:
        _concurrently(conn, f"CREATE {kind} CONCURRENTLY IF NOT EXISTS {name} ON {definition}")


def adopt(conn: Any, files: Sequence[Migration]) -> list[str]:
    """Give an existing raw_items what the contract adds; record files as applied.

    Every step checks the catalog first, so a second run, or a run after a crash half-way,
    does only what is left. The record is written last, in one transaction.
    """
    check_adoptable(conn)
    try:
        with conn.cursor() as cur:
            present = _columns(cur)
        conn.rollback()
        missing = [(n, kind) for n, kind in ADDED_COLUMNS if n not in present]
        alter = [f"ADD COLUMN IF NOT EXISTS {n} {kind}" for n, kind in missing]
        if "created_at" not in present:
            alter.append("ALTER COLUMN created_at SET DEFAULT now()")
        if alter:
            _retrying(conn, [f"ALTER TABLE raw_items {', '.join(alter)}"])
        kinds = {n: kind for n, (kind, _) in present.items()}
        errors_jsonb = kinds.get("errors", "jsonb") == "jsonb"
        if errors_jsonb and not _has_constraint(conn, "raw_items_errors_check"):
            _retrying(
                conn,
                [
                    "ALTER TABLE raw_items ADD CONSTRAINT raw_items_errors_check"
                    " CHECK (jsonb_typeof(errors) = 'array') NOT VALID"
                ],
            )
        # SHARE UPDATE EXCLUSIVE: reads and writes go on while the rows are checked.
        if errors_jsonb:
            _retrying(conn, ["ALTER TABLE raw_items VALIDATE CONSTRAINT raw_items_errors_check"])
        for name, kind, definition in INDEXES:
            if name == "raw_items_stream_entry_key" and _has_constraint(conn, name):
                continue
            _build_index(conn, name, kind, definition)
        if not _has_constraint(conn, "raw_items_stream_entry_key"):
            _retrying(
                conn,
                [
                    "ALTER TABLE raw_items ADD CONSTRAINT raw_items_stream_entry_key"
                    " UNIQUE USING INDEX raw_items_stream_entry_key"
                ],
            )
        with conn.cursor() as cur:
            cur.execute(_OTHER_TABLES)
            for view, sql in _VIEWS.items():
                cur.execute("SELECT to_regclass(%s) IS NULL", (view,))
                if cur.fetchone()[0]:
                    cur.execute(f"CREATE VIEW {view} AS {sql}")
            cur.execute(store._CREATE_SCHEMA_MIGRATIONS)
            for version, filename, checksum, _ in files:
                cur.execute(
                    "INSERT INTO schema_migrations (version, filename, checksum)"
                    " VALUES (%s, %s, %s) ON CONFLICT (version) DO NOTHING",
                    (version, filename, checksum),
                )
            cur.execute(
                "INSERT INTO schema_migrations (version, filename, checksum)"
                " VALUES (%s, 'adopted raw_items', '') ON CONFLICT (version) DO NOTHING",
                (ADOPTED_VERSION,),
            )
        conn.commit()
    except psycopg2.Error as exc:
        with contextlib.suppress(psycopg2.Error):
            conn.rollback()
        raise store._migration_failed(conn, "adopting raw_items", exc) from exc
    return [f"adopted raw_items ({', '.join(f[1] for f in files)})"]


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
