"""Shared by the bench scripts: servers, scratch names and schemas, the row the baselines write,
waiting for a drained group, and CPU / RSS accounting."""

from __future__ import annotations

import collections
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import psycopg2
import redis
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

from ratebox import embedded, migrate

ROOT = Path(__file__).resolve().parent.parent
MACHINE_REDIS = "redis://127.0.0.1:6379/0"
MACHINE_PG = "postgresql://postgres@127.0.0.1:5432/test"
#: Embedded servers of the bench live here, apart from the project's own ./var.
EMBEDDED_DIR = ROOT / "var" / "bench"
#: Environment names ratebox reads as overrides: the bench's YAML must win.
OVERRIDES = (
    "REDIS_URL",
    "REDIS_STREAM",
    "CONSUMER_GROUP",
    "CONSUMER_NAME",
    "BATCH_SIZE",
    "BLOCK_TIME",
    "MAX_RETRIES",
    "POSTGRES_DSN",
)


# -- servers -----------------------------------------------------------------------------------


@dataclass
class Servers:
    kind: str  # machine | embedded
    redis_url: str
    dsn: str
    redis_pid: int
    pg_pid: int  # the postmaster
    started: list[str] = field(default_factory=list)

    def stop(self) -> None:
        """Stop the embedded servers this run started (never the machine's)."""
        if self.started:
            embedded.stop(self.started, EMBEDDED_DIR)


def machine_up() -> bool:
    """True when 127.0.0.1:6379 and :5432 both accept a connection."""
    for port in (6379, 5432):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
    return True


def _listener(port: int) -> int:
    """The pid listening on 127.0.0.1:port (the name alone is ambiguous: tests run their own)."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise RuntimeError(f"no process found listening on port {port}")


def servers(kind: str) -> Servers:
    """The machine's servers, or embedded ones under var/bench (started when not running)."""
    if kind == "machine":
        return Servers(kind, MACHINE_REDIS, MACHINE_PG, _listener(6379), _listener(5432))
    url, dsn, started = embedded.resolve("embedded", "embedded", EMBEDDED_DIR)
    redis_pid = int((EMBEDDED_DIR / "redis" / "redis.pid").read_text().split()[0])
    pg_pid = int((EMBEDDED_DIR / "postgres" / "data" / "postmaster.pid").read_text().split()[0])
    return Servers(kind, url, dsn, redis_pid, pg_pid, started)


def celery_broker_url(redis_url: str) -> str:
    """kombu spells a unix socket redis+socket:///path."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url[len("unix://") :].split("?")[0]
    return redis_url


# -- scratch names and schema --------------------------------------------------------------------


@dataclass(frozen=True)
class Scratch:
    """Names unique to one measured run; suffix is also the PostgreSQL schema."""

    suffix: str
    dsn: str  # search_path = the scratch schema

    @property
    def stream(self) -> str:
        return f"raw_items_{self.suffix}"

    @property
    def group(self) -> str:
        return f"validator_workers_{self.suffix}"

    @property
    def dead_letter(self) -> str:
        return f"raw_items_{self.suffix}:dead"


def with_search_path(dsn: str, schema: str) -> str:
    options = parse_dsn(dsn).get("options", "")
    return make_dsn(dsn, options=f"{options} -c search_path={schema}".strip())


@contextmanager
def scratch(srv: Servers, kind: str) -> Iterator[Scratch]:
    """A fresh migrated schema and fresh stream names; both are removed afterwards."""
    suffix = f"bench_{kind}_{uuid.uuid4().hex[:8]}"
    schema = sql.Identifier(suffix)
    with closing(psycopg2.connect(srv.dsn)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
    try:
        dsn = with_search_path(srv.dsn, suffix)
        migrate.run(dsn)
        yield Scratch(suffix, dsn)
    finally:
        client = redis.Redis.from_url(srv.redis_url)
        for key in client.scan_iter(match=f"*{suffix}*", count=1000):
            client.delete(key)
        client.close()
        with closing(psycopg2.connect(srv.dsn)) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = '30s'")
                cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema))


def row_span(dsn: str, stream_name: str) -> tuple[int, float]:
    """(rows of the stream, seconds from their first processed_at to the last)."""
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*), extract(epoch FROM max(processed_at) - min(processed_at))"
            " FROM raw_items WHERE stream_name = %s",
            (stream_name,),
        )
        rows, span = cur.fetchone()
        return int(rows), float(span or 0.0)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    env.update(extra)
    return env


# -- waiting for the end of a run ----------------------------------------------------------------


class ConsumersFailed(RuntimeError):
    """The processes under test exited early or stopped making progress."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def wait_drained(
    client: redis.Redis,
    stream_name: str,
    group: str,
    procs: Sequence[subprocess.Popen[bytes]],
    on_first: Callable[[], None] = lambda: None,
    stall_s: float = 60.0,
) -> tuple[float, float]:
    """Poll until the group has delivered the stream's last entry and nothing is pending.

    Rows are committed before entries are acknowledged, so that is also "every row committed".
    Returns (time of the first delivery, time drained) in time.monotonic() seconds; calls
    on_first() when the first delivery is seen. Gives up after stall_s without progress.
    """
    last = _text(client.xinfo_stream(stream_name)["last-generated-id"])
    first_seen: float | None = None
    progress, progress_at = None, time.monotonic()
    while True:
        now = time.monotonic()
        info = next(g for g in client.xinfo_groups(stream_name) if _text(g["name"]) == group)
        delivered, pending = _text(info["last-delivered-id"]), int(info["pending"])
        if first_seen is None and delivered != "0-0":
            first_seen = now
            on_first()
        if delivered == last and pending == 0:
            return first_seen or now, now
        if (delivered, pending) != progress:
            progress, progress_at = (delivered, pending), now
        failed = [p for p in procs if p.poll() is not None]
        if failed:
            raise ConsumersFailed(f"consumer exited early: {failed[0].args}")
        if now - progress_at > stall_s:
            raise ConsumersFailed(f"no progress for {stall_s:.0f} s (delivered {delivered}/{last})")
        time.sleep(0.02)


def stop(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 30.0) -> None:
    """SIGTERM, then wait; SIGKILL what is still there after timeout_s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# -- CPU and RSS ---------------------------------------------------------------------------------


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its live descendants, and the children it has reaped.

    The reaped children's time (cutime/cstime) makes before/after deltas right for PostgreSQL,
    whose backends come and go: a backend that ends moves its time to the postmaster's
    children counters.
    """
    root = psutil.Process(pid)
    t = root.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in root.children(recursive=True):
        try:
            c = child.cpu_times()
        except psutil.Error:
            continue
        total += c.user + c.system
    return total


class Accounting:
    """CPU seconds of Redis, PostgreSQL, some process trees of ours, and this process."""

    def __init__(self, srv: Servers) -> None:
        self.srv = srv

    def snapshot(self, roots: Sequence[int]) -> dict[str, float]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        python = 0.0
        for pid in roots:
            try:
                python += tree_cpu(pid)
            except psutil.Error:
                pass
        m = psutil.cpu_times()
        return {
            "redis": tree_cpu(self.srv.redis_pid),
            "postgres": tree_cpu(self.srv.pg_pid),
            "python": python,
            "driver": me.ru_utime + me.ru_stime,
            # The whole machine, to tell how much of it went to work that is not ours.
            "machine": m.user + m.nice + m.system + m.irq + m.softirq + getattr(m, "steal", 0.0),
            "wall": time.monotonic(),
        }

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        d = {k: round(after[k] - before[k], 3) for k in after}
        ours = d["redis"] + d["postgres"] + d["python"] + d["driver"]
        d["other"] = round(max(0.0, d["machine"] - ours), 3)
        return d


class RssSampler(threading.Thread):
    """Samples the RSS of some processes and their descendants; keeps each one's peak and series."""

    def __init__(self, every_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.every_s = every_s
        self.roots: list[int] = []
        self.peak: dict[int, tuple[str, int]] = {}
        self.labels: dict[int, collections.Counter[str]] = {}
        self.series: dict[int, list[tuple[float, int]]] = {}
        self._done = threading.Event()
        self._t0 = time.monotonic()

    def watch(self, pids: Sequence[int]) -> None:
        self.roots.extend(pids)

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.every_s)

    def sample(self) -> None:
        for pid in list(self.roots):
            try:
                root = psutil.Process(pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    if p.status() == psutil.STATUS_ZOMBIE:
                        continue
                    rss = p.memory_info().rss
                    label = _label(p)
                except psutil.Error:
                    continue
                # A process caught between fork and exec has a passing name: the usual one wins.
                self.labels.setdefault(p.pid, collections.Counter())[label] += 1
                label = self.labels[p.pid].most_common(1)[0][0]
                self.peak[p.pid] = (label, max(self.peak.get(p.pid, ("", 0))[1], rss))
                self.series.setdefault(p.pid, []).append((time.monotonic() - self._t0, rss))

    def series_by_label(self) -> dict[str, list[tuple[float, float]]]:
        """RSS samples (seconds since start, MB) per process label."""
        return {
            f"{self.peak[pid][0]} (pid {pid})": [(round(t, 1), round(r / 2**20, 1)) for t, r in v]
            for pid, v in self.series.items()
        }

    def finish(self) -> dict[str, float]:
        """Stop; peak RSS in MB by process label (several processes of one label: the largest)."""
        self._done.set()
        self.join()
        out: dict[str, float] = {}
        for label, rss in self.peak.values():
            out[label] = max(out.get(label, 0.0), round(rss / 2**20, 1))
        return dict(sorted(out.items()))


def _label(p: psutil.Process) -> str:
    cmd = p.cmdline()
    if not cmd:
        raise psutil.ZombieProcess(p.pid)  # exiting: nothing to tell it by
    text = " ".join(" ".join(cmd).split())  # setproctitle pads its title with blanks
    if text.startswith("ratebox:"):
        return text  # setproctitle: "ratebox: worker worker_001"
    if "celery" in text:
        parent = p.parent()
        parent_text = " ".join(parent.cmdline()) if parent else ""
        main = "celeryd" not in parent_text and "celery_app" not in parent_text
        return "celery main" if main else "celery pool child"
    name = next((Path(c).name for c in cmd if c.endswith(".py") or "ratebox-" in c), p.name())
    if "--consumer" in cmd:
        return f"{name} {cmd[cmd.index('--consumer') + 1]}"
    return name
