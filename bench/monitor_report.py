"""Times monitor.collect() against 1,000,000 raw_items rows in a scratch schema.

    .venv/bin/python bench/monitor_report.py [--rows N] [--runs N] [--keep]

Uses POSTGRES_DSN / REDIS_URL when set, else the embedded servers under ./var. The rows are
made by generate_series inside PostgreSQL (seconds, not minutes); the consumer stats and
per-minute metrics are derived from them, so every figure of the report is consistent.
Prints one line per figure; the target is a report in under 1 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2
import redis
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

from ratebox import config, embedded, migrate, monitor, producer, store, stream

#: Where embedded servers live when POSTGRES_DSN / REDIS_URL are not set.
VAR_DIR = "var"

#: Spread of processed_at: one row every 7 ms puts 1,000,000 rows over the last ~2 hours, so
#: the one-hour windows of the report hold about half of them.
STEP_MS = 7

_ROWS = """
INSERT INTO raw_items (data, source, status, error_code, error_message, errors, created_at,
                       processed_at, stream_name, stream_id, consumer_name, delivery_count,
                       batch_id, producer, produced_at, processing_ms)
SELECT jsonb_build_object('phone', '09' || lpad((i %% 100000000)::text, 8, '0'),
                          'bank_account', lpad(i::text, 12, '0'),
                          'email', 'user' || i || '@example.com',
                          'name', 'Nguyen Van ' || i, 'source', 'web_crawler'),
       'web_crawler',
       CASE WHEN i %% 1000 = 0 THEN 'pending' WHEN i %% 10 < 3 THEN 'error' ELSE 'done' END,
       CASE WHEN i %% 1000 <> 0 AND i %% 10 < 3 THEN c.code END,
       CASE WHEN i %% 1000 <> 0 AND i %% 10 < 3 THEN c.message END,
       CASE WHEN i %% 1000 <> 0 AND i %% 10 < 3
            THEN jsonb_build_array(jsonb_build_object('code', c.code, 'field', c.field,
                                                      'message', c.message))
            ELSE '[]'::jsonb END,
       t.at - interval '20 ms',
       CASE WHEN i %% 1000 <> 0 THEN t.at END,
       %(stream)s,
       (extract(epoch FROM t.at) * 1000)::bigint || '-' || i,
       CASE WHEN i %% 1000 <> 0 THEN 'worker_00' || (1 + i %% 4) END,
       1,
       'batch_' || (i / 1000),
       'bench',
       t.at - interval '1 s',
       CASE WHEN i %% 1000 <> 0 THEN 0.05 + (i %% 97) / 100.0 END
FROM generate_series(1, %(rows)s) AS i
CROSS JOIN LATERAL (SELECT now() - (%(rows)s - i) * %(step)s * interval '1 ms' AS at) AS t
CROSS JOIN LATERAL (
    SELECT (ARRAY[100, 101, 200, 201, 300, 400])[1 + (i / 10) %% 6] AS code
) AS k
CROSS JOIN LATERAL (
    SELECT k.code,
           CASE k.code / 100 WHEN 1 THEN 'phone' WHEN 2 THEN 'bank_account'
                             WHEN 3 THEN 'email' ELSE 'name' END AS field,
           CASE k.code WHEN 100 THEN 'Missing phone number'
                       WHEN 101 THEN 'Phone number too short: 5 chars, minimum 10'
                       WHEN 200 THEN 'Missing bank account'
                       WHEN 201 THEN 'Bank account too short: 5 chars, minimum 8'
                       WHEN 300 THEN 'Invalid email format: user' || i || '@@example.com'
                       ELSE 'Name too short: 1 chars, minimum 2' END AS message
) AS c
"""

_STATS = """
INSERT INTO stream_consumer_stats (stream_name, consumer_name, group_name, processed, errors,
                                   dead_lettered, total_processing_ms, last_active, hostname,
                                   pid, started_at)
SELECT stream_name, consumer_name, %(group)s, count(*),
       count(*) FILTER (WHERE status = 'error'), 0, sum(processing_ms), max(processed_at),
       'bench-host', 4000 + right(consumer_name, 1)::int, min(processed_at)
FROM raw_items WHERE consumer_name IS NOT NULL
GROUP BY stream_name, consumer_name
"""

_METRICS = """
INSERT INTO stream_processing_metrics (minute, stream_name, consumer_name, processed, errors,
                                       dead_lettered, total_processing_ms, max_processing_ms)
SELECT date_trunc('minute', processed_at), stream_name, consumer_name, count(*),
       count(*) FILTER (WHERE status = 'error'), 0, sum(processing_ms), max(processing_ms)
FROM raw_items WHERE consumer_name IS NOT NULL
GROUP BY 1, 2, 3
"""

_ERROR_METRICS = """
INSERT INTO stream_error_metrics (minute, stream_name, error_code, field, count, sample_message)
SELECT date_trunc('minute', processed_at), stream_name, error_code, errors -> 0 ->> 'field',
       count(*), max(error_message)
FROM raw_items WHERE status = 'error'
GROUP BY 1, 2, 3, 4
"""


def _with_search_path(dsn: str, schema: str) -> str:
    options = parse_dsn(dsn).get("options", "")
    return make_dsn(dsn, options=f"{options} -c search_path={schema}".strip())


def fill_postgres(dsn: str, stream_name: str, group: str, rows: int) -> float:
    """Insert the rows, stats and metrics, then VACUUM ANALYZE; returns the seconds spent."""
    started = time.perf_counter()
    with closing(psycopg2.connect(dsn)) as conn:
        with conn, conn.cursor() as cur:
            cur.execute(_ROWS, {"stream": stream_name, "rows": rows, "step": STEP_MS})
            cur.execute(_STATS, {"group": group})
            cur.execute(_METRICS)
            cur.execute(_ERROR_METRICS)
        # As autovacuum would by the time anyone looks: the visibility map lets counts use
        # index-only scans, and the planner gets real statistics.
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "VACUUM ANALYZE raw_items, stream_consumer_stats,"
                " stream_processing_metrics, stream_error_metrics"
            )
    return time.perf_counter() - started


def fill_redis(client: redis.Redis, stream_name: str, group: str, entries: int) -> None:
    """A stream with a backlog: a third pending in the group, a third never delivered."""
    producer.produce(client, stream_name, entries)
    stream.ensure_group(client, stream_name, group)
    for i in range(4):
        stream.read(client, stream_name, group, f"worker_00{i + 1}", entries // 12)


def explain(dsn: str, statement: str) -> str:
    """The scan lines of EXPLAIN ANALYZE: shows which index a monitor query uses."""
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute("EXPLAIN (ANALYZE, COSTS OFF) " + statement)
        lines = [row[0].strip() for row in cur.fetchall()]
    return "; ".join(line.lstrip("-> ") for line in lines if "Scan" in line or "Execution" in line)


def measure(
    settings: config.Settings, client: redis.Redis, redis_url: str, dsn: str, runs: int
) -> dict[str, Any]:
    """Median and worst collect() on a kept connection (the live view), and one cold report."""
    conn = store.connect(dsn, application_name="ratebox bench")
    sampler = monitor.ProcessSampler()
    times, snapshot = [], {}
    try:
        for _ in range(runs + 1):  # the first run warms the caches and is not counted
            started = time.perf_counter()
            snapshot = monitor.collect(settings, client, conn, sampler=sampler)
            times.append(time.perf_counter() - started)
    finally:
        conn.close()
    started = time.perf_counter()
    monitor.report(settings, redis_url, dsn)
    cold = time.perf_counter() - started
    return {"times": times[1:], "snapshot": snapshot, "cold": cold}


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--entries", type=int, default=30_000, help="stream entries in Redis")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--keep", action="store_true", help="keep the schema and stream afterwards")
    args = p.parse_args()

    redis_url, dsn, started = embedded.resolve(
        os.environ.get("REDIS_URL") or "embedded",
        os.environ.get("POSTGRES_DSN") or "embedded",
        VAR_DIR,
    )
    suffix = f"bench_{uuid.uuid4().hex[:8]}"
    stream_name, group = f"raw_items_{suffix}", f"validator_workers_{suffix}"
    settings = config.from_mapping(
        {"stream": {"name": stream_name, "group": group, "dead_letter": f"{stream_name}:dead"}}, {}
    )
    with closing(psycopg2.connect(dsn)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(suffix)))
    schema_dsn = _with_search_path(dsn, suffix)
    client = stream.connect(redis_url)
    try:
        migrate.run(schema_dsn)
        fill_s = fill_postgres(schema_dsn, stream_name, group, args.rows)
        fill_redis(client, stream_name, group, args.entries)
        found = measure(settings, client, redis_url, schema_dsn, args.runs)
        times, snap = found["times"], found["snapshot"]
        (g,) = snap["groups"]
        median = statistics.median(times)
        print(f"rows in raw_items:        {args.rows:,} (inserted in {fill_s:.1f} s)")
        print(f"stream entries:           {args.entries:,} (lag {g['lag']:,}, {g['lag_source']})")
        print(f"report totals by status:  {snap['database']['totals']}")
        print(
            f"collect() median / max:   {median * 1000:.1f} ms / {max(times) * 1000:.1f} ms"
            f" over {len(times)} runs (kept connections, as the live view)"
        )
        print(f"  of which (last run):    {snap['timings_ms']}")
        # The one monitor query that touches raw_items (see schema/002_monitor_indexes.sql).
        pending_plan = explain(
            schema_dsn, "SELECT count(*) FROM raw_items WHERE status = 'pending'"
        )
        print(f"pending count plan:       {pending_plan}")
        print(f"one cold report:          {found['cold'] * 1000:.1f} ms (connecting included)")
        print(f"target < 1000 ms:         {'met' if max(median, found['cold']) < 1 else 'MISSED'}")
    finally:
        if args.keep:
            print(f"kept schema {suffix}, stream {stream_name}")
        else:
            client.delete(stream_name, settings.stream.dead_letter)
            with closing(psycopg2.connect(dsn)) as conn:
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(suffix)))
        client.close()
        embedded.stop(started, VAR_DIR)  # only the servers this run started
    return 0


if __name__ == "__main__":
    sys.exit(main())
