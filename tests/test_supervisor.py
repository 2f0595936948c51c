"""A real supervisor in its own session, receiving real signals; checked with psutil and Redis."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psutil
import psycopg2
import pytest
import redis
import yaml
from conftest import Names

from ratebox import producer, stream, stream_lease

ROOT = Path(__file__).resolve().parent.parent
#: Variables that would override the test's YAML, or make the supervisor talk to systemd.
SCRUBBED = (
    "REDIS_URL",
    "POSTGRES_DSN",
    "REDIS_STREAM",
    "CONSUMER_GROUP",
    "BATCH_SIZE",
    "BLOCK_TIME",
    "MAX_RETRIES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Running:
    """A ratebox-supervisor subprocess and what can be seen of it from outside."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bin" / "ratebox-supervisor"), "-c", str(config_path)],
            cwd=config_path.parent,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def titles(self) -> dict[str, int]:
        """Process title -> pid of the supervisor's living children."""
        out: dict[str, int] = {}
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return out
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    out[" ".join(child.cmdline()).strip()] = child.pid
            except psutil.NoSuchProcess:
                pass
        return out

    def wait_titles(self, expected: set[str], timeout: float = 15.0) -> dict[str, int]:
        return wait_for(
            f"children {sorted(expected)}",
            lambda: (t := self.titles()) and set(t) == expected and t,
            timeout,
        )

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Leave nothing behind, whatever the test did."""
        pids = list(self.titles().values())
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()


def titles(*workers: int, sweeper: bool = True) -> set[str]:
    names = {f"ratebox: worker worker_{i:03d}" for i in workers}
    return names | ({"ratebox: sweeper"} if sweeper else set())


@pytest.fixture
def config_path(tmp_path: Path, redis_url: str, pg_schema_dsn: str, names: Names) -> Path:
    path = tmp_path / "ratebox.yaml"
    write_config(path, redis_url, pg_schema_dsn, names, count=2)
    return path


def write_config(path: Path, redis_url: str, dsn: str, names: Names, count: int) -> None:
    document = {
        "redis": {"url": redis_url},
        "postgres": {"dsn": dsn, "migrate_on_start": False},
        "stream": {"name": names.stream, "group": names.group, "dead_letter": names.dead_letter},
        "workers": {"count": count, "block_ms": 200, "timeout_s": 10, "shutdown_timeout_s": 5},
        "sweeper": {"interval_s": 1},
        "monitor": {"enabled": False, "metrics_listen": None},
        "embedded": {"dir": str(path.parent / "var")},
    }
    path.write_text(yaml.safe_dump(document))


@pytest.fixture
def start(
    config_path: Path, tmp_path: Path, redis_client: redis.Redis
) -> Iterator[Callable[[], Running]]:
    started: list[Running] = []

    def launch() -> Running:
        running = Running(config_path, tmp_path / f"supervisor-{len(started)}.log")
        started.append(running)
        return running

    yield launch
    for running in started:
        running.stop()


class TestRestarts:
    def test_a_worker_killed_with_sigkill_comes_back_under_its_name_and_work_goes_on(
        self,
        start: Callable[[], Running],
        redis_client: redis.Redis,
        names: Names,
        pg_schema_dsn: str,
    ) -> None:
        sup = start()
        before = sup.wait_titles(titles(1, 2))
        os.kill(before["ratebox: worker worker_001"], signal.SIGKILL)
        after = wait_for(
            "a new worker_001",
            lambda: (
                (t := sup.titles()).get("ratebox: worker worker_001")
                not in (None, before["ratebox: worker worker_001"])
                and t
            ),
        )
        assert after["ratebox: worker worker_002"] == before["ratebox: worker worker_002"]
        assert "worker_001 (pid" in sup.text() and "was killed by SIGKILL" in sup.text()
        stream.publish(redis_client, names.stream, [{"data": '{"phone": "0123456789"}'}] * 5)
        wait_for("5 verdicts in PostgreSQL", lambda: _rows(pg_schema_dsn, names) == 5)


def _rows(dsn: str, names: Names) -> int:
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM raw_items WHERE stream_name = %s", (names.stream,))
        return int(cur.fetchone()[0])


class TestScaling:
    def test_hup_rescales_from_the_file_and_ttin_ttou_add_and_remove_one_worker(
        self,
        start: Callable[[], Running],
        config_path: Path,
        redis_url: str,
        pg_schema_dsn: str,
        names: Names,
        redis_client: redis.Redis,
    ) -> None:
        sup = start()
        sup.wait_titles(titles(1, 2))
        write_config(config_path, redis_url, pg_schema_dsn, names, count=3)
        sup.signal(signal.SIGHUP)
        sup.wait_titles(titles(1, 2, 3))
        wait_for("worker_003 in the group", lambda: "worker_003" in _consumers(redis_client, names))

        sup.signal(signal.SIGTTOU)
        sup.wait_titles(titles(1, 2))
        wait_for(
            "worker_003 deleted from the group",
            lambda: "worker_003" not in _consumers(redis_client, names),
        )
        assert "scaled to 2 workers" in sup.text()
        assert "deleted consumer worker_003" in sup.text()

        sup.signal(signal.SIGTTIN)
        sup.wait_titles(titles(1, 2, 3))
        workers = wait_for(
            "3 of 3 workers in the status file",
            lambda: (w := status_workers(config_path, names)) and w["running"] == 3 and w,
        )
        assert (workers["desired"], workers["autoscale"]) == (3, False)
        assert workers["reason"] == "TTIN: one worker more"

        config_path.write_text("workers: {count: many}\n")
        sup.signal(signal.SIGHUP)
        wait_for("the refusal", lambda: "reload refused: workers.count" in sup.text())
        assert set(sup.titles()) == titles(1, 2, 3)


def status_workers(config_path: Path, names: Names) -> dict[str, Any] | None:
    """The "workers" part of the supervisor's status file, None while there is none."""
    path = config_path.parent / "var" / f"supervisor-{names.stream}-{names.group}.json"
    try:
        return json.loads(path.read_text())["workers"]
    except (FileNotFoundError, ValueError):
        return None


def _consumers(client: redis.Redis, names: Names) -> set[str]:
    return {c["name"].decode() for c in stream.consumers(client, names.stream, names.group)}


class TestStopping:
    def test_term_stops_every_child_and_exits_0_and_a_second_supervisor_was_refused(
        self, start: Callable[[], Running], names: Names
    ) -> None:
        first = start()
        children = first.wait_titles(titles(1, 2))

        second = start()
        assert second.proc.wait(15) == 1
        assert (
            f"runs consumers worker_* of group {names.group} on stream {names.stream}"
            in second.text()
        )
        assert first.titles() == children

        first.signal(signal.SIGTERM)
        assert first.proc.wait(10) == 0
        assert all(gone(pid) for pid in children.values())

    def test_children_exit_when_the_supervisor_is_killed(
        self, start: Callable[[], Running]
    ) -> None:
        sup = start()
        children = sup.wait_titles(titles(1, 2))
        sup.proc.kill()
        sup.proc.wait(5)
        wait_for("every child to exit", lambda: all(gone(pid) for pid in children.values()), 10)


class TestLeaseAndConsumersInRedis:
    def test_the_lease_is_held_refreshed_and_released_by_its_holder_only(
        self, redis_client: redis.Redis, names: Names
    ) -> None:
        key = f"ratebox:lease:{names.stream}"
        assert stream_lease.take_lease(redis_client, key, "a:1:x", 15_000) is None
        assert stream_lease.take_lease(redis_client, key, "b:2:y", 15_000) == "a:1:x"
        assert stream_lease.refresh_lease(redis_client, key, "b:2:y", 15_000) is False
        assert stream_lease.refresh_lease(redis_client, key, "a:1:x", 15_000) is True
        assert stream_lease.release_lease(redis_client, key, "b:2:y") is False
        assert stream_lease.release_lease(redis_client, key, "a:1:x") is True
        assert stream_lease.take_lease(redis_client, key, "b:2:y", 15_000) is None

    def test_a_consumer_is_deleted_only_when_it_holds_nothing(
        self, redis_client: redis.Redis, names: Names
    ) -> None:
        stream.ensure_group(redis_client, names.stream, names.group)
        stream.publish(redis_client, names.stream, [{"data": "{}"}])
        stream.read(redis_client, names.stream, names.group, "worker_009", 10)
        stream.read(redis_client, names.stream, names.group, "worker_008", 10)
        assert stream_lease.delete_consumer_if_idle(
            redis_client, names.stream, names.group, "worker_009"
        ) == (False, 1)
        assert stream_lease.delete_consumer_if_idle(
            redis_client, names.stream, names.group, "worker_008"
        ) == (True, 0)
        assert _consumers(redis_client, names) == {"worker_009"}


# -- acceptance runs under load (the supervisor issue's 'done when') ----------------------


def row_count(dsn: str) -> int:
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT stream_id) FROM raw_items")
        total, distinct = cur.fetchone()
        assert total == distinct, "a message got two rows"
        return int(total)


def pending(client: redis.Redis, stream_name: str, group: str) -> int:
    return int(client.xpending(stream_name, group)["pending"])


def publish_in_background(
    client: redis.Redis, name: str, total: int, rate: float
) -> threading.Thread:
    """Publish ``total`` entries at about ``rate`` a second from a thread."""

    def work() -> None:
        sent = 0
        while sent < total:
            chunk = min(int(rate / 10), total - sent)
            producer.produce(client, name, chunk)
            sent += chunk
            time.sleep(0.1)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def test_twelve_random_worker_kills_lose_nothing_and_duplicate_nothing(
    start: Callable[[], Running], config_path: Path, redis_url, pg_schema_dsn, names, redis_client
) -> None:
    write_config(config_path, redis_url, pg_schema_dsn, names, count=3)
    sup = start()
    sup.wait_titles(titles(1, 2, 3))
    publisher = publish_in_background(redis_client, names.stream, 20_000, 4000)
    rng = random.Random(12)
    for _ in range(12):
        time.sleep(rng.uniform(0.2, 0.5))
        workers = [pid for title, pid in sup.titles().items() if "worker" in title]
        if workers:
            psutil.Process(rng.choice(workers)).kill()
    publisher.join(60)
    wait_for("20,000 rows", lambda: row_count(pg_schema_dsn) == 20_000, 120)
    wait_for("nothing pending", lambda: pending(redis_client, names.stream, names.group) == 0, 60)
    sup.wait_titles(titles(1, 2, 3), 60)
    assert redis_client.xlen(names.dead_letter) == 0
    assert sup.text().count("killed by signal 9") + sup.text().count("SIGKILL") >= 1


def test_workers_follow_the_file_from_2_to_5_to_1_while_a_producer_publishes(
    start: Callable[[], Running], config_path: Path, redis_url, pg_schema_dsn, names, redis_client
) -> None:
    write_config(config_path, redis_url, pg_schema_dsn, names, count=2)
    sup = start()
    sup.wait_titles(titles(1, 2))
    publisher = publish_in_background(redis_client, names.stream, 15_000, 2000)
    time.sleep(1)
    write_config(config_path, redis_url, pg_schema_dsn, names, count=5)
    sup.signal(signal.SIGHUP)
    sup.wait_titles(titles(1, 2, 3, 4, 5), 15)
    time.sleep(1)
    write_config(config_path, redis_url, pg_schema_dsn, names, count=1)
    sup.signal(signal.SIGHUP)
    sup.wait_titles(titles(1), 15)
    publisher.join(60)
    wait_for("every message has its row", lambda: row_count(pg_schema_dsn) == 15_000, 120)
    wait_for("nothing pending", lambda: pending(redis_client, names.stream, names.group) == 0, 60)


def test_term_under_load_exits_0_in_time_and_every_acknowledged_entry_has_its_row(
    start: Callable[[], Running], config_path: Path, redis_url, pg_schema_dsn, names, redis_client
) -> None:
    write_config(config_path, redis_url, pg_schema_dsn, names, count=2)
    producer.produce(redis_client, names.stream, 30_000)
    sup = start()
    children = sup.wait_titles(titles(1, 2))
    wait_for("some rows", lambda: row_count(pg_schema_dsn) > 0, 30)
    started = time.monotonic()
    sup.signal(signal.SIGTERM)
    assert sup.proc.wait(15) == 0
    assert time.monotonic() - started < 5 + 2  # shutdown_timeout_s in the test's file, plus slack
    assert all(gone(pid) for pid in children.values())
    last = redis_client.xinfo_groups(names.stream)[0]["last-delivered-id"]
    delivered = len(redis_client.xrange(names.stream, "-", last))
    assert row_count(pg_schema_dsn) == delivered - pending(redis_client, names.stream, names.group)


class TestHostileReload:
    def test_a_reload_of_a_hostile_file_is_refused_and_the_service_stays_up(
        self, start: Callable[[], Running], config_path: Path
    ) -> None:
        sup = start()
        children = sup.wait_titles(titles(1, 2))
        good = config_path.read_bytes()
        for hostile in (good + b"# caf\xe9\n", b"workers: " + b"[" * 3000 + b"]" * 3000 + b"\n"):
            config_path.write_bytes(hostile)
            before = sup.text().count("reload refused")
            sup.signal(signal.SIGHUP)
            wait_for("the refusal", lambda b=before: sup.text().count("reload refused") > b)
        assert "not UTF-8 text" in sup.text() and "nested too deeply" in sup.text()
        assert sup.proc.poll() is None
        assert sup.titles() == children  # the same children, none restarted
