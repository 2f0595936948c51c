"""The monitor: one report, a live Rich dashboard or log snapshots, and Prometheus /metrics.

``collect()`` gathers every figure of SPEC §8 into plain data (the JSON report is that data);
``render()`` and ``snapshot_line()`` (from ratebox.dashboard) show it, ratebox.metrics serves
it; ``run()`` is the sibling process under the supervisor, with the huey lifecycle:
``initialize()``, one refresh per ``loop()``, ``shutdown()``. An outage of either server marks
its sections unavailable and never stops the monitor. Free text from outside (error samples,
exit reasons, server errors) is masked here, before anything shows it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import psutil
import redis
from prometheus_client import start_http_server
from rich.console import Console
from rich.live import Live

from ratebox import inert, route, store, store_monitor, stream
from ratebox.config import Settings
from ratebox.dashboard import render, snapshot_line
from ratebox.errors import EXIT_OK, RateboxError
from ratebox.mask import mask_text, mask_url
from ratebox.metrics import registry_for
from ratebox.partitions import merge_consumer_rows, partitioned_figures
from ratebox.pipeline import sleep
from ratebox.rate import RateWindow
from ratebox.role import Role

__all__ = ["Monitor", "ProcessSampler", "collect", "render", "run", "snapshot_line"]

log = logging.getLogger(__name__)

#: Rows of "top errors (1 hour)" in the report.
TOP_ERRORS = 10

Snapshot = dict[str, Any]


# -- collect ----------------------------------------------------------------------------------


class ProcessSampler:
    """CPU% of a pid between two looks (psutil needs the previous sample), and its RSS."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, pid: int) -> tuple[float | None, int | None]:
        """(CPU %, RSS bytes) of a live pid, or (None, None) when it is gone."""
        proc = self._procs.get(pid)
        try:
            if proc is not None and proc.is_running():
                with proc.oneshot():
                    return proc.cpu_percent(None), proc.memory_info().rss
            proc = psutil.Process(pid)
            with proc.oneshot():
                # First look: the average since the process started; later looks measure the
                # time between refreshes.
                times, age = proc.cpu_times(), time.time() - proc.create_time()
                proc.cpu_percent(None)
                rss = proc.memory_info().rss
            self._procs[pid] = proc
            return (100 * (times.user + times.system) / age if age > 0 else 0.0), rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            self._procs.pop(pid, None)
            return None, None

    def keep_only(self, pids: set[int]) -> None:
        """Forget pids no longer listed, so a long-running monitor does not grow."""
        for pid in set(self._procs) - pids:
            del self._procs[pid]


def collect(
    settings: Settings,
    redis_client: redis.Redis | None,
    pg_conn: Any,
    status_path: str | None = None,
    *,
    sampler: ProcessSampler | None = None,
    pg_error: str | None = None,
    lag_counter: stream.LagCounter | None = None,
) -> Snapshot:
    """Every figure of SPEC §8 as JSON-ready data; a server that fails marks its sections unavailable."""
    started = time.perf_counter()
    snap: Snapshot = {
        "taken_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stream_name": settings.stream.name,
        "group_name": settings.stream.group,
        "servers": {},
        "stream": None,
        "groups": [],
        "database": None,
        "consumer_performance": [],
        "recent_activity": [],
        "top_errors": [],
        "throughput": None,
        "processes": None,
        "partitions": [],
    }
    timings: dict[str, float] = {}

    mark = time.perf_counter()
    try:
        if redis_client is None:
            raise ConnectionError("not connected")
        snap["stream"], snap["groups"], snap["partitions"] = partitioned_figures(
            redis_client,
            settings,
            lambda client, name, dead: _redis_figures(client, name, dead, lag_counter),
        )
        snap["servers"]["redis"] = {"available": True, "error": None}
    # A dashboard shows whatever it cannot read as unavailable, whatever the reason.
    except Exception as exc:
        snap["servers"]["redis"] = {"available": False, "error": _reason(exc)}
    timings["redis"] = _ms_since(mark)

    mark = time.perf_counter()
    try:
        if pg_conn is None:
            raise ConnectionError(pg_error or "not connected")
        figures = store_monitor.monitor_figures(pg_conn, route.stream_names(settings), TOP_ERRORS)
        figures["consumers"] = merge_consumer_rows(figures["consumers"])
        snap.update(_database_sections(figures))
        snap["servers"]["postgres"] = {"available": True, "error": None}
    except Exception as exc:
        snap["servers"]["postgres"] = {"available": False, "error": _reason(exc)}
    timings["postgres"] = _ms_since(mark)

    if status_path is not None:
        mark = time.perf_counter()
        snap["processes"] = _processes(status_path, sampler or ProcessSampler())
        timings["processes"] = _ms_since(mark)
    timings["total"] = _ms_since(started)
    snap["timings_ms"] = timings
    return snap


def report(
    settings: Settings, redis_url: str, dsn: str, status_path: str | None = None
) -> Snapshot:
    """One snapshot with connections of its own (ratebox-monitor without ``continuous``)."""
    client = stream.connect(redis_url, check=False, cluster=settings.redis.cluster)
    try:
        conn, error = store.connect(dsn, application_name="ratebox monitor"), None
    except RateboxError as exc:
        conn, error = None, str(exc)
    try:
        return collect(settings, client, conn, status_path, pg_error=error)
    finally:
        client.close()
        if conn is not None:
            store.close(conn)


def _redis_figures(
    client: redis.Redis, name: str, dead: str, lag_counter: stream.LagCounter | None = None
) -> tuple[Snapshot, list[Snapshot]]:
    info = stream.stream_info(client, name)
    figures: Snapshot = {
        "name": name,
        "exists": info is not None,
        "length": 0,
        "first_id": None,
        "last_id": None,
        "last_generated_id": None,
        "memory_bytes": None,
        "dead_letter": {"name": dead, "length": stream.length(client, dead)},
    }
    if info is None:
        return figures, []
    first, last = info.get("first-entry"), info.get("last-entry")
    figures.update(
        length=int(info.get("length", 0)),
        first_id=_text(first[0]) if first else None,
        last_id=_text(last[0]) if last else None,
        last_generated_id=_text(info.get("last-generated-id")),
        memory_bytes=stream.memory_usage(client, name),
    )
    # A server restarted from its append-only file replays the group with each consumer
    # "seen" at the replay: an idle that old only says the consumer did nothing since.
    uptime = stream.uptime_s(client, name)
    groups = []
    for group in stream.groups(client, name):
        group_name = _text(group["name"]) or ""
        lag, how = stream.group_lag(client, name, group, info, lag_counter)
        groups.append(
            {
                "name": group_name,
                "consumers": int(group.get("consumers", 0)),
                "pending": int(group.get("pending", 0)),
                "oldest_pending_s": stream.oldest_pending_age_ms(client, name, group_name) / 1000,
                "lag": lag,
                "lag_source": how,
                "last_delivered": _text(group.get("last-delivered-id")),
                "consumer_list": [
                    {
                        "name": _text(c["name"]),
                        "pending": int(c.get("pending", 0)),
                        "idle_s": int(c.get("idle", 0)) / 1000,
                        "idle_since_restart": uptime is not None
                        and int(c.get("idle", 0)) >= max(1000, (uptime - 1) * 1000),
                    }
                    for c in stream.consumers(client, name, group_name)
                ],
            }
        )
    return figures, groups


def _database_sections(figures: Mapping[str, Any]) -> Snapshot:
    """The database sections of a snapshot, with times as text and samples masked."""
    now: datetime = figures["now"]
    throughput = figures["throughput"]
    return {
        "database": {
            "totals": figures["totals"],
            "processed": figures["totals"]["processed"],
        },
        "consumer_performance": [
            {
                **{k: v for k, v in c.items() if k not in ("last_active", "started_at")},
                "last_active": _iso(c["last_active"]),
                "last_active_s": _age(now, c["last_active"]),
                "started_at": _iso(c["started_at"]),
            }
            for c in figures["consumers"]
        ],
        "recent_activity": figures["recent"],
        "top_errors": [{**e, "sample": _safe(e["sample"])} for e in figures["top_errors"]],
        "throughput": {
            **throughput,
            "minutes": [{**m, "minute": _iso(m["minute"])} for m in throughput["minutes"]],
        },
    }


def _processes(path: str, sampler: ProcessSampler) -> Snapshot:
    try:
        with open(path, encoding="utf-8") as handle:
            status = json.load(handle)
        children = [c for c in status.get("children") or [] if isinstance(c, dict)]
    except FileNotFoundError:
        return {"available": False, "error": f"no supervisor status file at {path}"}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        return {"available": False, "error": f"unreadable status file {path}: {_reason(exc)}"}
    supervisor_pid = status.get("supervisor_pid")
    cpu, rss = sampler.sample(supervisor_pid) if isinstance(supervisor_pid, int) else (None, None)
    out: Snapshot = {
        "available": True,
        "error": None,
        "supervisor_pid": supervisor_pid,
        "supervisor_up": cpu is not None,
        "started_at": status.get("started_at"),
        "uptime_s": _uptime(status.get("started_at")),
        "cpu_percent": cpu,
        "rss_bytes": rss,
        "children": [],
        "workers": None,
    }
    for child in children:
        pid = child.get("pid")
        cpu, rss = sampler.sample(pid) if isinstance(pid, int) and pid > 0 else (None, None)
        last_exit = child.get("last_exit")
        out["children"].append(
            {
                "name": str(child.get("name", "?")),
                "role": str(child.get("role", "?")),
                "pid": pid,
                "state": str(child.get("state", "?")),
                "alive": cpu is not None,
                "restarts": int(child.get("restarts") or 0),
                "started_at": child.get("started_at"),
                "uptime_s": _uptime(child.get("started_at")) if cpu is not None else None,
                "last_exit": _safe(str(last_exit)) if last_exit is not None else None,
                "cpu_percent": cpu,
                "rss_bytes": rss,
            }
        )
    sampler.keep_only(
        {p for p in [supervisor_pid, *(c["pid"] for c in out["children"])] if isinstance(p, int)}
    )
    out["workers"] = _workers(status.get("workers"), out["children"])
    return out


def _workers(reported: Any, children: list[Snapshot]) -> Snapshot:
    """Desired and running workers as the supervisor reported them, and its last reason."""
    reported = reported if isinstance(reported, dict) else {}
    running = reported.get("running")
    if not isinstance(running, int):  # a supervisor that does not say: count what is up
        running = sum(1 for c in children if c["role"] == "worker" and c["state"] == "running")
    desired, reason = reported.get("desired"), reported.get("reason")
    changed_at = reported.get("changed_at")
    return {
        "desired": desired if isinstance(desired, int) else None,
        "running": running,
        "autoscale": reported.get("autoscale") is True,
        "reason": _safe(str(reason)) if reason is not None else None,
        "changed_at": changed_at if isinstance(changed_at, (int, float)) else None,
    }


def _uptime(started: Any) -> float | None:
    """Seconds since a start time given as epoch seconds or ISO 8601 text."""
    try:
        if isinstance(started, str):
            started = datetime.fromisoformat(started).timestamp()
        return max(time.time() - float(started), 0.0) if started is not None else None
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def _age(now: datetime, then: datetime | None) -> float | None:
    return max((now - then).total_seconds(), 0.0) if then is not None else None


def _safe(text: str | None) -> str | None:
    """Free text from outside, masked, with control characters shown as escapes."""
    return inert.text(mask_text(mask_url(text))) if text is not None else None


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return _safe(lines[0] if lines else type(exc).__name__) or ""


def _ms_since(mark: float) -> float:
    return round((time.perf_counter() - mark) * 1000, 1)


# -- the process ------------------------------------------------------------------------------


def _add_current_rate(snap: Snapshot, window: RateWindow) -> None:
    """Put the rate of committed rows over the last ~10 s into the throughput section."""
    if snap["database"] is None or snap["throughput"] is None:
        return
    window.add(time.monotonic(), snap["database"]["processed"])
    snap["throughput"]["per_s_now"] = window.rate()
    snap["throughput"]["now_span_s"] = round(window.span_s(), 1)


class Monitor(Role):
    """The monitor process: refresh every refresh_s, show it, serve it; TERM stops it cleanly."""

    title = "monitor"
    # A second signal while a refresh hangs on a dead server: the monitor holds no work that
    # could be lost, so it may leave at once with success.
    interrupted_status = EXIT_OK

    def __init__(
        self,
        settings: Settings,
        redis_url: str,
        dsn: str,
        beat: Callable[[], None] = lambda: None,
        parent_pid: int | None = None,
        status_path: str | None = None,
        live: bool | None = None,
        refresh_s: float | None = None,
        as_json: bool = False,
        metrics_listen: str | bool | None = True,
    ) -> None:
        super().__init__(beat, parent_pid)
        self.settings = settings
        self.redis_url = redis_url
        self.dsn = dsn
        self.status_path = status_path
        self.live = live
        self.refresh_s = refresh_s or settings.monitor.refresh_s
        self.as_json = as_json
        # True: the configured monitor.metrics_listen (the supervisor's child); None: none.
        self.metrics_listen = (
            settings.monitor.metrics_listen if metrics_listen is True else metrics_listen or None
        )
        self.latest: Snapshot | None = None
        self.sampler = ProcessSampler()
        self.lag_counter = stream.LagCounter()
        self.rate = RateWindow()
        self._redis: redis.Redis | None = None
        self._pg: Any = None
        self._pg_error: str | None = None
        self._http: Any = None
        self._screen: Live | None = None
        self._was_up: dict[str, bool] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def initialize(self) -> None:
        """Post-fork setup: signal flags, the /metrics listener, the live screen."""
        super().initialize()
        if self.live is None:
            self.live = sys.stdout.isatty() and not self.as_json
        self._serve_metrics()
        if self.live:
            self._screen = Live(
                console=Console(), screen=True, auto_refresh=False, redirect_stderr=False
            )
            self._screen.start()

    def between_turns(self) -> None:
        """Wait for the next refresh, beating meanwhile."""
        sleep(self.refresh_s, self.keep_going, self.beat)

    def loop(self) -> Snapshot:
        """One refresh: collect, keep for /metrics, show."""
        snap = collect(
            self.settings,
            self._redis_client(),
            self._pg_conn(),
            self.status_path,
            sampler=self.sampler,
            pg_error=self._pg_error,
            lag_counter=self.lag_counter,
        )
        _add_current_rate(snap, self.rate)
        self.latest = snap
        self._note_outages(snap)
        if self._screen is not None:
            self._screen.update(render(snap, screen=True), refresh=True)
        elif self.as_json:
            print(json.dumps(snap), flush=True)
        else:
            log.info("%s", snapshot_line(snap))
        return snap

    def shutdown(self) -> None:
        """Leave the screen, stop serving, close connections."""
        if self._screen is not None:
            self._screen.stop()
            self._screen = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._redis is not None:
            with contextlib.suppress(Exception):  # a dead socket may refuse even to close
                self._redis.close()
            self._redis = None
        if self._pg is not None:
            store.close(self._pg)
            self._pg = None

    # -- helpers ---------------------------------------------------------------------------

    def _serve_metrics(self) -> None:
        listen = self.metrics_listen
        if not listen:
            return
        host, _, port = listen.rpartition(":")
        try:
            self._http, _ = start_http_server(
                int(port), host.strip("[]"), registry=registry_for(lambda: self.latest)
            )
        except OSError as exc:
            # The dashboard is still worth having; a restart loop over a busy port is not.
            log.error(
                "cannot serve /metrics on %s: %s; going on without it", listen, exc.strerror or exc
            )

    def _redis_client(self) -> redis.Redis:
        if self._redis is None:
            self._redis = stream.connect(
                self.redis_url, check=False, cluster=self.settings.redis.cluster
            )
        return self._redis

    def _pg_conn(self) -> Any:
        if self._pg is not None and self._pg.closed:
            store.close(self._pg)
            self._pg = None
        if self._pg is None:
            try:
                self._pg = store.connect(self.dsn, application_name="ratebox monitor")
                self._pg.autocommit = False
                self._pg_error = None
            except RateboxError as exc:
                self._pg_error = str(exc)
        return self._pg

    def _note_outages(self, snap: Snapshot) -> None:
        """One log line when a server goes away or comes back, not one per refresh."""
        for name, server in snap["servers"].items():
            was = self._was_up.get(name, True)
            if was and not server["available"]:
                log.warning("%s unavailable: %s", name, server["error"])
            elif not was and server["available"]:
                log.warning("%s available again", name)
            self._was_up[name] = server["available"]


def run(
    settings: Settings,
    redis_url: str,
    dsn: str,
    beat: Callable[[], None] = lambda: None,
    parent_pid: int | None = None,
    status_path: str | None = None,
    live: bool | None = None,
    **options: Any,
) -> int:
    """Entry point of the monitor process (after fork, or from ratebox-monitor continuous)."""
    return Monitor(settings, redis_url, dsn, beat, parent_pid, status_path, live, **options).run()
