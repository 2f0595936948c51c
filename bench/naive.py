"""The naive loop the old system would have grown into: one message at a time.

    XREADGROUP COUNT 10 -> for each entry: validate, INSERT one row, commit, XACK it

Same rules engine and the same row as bench/ceiling.py; only the batching differs.
Runs until SIGTERM.

    python bench/naive.py --redis URL --dsn DSN --stream S --group G --consumer n1
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2
import redis

from bench.ceiling import arguments, stop_flag
from bench.row import INSERT, TEMPLATE, judge

INSERT_ONE = INSERT.replace("VALUES %s", "VALUES " + TEMPLATE)


def main() -> None:
    args = arguments(__doc__ or "", 10)
    client = redis.Redis.from_url(args.redis)
    conn = psycopg2.connect(args.dsn)
    stopping = stop_flag()
    streams = {args.stream: ">"}
    while not stopping:
        reply = client.xreadgroup(args.group, args.consumer, streams, count=args.count, block=200)
        if not reply:
            continue
        for entry_id, fields in reply[0][1]:
            with conn.cursor() as cur:
                cur.execute(
                    INSERT_ONE, judge(args.stream, args.consumer, entry_id.decode(), fields)
                )
            conn.commit()
            client.xack(args.stream, args.group, entry_id)
    conn.close()


if __name__ == "__main__":
    main()
