"""The bare ceiling: the least a batched consumer can do per batch, with nothing else.

    XREADGROUP COUNT 500 -> validate each entry with ratebox.rules' engine
    -> one multi-row INSERT ... ON CONFLICT DO NOTHING (execute_values) -> commit -> one XACK

No stats, no metrics, no pending-entry recovery, no outage handling. Runs until SIGTERM.
With --copy the rows go by COPY into a temporary table, then one INSERT ... SELECT ... ON
CONFLICT DO NOTHING (what ratebox.store does, minus its statistics).

    python bench/ceiling.py --redis URL --dsn DSN --stream S --group G --consumer c1 [--copy]
"""

from __future__ import annotations

import argparse
import io
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2
import redis
from psycopg2.extras import execute_values

from bench.row import COLUMNS, INSERT, TEMPLATE, judge

STAGE = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS stage (data jsonb, source text, status text,"
    " error_code int, error_message text, errors jsonb, stream_name text, stream_id text,"
    " consumer_name text) ON COMMIT DELETE ROWS"
)
FROM_STAGE = (
    f"INSERT INTO raw_items ({COLUMNS}, processed_at) SELECT *, now() FROM stage"
    " ON CONFLICT (stream_name, stream_id) DO NOTHING"
)


def arguments(description: str, count: int) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    for name in ("--redis", "--dsn", "--stream", "--group", "--consumer"):
        p.add_argument(name, required=True)
    p.add_argument("--count", type=int, default=count, help="XREADGROUP COUNT")
    p.add_argument("--copy", action="store_true", help="COPY into a temp table, then INSERT")
    return p.parse_args()


def stop_flag() -> list[int]:
    """A list that gets an item on SIGTERM/SIGINT: the loop ends after its current batch."""
    flag: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: flag.append(signum))
    return flag


def copy_text(rows: list[tuple[Any, ...]]) -> str:
    """Rows as COPY text. Our values hold no tab or newline; JSON may hold backslashes."""
    return "".join(
        "\t".join("\\N" if v is None else str(v).replace("\\", "\\\\") for v in row) + "\n"
        for row in rows
    )


def main() -> None:
    args = arguments(__doc__ or "", 500)
    client = redis.Redis.from_url(args.redis)
    conn = psycopg2.connect(args.dsn)
    stopping = stop_flag()
    streams = {args.stream: ">"}
    while not stopping:
        reply = client.xreadgroup(args.group, args.consumer, streams, count=args.count, block=200)
        if not reply:
            continue
        entries = reply[0][1]
        rows = [
            judge(args.stream, args.consumer, entry_id.decode(), fields)
            for entry_id, fields in entries
        ]
        with conn.cursor() as cur:
            if args.copy:
                cur.execute(STAGE)
                cur.copy_expert("COPY stage FROM STDIN", io.StringIO(copy_text(rows)))
                cur.execute(FROM_STAGE)
            else:
                execute_values(cur, INSERT, rows, template=TEMPLATE, page_size=len(rows))
        conn.commit()
        client.xack(args.stream, args.group, *[entry_id for entry_id, _ in entries])
    conn.close()


if __name__ == "__main__":
    main()
