"""Speaks SQL: connections, migrations, batch writes, replay updates.

Its siblings: the monitor's read-only figures in store_monitor; a legacy table's adoption,
verdicts and bridge in store_adopt, store_legacy and store_bridge."""

from __future__ import annotations

import contextlib
import functools
import io
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2.extensions import connection as Connection
from psycopg2.extras import execute_values

from ratebox import buckets, message, privileges, verdict
from ratebox.errors import ConfigError, RateboxError, ServerUnavailable
from ratebox.mask import mask_url
from ratebox.verdict import Row

# -- connections and migrations -----------------------------------------------------------------

#: Seconds libpq waits for a server that does not answer, unless the DSN says otherwise.
CONNECT_TIMEOUT_S = 10
#: Advisory lock key that serialises migrations within a database (any fixed bigint will do).
MIGRATION_LOCK_KEY = int.from_bytes(b"ratebox", "big")

#: One migration file: (version, filename, sha256 checksum, SQL text).
Migration = tuple[str, str, str, str]
#: Decides which files to apply, given the files and the checksums applied so far by version.
MigrationPlan = Callable[[Sequence[Migration], Mapping[str, str]], Sequence[Migration]]

_CREATE_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     text PRIMARY KEY,
    filename    text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(RateboxError):
    """A migration file is wrong, was changed after it was applied, or failed to apply."""


def connect(
    dsn: str,
    application_name: str = "ratebox",
    idle_in_transaction_s: float | None = None,
    statement_timeout_s: float | None = None,
) -> Connection:
    """Open a connection (not autocommit); ServerUnavailable names the masked DSN on failure.

    ``idle_in_transaction_s``: the server ends this session's transaction when it idles
    that long (a client frozen or cut off mid-commit must not hold its locks for ever).
    ``statement_timeout_s``: a statement (or a wait for a lock) running that long is
    cancelled, an OperationalError that callers wait out like an outage.
    """
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        # Neither libpq's message nor the text itself: either may hold a piece of the password.
        raise ConfigError("postgres.dsn: not a valid libpq DSN or postgresql:// URL") from None
    params.setdefault("connect_timeout", str(CONNECT_TIMEOUT_S))
    params["application_name"] = application_name
    limits = []
    if idle_in_transaction_s is not None:
        limits.append(f"-c idle_in_transaction_session_timeout={int(idle_in_transaction_s * 1000)}")
    if statement_timeout_s is not None:
        ms = max(2, int(statement_timeout_s * 1000))
        # The lock wait ends first, so that the log says a lock was the cause.
        limits += [f"-c statement_timeout={ms}", f"-c lock_timeout={ms * 4 // 5}"]
    if limits:
        params["options"] = " ".join([params.get("options", ""), *limits]).strip()
    try:
        return psycopg2.connect(**params)
    except psycopg2.Error as exc:
        raise ServerUnavailable(
            f"cannot reach PostgreSQL at {_mask_dsn(dsn)}: {_first_line(exc)}"
        ) from exc


def apply_migrations(
    conn: Connection, files: Sequence[Migration], plan: MigrationPlan
) -> list[str]:
    """Apply the files that plan picks, each in one transaction with its record; returns their names.

    A session advisory lock is held throughout, so a concurrent run waits, then finds
    everything recorded and applies nothing.
    """
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    except psycopg2.Error as exc:
        raise ServerUnavailable(
            f"cannot lock the database for migrations: {_first_line(exc)}"
        ) from exc
    try:
        try:
            with conn, conn.cursor() as cur:
                cur.execute(_CREATE_SCHEMA_MIGRATIONS)
                cur.execute("SELECT version, checksum FROM schema_migrations")
                applied = dict(cur.fetchall())
        except psycopg2.Error as exc:
            raise _migration_failed(conn, "schema_migrations", exc) from exc
        done = []
        for version, filename, checksum, sql in plan(files, applied):
            try:
                with conn, conn.cursor() as cur:
                    cur.execute(sql)
                    cur.execute(
                        "INSERT INTO schema_migrations (version, filename, checksum)"
                        " VALUES (%s, %s, %s)",
                        (version, filename, checksum),
                    )
            except psycopg2.Error as exc:
                raise _migration_failed(conn, filename, exc) from exc
            done.append(filename)
        return done
    finally:
        # A broken connection has already dropped the lock with its session.
        with contextlib.suppress(psycopg2.Error), conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))


def _migration_failed(conn: Connection, what: str, exc: psycopg2.Error) -> RateboxError:
    """A lost server is an outage; anything else is the migration's fault."""
    if conn.closed:
        return ServerUnavailable(f"lost PostgreSQL while migrating ({what}): {_first_line(exc)}")
    return MigrationError(f"{what} failed: {_first_line(exc)}")


def _mask_dsn(dsn: str) -> str:
    """The DSN with its password hidden, in key=value, URL and URL-query form."""
    return mask_url(dsn)


def _first_line(exc: BaseException) -> str:
    """The first line of a libpq error (the rest is hints spread over several lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


# -- end of connections and migrations ----------------------------------------------------------


# -- batch writes (worker and sweeper) ---------------------------------------------------------

#: Errors that mean "the database is not there right now": wait, never blame the message.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
)


@dataclass(frozen=True)
class Consumer:
    """Who writes a batch: stream, group, consumer name, and where it runs."""

    stream: str
    group: str
    name: str
    hostname: str
    pid: int
    started_at: datetime


#: Columns of a batch, in COPY order; the first twelve are a Row's, the rest the batch's own.
_COLUMNS = (
    "data, source, status, error_code, error_message, errors, stream_id, delivery_count,"
    " batch_id, producer, produced_at, processing_ms, stream_name, consumer_name, processed_at"
)

# A batch of first deliveries cannot meet an existing row (barring a replay or a foreign
# writer), so it goes by COPY straight into raw_items: about a quarter less PostgreSQL CPU
# per row than staging it (bench/pg_paths.py). A batch that does meet one fails on the
# unique key as a whole, and takes the careful path below.
_COPY = f"COPY raw_items ({_COLUMNS}) FROM STDIN"

# The careful path: COPY into a temporary table (emptied at commit), then INSERT ... ON
# CONFLICT DO NOTHING, which says which rows were new.
_CREATE_STAGE = """
CREATE TEMPORARY TABLE IF NOT EXISTS ratebox_batch (
    data jsonb, source text, status text, error_code integer, error_message text,
    errors jsonb, stream_id text, delivery_count integer, batch_id text, producer text,
    produced_at timestamptz, processing_ms double precision, stream_name text,
    consumer_name text, processed_at timestamptz
) ON COMMIT DELETE ROWS
"""
_FROM_STAGE = f"""
INSERT INTO raw_items ({_COLUMNS}) SELECT {_COLUMNS} FROM ratebox_batch
ON CONFLICT (stream_name, stream_id) DO NOTHING
RETURNING stream_id
"""

# The statistics of the rows just inserted, in the same transaction: the consumer's totals,
# the minute's metrics and the minute's error counts, in one round trip. Error counts go in
# key order, so two workers lock shared rows in the same order and never deadlock.
_RECORD_STATS = """
WITH stats AS (
    INSERT INTO stream_consumer_stats AS s (stream_name, consumer_name, group_name, processed,
        errors, dead_lettered, total_processing_ms, last_active, hostname, pid, started_at,
        processing_buckets)
    VALUES (%(stream)s, %(consumer)s, %(group)s, %(processed)s, %(errors)s, %(dead)s,
            %(total_ms)s, now(), %(hostname)s, %(pid)s, %(started_at)s, %(buckets)s::bigint[])
    ON CONFLICT (stream_name, consumer_name) DO UPDATE SET
        processed = s.processed + EXCLUDED.processed,
        processing_buckets = ARRAY(
            SELECT coalesce(a, 0) + coalesce(b, 0)
            FROM unnest(s.processing_buckets, EXCLUDED.processing_buckets) WITH ORDINALITY
                AS u (a, b, i)
            ORDER BY i),
        errors = s.errors + EXCLUDED.errors,
        dead_lettered = s.dead_lettered + EXCLUDED.dead_lettered,
        total_processing_ms = s.total_processing_ms + EXCLUDED.total_processing_ms,
        last_active = EXCLUDED.last_active, group_name = EXCLUDED.group_name,
        hostname = EXCLUDED.hostname, pid = EXCLUDED.pid, started_at = EXCLUDED.started_at
), metrics AS (
    INSERT INTO stream_processing_metrics AS m (minute, stream_name, consumer_name, processed,
        errors, dead_lettered, total_processing_ms, max_processing_ms)
    SELECT date_trunc('minute', now()), %(stream)s, %(consumer)s, %(processed)s, %(errors)s,
           %(dead)s, %(total_ms)s, %(max_ms)s
    WHERE %(processed)s > 0
    ON CONFLICT (minute, stream_name, consumer_name) DO UPDATE SET
        processed = m.processed + EXCLUDED.processed,
        errors = m.errors + EXCLUDED.errors,
        dead_lettered = m.dead_lettered + EXCLUDED.dead_lettered,
        total_processing_ms = m.total_processing_ms + EXCLUDED.total_processing_ms,
        max_processing_ms = greatest(m.max_processing_ms, EXCLUDED.max_processing_ms)
)
INSERT INTO stream_error_metrics AS e (minute, stream_name, error_code, field, count,
    sample_message)
SELECT date_trunc('minute', now()), %(stream)s, code, field, n, sample
FROM unnest(%(codes)s::integer[], %(fields)s::text[], %(counts)s::bigint[], %(samples)s::text[])
    AS u (code, field, n, sample)
ON CONFLICT (minute, stream_name, error_code, field) DO UPDATE SET
    count = e.count + EXCLUDED.count, sample_message = EXCLUDED.sample_message
"""

_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
NULL = "\\N"


def _json(value: Any) -> str:
    if not value and type(value) is list:
        return "[]"  # the errors of every valid item
    return _text(message.dumps(value))


def _text(value: str | None) -> str:
    if value is None:
        return NULL
    # Most values need no escaping; four substring tests are cheaper than translate().
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value


# Producer, batch and source repeat across a batch: escaped once each (a small cache: a
# value can be as large as a whole entry).
_meta = functools.lru_cache(maxsize=64)(_text)


# Producers stamp a batch of entries with one time.
@functools.lru_cache(maxsize=256)
def _stamp(at: datetime | None) -> str:
    return NULL if at is None else at.isoformat()


def _copy_text(rows: Sequence[Row], consumer: Consumer, now: datetime) -> io.StringIO:
    """The rows as COPY text: tab-separated, \\N for NULL, one line each."""
    tail = f"\t{_text(consumer.stream)}\t{_text(consumer.name)}\t{now.isoformat()}\n"
    # Stream IDs are digits and a dash: nothing to escape.
    return io.StringIO(
        "".join(
            f"{_text(r.data)}\t{_meta(r.source)}\t{r.status}\t"
            f"{NULL if r.error_code is None else r.error_code}\t{_text(r.error_message)}\t"
            f"{_json(r.errors)}\t{r.stream_id}\t{r.delivery_count}\t{_meta(r.batch_id)}\t"
            f"{_meta(r.producer)}\t{_stamp(r.produced_at)}\t{r.processing_ms:.4f}{tail}"
            for r in rows
        )
    )


def _stats(consumer: Consumer, rows: Sequence[Row]) -> dict[str, Any]:
    """The parameters of _RECORD_STATS for rows just inserted."""
    errors = dead = 0
    total_ms = max_ms = 0.0
    counts: dict[tuple[int, str], list[Any]] = {}
    per_bucket = [0] * (len(buckets.BOUNDS_MS) + 1)
    for r in rows:
        ms = r.processing_ms
        per_bucket[bisect_left(buckets.BOUNDS_MS, ms)] += 1
        total_ms += ms
        if ms > max_ms:
            max_ms = ms
        if r.errors:
            errors += 1
            dead += r.error_code == message.DEAD_LETTERED
            for failure in r.errors:
                key = (failure.code, failure.field)
                if key in counts:
                    counts[key][0] += 1
                else:
                    counts[key] = [1, failure.message]
    keys = sorted(counts)
    return {
        "stream": consumer.stream,
        "consumer": consumer.name,
        "group": consumer.group,
        "hostname": consumer.hostname,
        "pid": consumer.pid,
        "started_at": consumer.started_at,
        "processed": len(rows),
        "errors": errors,
        "dead": dead,
        "total_ms": total_ms,
        "max_ms": max_ms,
        "buckets": per_bucket,
        "codes": [code for code, _ in keys],
        "fields": [field for _, field in keys],
        "counts": [counts[k][0] for k in keys],
        "samples": [counts[k][1] for k in keys],
    }


def _now(cur: Any) -> datetime:
    # The transaction's own now(), as the statistics' minute will be.
    cur.execute("SELECT now()")
    return cur.fetchone()[0]


def _copy_all(conn: Any, consumer: Consumer, rows: Sequence[Row]) -> int:
    with conn.cursor() as cur:
        cur.copy_expert(_COPY, _copy_text(rows, consumer, _now(cur)))
        cur.execute(_RECORD_STATS, _stats(consumer, rows))
    conn.commit()
    return len(rows)


def _insert_new(conn: Any, consumer: Consumer, rows: Sequence[Row]) -> int:
    with conn.cursor() as cur:
        cur.execute(_CREATE_STAGE)
        cur.copy_expert(
            f"COPY ratebox_batch ({_COLUMNS}) FROM STDIN", _copy_text(rows, consumer, _now(cur))
        )
        cur.execute(_FROM_STAGE)
        inserted = {stream_id for (stream_id,) in cur.fetchall()}
        new = [r for r in rows if r.stream_id in inserted]
        cur.execute(_RECORD_STATS, _stats(consumer, new))
    conn.commit()
    return len(new)


class SchemaMissing(RateboxError):
    """The database was never migrated: waiting will not fix it."""


def write_batch(conn: Any, consumer: Consumer, rows: Sequence[Row]) -> int:
    """Insert the new rows and their stats in one transaction; returns how many were new.

    A row the database refuses is isolated by retrying in halves and recorded with code 903;
    the rest of the batch still commits. Outage errors are raised for the caller to wait out.
    """
    if not rows:
        return 0
    if all(r.delivery_count == 1 for r in rows):
        try:
            return _copy_all(conn, consumer, rows)
        except OUTAGE_ERRORS:
            raise
        except psycopg2.errors.InsufficientPrivilege as exc:
            raise _permission(conn, exc) from None
        except (psycopg2.Error, UnicodeError):
            conn.rollback()  # a row exists already, or one is refused: the careful path sorts it
    return _write_careful(conn, consumer, rows)


def _write_careful(conn: Any, consumer: Consumer, rows: Sequence[Row]) -> int:
    try:
        return _insert_new(conn, consumer, rows)
    except OUTAGE_ERRORS:
        raise
    except psycopg2.errors.InsufficientPrivilege as exc:
        # The role's fault, not the rows': never recorded as code 903.
        raise _permission(conn, exc) from None
    except (psycopg2.Error, UnicodeError) as exc:
        conn.rollback()
        if len(rows) == 1:
            # The first line only: DETAIL and CONTEXT lines quote the row's data.
            reason = (getattr(exc, "pgerror", None) or str(exc)).strip().splitlines()[0][:200]
            try:
                return _insert_new(conn, consumer, [verdict.rejected(rows[0], reason)])
            except OUTAGE_ERRORS:
                raise
            except (psycopg2.Error, UnicodeError):
                conn.rollback()
                return _insert_new(conn, consumer, [verdict.bare(rows[0], "row refused")])
        middle = len(rows) // 2
        return _write_careful(conn, consumer, rows[:middle]) + _write_careful(
            conn, consumer, rows[middle:]
        )


def _permission(conn: Any, exc: psycopg2.Error) -> privileges.PermissionMissing:
    conn.rollback()
    return privileges.PermissionMissing(privileges.postgres_line(exc.pgerror or str(exc)))


def register_consumer(conn: Any, consumer: Consumer) -> None:
    """Record (or refresh) the consumer's row: host, pid, start time."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('raw_items') IS NOT NULL")
        if not cur.fetchone()[0]:
            conn.rollback()
            raise SchemaMissing(
                "the database has no raw_items table: run bin/ratebox-migrate "
                "(or set postgres.migrate_on_start)"
            )
        cur.execute(
            """
            INSERT INTO stream_consumer_stats (stream_name, consumer_name, group_name, processed,
                errors, dead_lettered, total_processing_ms, last_active, hostname, pid, started_at)
            VALUES (%s, %s, %s, 0, 0, 0, 0, now(), %s, %s, %s)
            ON CONFLICT (stream_name, consumer_name) DO UPDATE SET group_name = EXCLUDED.group_name,
                hostname = EXCLUDED.hostname, pid = EXCLUDED.pid, started_at = EXCLUDED.started_at
            """,
            (
                consumer.stream,
                consumer.name,
                consumer.group,
                consumer.hostname,
                consumer.pid,
                consumer.started_at,
            ),
        )
    conn.commit()


def close(conn: Any) -> None:
    """Close a connection that may already be broken."""
    try:
        conn.close()
    except Exception:  # a dead connection may refuse even to close
        pass


# -- end of batch writes ---------------------------------------------------------------------


# -- sweeper ------------------------------------------------------------------------------------


def ping(conn: Any) -> None:
    """One round trip, so a dead server shows as an outage error before anything is claimed."""
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    conn.rollback()  # end the implicit transaction: an idle session holds nothing open


# -- end of sweeper -----------------------------------------------------------------------------


# -- replay -------------------------------------------------------------------------------------

_VERDICT_TEMPLATE = "(%s, %s, %s::integer, %s, %s::jsonb)"

# One statement per page: compare each row's verdict with the new one, update those that
# differ, and count. Rows holding a pipeline verdict (900 and above: rejected, dead-lettered,
# malformed) are not re-judged by rules, and neither is a new verdict of that kind.
_UPDATE_VERDICTS = """
WITH v (stream_id, status, error_code, error_message, errors) AS (VALUES %s),
cur AS (
    SELECT r.id, v.stream_id, r.status AS old_status, r.consumer_name,
           coalesce(r.error_code >= 900, false) OR coalesce(v.error_code >= 900, false) AS pipeline,
           (r.status, r.error_code, r.error_message, r.errors)
               IS DISTINCT FROM (v.status, v.error_code, v.error_message, v.errors) AS differs
    FROM raw_items r JOIN v ON r.stream_id = v.stream_id
    WHERE r.stream_name = %(stream)s
    FOR UPDATE OF r
), upd AS (
    UPDATE raw_items r
    SET status = v.status, error_code = v.error_code, error_message = v.error_message,
        errors = v.errors, processed_at = now()
    FROM cur JOIN v ON v.stream_id = cur.stream_id
    WHERE r.id = cur.id AND cur.differs AND NOT cur.pipeline
    RETURNING 1
), totals AS (
    -- The consumers' error totals follow their rows, so the monitor's totals stay exact.
    UPDATE stream_consumer_stats s SET errors = s.errors + d.delta
    FROM (
        SELECT cur.consumer_name,
               sum((v.status = 'error')::int - (cur.old_status = 'error')::int) AS delta
        FROM cur JOIN v ON v.stream_id = cur.stream_id
        WHERE cur.differs AND NOT cur.pipeline
        GROUP BY cur.consumer_name
    ) AS d
    WHERE s.stream_name = %(stream)s AND s.consumer_name = d.consumer_name AND d.delta <> 0
    RETURNING 1
)
SELECT (SELECT count(*) FROM upd),
       count(*) FILTER (WHERE NOT pipeline AND NOT differs),
       count(*) FILTER (WHERE pipeline)
FROM cur
"""


def update_verdicts(conn: Any, stream: str, rows: Sequence[Row]) -> dict[str, int]:
    """Rewrite the verdicts of existing rows in one transaction: counts changed/unchanged/skipped.

    Rows not in the table yet are left to the workers; the caller counts them as the rest.
    """
    if not rows:
        return {"changed": 0, "unchanged": 0, "skipped": 0}
    values = [
        (r.stream_id, r.status, r.error_code, r.error_message, message.dumps(r.errors))
        for r in rows
    ]
    try:
        with conn.cursor() as cur:
            sql = cur.mogrify(
                _UPDATE_VERDICTS.replace("VALUES %s", "VALUES __ROWS__"), {"stream": stream}
            ).decode()
            result = execute_values(
                cur,
                sql.replace("VALUES __ROWS__", "VALUES %s"),
                values,
                template=_VERDICT_TEMPLATE,
                page_size=len(values),
                fetch=True,
            )
        conn.commit()
    except Exception:
        with contextlib.suppress(psycopg2.Error):
            conn.rollback()
        raise
    changed, unchanged, skipped = result[0]
    return {"changed": int(changed), "unchanged": int(unchanged), "skipped": int(skipped)}


# -- end of replay ------------------------------------------------------------------------------
