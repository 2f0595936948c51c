"""Hostile days: a pill among innocent entries, a locked or slow database, a huge entry.

Only an entry that failed on its own may be dead-lettered; a database that blocks or
crawls is an outage, waited out; a move to or from the dead-letter stream is atomic for
any entry Redis accepts.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg2
import redis
import yaml

from ratebox import deadletter, producer, stream, stream_dead
from ratebox.config import Settings
from ratebox.worker import Worker
from tests.conftest import Names
from tests.test_supervisor import Running, pending, row_count, titles, wait_for
from tests.test_sweeper import HANGING_NAME, VALID, _HangingEngine, make_settings, publish, rows
from tests.test_worker import start_worker


def _work_until_hung(settings: Settings, redis_url: str, dsn: str) -> None:
    worker = Worker(settings, "worker_001", redis_url, dsn, _HangingEngine(settings))  # type: ignore[arg-type]
    try:
        while worker.loop() or worker.batch is not None or any(worker.cursors):
            pass
    finally:
        worker.shutdown()
    os._exit(0)


def test_a_hanging_pill_behind_innocent_entries_dead_letters_only_itself(
    redis_client: redis.Redis, redis_url: str, pg_schema_dsn: str, names: Any
) -> None:
    settings = make_settings(names, workers={"batch_size": 10, "block_ms": 100})
    items = [dict(VALID, name=f"Tran Van {i}") for i in range(10)]
    # Last of the page: chunks of 1, 2, 4 and 3 put innocent entries beside it after each
    # restart, and a count of the page's re-reads would give one of them up before it.
    items[9] = dict(VALID, name=HANGING_NAME)
    ids = publish(redis_client, settings, items)
    pill = ids[9]
    fork = multiprocessing.get_context("fork")
    # A minimal supervisor: the worker under its one name, killed whenever it hangs.
    hangs = 0
    for _ in range(settings.workers.max_retries + 6):
        child = fork.Process(target=_work_until_hung, args=(settings, redis_url, pg_schema_dsn))
        child.start()
        child.join(timeout=8)
        if child.is_alive():
            hangs += 1
            child.kill()
            child.join()
        if not redis_client.xpending(settings.stream.name, settings.stream.group)["pending"]:
            break

    dead = stream.entries_between(redis_client, settings.stream.dead_letter, "-", "+", 100)
    assert [d[1][b"original_id"] for d in dead] == [pill.encode()]
    found = rows(pg_schema_dsn, settings)
    assert found[pill]["error_code"] == 910
    assert found[pill]["deliveries"] == settings.workers.max_retries + 1
    assert all(found[i]["status"] == "done" for i in ids if i != pill), found
    assert len(found) == len(ids)
    # Tried alone (a delivery counted each time) until it had max_retries, then given up.
    assert hangs >= settings.workers.max_retries


def _supervised(tmp_path: Path, redis_url: str, dsn: str, names: Names) -> Running:
    path = tmp_path / "ratebox.yaml"
    document = {
        "redis": {"url": redis_url},
        "postgres": {"dsn": dsn, "migrate_on_start": False},
        "stream": {"name": names.stream, "group": names.group, "dead_letter": names.dead_letter},
        "workers": {
            "count": 2,
            "batch_size": 50,
            "block_ms": 200,
            "timeout_s": 6,
            "max_retries": 2,
            "shutdown_timeout_s": 5,
        },
        # Short, so that anything left idle while the database is stuck would be reclaimed.
        "sweeper": {"interval_s": 1, "min_idle_ms": 2000},
        "monitor": {"enabled": False, "metrics_listen": None},
        "embedded": {"dir": str(tmp_path / "var")},
    }
    path.write_text(yaml.safe_dump(document))
    running = Running(path, tmp_path / "supervisor.log")
    running.wait_titles(titles(1, 2), timeout=60)
    return running


def _publish_for(client: redis.Redis, name: str, seconds: float, sent: list[int]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sent[0] += producer.produce(client, name, 50)
        time.sleep(0.1)


def _settle(
    running: Running, client: redis.Redis, names: Names, dsn: str, sent: int, limit_s: float
) -> None:
    wait_for(
        f"{sent} rows",
        lambda: row_count(dsn) == sent and pending(client, names.stream, names.group) == 0,
        limit_s,
    )
    assert client.xlen(names.dead_letter) == 0
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM raw_items WHERE error_code = 910")
        assert cur.fetchone() == (0,)
    assert "as silent" not in running.text()
    assert running.proc.poll() is None


def test_a_45_s_exclusive_lock_on_raw_items_ends_with_every_row_and_nothing_dead_lettered(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, pg_schema_dsn: str, names: Names
) -> None:
    running = _supervised(tmp_path, redis_url, pg_schema_dsn, names)
    try:
        sent = [producer.produce(redis_client, names.stream, 500)]
        wait_for("the first rows", lambda: row_count(pg_schema_dsn) == sent[0], 60)
        traffic = threading.Thread(target=_publish_for, args=(redis_client, names.stream, 50, sent))
        with closing(psycopg2.connect(pg_schema_dsn)) as locker, locker.cursor() as cur:
            cur.execute("LOCK TABLE raw_items IN ACCESS EXCLUSIVE MODE")
            traffic.start()
            time.sleep(45)  # far beyond workers.timeout_s, sweeper.min_idle_ms and max_retries
            locker.rollback()
        traffic.join()
        _settle(running, redis_client, names, pg_schema_dsn, sent[0], 120)
        assert "canceling statement due to lock timeout" in running.text()
    finally:
        running.stop()


def test_a_database_that_answers_slowly_is_waited_out(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, pg_schema_dsn: str, names: Names
) -> None:
    running = _supervised(tmp_path, redis_url, pg_schema_dsn, names)
    try:
        sent = [0]
        with closing(psycopg2.connect(pg_schema_dsn)) as conn, conn.cursor() as cur:

            def crawl(seconds: float) -> None:
                cur.execute(
                    "CREATE OR REPLACE FUNCTION crawl() RETURNS trigger LANGUAGE plpgsql AS"
                    f" $$BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END$$"
                )
                conn.commit()

            crawl(0.3)  # slow, within what a statement may take (an eighth of timeout_s)
            cur.execute(
                "CREATE TRIGGER crawl BEFORE INSERT ON raw_items"
                " FOR EACH STATEMENT EXECUTE FUNCTION crawl()"
            )
            conn.commit()
            _publish_for(redis_client, names.stream, 10, sent)
            crawl(3)  # slower than a statement may take, half of timeout_s: an outage
            _publish_for(redis_client, names.stream, 15, sent)
            cur.execute("DROP TRIGGER crawl ON raw_items")
            conn.commit()
        _settle(running, redis_client, names, pg_schema_dsn, sent[0], 120)
        assert "canceling statement due to statement timeout" in running.text()
    finally:
        running.stop()


def _huge(fields: int) -> dict[bytes, bytes]:
    out = {f"f{i}".encode(): b"x" for i in range(fields)}
    out[b"data"] = b'{"name": "Tran Van Huge"}'
    return out


def test_an_entry_of_thousands_of_fields_is_dead_lettered_and_replayed_whole(
    redis_client: redis.Redis, names: Names
) -> None:
    redis_client.xgroup_create(names.stream, names.group, id="0", mkstream=True)
    fields = _huge(6000)  # 12,000 values: more than one Lua call can pass
    entry_id = redis_client.xadd(names.stream, fields).decode()
    redis_client.xreadgroup(names.group, "worker_001", {names.stream: ">"})

    extra = {"original_id": entry_id, "reason": "test"}
    moved = stream_dead.move_to_dead_letter(
        redis_client, names.stream, names.group, names.dead_letter, entry_id, fields, extra
    )
    assert moved
    assert pending(redis_client, names.stream, names.group) == 0
    ((copy_id, copy),) = redis_client.xrange(names.dead_letter)
    assert {k: v for k, v in copy.items() if k.decode() not in extra} == fields
    # A second move of the same entry (two processes, or a retry) copies nothing again.
    assert not stream_dead.move_to_dead_letter(
        redis_client, names.stream, names.group, names.dead_letter, entry_id, fields, extra
    )
    assert redis_client.xlen(names.dead_letter) == 1

    new_id = stream_dead.replay_entry(
        redis_client, names.dead_letter, names.stream, copy_id.decode(), deadletter.ADDED_FIELDS
    )
    assert new_id is not None
    assert redis_client.xlen(names.dead_letter) == 0
    ((_, replayed),) = redis_client.xrange(names.stream, new_id, new_id)
    assert replayed == fields
    assert not redis_client.keys(f"{names.dead_letter}:lock:*")


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_batch_of_huge_entries_takes_a_bounded_share_of_a_workers_memory(
    make_config, redis_client: redis.Redis, names: Names
) -> None:
    settings, path = make_config(workers={"batch_size": 20, "block_ms": 200})
    producer.produce(redis_client, names.stream, 10)
    proc = start_worker(path)
    try:
        dsn = settings.postgres.dsn
        wait_for("the first rows", lambda: row_count(dsn) == 10, 60)
        before = _peak_rss_mb(proc.pid)
        huge = b'{"name": "' + b"x" * (8 << 20) + b'"}'
        with redis_client.pipeline(transaction=True) as tx:  # all there for one batch
            for _ in range(20):
                tx.xadd(names.stream, {"data": huge, "source": "huge"})
            tx.execute()
        wait_for("the huge rows", lambda: row_count(dsn) == 30, 120)
        grown = _peak_rss_mb(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(30)
    # 160 MB were sent in one batch; at most one entry left Redis whole.
    assert grown < 60, f"the worker grew by {grown:.0f} MB"
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT error_code, source, length(data::text) FROM raw_items WHERE source = 'huge'"
        )
        found = cur.fetchall()
    assert len(found) == 20
    assert {code for code, _, _ in found} == {902}
    assert all(length < 10_000 for _, _, length in found)
