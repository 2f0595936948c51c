"""Operating RateBox as deployed: TLS to both servers, deploy/'s least privileges, and the
supervisor's acceptance checks (kills, outages) on the whole pipeline, the bridge included.

Both servers are this test's own (tests/tls_servers.py), whatever REDIS_URL/POSTGRES_DSN
say: a TLS-only redis-server loading deploy/redis.acl as its --aclfile, and a PostgreSQL with
ssl = on and hostssl lines only, set up with deploy/postgres-roles.sql and
deploy/postgres-grants.sql as shipped. Being its own, the test uses the shipped names
(stream raw_items, schema ratebox, roles ratebox_migrate and ratebox_worker).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from test_legacy import legacy_db
from test_privileges import DEPLOY, write_aclfile
from test_supervisor import ROOT, SCRUBBED, Running, pending, titles, wait_for
from tls_servers import TlsPostgres, TlsRedis, make_certificates

from ratebox import producer

STREAM, GROUP, DEAD = "raw_items", "validator_workers", "raw_items:dead"
DATABASE = "validator"
#: A legacy producer's row (what the bridge publishes).
LEGACY_ROW = '{"phone": "0123456789", "bank_account": "12345678901", "name": "An"}'


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SCRUBBED}


@dataclass
class Stack:
    """The two TLS servers, the URLs of each login, and every password (never to be shown)."""

    redis: TlsRedis
    pg: TlsPostgres
    admin_url: str
    passwords: dict[str, str]
    config: Path
    #: Ids of the legacy rows inserted as pending: each must end with one verdict of ours.
    legacy_pending: list[int] = field(default_factory=list)

    def admin(self) -> redis.Redis:
        return redis.Redis.from_url(self.admin_url)

    def sql(self, text: str, params: Any = None) -> list[Any]:
        return self.pg.execute(text, DATABASE, params)

    def verdicts(self) -> int:
        """Verdicts written so far, as the workers counted them (each once: same transaction)."""
        return int(self.sql("SELECT sum(processed) FROM ratebox.stream_consumer_stats")[0][0] or 0)

    def insert_legacy(self, count: int) -> None:
        """What a legacy producer does: INSERT pending rows (here as the superuser)."""
        ids = self.sql(
            "INSERT INTO ratebox.raw_items (data) SELECT %s::jsonb FROM generate_series(1, %s)"
            " RETURNING id",
            (LEGACY_ROW, count),
        )
        self.legacy_pending += [i for (i,) in ids]


def _migrate(stack_dir: Path, dsn: str) -> None:
    path = stack_dir / "migrate.yaml"
    path.write_text(yaml.safe_dump({"postgres": {"dsn": dsn}, "embedded": {"dir": "var"}}))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "ratebox-migrate"), "-c", str(path)],
        cwd=stack_dir,
        capture_output=True,
        text=True,
        timeout=180,
        env=_env(),
    )
    assert done.returncode == 0 and done.stdout.startswith("applied "), done.stderr
    assert "adopted raw_items" in done.stdout, done.stdout


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    passwords = {name: uuid.uuid4().hex for name in ("admin", "ratebox", "migrate", "worker")}
    ca = make_certificates(tmp_path / "certs")
    aclfile = write_aclfile(tmp_path / "users.acl", passwords["ratebox"], passwords["admin"])
    server = TlsRedis(tmp_path / "redis", ca, aclfile=aclfile, persistent=True)
    admin_url = server.url("default", passwords["admin"])
    pg = TlsPostgres(tmp_path / "postgres", ca)
    try:
        server.start(ready_url=admin_url)
        pg.start()
        pg.execute(f"CREATE DATABASE {DATABASE}")
        pg.execute((DEPLOY / "postgres-roles.sql").read_text(), DATABASE)
        pg.execute("ALTER ROLE ratebox_migrate PASSWORD %s", DATABASE, (passwords["migrate"],))
        pg.execute("ALTER ROLE ratebox_worker PASSWORD %s", DATABASE, (passwords["worker"],))
        # The table of the polling system RateBox replaces, owned by the schema's owner: six
        # rows its pollers judged, 3,000 pending.
        migrate_url = pg.url(DATABASE, "ratebox_migrate", passwords["migrate"])
        legacy_db(migrate_url, pending=3000)
        _migrate(tmp_path, migrate_url)
        pg.execute((DEPLOY / "postgres-grants.sql").read_text(), DATABASE)
        config = tmp_path / "ratebox.yaml"
        document = {
            "redis": {"url": server.url("ratebox", passwords["ratebox"])},
            "postgres": {
                "dsn": pg.dsn(DATABASE, user="ratebox_worker", password=passwords["worker"]),
                "migrate_on_start": False,
            },
            "stream": {"name": STREAM, "group": GROUP, "dead_letter": DEAD},
            "workers": {"count": 2, "block_ms": 200, "timeout_s": 20, "shutdown_timeout_s": 5},
            "sweeper": {"interval_s": 1, "min_idle_ms": 5000},
            "monitor": {"enabled": True, "metrics_listen": None, "refresh_s": 0.5},
            "embedded": {"dir": str(tmp_path / "var")},
        }
        config.write_text(yaml.safe_dump(document))
        stack = Stack(server, pg, admin_url, passwords, config)
        stack.legacy_pending += [
            i for (i,) in stack.sql("SELECT id FROM ratebox.raw_items WHERE status = 'pending'")
        ]
        yield stack
    finally:
        pg.stop()
        server.stop()


class Bridge:
    """bin/ratebox-bridge --follow, each run logging to a file of its own."""

    def __init__(self, stack: Stack, where: Path) -> None:
        self.stack, self.where = stack, where
        self.runs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self) -> None:
        # A bridge SIGKILLed a moment ago may still hold its session lock: wait for its
        # session to end, or the new one would rightly refuse to run beside it.
        wait_for(
            "no bridge session in PostgreSQL",
            lambda: (
                not self.stack.sql(
                    "SELECT 1 FROM pg_stat_activity WHERE application_name = 'ratebox-bridge'"
                )
            ),
            60,
        )
        log = self.where / f"bridge-{len(self.runs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "bin" / "ratebox-bridge"), "-c", str(self.stack.config),
                 "--follow"],
                cwd=self.where, env=_env(), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.runs.append((proc, log))
        # Connected and locked: from here on it waits out outages instead of refusing to start.
        wait_for(
            "the bridge holding its lock",
            lambda: (
                self.stack.sql(
                    "SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                    " WHERE a.application_name = 'ratebox-bridge' AND l.locktype = 'advisory'"
                    " AND l.granted"
                )
                or proc.poll() is not None
            ),
            60,
        )
        assert proc.poll() is None, self.text()

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.runs[-1][0]

    def text(self) -> str:
        return "".join(log.read_text(errors="replace") for _, log in self.runs)

    def stop(self) -> None:
        for proc, _ in self.runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def _legacy_published(client: redis.Redis) -> int:
    return sum(1 for _, fields in client.xrange(STREAM) if b"legacy_id" in fields)


def test_the_pipeline_over_tls_with_least_privileges_survives_kills_and_outages(
    stack: Stack, tmp_path: Path
) -> None:
    client = stack.admin()
    sup = Running(stack.config, tmp_path / "supervisor.log")
    bridge = Bridge(stack, tmp_path)
    produced = 0
    try:
        first = sup.wait_titles(titles(1, 2) | {"ratebox: monitor"}, 60)
        bridge.start()
        wait_for("the bridge publishing", lambda: _legacy_published(client) > 0, 60)

        # A worker SIGKILLed with a batch in hand.
        produced += producer.produce(client, STREAM, 2000)
        os.kill(first["ratebox: worker worker_001"], signal.SIGKILL)
        stack.insert_legacy(1500)

        # The bridge SIGKILLed (mid-page, most likely), then started again.
        produced += producer.produce(client, STREAM, 2000)
        os.kill(bridge.proc.pid, signal.SIGKILL)
        bridge.proc.wait(10)
        stack.insert_legacy(1500)
        bridge.start()

        # Redis stopped for a few seconds and started again on its port and append-only
        # file; legacy producers go on inserting meanwhile.
        stack.redis.stop()
        stack.insert_legacy(500)
        time.sleep(3)
        client.close()
        stack.redis.start(ready_url=stack.admin_url)
        client = stack.admin()
        produced += producer.produce(client, STREAM, 2000)

        # PostgreSQL stopped for a few seconds (every session ended); items keep coming.
        stack.pg.stop()
        produced += producer.produce(client, STREAM, 1000)
        time.sleep(3)
        stack.pg.start()
        stack.insert_legacy(1000)

        # The second worker kill, once the workers write again, whichever worker_002 is now.
        before = stack.verdicts()
        produced += producer.produce(client, STREAM, 2000)
        wait_for("verdicts after the outage", lambda: stack.verdicts() > before, 120)
        second = wait_for("worker_002", lambda: sup.titles().get("ratebox: worker worker_002"))
        os.kill(second, signal.SIGKILL)

        wait_for(
            "no legacy row pending",
            lambda: (
                stack.sql("SELECT count(*) FROM ratebox.raw_items WHERE status = 'pending'")
                == [(0,)]
            ),
            240,
        )
        verdicts = len(stack.legacy_pending) + produced
        wait_for(
            "a verdict for every item",
            lambda: stack.verdicts() == verdicts,
            240,
        )
        wait_for("nothing pending in Redis", lambda: pending(client, STREAM, GROUP) == 0, 120)
        assert bridge.proc.poll() is None, bridge.text()
        sup.wait_titles(titles(1, 2) | {"ratebox: monitor"}, 60)

        _every_item_and_legacy_row_has_exactly_one_verdict(stack, client, produced)
        assert client.xlen(DEAD) == 0
        assert sup.text().count("was killed by SIGKILL") >= 2, sup.text()
        _the_monitor_reports_under_the_worker_role(stack, verdicts)
    finally:
        bridge.stop()
        sup.stop()
        client.close()
    shown = sup.text() + bridge.text()
    for word in ("NOPERM", "permission denied", "Traceback", *stack.passwords.values()):
        assert word not in shown, word
    assert "server unavailable" in shown  # the outages were seen, and waited out


def _every_item_and_legacy_row_has_exactly_one_verdict(
    stack: Stack, client: redis.Redis, produced: int
) -> None:
    entries = {eid.decode(): fields for eid, fields in client.xrange(STREAM)}
    items = {eid for eid, fields in entries.items() if b"legacy_id" not in fields}
    assert len(items) == produced
    rows = stack.sql(
        "SELECT id, stream_id, status, consumer_name, error_code FROM ratebox.raw_items"
    )
    legacy = set(stack.legacy_pending)
    by_id = {r[0]: r for r in rows}
    # Each produced item: one row of its own; nothing else got a row (no 904: every legacy
    # entry found its row).
    own = [r for r in rows if r[0] not in legacy and r[3] is not None]
    assert sorted(r[1] for r in own) == sorted(items)
    assert len(rows) == len(legacy) + produced + 6  # + the six the legacy pollers judged
    assert not [r for r in rows if r[4] == 904]
    # Each legacy row: judged by one of our workers, from an entry the bridge published for it.
    for i in legacy:
        _, stream_id, status, consumer, _ = by_id[i]
        assert status in ("done", "error") and consumer is not None, by_id[i]
        assert entries[stream_id][b"legacy_id"] == str(i).encode()


def _the_monitor_reports_under_the_worker_role(stack: Stack, verdicts: int) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "ratebox-monitor"), "-c", str(stack.config), "--json"],
        cwd=stack.config.parent,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert done.returncode == 0, done.stderr
    for password in stack.passwords.values():
        assert password not in done.stdout + done.stderr
    snap = json.loads(done.stdout)
    assert snap["servers"]["redis"]["available"] and snap["servers"]["postgres"]["available"]
    totals = snap["database"]["totals"]
    assert (totals["processed"], totals["pending"], totals["dead_lettered"]) == (verdicts, 0, 0)
    assert snap["stream"]["dead_letter"]["length"] == 0
    assert snap["processes"]["available"], snap["processes"]
