"""The embedded Redis and PostgreSQL: real servers, each test in its own var dir."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from pathlib import Path
from urllib.parse import unquote, urlparse

import psycopg2
import pytest
import redis
from psycopg2.extensions import parse_dsn

from ratebox import embedded
from ratebox.errors import ServerUnavailable


@pytest.fixture
def var_dir(tmp_path: Path) -> Iterator[Path]:
    """A var dir whose servers are stopped after the test, whatever happened."""
    var = tmp_path / "var"
    yield var
    embedded.stop(["redis", "postgres"], var)


def redis_pid(var: Path) -> int:
    return int((var / "redis" / "redis.pid").read_text())


def postmaster_pid(var: Path) -> int:
    return int((var / "postgres" / "data" / "postmaster.pid").read_text().split()[0])


def gone(pid: int) -> bool:
    return not embedded._alive(pid)


def query(dsn: str, statement: str) -> list[tuple]:
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(statement)
        rows = cur.fetchall() if cur.description else []
        conn.commit()
        return rows


class TestRedis:
    def test_it_listens_on_a_unix_socket_under_the_var_dir_and_not_on_tcp(self, var_dir):
        url = embedded.ensure_redis(var_dir)
        assert url.startswith("unix://") and url.endswith("?db=0")
        assert Path(unquote(urlparse(url).path)).parent == (var_dir / "redis").resolve()
        client = redis.Redis.from_url(url)
        assert client.ping()
        assert client.config_get("port") == {"port": "0"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.close()

    def test_a_second_call_reuses_the_running_server(self, var_dir):
        url = embedded.ensure_redis(var_dir)
        pid = redis_pid(var_dir)
        assert embedded.ensure_redis(var_dir) == url
        assert embedded.resolve("embedded", "unused", var_dir) == (url, "unused", [])
        assert redis_pid(var_dir) == pid

    def test_data_survives_a_restart(self, var_dir):
        client = redis.Redis.from_url(embedded.ensure_redis(var_dir))
        entry_id = client.xadd("raw_items", {"data": "{}"})
        client.close()
        pid = redis_pid(var_dir)
        embedded.stop_redis(var_dir)
        assert gone(pid)
        client = redis.Redis.from_url(embedded.ensure_redis(var_dir))
        assert redis_pid(var_dir) != pid
        assert [e[0] for e in client.xrange("raw_items") or []] == [entry_id]
        client.close()

    def test_stop_is_a_no_op_when_nothing_runs(self, var_dir):
        embedded.stop_redis(var_dir)
        embedded.ensure_redis(var_dir)
        embedded.stop_redis(var_dir)
        embedded.stop_redis(var_dir)
        assert not var_dir.joinpath("redis", "redis.pid").exists()

    def test_a_server_that_cannot_start_is_reported_in_one_line_naming_its_log(self, var_dir):
        embedded.ensure_redis(var_dir)
        embedded.stop_redis(var_dir)
        # Multi-part AOF (Redis 7, Valkey): the increment file is what a restart replays.
        (incr,) = (var_dir / "redis" / "appendonlydir").glob("*.incr.aof")
        incr.write_bytes(b"*garbage")
        with pytest.raises(ServerUnavailable) as failure:
            embedded.ensure_redis(var_dir)
        message = str(failure.value)
        assert "\n" not in message
        assert "redis.log" in message and "append only file" in message


class TestPostgres:
    def test_it_listens_on_a_unix_socket_only_and_has_the_ratebox_database(self, var_dir):
        dsn = embedded.ensure_postgres(var_dir)
        params = parse_dsn(dsn)
        assert params["host"] == str((var_dir / "postgres").resolve())
        assert params["dbname"] == "ratebox" and params["user"] == "postgres"
        assert query(dsn, "SHOW listen_addresses") == [("",)]
        assert query(dsn, "SELECT current_database()") == [("ratebox",)]
        assert query(dsn, "SHOW fsync") == [("on",)]
        assert query(dsn, "SHOW max_connections") == [("200",)]
        assert query(dsn, "SHOW server_encoding") == [("UTF8",)]

    def test_a_second_call_reuses_the_running_server(self, var_dir):
        dsn = embedded.ensure_postgres(var_dir)
        pid = postmaster_pid(var_dir)
        assert embedded.ensure_postgres(var_dir) == dsn
        assert embedded.resolve("redis://unused", "embedded", var_dir) == (
            "redis://unused",
            dsn,
            [],
        )
        assert postmaster_pid(var_dir) == pid

    def test_data_survives_a_restart_and_stop_is_idempotent(self, var_dir):
        dsn = embedded.ensure_postgres(var_dir)
        query(dsn, "CREATE TABLE kept AS SELECT 42 AS answer")
        pid = postmaster_pid(var_dir)
        embedded.stop_postgres(var_dir)
        assert gone(pid)
        embedded.stop_postgres(var_dir)
        assert embedded.ensure_postgres(var_dir) == dsn
        assert query(dsn, "SELECT answer FROM kept") == [(42,)]

    def test_a_server_that_cannot_start_is_reported_in_one_line_naming_its_log(self, var_dir):
        embedded.ensure_postgres(var_dir)
        embedded.stop_postgres(var_dir)
        with open(var_dir / "postgres" / "data" / "postgresql.conf", "a") as conf:
            conf.write("shared_buffers = plenty\n")
        with pytest.raises(ServerUnavailable) as failure:
            embedded.ensure_postgres(var_dir)
        message = str(failure.value)
        assert "\n" not in message
        assert "postgres.log" in message and "FATAL" in message


class TestResolve:
    def test_addresses_other_than_embedded_pass_through_untouched(self, var_dir):
        assert embedded.resolve("redis://h:6379/0", "host=h dbname=x", var_dir) == (
            "redis://h:6379/0",
            "host=h dbname=x",
            [],
        )
        assert not var_dir.exists()

    def test_it_reports_what_it_started_and_stop_stops_exactly_that(self, var_dir):
        _, _, started = embedded.resolve("embedded", "embedded", var_dir)
        assert started == ["redis", "postgres"]
        pids = redis_pid(var_dir), postmaster_pid(var_dir)
        embedded.stop(started, var_dir)
        assert all(gone(pid) for pid in pids)

    def test_a_failed_start_stops_what_the_same_call_started(self, var_dir):
        var_dir.mkdir()
        (var_dir / "postgres").write_text("in the way")
        with pytest.raises(ServerUnavailable, match="cannot create"):
            embedded.resolve("embedded", "embedded", var_dir)
        assert not (var_dir / "redis" / "redis.pid").exists()

    def test_concurrent_starts_from_several_processes_share_one_server_each(self, var_dir):
        with ProcessPoolExecutor(4) as pool:
            futures = [
                pool.submit(embedded.resolve, "embedded", "embedded", str(var_dir))
                for _ in range(4)
            ]
            results = [f.result() for f in futures]
        assert len({(url, dsn) for url, dsn, _ in results}) == 1
        started = sorted(name for _, _, names in results for name in names)
        assert started == ["postgres", "redis"]
        url, dsn, _ = results[0]
        assert redis.Redis.from_url(url).ping()
        assert query(dsn, "SELECT 1") == [(1,)]

    def test_a_var_dir_too_long_for_a_socket_path_uses_a_short_socket_dir(self, tmp_path):
        var = tmp_path / ("x" * 100) / "var"
        try:
            url, dsn, _ = embedded.resolve("embedded", "embedded", var)
            sock = unquote(urlparse(url).path)
            assert sock.startswith("/tmp/ratebox-") and len(sock) < 108
            assert parse_dsn(dsn)["host"] == os.path.dirname(sock)
            assert redis.Redis.from_url(url).ping()
            assert query(dsn, "SELECT 1") == [(1,)]
        finally:
            embedded.stop(["redis", "postgres"], var)
            short = embedded._socket_dir(var.resolve(), var / "redis", "redis.sock")
            shutil.rmtree(short, ignore_errors=True)
