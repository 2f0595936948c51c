"""The arbiter: one process per stable name (worker_001 ..., sweeper, monitor), kept running.

Before any fork it validates the configuration, compiles the rules, starts the embedded
servers it needs, takes the lease on the consumer names and applies migrations. Then a loop
of short verbs: wait for a signal or a second to pass, act on queued signals, reap the
children that exited, kill the silent ones, converge the children table towards the desired
one (``plan``, pure), report (lease, status file, systemd). Signal handlers only queue.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import importlib
import json
import logging
import os
import select
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from ratebox import config, heartbeat, stream, systemd
from ratebox import log as ratebox_log
from ratebox.config import Settings
from ratebox.errors import EXIT_BOOT_FAILURE, EXIT_FAILURE, EXIT_OK, ConfigError, RateboxError
from ratebox.rules import Engine, compile_rules

log = logging.getLogger(__name__)

#: Longest sleep between two loop turns when nothing happens.
WAKE_S = 1.0
#: First respawn delay of a child that keeps dying soon after start; doubles up to the cap.
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
#: A child that ran this long was healthy: its next crash starts the backoff from scratch.
HEALTHY_AFTER_S = 60.0
#: A child that cannot boot is retried this slowly: it will not get better by spinning.
BOOT_RETRY_S = 30.0
#: After SIGABRT to a silent child (so it can leave a traceback or core), SIGKILL this much later.
KILL_AFTER_ABORT_S = 5.0
#: The lease on the consumer names lives this long unless refreshed (every LEASE_REFRESH_S).
LEASE_TTL_MS = 15_000
LEASE_REFRESH_S = 5.0
#: The status file is rewritten when something changed, and at least this often.
STATUS_EVERY_S = 5.0
#: The upper bound of workers.count in config.py; TTIN stops there.
MAX_WORKERS = 256

#: Signals the supervisor handles; blocked around fork so a child never runs our handlers.
HANDLED = (
    signal.SIGHUP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGCHLD,
)
#: Keys only the supervisor reads: changing them never restarts a child.
SUPERVISOR_ONLY = frozenset(
    {
        "workers.count",
        "workers.timeout_s",
        "workers.shutdown_timeout_s",
        "postgres.migrate_on_start",
        "embedded.dir",
        "monitor.enabled",
    }
)
#: Keys a reload cannot change: they name the servers, the lease and the consumers' names.
FIXED_ON_RELOAD = (
    "redis.url",
    "postgres.dsn",
    "embedded.dir",
    "stream.name",
    "stream.group",
    "workers.name_prefix",
)
#: Keys (a trailing '.' means a whole section) each role never reads.
ROLE_IGNORES: Mapping[str, tuple[str, ...]] = {
    "worker": ("sweeper.", "monitor."),
    "sweeper": ("monitor.",),
    "monitor": ("rules", "limits."),
}
_ROLE_ORDER = {"worker": 0, "sweeper": 1, "monitor": 2}

PR_SET_PDEATHSIG = 1


# -- the pure part: what should run, and what to do about it -------------------------------


@dataclass(frozen=True)
class Spec:
    """What should run under a name."""

    name: str
    role: str
    settings: Settings


@dataclass
class Child:
    """One name of the children table: its process, if any, and its history."""

    name: str
    role: str
    settings: Settings
    #: starting (forked, no heartbeat yet) | running | stopping | waiting (to respawn)
    #: | failed (cannot boot; slow retry) | gone (stopped for good, to be forgotten)
    state: str = "waiting"
    pid: int | None = None
    heartbeat: heartbeat.Heartbeat | None = None
    started_at: float = 0.0  # monotonic, current or last process
    started_wall: float | None = None
    born: float = 0.0  # wall time of the heartbeat file's creation, to see the first beat
    stop_reason: str | None = None  # why we sent TERM: scale | restart
    stop_sent_at: float = 0.0
    aborted_at: float | None = None
    killed: bool = False
    restarting: bool = False  # a rolling restart of this name is in flight until it is up
    failures: int = 0  # consecutive short-lived runs
    not_before: float = 0.0  # earliest respawn
    restarts: int = 0
    last_exit: str | None = None

    @property
    def alive(self) -> bool:
        return self.pid is not None


@dataclass(frozen=True)
class Action:
    """One step of a plan: spawn, stop, restart or forget a name."""

    verb: str
    name: str


def desired_children(settings: Settings, workers: int) -> dict[str, Spec]:
    """The children the settings ask for, workers first, in name order."""
    desired = {
        settings.consumer_name(i): Spec(settings.consumer_name(i), "worker", settings)
        for i in range(1, workers + 1)
    }
    desired["sweeper"] = Spec("sweeper", "sweeper", settings)
    if settings.monitor.enabled:
        desired["monitor"] = Spec("monitor", "monitor", settings)
    return desired


def needs_restart(role: str, changed: Iterable[str]) -> bool:
    """True when a key the role reads is among ``changed`` (key paths, or "rules")."""
    ignored = ROLE_IGNORES[role]
    for key in changed:
        if key in SUPERVISOR_ONLY:
            continue
        if any(key == skip or (skip.endswith(".") and key.startswith(skip)) for skip in ignored):
            continue
        return True
    return False


def is_stale(child: Child, spec: Spec) -> bool:
    """True when the child runs with settings that differ in something its role reads."""
    return child.settings is not spec.settings and needs_restart(
        child.role, child.settings.diff(spec.settings)
    )


def plan(desired: Mapping[str, Spec], children: Mapping[str, Child], now: float) -> list[Action]:
    """Steps that bring the running children towards the desired ones; touches nothing."""
    actions: list[Action] = []
    # Surplus first, highest names first, so that the names in use stay _001 ... _00n.
    for name in sorted(children.keys() - desired.keys(), reverse=True):
        surplus = children[name]
        if not surplus.alive:
            actions.append(Action("forget", name))
        elif surplus.state != "stopping":
            actions.append(Action("stop", name))
    for name in desired:
        missing = children.get(name)
        if missing is None or (not missing.alive and now >= missing.not_before):
            actions.append(Action("spawn", name))
    # Restarts for new settings go one at a time: the next waits until the last one is up,
    # so a configuration that breaks the children takes down one of them, not all.
    if not any(c.restarting for name, c in children.items() if name in desired):
        for name, spec in desired.items():
            child = children.get(name)
            if child and child.state in ("starting", "running") and is_stale(child, spec):
                actions.append(Action("restart", name))
                break
    return actions


def respawn_delay(failures: int, uptime: float, boot_failure: bool) -> tuple[int, float]:
    """(consecutive failures, seconds to wait) after a child exited on its own."""
    if boot_failure:
        return failures + 1, BOOT_RETRY_S
    if uptime >= HEALTHY_AFTER_S:
        failures = 0
    failures += 1
    return failures, min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(failures - 1, 16))


def describe_exit(status: int) -> tuple[int | None, int | None, str]:
    """(exit code, signal, text) of a wait status."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return None, signum, f"was killed by {_signame(signum)}"
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        what = " (cannot boot)" if code == EXIT_BOOT_FAILURE else ""
        return code, None, f"exited with status {code}{what}"
    return None, None, f"ended with wait status {status}"


def status_line(desired: Mapping[str, Spec], children: Mapping[str, Child]) -> str:
    """One line for systemd's STATUS: workers running out of desired, then the siblings."""
    workers = [n for n, s in desired.items() if s.role == "worker"]
    up = sum(1 for n in workers if n in children and children[n].state == "running")
    parts = [f"{up}/{len(workers)} workers running"]
    for name in ("sweeper", "monitor"):
        if name in desired:
            parts.append(f"{name} {children[name].state if name in children else 'waiting'}")
    return ", ".join(parts)


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# -- the lease on the consumer names ---------------------------------------------------------


@dataclass
class Lease:
    """A Redis key saying which supervisor runs ``<prefix>_*`` of one group on one stream."""

    client: Any
    key: str
    holder: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    )

    @classmethod
    def for_settings(cls, client: Any, settings: Settings) -> Lease:
        prefix = settings.consumer_name(1).rsplit("_", 1)[0]
        return cls(client, f"ratebox:lease:{settings.stream.name}:{settings.stream.group}:{prefix}")

    def take(self) -> str | None:
        """None when we hold it now, else who does (host:pid)."""
        other = stream.take_lease(self.client, self.key, self.holder, LEASE_TTL_MS)
        return None if other is None else other.rsplit(":", 1)[0]

    def refresh(self) -> bool:
        return stream.refresh_lease(self.client, self.key, self.holder, LEASE_TTL_MS)

    def release(self) -> None:
        stream.release_lease(self.client, self.key, self.holder)


# -- the process ---------------------------------------------------------------------------


class Supervisor:
    """The arbiter. ``run()`` = ``initialize()``, ``loop()`` until told to stop, ``stop_children()``."""

    def __init__(
        self,
        settings: Settings,
        config_path: str,
        log_level: str = "INFO",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.log_level = log_level
        self.clock = clock
        self.pid = os.getpid()
        self.engine: Engine | None = None
        self.worker_count = settings.workers.count
        self.desired = desired_children(settings, self.worker_count)
        self.children: dict[str, Child] = {}
        self.pids: dict[int, str] = {}
        self.signals: collections.deque[int] = collections.deque()
        self.stop_mode: str | None = None  # graceful | immediate
        self.exit_status = EXIT_OK
        self.redis_url = self.dsn = ""
        self.servers_started: list[str] = []
        self.lease: Lease | None = None
        self.lease_due = 0.0
        self.lease_trouble = False
        self.pipe: tuple[int, int] | None = None
        self.started_wall = time.time()
        self.status_path = ""
        self.status_written: tuple[float, Any] = (0.0, None)
        self.systemd_status = ""
        self.ready = False
        self.watchdog_s = systemd.watchdog_interval()
        self.watchdog_due = 0.0

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        """Boot, supervise until a stop signal, stop the children; returns the exit status."""
        try:
            self.initialize()
            while self.stop_mode is None:
                self.loop()
            return self.stop_children()
        finally:
            # Only does something when we got here by an exception: no child may outlive us.
            self.kill_all()
            self.release_everything()

    def initialize(self) -> None:
        """Everything before the first fork; a RateboxError here means nothing runs."""
        _proctitle("supervisor")
        # Handlers first: a TERM during a slow server start is queued, not fatal halfway.
        self._install_signals()
        self.engine = compile_rules(self.settings.rules)
        s = self.settings
        if config_needs_embedded(s):
            from ratebox import embedded

            self.redis_url, self.dsn, self.servers_started = embedded.resolve(
                s.redis.url, s.postgres.dsn, s.embedded.dir
            )
        else:
            self.redis_url, self.dsn = s.redis.url, s.postgres.dsn
        self._abort_if_asked()
        # The lease before migrations: a duplicate supervisor is refused before it touches
        # the database.
        self.lease = Lease.for_settings(stream.connect_quick(self.redis_url), s)
        holder = self.lease.take()
        if holder is not None:
            self.lease = None
            prefix = s.consumer_name(1).rsplit("_", 1)[0]
            raise RateboxError(
                f"another supervisor ({holder}) runs consumers {prefix}_* of group "
                f"{s.stream.group} on stream {s.stream.name}"
            )
        self.lease_due = self.clock() + LEASE_REFRESH_S
        if s.postgres.migrate_on_start:
            from ratebox import migrate

            applied = migrate.run(self.dsn)
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
        self._abort_if_asked()
        directory = os.path.abspath(s.embedded.dir)
        os.makedirs(directory, exist_ok=True)
        self.status_path = os.path.join(
            directory, f"supervisor-{s.stream.name}-{s.stream.group}.json"
        )
        log.info(
            "supervising %d workers on %s/%s (config %s)",
            self.worker_count,
            s.stream.name,
            s.stream.group,
            self.config_path,
        )

    def loop(self) -> None:
        """One turn: wait, act on signals, reap, kill the silent, converge, report."""
        self.wait_for_signals(self._next_wake())
        self.handle_signals()
        if self.stop_mode is not None:
            return
        now = self.clock()
        self.reap(now)
        self.notice_up(now)
        self.kill_silent(now)
        self.converge(now)
        self.keep_lease(now)
        self.report(now)

    def stop_children(self) -> int:
        """Stop every child, gracefully unless told otherwise; returns the exit status."""
        # The order is deliberate. systemd hears first, so it does not take the exits below
        # for a crash. Every child gets TERM at once: each worker finishes and acknowledges
        # its own batch, so stopping them one by one would only be slower. The lease and the
        # servers are kept until the last child is gone (release_everything), since the
        # children still use both while they finish.
        systemd.notify("STOPPING=1")
        graceful = self.stop_mode == "graceful"
        grace = self.settings.workers.shutdown_timeout_s if graceful else 0.0
        log.info(
            "stopping %d children %s",
            len(self.pids),
            f"gracefully (up to {grace:g} s)" if graceful else "at once",
        )
        self._signal_all(signal.SIGTERM if graceful else signal.SIGKILL)
        deadline = self.clock() + grace
        while self.pids and self.clock() < deadline:
            self.wait_for_signals(0.2)
            if graceful and any(
                s in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT) for s in self.signals
            ):
                log.warning("second stop signal: killing the children at once")
                graceful = False
                deadline = self.clock()
            self.signals.clear()
            now = self.clock()
            self.reap(now)
            self.keep_lease(now)
            self.report(now)
        if self.pids:
            if graceful:
                log.warning(
                    "%d children still running after %g s: killing them", len(self.pids), grace
                )
            self.kill_all()
        log.info("stopped")
        return self.exit_status

    # -- signals ---------------------------------------------------------------------------

    def _install_signals(self) -> None:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pipe = (read_fd, write_fd)
        # The interpreter writes a byte here for every signal, which wakes the select below.
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for signum in HANDLED:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Record only: logging, forking or killing from here can deadlock or re-enter.
        if signum != signal.SIGCHLD:  # SIGCHLD only needs to wake the loop, which reaps
            self.signals.append(signum)

    def wait_for_signals(self, timeout: float) -> None:
        """Sleep until a signal arrives or ``timeout`` passes."""
        if self.pipe is None or self.signals:
            return
        with contextlib.suppress(InterruptedError):
            ready, _, _ = select.select([self.pipe[0]], [], [], max(0.0, timeout))
            if ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self.pipe[0], 4096):
                        pass

    def handle_signals(self) -> None:
        """Act on the queued signals, in arrival order."""
        while self.signals:
            signum = self.signals.popleft()
            log.info("received %s", _signame(signum))
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stop_mode = "graceful" if self.stop_mode is None else "immediate"
            elif signum == signal.SIGQUIT:
                self.stop_mode = "immediate"
            elif self.stop_mode is not None:
                continue
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGTTIN:
                self.scale(self.worker_count + 1)
            elif signum == signal.SIGTTOU:
                self.scale(self.worker_count - 1)

    def _abort_if_asked(self) -> None:
        if any(s in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT) for s in self.signals):
            raise RateboxError("interrupted while starting")

    # -- HUP, TTIN, TTOU -------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the file; a bad one is refused and the running topology stays."""
        if self.ready:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
        try:
            new = config.load(self.config_path)
            fixed = [k for k in FIXED_ON_RELOAD if new.get(k) != self.settings.get(k)]
            if fixed:
                raise ConfigError(f"{fixed[0]}: cannot change on reload; restart the supervisor")
            engine = self.engine if new.rules == self.settings.rules else compile_rules(new.rules)
        except ConfigError as exc:
            log.error("reload refused: %s", exc)
        else:
            changed = self.settings.diff(new)
            self.settings, self.engine = new, engine
            log.info(
                "reloaded %s: %s",
                self.config_path,
                f"changed {', '.join(sorted(changed))}" if changed else "nothing changed",
            )
            self.scale(new.workers.count)
        finally:
            if self.ready:
                systemd.notify(f"READY=1\nSTATUS={self.systemd_status}")

    def scale(self, count: int) -> None:
        """Change the number of workers; converge() does the rest."""
        count = max(1, min(MAX_WORKERS, count))
        if count != self.worker_count:
            self.worker_count = count
            log.info("scaled to %d workers", count)
        self.desired = desired_children(self.settings, self.worker_count)

    # -- reap, notice, kill, converge ------------------------------------------------------

    def reap(self, now: float) -> None:
        """Collect every exited child; pids we did not fork are ignored."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            name = self.pids.pop(pid, None)
            if name is not None:
                self.on_exit(self.children[name], status, now)

    def on_exit(self, child: Child, status: int, now: float) -> None:
        """Record an exit and decide what follows: nothing, a respawn now, or one later."""
        code, _, text = describe_exit(status)
        uptime = now - child.started_at
        log.info("%s (pid %s) %s after %.1f s", child.name, child.pid, text, uptime)
        if child.heartbeat is not None:
            child.heartbeat.close()
        reason = child.stop_reason
        child.pid, child.heartbeat, child.last_exit = None, None, text
        child.stop_reason, child.aborted_at, child.killed = None, None, False
        if self.stop_mode is not None:
            child.state = "gone"
        elif child.name not in self.desired:
            child.state = "gone"
            if child.role == "worker":
                self.forget_consumer(child.name)
        elif reason is not None:
            # Stopped by us for new settings, or scaled down and wanted again since: at once.
            child.state, child.not_before = "waiting", now
        else:
            boot_failure = code == EXIT_BOOT_FAILURE
            child.failures, delay = respawn_delay(child.failures, uptime, boot_failure)
            child.state = "failed" if boot_failure else "waiting"
            child.not_before = now + delay
            if boot_failure:
                log.error(
                    "%s cannot boot (see its error above); retrying in %g s", child.name, delay
                )
            else:
                log.info("restarting %s in %g s", child.name, delay)

    def forget_consumer(self, name: str) -> None:
        """Delete a scaled-down worker's consumer from the group, unless it still holds entries."""
        if self.lease is None:
            return
        s = self.settings
        try:
            deleted, pending = stream.delete_consumer_if_idle(
                self.lease.client, s.stream.name, s.stream.group, name
            )
        except stream.OUTAGE_ERRORS as exc:
            log.warning("could not delete consumer %s (Redis: %s); left for the sweeper", name, exc)
            return
        if deleted:
            log.info("deleted consumer %s from group %s", name, s.stream.group)
        elif pending:
            log.info(
                "consumer %s still holds %d pending entries; left for the sweeper", name, pending
            )

    def notice_up(self, now: float) -> None:
        """A starting child is up once it has beaten; that also ends its rolling restart."""
        for child in self.children.values():
            if child.state != "starting" or child.heartbeat is None:
                continue
            if time.time() - child.heartbeat.age() > child.born + 0.001:
                child.state, child.restarting = "running", False

    def kill_silent(self, now: float) -> None:
        """SIGABRT a child silent for workers.timeout_s, SIGKILL it if that did not do; same for a
        child that ignores TERM for workers.shutdown_timeout_s."""
        timeout = self.settings.workers.timeout_s
        for child in self.children.values():
            if child.pid is None or child.heartbeat is None:
                continue
            if child.aborted_at is not None:
                if now - child.aborted_at >= KILL_AFTER_ABORT_S and not child.killed:
                    log.error("%s (pid %d) survived SIGABRT: SIGKILL", child.name, child.pid)
                    self._kill(child, signal.SIGKILL)
                    child.killed = True
            elif child.state == "stopping":
                if now - child.stop_sent_at > self.settings.workers.shutdown_timeout_s:
                    log.error("%s (pid %d) did not stop in time: SIGKILL", child.name, child.pid)
                    self._kill(child, signal.SIGKILL)
                    child.aborted_at, child.killed = now, True
            elif (age := child.heartbeat.age()) > timeout:
                log.error(
                    "killed %s (pid %d) as silent: no heartbeat for %.0f s (workers.timeout_s %g)",
                    child.name,
                    child.pid,
                    age,
                    timeout,
                )
                self._kill(child, signal.SIGABRT)
                child.aborted_at = now

    def converge(self, now: float) -> None:
        """Carry out the plan: spawn the missing, stop the surplus, restart the stale."""
        for action in plan(self.desired, self.children, now):
            child = self.children.get(action.name)
            if action.verb == "spawn":
                self.spawn(self.desired[action.name], now)
            elif action.verb == "forget":
                del self.children[action.name]
            elif action.verb == "stop" and child is not None:
                log.info("stopping %s (pid %s): no longer wanted", child.name, child.pid)
                self._stop(child, "scale", now)
            elif action.verb == "restart" and child is not None:
                changed = child.settings.diff(self.desired[action.name].settings)
                log.info(
                    "restarting %s (pid %s): changed %s",
                    child.name,
                    child.pid,
                    ", ".join(sorted(changed)),
                )
                child.restarting = True
                self._stop(child, "restart", now)

    def _stop(self, child: Child, reason: str, now: float) -> None:
        child.state, child.stop_reason, child.stop_sent_at = "stopping", reason, now
        self._kill(child, signal.SIGTERM)

    def _kill(self, child: Child, signum: int) -> None:
        if child.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    def _signal_all(self, signum: int) -> None:
        for child in self.children.values():
            self._kill(child, signum)

    def kill_all(self) -> None:
        """SIGKILL every child still there and reap them (a few seconds at most)."""
        if not self.pids:
            return
        self._signal_all(signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while self.pids and time.monotonic() < deadline:
            self.reap(self.clock())
            if self.pids:
                time.sleep(0.02)

    # -- fork ------------------------------------------------------------------------------

    def spawn(self, spec: Spec, now: float) -> None:
        """Fork a process for ``spec``; the child never returns from here."""
        child = self.children.get(spec.name)
        if child is None:
            child = self.children[spec.name] = Child(spec.name, spec.role, spec.settings)
        elif child.started_wall is not None:
            child.restarts += 1
        child.settings = spec.settings
        beat = heartbeat.Heartbeat()
        born = time.time() - beat.age()
        for stdio in (sys.stdout, sys.stderr):
            stdio.flush()  # or the child would write the parent's buffered text again
        # Blocked across fork: a signal arriving in between must not run our handler in the
        # child (it would queue into a copy of our state, or write to our wakeup pipe).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            pid = os.fork()
            if pid == 0:
                self._become_child(child, beat)
        except OSError as exc:
            beat.close()
            child.state, child.not_before = "waiting", now + BACKOFF_MAX_S
            log.error("cannot fork %s: %s; retrying in %g s", spec.name, exc, BACKOFF_MAX_S)
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        child.pid, child.heartbeat, child.born = pid, beat, born
        child.state, child.started_at, child.started_wall = "starting", now, time.time()
        self.pids[pid] = spec.name
        log.info("spawned %s (pid %d)", spec.name, pid)

    def _become_child(self, child: Child, beat: heartbeat.Heartbeat) -> None:
        """The child's side of fork: set up, run the role, and leave by os._exit only."""
        status = EXIT_BOOT_FAILURE
        pulse = _Pulse(beat)
        try:
            self._child_setup(child, beat)
            status = self._run_role(child, pulse)
        except SystemExit as exc:
            status = (
                exc.code
                if isinstance(exc.code, int)
                else (EXIT_OK if exc.code is None else EXIT_FAILURE)
            )
        except RateboxError as exc:
            log.error("%s cannot %s: %s", child.name, "run" if pulse.seen else "boot", exc)
            status = EXIT_FAILURE if pulse.seen else EXIT_BOOT_FAILURE
        except BaseException:
            # Before the first heartbeat the role never got going: a boot failure, which the
            # supervisor retries slowly; after it, an ordinary crash.
            log.exception("%s %s", child.name, "crashed" if pulse.seen else "cannot boot")
            status = EXIT_FAILURE if pulse.seen else EXIT_BOOT_FAILURE
        finally:
            logging.shutdown()
            os._exit(status)

    def _child_setup(self, child: Child, beat: heartbeat.Heartbeat) -> None:
        signal.set_wakeup_fd(-1)
        for signum in HANDLED:
            signal.signal(signum, signal.SIG_DFL)
        # Reload and rescale are the supervisor's business; TTIN/TTOU would stop us by default.
        for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(signum, signal.SIG_IGN)
        # Out of the terminal's process group: ^C reaches the supervisor alone, which then
        # stops the workers once, gracefully, instead of each getting INT and then TERM.
        os.setpgid(0, 0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        _die_with_parent()
        if os.getppid() != self.pid:  # the parent died before prctl took effect
            os._exit(EXIT_OK)
        if self.pipe is not None:
            for fd in self.pipe:
                os.close(fd)
        for other in self.children.values():
            if other.heartbeat is not None and other.heartbeat is not beat:
                other.heartbeat.close()
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(key, None)  # only the supervisor talks to systemd
        title = f"worker {child.name}" if child.role == "worker" else child.role
        _proctitle(title)
        ratebox_log.setup(title, self.log_level)

    def _run_role(self, child: Child, pulse: _Pulse) -> int:
        module: Any = importlib.import_module(f"ratebox.{child.role}")
        common: dict[str, Any] = {"beat": pulse, "parent_pid": self.pid}
        if child.role == "worker":
            status = module.run(
                child.settings, child.name, self.redis_url, self.dsn, engine=self.engine, **common
            )
        elif child.role == "sweeper":
            status = module.run(child.settings, self.redis_url, self.dsn, **common)
        else:
            status = module.run(
                child.settings,
                self.redis_url,
                self.dsn,
                status_path=self.status_path,
                live=sys.stdout.isatty(),
                **common,
            )
        return int(status or 0)

    # -- lease, status file, systemd -------------------------------------------------------

    def keep_lease(self, now: float) -> None:
        """Refresh the lease every few seconds; stop if another supervisor took it."""
        if self.lease is None or now < self.lease_due:
            return
        self.lease_due = now + LEASE_REFRESH_S
        try:
            if self.lease.refresh():
                holder = None
            else:
                # Expired (Redis lost its data, or we were stopped for too long): take it
                # again, unless somebody else holds it now.
                holder = self.lease.take()
                if holder is None:
                    log.warning("the lease %s had expired; taken again", self.lease.key)
        except stream.OUTAGE_ERRORS as exc:
            if not self.lease_trouble:
                log.warning("cannot refresh the lease %s: %s", self.lease.key, stream.reason(exc))
            self.lease_trouble = True
            return
        if self.lease_trouble:
            log.info("lease %s refreshed again", self.lease.key)
            self.lease_trouble = False
        if holder is not None:
            log.error("another supervisor (%s) took the lease %s; stopping", holder, self.lease.key)
            self.lease = None
            self.exit_status = EXIT_FAILURE
            self.stop_mode = self.stop_mode or "graceful"

    def report(self, now: float) -> None:
        """Status file for the monitor, STATUS / READY / WATCHDOG for systemd."""
        snapshot = self.snapshot()
        last_at, last = self.status_written
        if self.status_path and (snapshot != last or now - last_at >= STATUS_EVERY_S):
            self.status_written = (now, snapshot)
            document = {"supervisor_pid": self.pid, "started_at": self.started_wall, **snapshot}
            try:
                write_atomically(self.status_path, json.dumps(document, indent=1).encode())
            except OSError as exc:
                log.warning("cannot write %s: %s", self.status_path, exc.strerror)
        line = status_line(self.desired, self.children)
        if line != self.systemd_status:
            self.systemd_status = line
            systemd.notify(f"STATUS={line}")
        if not self.ready and self.stop_mode is None and self._all_up():
            self.ready = True
            log.info("all %d children up", len(self.desired))
            systemd.notify(f"READY=1\nSTATUS={line}")
        if self.watchdog_s is not None and now >= self.watchdog_due:
            self.watchdog_due = now + self.watchdog_s
            systemd.notify("WATCHDOG=1")

    def _all_up(self) -> bool:
        return all(n in self.children and self.children[n].state == "running" for n in self.desired)

    def snapshot(self) -> dict[str, Any]:
        """The children as the monitor sees them (status file, without the timestamp)."""
        ordered = sorted(self.children.values(), key=lambda c: (_ROLE_ORDER[c.role], c.name))
        return {
            "children": [
                {
                    "name": c.name,
                    "role": c.role,
                    "pid": c.pid,
                    "state": c.state,
                    "restarts": c.restarts,
                    "started_at": c.started_wall,
                    "last_exit": c.last_exit,
                }
                for c in ordered
            ]
        }

    def release_everything(self) -> None:
        """Lease, status file, embedded servers (only those we started), wakeup pipe."""
        if self.lease is not None:
            try:
                self.lease.release()
            except stream.OUTAGE_ERRORS as exc:
                log.warning(
                    "cannot release the lease (it expires by itself): %s", stream.reason(exc)
                )
            self.lease = None
        if self.status_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.status_path)
        if self.servers_started:
            from ratebox import embedded

            try:
                embedded.stop(self.servers_started, self.settings.embedded.dir)
            except Exception as exc:
                log.error("cannot stop the embedded servers: %s", exc)
            self.servers_started = []
        if self.pipe is not None:
            signal.set_wakeup_fd(-1)
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None

    def _next_wake(self) -> float:
        now = self.clock()
        wake = WAKE_S
        for child in self.children.values():
            if child.state == "starting":
                wake = min(wake, 0.2)  # notice it is up soon, for READY and rolling restarts
            elif not child.alive and child.state != "gone":
                wake = min(wake, child.not_before - now)
        if self.watchdog_s is not None:
            wake = min(wake, self.watchdog_due - now)
        return max(0.0, wake)


class _Pulse:
    """The child's heartbeat callable; remembers whether the role got as far as beating."""

    def __init__(self, beat: heartbeat.Heartbeat) -> None:
        self.beat = beat
        self.seen = False

    def __call__(self) -> None:
        self.seen = True
        self.beat.beat()


def config_needs_embedded(settings: Settings) -> bool:
    """True when either server is ``embedded`` and has to be started (or found) first."""
    return "embedded" in (settings.redis.url, settings.postgres.dsn)


def write_atomically(path: str, data: bytes) -> None:
    """Write ``path`` so that a reader sees the old content or the new, never a part."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _die_with_parent() -> None:
    # A second guard besides the workers' getppid() check: the kernel sends SIGTERM when the
    # supervisor dies, even to a child blocked in a long call that never checks.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the getppid() check remains
        pass


def _proctitle(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(f"ratebox: {title}")
    except ImportError:  # pragma: no cover - a dependency; titles help operators, nothing more
        pass


def run(settings: Settings, config_path: str, log_level: str = "INFO") -> int:
    """Entry point of ratebox-supervisor (after the configuration was loaded)."""
    return Supervisor(settings, config_path, log_level).run()
