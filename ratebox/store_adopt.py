"""SQL that adopts a legacy raw_items table (ratebox-migrate), and the migration lock.

Adoption never holds a lock that stops the legacy system for long: indexes are built
CONCURRENTLY outside any transaction, catalog changes take their brief exclusive lock under a
short lock_timeout and are retried.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg2

from ratebox import store
from ratebox.store import (
    Migration,
    MigrationError,
    _first_line,
)

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
