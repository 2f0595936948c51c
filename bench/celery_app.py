"""The peer: Celery 5 with the Redis broker, one task per message, acks_late.

Each task does what bench/naive.py does for one entry: validate with ratebox.rules' engine,
INSERT one row, commit. The worker is started by bench/run.py:

    BENCH_BROKER=redis://... BENCH_DSN=... BENCH_QUEUE=q BENCH_STREAM=s \\
        celery -A bench.celery_app worker --pool prefork --concurrency W -Q q

Everything the broker stores is under the key prefix BENCH_QUEUE: (deleted after the run).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2
from celery import Celery

from bench.row import INSERT, TEMPLATE, judge

QUEUE = os.environ.get("BENCH_QUEUE", "bench")
STREAM = os.environ.get("BENCH_STREAM", "bench")
INSERT_ONE = INSERT.replace("VALUES %s", "VALUES " + TEMPLATE)


def make_app(broker: str, queue: str) -> Celery:
    """The app, for the worker and for the publisher alike."""
    app = Celery("bench", broker=broker)
    app.conf.update(
        task_acks_late=True,
        task_ignore_result=True,
        task_default_queue=queue,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        # Every key the broker writes starts with the queue name: nothing shared, easy to drop.
        broker_transport_options={"global_keyprefix": f"{queue}:"},
        worker_hijack_root_logger=False,
    )
    return app


app = make_app(os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/0"), QUEUE)
_conn: list[Any] = []  # one connection per pool process, opened after the fork


def _db() -> Any:
    if not _conn:
        _conn.append(psycopg2.connect(os.environ["BENCH_DSN"]))
    return _conn[0]


@app.task(name="bench.validate")
def validate(entry_id: str, fields: dict[str, str]) -> None:
    """One message: the same verdict row as the other loops, committed on its own."""
    conn = _db()
    with conn.cursor() as cur:
        cur.execute(INSERT_ONE, judge(STREAM, "celery", entry_id, fields))
    conn.commit()
