"""PostgreSQL's share of a batch write, path by path: the backend's CPU per row.

    .venv/bin/python bench/pg_paths.py [--servers machine|embedded] [--batches 60] [--size 500]
    .venv/bin/python bench/pg_paths.py --variants     # what each part of raw_items costs

Rows are judged and turned into COPY text before the clock starts, so what is timed is the
server's work (read from /proc for the connection's backend) plus the round trips:

- ``store.write_batch`` on first deliveries: COPY straight into raw_items, then the stats;
- ``store.write_batch`` on redeliveries: the careful path (staging table, INSERT ... ON
  CONFLICT DO NOTHING RETURNING, then the stats);
- the COPY ceiling's statements (staging table, INSERT ... SELECT ... ON CONFLICT, no stats).

``--variants`` times plain COPY batches into raw_items as migrated and into altered copies
of it (one scratch schema each), to show what the jsonb columns, the unique key, its
collation and the failures' index cost per row.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from datetime import datetime, timezone
from typing import Any

from common import machine_up, scratch, servers

from ratebox import producer, store, verdict
from ratebox.rules import DEFAULT_RULES, compile_rules
from ratebox.verdict import Row


def backend_cpu_s(conn: Any) -> float:
    """CPU seconds used so far by the connection's server process (Linux /proc)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
    conn.rollback()
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sample_rows(size: int) -> list[Row]:
    """One batch of the producer's mix (70 % valid), judged by the default rules."""
    items = producer.generate(size, seed=7)
    entries = [
        (f"1-{i}", {k.encode(): v.encode() for k, v in fields.items()})
        for i, fields in enumerate(items)
    ]
    return verdict.judge_all(entries, compile_rules(DEFAULT_RULES), 1 << 20)


def batches(template: Sequence[Row], count: int, deliveries: int) -> list[list[Row]]:
    """Copies of the template with fresh stream IDs (and the given delivery count)."""
    base = time.time_ns()
    return [
        [
            r._replace(stream_id=f"{base}-{b * len(template) + i}", delivery_count=deliveries)
            for i, r in enumerate(template)
        ]
        for b in range(count)
    ]


def ceiling_copy(conn: Any, consumer: store.Consumer, rows: Sequence[Row]) -> None:
    """What bench/ceiling.py --copy does: staging table, INSERT ... SELECT ... ON CONFLICT."""
    with conn.cursor() as cur:
        cur.execute(store._CREATE_STAGE)
        text = store._copy_text(rows, consumer, datetime.now(timezone.utc))
        cur.copy_expert(f"COPY ratebox_batch ({store._COLUMNS}) FROM STDIN", text)
        cur.execute(
            f"INSERT INTO raw_items ({store._COLUMNS}) SELECT * FROM ratebox_batch"
            " ON CONFLICT (stream_name, stream_id) DO NOTHING"
        )
    conn.commit()


# Alterations of a freshly migrated raw_items; each is measured in a schema of its own.
VARIANTS: dict[str, list[str]] = {
    "raw_items as migrated": [],
    'unique key with COLLATE "C"': [
        "ALTER TABLE raw_items DROP CONSTRAINT raw_items_stream_entry_key",
        'ALTER TABLE raw_items ALTER stream_name TYPE text COLLATE "C",'
        ' ALTER stream_id TYPE text COLLATE "C"',
        "ALTER TABLE raw_items ADD CONSTRAINT raw_items_stream_entry_key"
        " UNIQUE (stream_name, stream_id)",
    ],
    "without the failures' index": ["DROP INDEX raw_items_recent_errors_idx"],
    "data and errors as json, not jsonb": [
        "ALTER TABLE raw_items DROP CONSTRAINT IF EXISTS raw_items_errors_check,"
        " ALTER errors DROP DEFAULT, ALTER data TYPE json, ALTER errors TYPE json"
    ],
    "without the unique key": ["ALTER TABLE raw_items DROP CONSTRAINT raw_items_stream_entry_key"],
}


def variants(srv: Any, template: Sequence[Row], count: int) -> list[dict[str, Any]]:
    """Plain COPY batches (one commit each) into raw_items as altered by each variant."""
    results = []
    for name, statements in VARIANTS.items():
        with scratch(srv, "pgvariant") as s, closing(store.connect(s.dsn)) as conn:
            with conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
            conn.commit()
            consumer = store.Consumer(
                s.stream, s.group, "bench", "host", 1, datetime.now(timezone.utc)
            )
            now = datetime.now(timezone.utc)
            texts = [store._copy_text(b, consumer, now) for b in batches(template, count, 1)]

            def copy(text: Any) -> None:
                with conn.cursor() as cur:
                    cur.copy_expert(store._COPY, text)
                conn.commit()

            results.append(measure(conn, name, copy, texts, len(texts) * len(template)))
    return results


def measure(
    conn: Any, name: str, write: Callable[[Any], Any], work: Sequence[Any], rows: int
) -> dict[str, Any]:
    cpu, started = backend_cpu_s(conn), time.perf_counter()
    for batch in work:
        write(batch)
    wall, cpu = time.perf_counter() - started, backend_cpu_s(conn) - cpu
    print(
        f"{name:48s} backend CPU {cpu / rows * 1e6:6.1f} µs/row   wall {wall / rows * 1e6:6.1f} µs/row"
    )
    return {"path": name, "backend_cpu_us": cpu / rows * 1e6, "wall_us": wall / rows * 1e6}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--servers", choices=["machine", "embedded"], default=None)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--size", type=int, default=500)
    p.add_argument("--variants", action="store_true", help="raw_items altered, plain COPY")
    args = p.parse_args()
    srv = servers(args.servers or ("machine" if machine_up() else "embedded"))
    template = sample_rows(args.size)
    total = args.batches * args.size
    try:
        if args.variants:
            for _ in range(2):  # the first round warms caches; both are shown
                variants(srv, template, args.batches)
            return
        with scratch(srv, "pgpaths") as s, closing(store.connect(s.dsn)) as conn:
            consumer = store.Consumer(
                s.stream, s.group, "bench", "host", 1, datetime.now(timezone.utc)
            )
            store.register_consumer(conn, consumer)
            for _ in range(2):  # the first round warms caches; both are shown
                measure(
                    conn,
                    "write_batch, first deliveries (direct COPY)",
                    lambda rows: store.write_batch(conn, consumer, rows),
                    batches(template, args.batches, 1),
                    total,
                )
                measure(
                    conn,
                    "write_batch, redeliveries (careful path)",
                    lambda rows: store.write_batch(conn, consumer, rows),
                    batches(template, args.batches, 2),
                    total,
                )
                measure(
                    conn,
                    "COPY ceiling (staging + ON CONFLICT, no stats)",
                    lambda rows: ceiling_copy(conn, consumer, rows),
                    batches(template, args.batches, 1),
                    total,
                )
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
