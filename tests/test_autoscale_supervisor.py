"""The supervisor follows the backlog: up when a backlog lands, back to min when it is gone,
still through a trickle; every item exactly one row."""

from __future__ import annotations

import re
import time
from contextlib import closing
from pathlib import Path

import psycopg2
import redis
import yaml

from ratebox import producer
from tests.conftest import Names
from tests.test_supervisor import Running, titles, wait_for

ITEMS = 150_000


def _config(path: Path, redis_url: str, dsn: str, names: Names) -> None:
    document = {
        "redis": {"url": redis_url},
        "postgres": {"dsn": dsn, "migrate_on_start": False},
        "stream": {"name": names.stream, "group": names.group, "dead_letter": names.dead_letter},
        "workers": {
            "count": 1,
            "block_ms": 200,
            "timeout_s": 20,
            "shutdown_timeout_s": 10,
            "autoscale": {
                "enabled": True,
                "min": 1,
                "max": 4,
                "lag_per_worker": 5000,
                "interval_s": 0.5,
                "scale_down_after_s": 4,
            },
        },
        "sweeper": {"interval_s": 1},
        "monitor": {"enabled": False, "metrics_listen": None},
        "embedded": {"dir": str(path.parent / "var")},
    }
    path.write_text(yaml.safe_dump(document))


def _rows(dsn: str) -> tuple[int, int]:
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT stream_id) FROM raw_items")
        total, distinct = cur.fetchone()
    return int(total), int(distinct)


def _workers(sup: Running) -> int:
    return sum(1 for t in sup.titles() if t.startswith("ratebox: worker "))


def test_a_backlog_scales_up_then_quiet_scales_back_to_min_through_a_trickle(
    tmp_path: Path, redis_url: str, pg_schema_dsn: str, names: Names, redis_client: redis.Redis
) -> None:
    path = tmp_path / "ratebox.yaml"
    _config(path, redis_url, pg_schema_dsn, names)
    sup = Running(path, tmp_path / "supervisor.log")
    try:
        sup.wait_titles(titles(1), timeout=60)
        producer.produce(redis_client, names.stream, ITEMS)
        most = wait_for("3 or more workers", lambda: (n := _workers(sup)) >= 3 and n, 120)
        assert most >= 3
        wait_for("every item a row", lambda: _rows(pg_schema_dsn)[0] >= ITEMS, 300)
        wait_for("back to one worker", lambda: sup.wait_titles(titles(1), 120), 130)
        logged = sup.text()
        assert re.search(
            r"scaled to [34] workers: backlog [\d,]+ for 1 workers > 5,000 each", logged
        )
        assert re.search(r"scaled to 1 workers: backlog [\d,]+ for 2 workers, below", logged)

        # A trickle far below one worker's capacity: the count stays where it is.
        before = logged.count("scaled to")
        sent, deadline = 0, time.monotonic() + 8
        while time.monotonic() < deadline:
            sent += producer.produce(redis_client, names.stream, 20)
            time.sleep(0.2)
        assert sup.text().count("scaled to") - before <= 1
        wait_for("the trickle's rows", lambda: _rows(pg_schema_dsn)[0] >= ITEMS + sent, 120)
        total, distinct = _rows(pg_schema_dsn)
        assert total == distinct == redis_client.xlen(names.stream)
        assert redis_client.xpending(names.stream, names.group)["pending"] == 0
    finally:
        sup.stop()
