"""PostgreSQL's share of a batch write, path by path: the backend's CPU per row.

    .venv/bin/python bench/pg_paths.py [--servers machine|embedded] [--batches 60] [--size 500]

Rows are judged and turned into COPY text before the clock starts, so what is timed is the
server's work (read from /proc for the connection's backend) plus the round trips:

- ``store.write_batch`` on first deliveries: COPY straight into raw_items, then the stats;
- ``store.write_batch`` on redeliveries: the careful path (staging table, INSERT ... ON
  CONFLICT DO NOTHING RETURNING, then the stats);
- the COPY ceiling's statements (staging table, INSERT ... SELECT ... ON CONFLICT, no stats).
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


def measure(
    conn: Any, name: str, write: Callable[[Sequence[Row]], Any], work: list[list[Row]]
) -> dict[str, Any]:
    rows = sum(len(b) for b in work)
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
    args = p.parse_args()
    srv = servers(args.servers or ("machine" if machine_up() else "embedded"))
    template = sample_rows(args.size)
    try:
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
                )
                measure(
                    conn,
                    "write_batch, redeliveries (careful path)",
                    lambda rows: store.write_batch(conn, consumer, rows),
                    batches(template, args.batches, 2),
                )
                measure(
                    conn,
                    "COPY ceiling (staging + ON CONFLICT, no stats)",
                    lambda rows: ceiling_copy(conn, consumer, rows),
                    batches(template, args.batches, 1),
                )
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
