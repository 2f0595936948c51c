"""The reclaim sweeper on real servers: reclaim, poison pills, outages, trimming, ghosts."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
import yaml

from ratebox import config, producer, stream
from ratebox.config import Settings
from ratebox.pipeline import OUTAGE_ERRORS
from ratebox.rules import compile_rules
from ratebox.sweeper import NAME, Sweeper
from ratebox.worker import Worker

#: A DSN that refuses at once: nothing listens on port 1.
REFUSING_DSN = "postgresql://ratebox@127.0.0.1:1/ratebox?connect_timeout=2"

VALID = {
    "phone": "0901234567",
    "bank_account": "12345678901",
    "email": "lan.nguyen@example.com",
    "name": "Nguyen Thi Lan",
    "source": "test",
}


def make_settings(names: Any, **sections: Any) -> Settings:
    """Settings on this test's stream and group, with fast sweeper timings."""
    data: dict[str, Any] = {
        "stream": {
            "name": names.stream,
            "group": names.group,
            "dead_letter": names.dead_letter,
            "retention": "1h",
        },
        "workers": {"max_retries": 3, "batch_size": 50, "block_ms": 100},
        "sweeper": {"interval_s": 0.2, "min_idle_ms": 300, "ghost_idle_s": 3600},
    }
    for key, value in sections.items():
        if key == "rules":
            data["rules"] = value
        else:
            data.setdefault(key, {}).update(value)
    return config.from_mapping(data, {})


def write_config(tmp_path: Path, names: Any, redis_url: str, dsn: str, **sections: Any) -> str:
    """A ratebox.yaml on this test's servers and names; returns its path."""
    data: dict[str, Any] = {
        "redis": {"url": redis_url},
        "postgres": {"dsn": dsn, "migrate_on_start": False},
        "stream": {"name": names.stream, "group": names.group, "dead_letter": names.dead_letter},
        "embedded": {"dir": str(tmp_path / "var")},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    path = tmp_path / "ratebox.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def publish(client: redis.Redis, settings: Settings, items: list[dict[str, Any]]) -> list[str]:
    """XADD one entry per item (SPEC §4 fields); returns their IDs."""
    entries = [producer.entry(item, "batch_test") for item in items]
    return stream.publish(client, settings.stream.name, entries)


def read_as(client: redis.Redis, settings: Settings, consumer: str, count: int = 100) -> list[str]:
    """Read new entries as ``consumer`` and never acknowledge them (a worker that then dies)."""
    s = settings.stream
    stream.ensure_group(client, s.name, s.group)
    return [entry_id for entry_id, _ in stream.read(client, s.name, s.group, consumer, count)]


def rows(dsn: str, settings: Settings) -> dict[str, dict[str, Any]]:
    """raw_items rows of this stream by stream_id."""
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT stream_id, status, error_code, consumer_name, delivery_count"
            " FROM raw_items WHERE stream_name = %s",
            (settings.stream.name,),
        )
        keys = ("status", "error_code", "consumer", "deliveries")
        return {r[0]: dict(zip(keys, r[1:], strict=True)) for r in cur.fetchall()}


def row_count(dsn: str, settings: Settings) -> int:
    """All raw_items rows of this stream, duplicates included."""
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM raw_items WHERE stream_name = %s", (settings.stream.name,)
        )
        (count,) = cur.fetchone() or (0,)
        return int(count)


def entries(client: redis.Redis, key: str) -> list[stream.Entry]:
    """Every entry of a stream: (ID, fields)."""
    return stream.entries_between(client, key, "-", "+", 10_000)


def pending(client: redis.Redis, settings: Settings) -> list[dict[str, Any]]:
    """Every pending entry of the group: id, consumer, idle_ms, deliveries."""
    return stream.pending_idle(client, settings.stream.name, settings.stream.group, 0, 10_000)


def until(
    condition: Callable[[], bool], timeout: float, step: Callable[[], Any] = lambda: None
) -> bool:
    """Call ``step`` until ``condition`` holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step()
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def make_sweeper() -> Iterator[Callable[..., Sweeper]]:
    """Sweepers whose connections are closed after the test (the schema is dropped then)."""
    made: list[Sweeper] = []

    def make(settings: Settings, redis_url: str, dsn: str) -> Sweeper:
        sweeper = Sweeper(settings, redis_url, dsn)
        made.append(sweeper)
        return sweeper

    yield make
    for sweeper in made:
        sweeper.shutdown()


def test_entries_of_a_dead_worker_are_processed_once_within_min_idle_plus_interval(
    redis_client: redis.Redis, redis_url: str, pg_schema_dsn: str, names: Any, make_sweeper: Any
) -> None:
    settings = make_settings(names)
    ids = publish(
        redis_client, settings, [dict(VALID, name=f"Nguyen Van {i:02d}") for i in range(20)]
    )
    assert read_as(redis_client, settings, "worker_009") == ids
    died_at = time.monotonic()
    sweeper = make_sweeper(settings, redis_url, pg_schema_dsn)

    first = sweeper.loop()
    assert first.processed == 0, "entries not idle yet must be left to their consumer"

    def sweep() -> None:
        sweeper.loop()
        time.sleep(settings.sweeper.interval_s)

    assert until(lambda: not pending(redis_client, settings), 10, sweep)
    elapsed = time.monotonic() - died_at
    budget = settings.sweeper.min_idle_ms / 1000 + settings.sweeper.interval_s
    assert elapsed < budget + 1.5, f"took {elapsed:.2f}s, budget {budget:.2f}s"

    for _ in range(3):  # more sweeps change nothing
        sweeper.loop()
    found = rows(pg_schema_dsn, settings)
    assert sorted(found) == sorted(ids)
    assert row_count(pg_schema_dsn, settings) == len(ids)
    assert {r["consumer"] for r in found.values()} == {NAME}
    assert {r["deliveries"] for r in found.values()} == {2}
    assert {r["status"] for r in found.values()} == {"done"}
    assert sweeper.totals.processed == len(ids)
    assert redis_client.xlen(settings.stream.dead_letter) == 0


def test_entries_whose_payload_is_gone_are_acknowledged_and_counted(
    redis_client: redis.Redis, redis_url: str, pg_schema_dsn: str, names: Any, make_sweeper: Any
) -> None:
    settings = make_settings(names)
    ids = publish(redis_client, settings, [VALID, VALID, VALID])
    read_as(redis_client, settings, "worker_009")
    redis_client.xdel(settings.stream.name, ids[1])
    time.sleep(settings.sweeper.min_idle_ms / 1000 + 0.05)

    sweep = make_sweeper(settings, redis_url, pg_schema_dsn).loop()

    assert (sweep.processed, sweep.gone, sweep.dead_lettered) == (2, 1, 0)
    assert pending(redis_client, settings) == []
    assert sorted(rows(pg_schema_dsn, settings)) == [ids[0], ids[2]]


def test_a_poison_pill_that_crashes_every_delivery_is_dead_lettered_and_the_rest_processed(
    redis_client: redis.Redis, redis_url: str, pg_schema_dsn: str, names: Any, make_sweeper: Any
) -> None:
    settings = make_settings(names)
    ids = publish(redis_client, settings, [VALID] * 5)
    pill = ids[2]
    read_as(redis_client, settings, "worker_009")  # delivery 1, then the worker died
    s = settings.stream
    # Two more deliveries that each crashed before committing: claimed, never acknowledged.
    for _ in range(settings.workers.max_retries - 1):
        stream.claim(redis_client, s.name, s.group, NAME, 0, [pill])
    assert {p["id"]: p["deliveries"] for p in pending(redis_client, settings)}[pill] == 3
    time.sleep(settings.sweeper.min_idle_ms / 1000 + 0.05)

    sweep = make_sweeper(settings, redis_url, pg_schema_dsn).loop()

    assert (sweep.processed, sweep.dead_lettered) == (4, 1)
    assert pending(redis_client, settings) == []
    dead = entries(redis_client, s.dead_letter)
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"original_id"] == pill.encode()
    assert fields[b"delivery_count"] == b"4"
    assert b"data" in fields
    found = rows(pg_schema_dsn, settings)
    assert found[pill]["error_code"] == 910
    assert all(found[i]["status"] == "done" for i in ids if i != pill)
    assert row_count(pg_schema_dsn, settings) == len(ids)


#: The name of the item that hangs the rules (see _HangingEngine).
HANGING_NAME = "a" * 40 + "!"


class _HangingEngine:
    """The configured rules, except that one item hangs them: a defect in our own code.

    Rule patterns run on RE2 and cannot hang; a bug can, and the sweeper must survive it.
    """

    def __init__(self, settings: Settings) -> None:
        self.engine = compile_rules(settings.rules)

    def check(self, item: Any) -> Any:
        if isinstance(item, dict) and item.get("name") == HANGING_NAME:
            time.sleep(3600)
        return self.engine.check(item)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


def _sweep_once(settings: Settings, redis_url: str, dsn: str) -> None:
    sweeper = Sweeper(settings, redis_url, dsn, _HangingEngine(settings))  # type: ignore[arg-type]
    try:
        sweeper.loop()
    finally:
        sweeper.shutdown()
    os._exit(0)


def test_a_poison_pill_that_hangs_the_sweeper_only_takes_itself_down(
    redis_client: redis.Redis, redis_url: str, pg_schema_dsn: str, names: Any
) -> None:
    settings = make_settings(names)
    items = [dict(VALID, name=f"Tran Van {i}") for i in range(5)]
    items.insert(2, dict(VALID, name=HANGING_NAME))
    ids = publish(redis_client, settings, items)
    pill = ids[2]
    read_as(redis_client, settings, "worker_009")
    fork = multiprocessing.get_context("fork")

    # A minimal supervisor: one sweep per child process, killed when it hangs.
    hangs = 0
    for _ in range(settings.workers.max_retries + 2):
        time.sleep(settings.sweeper.min_idle_ms / 1000 + 0.05)
        child = fork.Process(target=_sweep_once, args=(settings, redis_url, pg_schema_dsn))
        child.start()
        child.join(timeout=5)
        if child.is_alive():
            hangs += 1
            child.kill()
            child.join()
        if not pending(redis_client, settings):
            break

    assert hangs == settings.workers.max_retries - 1  # deliveries 2 and 3 hung; 4 dead-lettered
    assert pending(redis_client, settings) == []
    dead = entries(redis_client, settings.stream.dead_letter)
    assert [d[1][b"original_id"] for d in dead] == [pill.encode()]
    found = rows(pg_schema_dsn, settings)
    assert found[pill]["error_code"] == 910
    assert found[pill]["deliveries"] == settings.workers.max_retries + 1
    assert all(found[i]["status"] == "done" for i in ids if i != pill)
    assert row_count(pg_schema_dsn, settings) == len(ids)


def test_postgres_unreachable_for_twice_min_idle_dead_letters_nothing(
    redis_client: redis.Redis, redis_url: str, pg_schema_dsn: str, names: Any, make_sweeper: Any
) -> None:
    settings = make_settings(names, sweeper={"min_idle_ms": 200}, workers={"max_retries": 2})
    ids = publish(redis_client, settings, [VALID] * 4)
    read_as(redis_client, settings, "worker_009")
    sweeper = make_sweeper(settings, redis_url, REFUSING_DSN)

    outages = 0
    deadline = time.monotonic() + 3 * settings.sweeper.min_idle_ms / 1000
    while time.monotonic() < deadline:
        try:
            sweeper.loop()
        except OUTAGE_ERRORS:
            outages += 1
            sweeper.pipeline.reset()
        time.sleep(settings.sweeper.interval_s / 2)

    assert outages >= 3
    assert redis_client.xlen(settings.stream.dead_letter) == 0
    held = pending(redis_client, settings)
    assert [(p["id"], p["consumer"], p["deliveries"]) for p in held] == [
        (i, "worker_009", 1) for i in ids
    ], "nothing may be claimed while the database is down"

    # The database is back: the entries are processed, none dead-lettered. The dead worker's
    # delivery and the sweeper's claim now make 2 = max_retries: a single delivery counted
    # during the outage would have sent them to the dead-letter stream.
    sweeper.pipeline.dsn = pg_schema_dsn
    assert until(lambda: not pending(redis_client, settings), 5, sweeper.loop)
    assert redis_client.xlen(settings.stream.dead_letter) == 0
    found = rows(pg_schema_dsn, settings)
    assert sorted(found) == ids
    assert {r["status"] for r in found.values()} == {"done"}


def test_a_worker_waiting_out_a_database_outage_keeps_its_batch_from_the_sweeper(
    redis_client: redis.Redis, redis_url: str, pg_schema_dsn: str, names: Any, make_sweeper: Any
) -> None:
    settings = make_settings(names, sweeper={"min_idle_ms": 200}, workers={"max_retries": 1})
    ids = publish(redis_client, settings, [VALID] * 3)
    worker = Worker(settings, "worker_001", redis_url, REFUSING_DSN)
    with pytest.raises(OUTAGE_ERRORS):
        worker.loop()  # reads the batch, then cannot commit it
    assert worker.batch is not None and len(worker.batch.entries) == 3
    sweeper = make_sweeper(settings, redis_url, pg_schema_dsn)  # the sweeper's database is fine

    deadline = time.monotonic() + 4 * settings.sweeper.min_idle_ms / 1000
    while time.monotonic() < deadline:
        worker.outage_tick()  # what the worker's backoff sleep calls
        sweeper.loop()
        time.sleep(0.05)

    held = pending(redis_client, settings)
    assert [(p["id"], p["consumer"], p["deliveries"]) for p in held] == [
        (i, "worker_001", 1) for i in ids
    ]
    assert redis_client.xlen(settings.stream.dead_letter) == 0

    worker.pipeline.reset()
    worker.pipeline.dsn = pg_schema_dsn  # the outage ends
    try:
        worker.loop()
    finally:
        worker.shutdown()
    assert pending(redis_client, settings) == []
    found = rows(pg_schema_dsn, settings)
    assert {r["consumer"] for r in found.values()} == {"worker_001"}
    assert {r["deliveries"] for r in found.values()} == {1}


def test_trimming_removes_old_acknowledged_entries_but_never_pending_or_undelivered_ones(
    redis_client: redis.Redis, redis_url: str, pg_schema_dsn: str, names: Any, make_sweeper: Any
) -> None:
    settings = make_settings(names, stream={"retention": "300ms"})
    s = settings.stream
    ids = publish(redis_client, settings, [VALID] * 10)
    read = read_as(redis_client, settings, "worker_001", count=6)
    stream.ack(redis_client, s.name, s.group, read[:3])  # 0-2 acked, 3-5 pending, 6-9 undelivered
    # A second group that has only read (and acknowledged) the first two entries.
    redis_client.xgroup_create(s.name, "other", id="0")
    other = stream.read(redis_client, s.name, "other", "reader", 2)
    stream.ack(redis_client, s.name, "other", [e[0] for e in other])
    time.sleep(0.35)  # every entry is now older than the retention
    sweeper = make_sweeper(settings, redis_url, pg_schema_dsn)

    def left() -> list[str]:
        return [e[0] for e in stream.entries_between(redis_client, s.name, "-", "+", 100)]

    # The other group's last-delivered ID (1) holds trimming back.
    assert sweeper.trim() == 1
    assert left() == ids[1:]

    redis_client.xgroup_destroy(s.name, "other")
    assert sweeper.loop().trimmed == 2  # up to the oldest pending entry (3)
    assert left() == ids[3:]

    stream.ack(redis_client, s.name, s.group, read[3:])
    assert sweeper.trim() == 2  # up to the last delivered ID (5); 6-9 were never delivered
    assert left() == ids[5:]

    stream.ack(
        redis_client,
        s.name,
        s.group,
        [e[0] for e in stream.read(redis_client, s.name, s.group, "worker_001", 10)],
    )
    fresh = publish(redis_client, settings, [VALID])
    stream.ack(redis_client, s.name, s.group, read_as(redis_client, settings, "worker_001"))
    assert sweeper.trim() == 5  # 5-9 now; the fresh entry is within the retention
    assert left() == fresh


def test_trimming_keeps_everything_when_no_group_has_read_the_stream(
    redis_client: redis.Redis, redis_url: str, pg_schema_dsn: str, names: Any, make_sweeper: Any
) -> None:
    settings = make_settings(names, stream={"retention": 0})
    publish(redis_client, settings, [VALID] * 3)
    sweeper = make_sweeper(settings, redis_url, pg_schema_dsn)
    assert sweeper.trim() == 0  # no group at all
    stream.ensure_group(redis_client, settings.stream.name, settings.stream.group)
    assert sweeper.trim() == 0  # a group that has delivered nothing
    assert redis_client.xlen(settings.stream.name) == 3


def test_ghost_consumers_are_removed_and_live_or_foreign_ones_kept(
    redis_client: redis.Redis, redis_url: str, pg_schema_dsn: str, names: Any, make_sweeper: Any
) -> None:
    settings = make_settings(names, sweeper={"ghost_idle_s": 1, "min_idle_ms": 60_000})
    s = settings.stream
    publish(redis_client, settings, [VALID])
    stream.ensure_group(redis_client, s.name, s.group)
    for name in ("worker_001", "worker_003", NAME, "reporting_tool", "worker_x"):
        redis_client.xgroup_createconsumer(s.name, s.group, name)
    read_as(redis_client, settings, "worker_002")  # idle but holding an entry
    sweeper = make_sweeper(settings, redis_url, pg_schema_dsn)

    # worker_003 stays alive and busy. (Before Redis 7.2 only a read that returns entries resets
    # a consumer's idle time; from 7.2 on, any read does.)
    def alive() -> None:
        publish(redis_client, settings, [VALID])
        got = stream.read(redis_client, s.name, s.group, "worker_003", 10)
        stream.ack(redis_client, s.name, s.group, [entry_id for entry_id, _ in got])

    until(lambda: False, settings.sweeper.ghost_idle_s + 0.2, alive)
    alive()

    assert sorted(sweeper.loop().ghosts) == sorted(["worker_001", NAME])
    left = sorted(c["name"].decode() for c in stream.consumers(redis_client, s.name, s.group))
    assert left == ["reporting_tool", "worker_002", "worker_003", "worker_x"]
    assert len(pending(redis_client, settings)) == 1


ROOT = Path(__file__).resolve().parent.parent


def test_the_sweeper_command_reclaims_in_the_background_and_stops_cleanly_on_term(
    redis_client: redis.Redis, redis_url: str, pg_schema_dsn: str, names: Any, tmp_path: Path
) -> None:
    settings = make_settings(names)
    path = write_config(
        tmp_path,
        names,
        redis_url,
        pg_schema_dsn,
        sweeper={"interval_s": 0.2, "min_idle_ms": 300},
    )
    ids = publish(redis_client, settings, [VALID] * 3)
    read_as(redis_client, settings, "worker_009")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bin" / "ratebox-sweeper"), "-c", path],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert until(lambda: not pending(redis_client, settings), 10)
        assert sorted(rows(pg_schema_dsn, settings)) == ids
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    assert "[sweeper] swept: 3 processed" in err
    assert "[sweeper] stopping: 3 processed" in err
