"""TLS against real servers with a throw-away CA (openssl CLI): rediss:// to a TLS-only
redis-server, and PostgreSQL with sslmode=verify-full to a server that refuses plain TCP."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import psycopg2
import pytest
import yaml
from test_legacy import drain
from test_supervisor import ROOT, SCRUBBED
from tls_servers import TlsPostgres, TlsRedis, make_certificates

from ratebox import config, producer, store, stream
from ratebox.errors import ServerUnavailable

#: The password of the PostgreSQL role these tests log in as: never in any output.
SECRET = f"Tls-{uuid.uuid4().hex}"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    """A redis-server answering TLS only on a loopback port."""
    server = TlsRedis(tmp_path / "redis", make_certificates(tmp_path / "certs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_rediss_with_the_ca_in_the_url_verifies_and_carries_the_stream(tls_redis, names) -> None:
    client = stream.connect(tls_redis.url())
    try:
        producer.produce(client, names.stream, 10)
        stream.ensure_group(client, names.stream, names.group)
        read = stream.read(client, names.stream, names.group, "worker_001", 10)
        assert len(read) == 10 and all(fields for _, fields in read)
    finally:
        client.close()


def test_rediss_without_the_ca_is_refused_in_one_line(tls_redis) -> None:
    with pytest.raises(ServerUnavailable) as refused:
        stream.connect(f"rediss://127.0.0.1:{tls_redis.port}/0")
    assert "certificate verify failed" in str(refused.value)
    assert "\n" not in str(refused.value)


# -- PostgreSQL, sslmode=verify-full ---------------------------------------------------------


@pytest.fixture
def tls_postgres(tmp_path: Path) -> Iterator[TlsPostgres]:
    """A PostgreSQL with ssl = on and hostssl lines only; role app (password SECRET) owns the
    database validator."""
    server = TlsPostgres(tmp_path / "postgres", make_certificates(tmp_path / "certs"))
    server.start()
    try:
        server.execute("CREATE ROLE app LOGIN PASSWORD %s", params=(SECRET,))
        server.execute("CREATE DATABASE validator OWNER app")
        yield server
    finally:
        server.stop()


def _config(path: Path, dsn: str, redis_url: str = "embedded", names=None) -> Path:
    document = {
        "redis": {"url": redis_url},
        "postgres": {"dsn": dsn, "migrate_on_start": False},
        "embedded": {"dir": str(path.parent / "var")},
    }
    if names is not None:
        document["stream"] = {
            "name": names.stream,
            "group": names.group,
            "dead_letter": names.dead_letter,
        }
    path.write_text(yaml.safe_dump(document))
    return path


def _migrate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bin" / "ratebox-migrate"), "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k not in SCRUBBED},
    )


def _encrypted(dsn: str) -> bool:
    """Whether RateBox's own connection to dsn is TLS, as the server sees it."""
    conn = store.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            return bool(cur.fetchone()[0]) and bool(conn.info.ssl_in_use)
    finally:
        conn.close()


def test_postgres_verify_full_migrates_and_writes_rows(
    tls_postgres: TlsPostgres, redis_url, redis_client, names, tmp_path: Path
) -> None:
    dsn = tls_postgres.dsn("validator", user="app", password=SECRET)
    path = _config(tmp_path / "ratebox.yaml", dsn, redis_url, names)
    done = _migrate(path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("applied ") and SECRET not in done.stdout + done.stderr

    producer.produce(redis_client, names.stream, 300)
    drain(config.load(str(path), {}), redis_url, dsn)
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*), count(DISTINCT stream_id) FROM raw_items WHERE stream_name = %s",
            (names.stream,),
        )
        assert cur.fetchone() == (300, 300)
    assert redis_client.xpending(names.stream, names.group)["pending"] == 0
    # The same server by URL, and by the certificate's other name.
    assert _encrypted(dsn)
    assert _encrypted(tls_postgres.url("validator", "app", SECRET))
    assert _encrypted(dsn.replace("host=127.0.0.1", "host=localhost"))


def _refusal(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a refused command printed; nothing else, no password."""
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert SECRET not in done.stderr
    (line,) = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: cannot reach PostgreSQL at ") and "password=***" in line
    return line


def test_postgres_with_a_wrong_ca_is_refused_in_one_line_without_the_password(
    tls_postgres: TlsPostgres, tmp_path: Path
) -> None:
    other = make_certificates(tmp_path / "other-ca")
    dsn = tls_postgres.dsn("validator", user="app", password=SECRET, sslrootcert=str(other))
    line = _refusal(_migrate(_config(tmp_path / "ratebox.yaml", dsn)))
    assert "certificate verify failed" in line
    url = tls_postgres.url("validator", "app", SECRET, sslrootcert=str(other))
    with pytest.raises(ServerUnavailable) as refused:
        store.connect(url)
    assert "certificate verify failed" in str(refused.value)
    assert "\n" not in str(refused.value) and SECRET not in str(refused.value)


def test_postgres_without_tls_is_refused(tls_postgres: TlsPostgres, tmp_path: Path) -> None:
    dsn = tls_postgres.dsn("validator", user="app", password=SECRET, sslmode="disable")
    line = _refusal(_migrate(_config(tmp_path / "ratebox.yaml", dsn)))
    assert "no pg_hba.conf entry" in line and "no encryption" in line
    # The superuser too: the only way in is hostssl.
    with pytest.raises(psycopg2.OperationalError, match="no encryption"):
        psycopg2.connect(tls_postgres.dsn(sslmode="disable")).close()
