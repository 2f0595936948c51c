"""The whole pipeline under deploy/'s least-privileged PostgreSQL role and Redis ACL user."""

from __future__ import annotations

import os
import re
import signal
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import psycopg2
import pytest
import redis
import yaml
from psycopg2.extensions import make_dsn
from test_supervisor import Running, pending, row_count, titles, wait_for

from ratebox import migrate, producer

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


@dataclass
class Access:
    worker_dsn: str
    redis_url: str
    schema: str


def _sql_file(name: str, schema: str, migrator: str, worker: str) -> str:
    text = (DEPLOY / name).read_text()
    text = text.replace("ratebox_migrate", migrator).replace("ratebox_worker", worker)
    return re.sub(r"\bratebox\b", schema, text)


def _run(dsn: str, text: str) -> None:
    with closing(psycopg2.connect(dsn)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(text)


def acl_rules(stream_name: str, dead_letter: str, password: str) -> list[str]:
    """deploy/redis.acl's rules for this test's streams and password."""
    (line,) = [
        ln for ln in (DEPLOY / "redis.acl").read_text().splitlines() if ln.startswith("user ")
    ]
    rules = line.split()[2:]
    swap = {"~raw_items": f"~{stream_name}", "~raw_items:dead": f"~{dead_letter}"}
    return [">" + password if r.startswith("#") else swap.get(r, r) for r in rules]


@pytest.fixture
def access(postgres_dsn: str, redis_url: str, redis_client: redis.Redis, names) -> Iterator[Access]:
    """Roles and an ACL user made from deploy/, unique to this test, removed afterwards."""
    migrator, worker = f"{names.suffix}_migrate", f"{names.suffix}_worker"
    user, password = f"rb_{names.suffix}", uuid.uuid4().hex
    _run(postgres_dsn, _sql_file("postgres-roles.sql", names.schema, migrator, worker))
    options = f"-c search_path={names.schema}"
    migrate.run(make_dsn(postgres_dsn, user=migrator, password="x", options=options))
    _run(postgres_dsn, _sql_file("postgres-grants.sql", names.schema, migrator, worker))
    redis_client.execute_command(
        "ACL", "SETUSER", user, "reset", *acl_rules(names.stream, names.dead_letter, password)
    )
    sep = "&" if "?" in redis_url else "?"
    url = redis_url + sep + urlencode({"username": user, "password": password})
    try:
        yield Access(
            make_dsn(postgres_dsn, user=worker, password="x", options=options), url, names.schema
        )
    finally:
        redis_client.execute_command("ACL", "DELUSER", user)
        _run(
            postgres_dsn,
            f'DROP SCHEMA IF EXISTS "{names.schema}" CASCADE; DROP OWNED BY "{worker}";'
            f' DROP OWNED BY "{migrator}"; DROP ROLE "{worker}"; DROP ROLE "{migrator}"',
        )


def write_config(path: Path, access: Access, names, count: int = 2) -> Path:
    document = {
        "redis": {"url": access.redis_url},
        "postgres": {"dsn": access.worker_dsn, "migrate_on_start": False},
        "stream": {"name": names.stream, "group": names.group, "dead_letter": names.dead_letter},
        "workers": {"count": count, "block_ms": 200, "timeout_s": 10, "shutdown_timeout_s": 5},
        "sweeper": {"interval_s": 1, "min_idle_ms": 1000},
        "monitor": {"enabled": True, "metrics_listen": None, "refresh_s": 0.5},
        "embedded": {"dir": str(path.parent / "var")},
    }
    path.write_text(yaml.safe_dump(document))
    return path


def test_the_pipeline_runs_with_the_worker_role_and_acl_user_and_kills_lose_nothing(
    access: Access, names, redis_client: redis.Redis, postgres_dsn: str, tmp_path: Path
) -> None:
    sup = Running(write_config(tmp_path / "ratebox.yaml", access, names), tmp_path / "sup.log")
    try:
        first = sup.wait_titles(titles(1, 2) | {"ratebox: monitor"}, 30)
        producer.produce(redis_client, names.stream, 3000)
        os.kill(first["ratebox: worker worker_001"], signal.SIGKILL)
        producer.produce(redis_client, names.stream, 2000)
        schema_dsn = make_dsn(postgres_dsn, options=f"-c search_path={access.schema}")
        wait_for("5,000 rows, one each", lambda: row_count(schema_dsn) == 5000, 120)
        wait_for(
            "nothing pending", lambda: pending(redis_client, names.stream, names.group) == 0, 60
        )
        log = sup.text()
        assert "NOPERM" not in log and "permission denied" not in log, log
    finally:
        sup.stop()
