"""Moving off database polling, measured: adoption under a polling load, compare, bridge, and
the legacy-verdict drain against ordinary entries. Prints figures.

    /work/venv/bin/python bench/legacy.py [--judged 1000000] [--pending 20000]

Uses the machine's servers (POSTGRES_DSN / REDIS_URL, default 127.0.0.1) in a schema and a
stream of its own, both removed afterwards. The poller thread does what a legacy poller
does -- SELECT ... WHERE status = 'pending' LIMIT 10 FOR UPDATE SKIP LOCKED, UPDATE, commit --
but touches another column instead of the status, so the pending rows stay for the bridge.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2
import redis
from psycopg2.extensions import make_dsn, parse_dsn

from ratebox import bridge, compare, config, migrate, producer, stream
from ratebox.rules import compile_rules
from ratebox.worker import Worker

PG = os.environ.get("POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def sql(dsn: str, text: str, params: object = None) -> list[tuple]:
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(text, params)
        found = cur.fetchall() if cur.description else []
        conn.commit()
        return found


def poll(dsn: str, stop: threading.Event, stalls: list[float]) -> None:
    with closing(psycopg2.connect(dsn)) as conn:
        while not stop.is_set():
            started = time.monotonic()
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT id FROM raw_items WHERE status = 'pending' ORDER BY id LIMIT 10"
                    " FOR UPDATE SKIP LOCKED"
                )
                ids = [i for (i,) in cur.fetchall()]
                cur.execute("UPDATE raw_items SET touched = now() WHERE id = ANY(%s)", (ids,))
            conn.commit()
            stalls.append(time.monotonic() - started)
            time.sleep(0.005)


def drain(settings: config.Settings, dsn: str, expected: int) -> float:
    worker = Worker(settings, "worker_001", REDIS, dsn)
    started = time.monotonic()
    handled = 0
    while handled < expected:
        handled += worker.loop()
    took = time.monotonic() - started
    worker.pipeline.reset()
    return expected / took


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--judged", type=int, default=1_000_000)
    p.add_argument("--pending", type=int, default=20_000)
    args = p.parse_args()
    schema = f"bench_legacy_{uuid.uuid4().hex[:8]}"
    sql(PG, f"CREATE SCHEMA {schema}")
    options = parse_dsn(PG).get("options", "")
    dsn = make_dsn(PG, options=f"{options} -c search_path={schema}".strip())
    name = f"raw_items_{schema}"
    client = redis.Redis.from_url(REDIS)
    try:
        sql(
            dsn,
            "CREATE TABLE raw_items (id bigserial PRIMARY KEY, data jsonb NOT NULL,"
            " status text NOT NULL DEFAULT 'pending', source text, error_code integer,"
            " error_message text, created_at timestamptz NOT NULL DEFAULT now(),"
            " processed_at timestamptz, touched timestamptz)",
        )
        sql(
            dsn,
            "INSERT INTO raw_items (data, status, error_code, created_at, processed_at)"
            " SELECT jsonb_build_object('phone', CASE WHEN i %% 5 = 0 THEN '123' ELSE"
            " '0912345678' END, 'bank_account', '12345678901', 'name', 'Nguyen Van A'),"
            " CASE WHEN i %% 7 = 0 THEN 'error' ELSE 'done' END,"
            " CASE WHEN i %% 7 = 0 THEN 101 END,"
            " now() - interval '2 hours' + i * interval '5 ms',"
            " now() - interval '2 hours' + i * interval '5 ms' + interval '3 s'"
            " FROM generate_series(1, %s) i",
            (args.judged,),
        )
        sql(
            dsn,
            "INSERT INTO raw_items (data) SELECT jsonb_build_object('phone', '0912345678',"
            " 'bank_account', '12345678901', 'n', i) FROM generate_series(1, %s) i",
            (args.pending,),
        )
        judged_before = sql(
            dsn,
            "SELECT md5(string_agg(id || status || coalesce(error_code, 0)::text, ',' ORDER BY id)) FROM raw_items WHERE status <> 'pending'",
        )
        stop, stalls = threading.Event(), []
        thread = threading.Thread(target=poll, args=(dsn, stop, stalls))
        thread.start()
        time.sleep(1)
        started = time.monotonic()
        migrate.run(dsn)
        adopt_s = time.monotonic() - started
        time.sleep(1)
        stop.set()
        thread.join()
        unchanged = judged_before == sql(
            dsn,
            "SELECT md5(string_agg(id || status || coalesce(error_code, 0)::text, ',' ORDER BY id)) FROM raw_items WHERE status <> 'pending'",
        )
        print(
            f"adoption of {args.judged:,} judged + {args.pending:,} pending rows: {adopt_s:.2f} s;"
            f" poller: {len(stalls)} cycles, longest {max(stalls) * 1000:.0f} ms;"
            f" judged rows unchanged: {unchanged}"
        )

        settings = config.from_mapping(
            {"stream": {"name": name, "group": f"g_{schema}", "dead_letter": f"{name}:dead"}},
            {},
            source="bench",
        )
        report = compare.compare(dsn, compile_rules(settings.rules))
        print(
            f"compare: {report.compared:,} rows, {report.compared - report.agreed:,} disagree,"
            f" {report.seconds:.2f} s ({report.compared / report.seconds:,.0f} rows/s)"
        )
        return run_stream(settings, dsn, client, args.pending, name, schema)
    finally:
        sql(PG, f"DROP SCHEMA {schema} CASCADE")
        for key in client.scan_iter(match=f"*{schema}*"):
            client.delete(key)


def run_stream(settings, dsn, client, pending, name, schema) -> int:
    stream.ensure_group(client, name, settings.stream.group)
    counts = bridge.Bridge(settings, REDIS, dsn).run(follow=False)
    took = time.monotonic() - counts.started
    print(
        f"bridge: {counts.published:,} rows published in {took:.2f} s"
        f" ({counts.published / took:,.0f} rows/s)"
    )
    legacy_rate = drain(settings, dsn, counts.published)
    producer.produce(client, name, pending)
    ordinary_rate = drain(settings, dsn, pending)
    left = sql(dsn, "SELECT count(*) FROM raw_items WHERE status = 'pending'")[0][0]
    print(
        f"drain, one worker: legacy entries {legacy_rate:,.0f} msg/s, ordinary entries"
        f" {ordinary_rate:,.0f} msg/s (ratio {legacy_rate / ordinary_rate:.2f}); pending left {left}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
