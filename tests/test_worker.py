"""The worker on real servers: one row per message through bad input, crashes and outages."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import pytest
import redis

from ratebox import embedded, migrate, producer, rules, stream, verdict
from ratebox.worker import Worker

ROOT = Path(__file__).resolve().parent.parent


def rows(dsn: str) -> dict[str, tuple[Any, ...]]:
    """raw_items by stream_id: (status, error_code, errors, delivery_count)."""
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute("SELECT stream_id, status, error_code, errors, data FROM raw_items")
        return {r[0]: r[1:] for r in cur.fetchall()}


def count_rows(dsn: str) -> int:
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT stream_id) FROM raw_items")
        total, distinct = cur.fetchone()
        assert total == distinct
        return int(total)


def pending(client: redis.Redis, stream_name: str, group: str) -> int:
    return int(client.xpending(stream_name, group)["pending"])


def drain(worker: Worker, expected: int, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    done = 0
    while done < expected and time.monotonic() < deadline:
        done += worker.loop()


def start_worker(path: Path, name: str = "worker_001", **env: str) -> subprocess.Popen[bytes]:
    # The log goes to a file beside the config: a pipe nobody reads would block the worker.
    with open(path.parent / "worker.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "bin" / "ratebox-worker"), "-c", str(path)],
            env={**os.environ, "CONSUMER_NAME": name, **env},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def worker_log(path: Path) -> str:
    return (path.parent / "worker.log").read_text(errors="replace")


def wait_for(predicate: Callable[[], bool], limit_s: float = 60, step: float = 0.1) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def test_every_message_gets_the_verdict_the_rules_give(make_config, redis_client, names) -> None:
    settings, _ = make_config(workers={"batch_size": 100})
    producer.produce(redis_client, names.stream, 1000)
    worker = Worker(settings, "worker_001", settings.redis.url, settings.postgres.dsn)
    drain(worker, 1000)
    engine = rules.compile_rules(settings.rules)
    got = rows(settings.postgres.dsn)
    assert len(got) == 1000
    for entry_id, fields in redis_client.xrange(names.stream):
        expected = verdict.judge(entry_id.decode(), fields, engine, 65536)
        status, code, errors, _ = got[entry_id.decode()]
        shown = [failure.as_dict() for failure in expected.errors]
        assert (status, code, errors) == (expected.status, expected.error_code, shown)
    assert pending(redis_client, names.stream, names.group) == 0


def test_stats_count_each_message_once_even_when_redelivered(
    make_config, redis_client, names
) -> None:
    settings, _ = make_config()
    producer.produce(redis_client, names.stream, 50)
    worker = Worker(settings, "worker_001", settings.redis.url, settings.postgres.dsn)
    stream.ensure_group(redis_client, names.stream, names.group)
    entries = stream.read(redis_client, names.stream, names.group, "worker_001", 100)
    worker.pipeline.process(entries)
    worker.pipeline.process(entries)  # a redelivery after a crash between commit and ack
    with closing(psycopg2.connect(settings.postgres.dsn)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT processed FROM stream_consumer_stats WHERE consumer_name = 'worker_001'"
        )
        assert cur.fetchone()[0] == 50
        cur.execute("SELECT sum(processed) FROM stream_processing_metrics")
        assert cur.fetchone()[0] == 50
    assert count_rows(settings.postgres.dsn) == 50


BAD_INPUT: list[tuple[str, dict[bytes, bytes], int | None]] = [
    ("not json", {b"data": b"{not json"}, 900),
    ("an array", {b"data": b"[1, 2, 3]"}, 900),
    ("missing data", {b"source": b"web_crawler"}, 901),
    ("invalid utf-8", {b"data": b'{"phone": "\xff\xfe"}'}, 900),
    ("a 1 MB payload", {b"data": b'{"x": "' + b"a" * 1_000_000 + b'"}'}, 902),
    ("10,000-deep nesting", {b"data": b"[" * 10_000 + b"]" * 10_000}, 900),
    (
        "a NUL inside a string",
        {b"data": b'{"phone": "0123456789", "bank_account": "12345678", "name": "A\\u0000B"}'},
        None,
    ),
    ("an object as phone", {b"data": b'{"phone": {"a": 1}, "bank_account": "12345678"}'}, 100),
    ("a list as bank account", {b"data": b'{"phone": "0123456789", "bank_account": [1]}'}, 200),
    ("null phone", {b"data": b'{"phone": null, "bank_account": "12345678"}'}, 100),
    (
        "a boolean name",
        {b"data": b'{"phone": "0123456789", "bank_account": "12345678", "name": true}'},
        400,
    ),
]


def test_bad_input_gets_its_own_row_and_the_stream_goes_on(
    make_config, redis_client, names
) -> None:
    settings, _ = make_config(workers={"batch_size": 7})
    good = {b"data": orjson.dumps({"phone": "0912345678", "bank_account": "123456789"})}
    ids = {}
    for label, fields, code in BAD_INPUT:
        redis_client.xadd(names.stream, good)
        ids[label] = (redis_client.xadd(names.stream, fields).decode(), code)
    redis_client.xadd(names.stream, good)
    total = 2 * len(BAD_INPUT) + 1
    worker = Worker(settings, "worker_001", settings.redis.url, settings.postgres.dsn)
    drain(worker, total)
    got = rows(settings.postgres.dsn)
    assert len(got) == total
    for label, (entry_id, code) in ids.items():
        assert got[entry_id][1] == code, label
    assert (
        sum(1 for r in got.values() if r[0] == "done") == len(BAD_INPUT) + 2
    )  # goods + the NUL one
    nul_id = ids["a NUL inside a string"][0]
    assert got[nul_id][3]["name"] == "A\ufffdB"
    assert pending(redis_client, names.stream, names.group) == 0


def test_a_row_the_database_refuses_is_recorded_as_903_and_the_rest_commits(
    make_config, redis_client, names
) -> None:
    settings, _ = make_config(workers={"batch_size": 50})
    with closing(psycopg2.connect(settings.postgres.dsn)) as conn, conn.cursor() as cur:
        cur.execute(
            """
            CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF NEW.data->>'name' = 'Refuse Me' THEN RAISE EXCEPTION 'refused by a test trigger'; END IF;
              RETURN NEW;
            END $$;
            CREATE TRIGGER refuse BEFORE INSERT ON raw_items FOR EACH ROW EXECUTE FUNCTION refuse();
            """
        )
        conn.commit()
    producer.produce(redis_client, names.stream, 20)
    bad = redis_client.xadd(names.stream, {"data": '{"name": "Refuse Me"}'}).decode()
    producer.produce(redis_client, names.stream, 20)
    worker = Worker(settings, "worker_001", settings.redis.url, settings.postgres.dsn)
    drain(worker, 41)
    got = rows(settings.postgres.dsn)
    assert len(got) == 41
    assert got[bad][1] == 903
    assert "refused by a test trigger" in got[bad][2][0]["message"]


def test_a_worker_killed_five_times_leaves_exactly_one_row_per_message(
    make_config, redis_client, names
) -> None:
    settings, path = make_config(workers={"batch_size": 200})
    producer.produce(redis_client, names.stream, 10_000)
    rng = random.Random(7)
    for _ in range(5):
        proc = start_worker(path)
        time.sleep(rng.uniform(0.3, 0.9))
        proc.kill()
        proc.wait()
    before = worker_log(path).count("started")
    proc = start_worker(path)
    try:
        assert wait_for(lambda: count_rows(settings.postgres.dsn) == 10_000, 90)
        assert wait_for(lambda: pending(redis_client, names.stream, names.group) == 0, 30)
        # TERM before the worker installed its handlers would kill it with status -15.
        assert wait_for(lambda: worker_log(path).count("started") > before, 30)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, worker_log(path)
    engine = rules.compile_rules(settings.rules)
    got = rows(settings.postgres.dsn)
    for entry_id, fields in redis_client.xrange(names.stream):
        expected = verdict.judge(entry_id.decode(), fields, engine, 65536)
        assert got[entry_id.decode()][1] == expected.error_code
    assert redis_client.xlen(names.dead_letter) == 0


def test_term_finishes_the_batch_in_hand_and_exits_zero(make_config, redis_client, names) -> None:
    settings, path = make_config(workers={"batch_size": 500})
    producer.produce(redis_client, names.stream, 3000)
    proc = start_worker(path)
    assert wait_for(lambda: count_rows(settings.postgres.dsn) > 0, 30)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    # Whatever was acknowledged has its row; nothing half-done is left pending.
    last = redis_client.xinfo_groups(names.stream)[0]["last-delivered-id"]
    acked = len(redis_client.xrange(names.stream, "-", last))  # delivered, and none left pending
    assert pending(redis_client, names.stream, names.group) == 0
    assert count_rows(settings.postgres.dsn) == acked


@pytest.fixture
def own_postgres(tmp_path_factory: pytest.TempPathFactory):
    """A PostgreSQL server this test may stop and start."""
    var = tmp_path_factory.mktemp("own_pg")
    dsn = embedded.ensure_postgres(var)
    migrate.run(dsn)
    yield var, dsn
    embedded.stop_postgres(var)


def test_postgres_down_mid_run_is_waited_out(
    make_config, redis_client, names, own_postgres
) -> None:
    var, dsn = own_postgres
    _, path = make_config(postgres={"dsn": dsn}, workers={"batch_size": 100})
    producer.produce(redis_client, names.stream, 2000)
    proc = start_worker(path)
    try:
        assert wait_for(lambda: count_rows(dsn) > 0, 30)
        embedded.stop_postgres(var)
        producer.produce(redis_client, names.stream, 2000)
        time.sleep(10)
        assert proc.poll() is None, "the worker must wait out the outage, not exit"
        embedded.ensure_postgres(var)
        assert wait_for(lambda: count_rows(dsn) == 4000, 60)
        assert wait_for(lambda: pending(redis_client, names.stream, names.group) == 0, 30)
    finally:
        proc.terminate()
        proc.wait(30)
    log = worker_log(path)
    assert log.count("server unavailable") <= 2, log  # once per state change, not per retry
    assert redis_client.xlen(names.dead_letter) == 0


def test_redis_restart_mid_run_is_waited_out(make_config, names, tmp_path_factory) -> None:
    var = tmp_path_factory.mktemp("own_redis")
    url = embedded.ensure_redis(var)
    client = redis.Redis.from_url(url)
    try:
        settings, path = make_config(redis={"url": url}, workers={"batch_size": 100})
        producer.produce(client, names.stream, 2000)
        proc = start_worker(path)
        try:
            assert wait_for(lambda: count_rows(settings.postgres.dsn) > 0, 30)
            embedded.stop_redis(var)
            time.sleep(3)
            assert proc.poll() is None
            embedded.ensure_redis(var)
            client = redis.Redis.from_url(url)
            producer.produce(client, names.stream, 1000)
            assert wait_for(lambda: count_rows(settings.postgres.dsn) == 3000, 60)
            assert wait_for(lambda: pending(client, names.stream, names.group) == 0, 30)
        finally:
            proc.terminate()
            proc.wait(30)
        assert client.xlen(names.dead_letter) == 0
    finally:
        embedded.stop_redis(var)


def test_a_restarted_idle_worker_shows_its_own_pid_before_any_work(
    make_config, redis_client, names
) -> None:
    settings, _ = make_config()
    dsn = settings.postgres.dsn
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        # What the dead predecessor of the same name left behind.
        cur.execute(
            "INSERT INTO stream_consumer_stats (stream_name, consumer_name, group_name, processed,"
            " errors, dead_lettered, total_processing_ms, last_active, hostname, pid, started_at)"
            " VALUES (%s, 'worker_001', %s, 5, 0, 0, 1, now(), 'old-host', 1, now())",
            (names.stream, names.group),
        )
        conn.commit()
    worker = Worker(settings, "worker_001", settings.redis.url, dsn)
    try:
        assert worker.loop() == 0  # nothing to read: an idle worker
    finally:
        worker.pipeline.reset()
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT pid, hostname, processed FROM stream_consumer_stats WHERE consumer_name ="
            " 'worker_001' AND stream_name = %s",
            (names.stream,),
        )
        pid, host, processed = cur.fetchone()
    assert (pid, processed) == (os.getpid(), 5) and host != "old-host"
