"""The whole pipeline under deploy/'s least-privileged PostgreSQL role and Redis ACL user."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
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
from tls_servers import TlsRedis, make_certificates

from ratebox import migrate, privileges, producer

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


def write_aclfile(path: Path, password: str, admin_password: str | None = None) -> Path:
    """deploy/redis.acl as shipped, its hash that of password; with admin_password, a line
    for the default user too (all keys and commands)."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    text = re.sub(r"#0{64}", "#" + digest, (DEPLOY / "redis.acl").read_text())
    if admin_password is not None:
        admin = hashlib.sha256(admin_password.encode()).hexdigest()
        text += f"user default on #{admin} ~* &* +@all\n"
    path.write_text(text)
    return path


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


def test_the_worker_role_runs_no_ddl_and_the_acl_user_reaches_no_other_key(
    access: Access, names
) -> None:
    with closing(psycopg2.connect(access.worker_dsn)) as conn, conn.cursor() as cur:
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("CREATE TABLE sneaky (id int)")
        conn.rollback()
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("DELETE FROM raw_items")
    client = redis.Redis.from_url(access.redis_url)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.get(f"other_{names.suffix}")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command("FLUSHALL")
        assert client.xlen(names.stream) == 0
    finally:
        client.close()


def test_a_missing_grant_is_one_line_naming_the_privilege(
    access: Access, names, redis_client: redis.Redis, postgres_dsn: str, tmp_path: Path
) -> None:
    worker = psycopg2.extensions.parse_dsn(access.worker_dsn)["user"]
    _run(postgres_dsn, f'REVOKE INSERT ON "{names.schema}".raw_items FROM "{worker}"')
    path = write_config(tmp_path / "ratebox.yaml", access, names)
    producer.produce(redis_client, names.stream, 3)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "ratebox-worker"), "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "POSTGRES_DSN")},
    )
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[-1].endswith(
        "permission denied for table raw_items: GRANT SELECT, INSERT, UPDATE ON raw_items"
        " TO the worker role (deploy/postgres-grants.sql)"
    ), done.stderr
    # Nothing was recorded as the rows' fault (code 903), and the entries wait their turn.
    assert redis_client.xpending(names.stream, names.group)["pending"] == 3


def test_a_command_missing_from_the_acl_is_one_line_naming_it(
    access: Access, names, redis_client: redis.Redis, tmp_path: Path
) -> None:
    user = f"rb_{names.suffix}"
    redis_client.execute_command("ACL", "SETUSER", user, "-xack")
    path = write_config(tmp_path / "ratebox.yaml", access, names)
    producer.produce(redis_client, names.stream, 3)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "ratebox-worker"), "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "POSTGRES_DSN")},
    )
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    # Redis versions word it differently; each names the command.
    assert lines[-1].startswith("error: Redis refused: NOPERM "), done.stderr
    assert "'xack' command" in lines[-1] and lines[-1].endswith("(deploy/redis.acl)")


def test_refusals_name_the_grant_or_the_acl_and_other_errors_pass() -> None:
    assert privileges.postgres_line("permission denied for sequence raw_items_id_seq\n") == (
        "permission denied for sequence raw_items_id_seq: GRANT USAGE ON SEQUENCE"
        " raw_items_id_seq TO the worker role (deploy/postgres-grants.sql)"
    )
    line = privileges.postgres_line('permission denied to create temporary tables in database "v"')
    assert "GRANT TEMPORARY ON DATABASE v TO" in line
    assert "GRANT USAGE ON SCHEMA s TO" in privileges.postgres_line(
        "permission denied for schema s"
    )
    assert privileges.refused(ValueError("x")) is None


def test_the_shipped_acl_file_loads_into_redis_server_as_an_aclfile(tmp_path: Path) -> None:
    password = uuid.uuid4().hex
    server = TlsRedis(
        tmp_path / "redis",
        make_certificates(tmp_path / "certs"),
        aclfile=write_aclfile(tmp_path / "users.acl", password),
    )
    server.start()
    try:
        client = redis.Redis.from_url(server.url("ratebox", password))
        try:
            assert client.ping() and client.xadd("raw_items", {"data": "{}"})
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.get("other")
        finally:
            client.close()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(server.url("ratebox", "wrong")).ping()
    finally:
        server.stop()
