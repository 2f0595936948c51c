"""The arbiter: one process per stable name (worker_001 ..., sweeper, monitor), kept running.

Before any fork it validates the configuration, compiles the rules, starts the embedded
servers it needs, takes the lease on the consumer names and applies migrations. Then a loop
of short verbs: wait for a signal or a second, act on the queued signals, reap the children
that exited, kill the silent ones, converge the children table towards the desired one
(``plan``, pure), keep the lease, report (status file, systemd). Signal handlers only queue.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import json
import logging
import math
import os
import select
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from signal import SIGABRT, SIGCHLD, SIGHUP, SIGINT, SIGKILL, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU
from types import FrameType
from typing import Any

from ratebox import child as role_child
from ratebox import config, heartbeat, route, stream, stream_lease, systemd, topology
from ratebox.config import Settings
from ratebox.errors import (
    EXIT_BOOT_FAILURE,
    EXIT_FAILURE,
    EXIT_OK,
    ConfigError,
    RateboxError,
    ServerUnavailable,
)
from ratebox.rules import Engine, compile_rules
from ratebox.scaler import Scaler
from ratebox.topology import Child, Spec

log = logging.getLogger(__name__)

#: Longest sleep between two loop turns when nothing happens.
WAKE_S = 1.0
#: fork() failing (EAGAIN, ENOMEM) is the machine's trouble: retry gently.
FORK_RETRY_S = 30.0
#: SIGABRT first, so a silent child can leave a traceback or a core; SIGKILL this much later.
KILL_AFTER_ABORT_S = 5.0
#: The lease on the consumer names lives this long unless refreshed every LEASE_REFRESH_S.
LEASE_TTL_MS, LEASE_REFRESH_S = 15_000, 5.0
#: The status file is rewritten when something changed, and at least this often.
STATUS_EVERY_S = 5.0
#: The upper bound of workers.count in config.py; TTIN stops there.
MAX_WORKERS = 256
#: Signals the supervisor handles; blocked around fork so a child never runs our handlers.
HANDLED = role_child.HANDLED
_STOP_SIGNALS = (SIGTERM, SIGINT, SIGQUIT)
#: Keys a reload cannot change: they name the servers, the lease and the consumers.
FIXED_ON_RELOAD = tuple(
    [
        "redis.url",
        "postgres.dsn",
        "embedded.dir",
        "stream.name",
        "stream.group",
        "workers.name_prefix",
        "redis.cluster",
        "stream.partitions",
        "stream.partition_key",
    ]
)
_ROLE_ORDER = {"worker": 0, "sweeper": 1, "monitor": 2}
#: What the status file says of each child (the monitor reads it).
STATUS_FIELDS = ("name", "role", "pid", "state", "restarts", "started_at", "last_exit")


# -- the process ---------------------------------------------------------------------------


class Supervisor:
    """The arbiter: ``run()`` = ``initialize()``, ``loop()`` until told to stop, ``stop_children()``."""

    def __init__(
        self,
        settings: Settings,
        config_path: str,
        log_level: str = "INFO",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings, self.config_path, self.log_level = settings, config_path, log_level
        self.clock = clock
        self.pid = os.getpid()
        self.engine: Engine | None = None
        self.worker_count = settings.workers.count  # with autoscale on: the start
        self.scaler = Scaler(settings)
        self.scale_reason: str | None = None  # why the worker count last changed
        self.scaled_at: float | None = None  # wall clock of that change
        self.desired = topology.desired_children(settings, self.worker_count)
        self.children: dict[str, Child] = {}
        self.pids: dict[int, str] = {}
        self.signals: collections.deque[int] = collections.deque()
        self.pipe: tuple[int, int] | None = None
        self.stop_mode: str | None = None  # graceful | immediate
        self.exit_status = EXIT_OK
        self.redis_url = self.dsn = ""
        self.servers_started: list[str] = []
        self.redis: Any = None  # the supervisor's own client: lease and consumer clean-up
        self.lease_key = settings.lease_key()
        self.lease_holder = f"{socket.gethostname()}:{self.pid}:{uuid.uuid4().hex[:12]}"
        self.lease_held = False
        self.lease_due = 0.0
        self.lease_trouble = False
        self.started_at = time.time()
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
            # Does something only when we got here by an exception: no child may outlive us.
            self.kill_all()
            self.release_everything()

    def initialize(self) -> None:
        """Everything before the first fork; a RateboxError here means nothing runs."""
        role_child.proctitle("supervisor")
        # Handlers first: a TERM during a slow server start is queued, not fatal halfway.
        self._install_signals()
        s = self.settings
        self.engine = compile_rules(s.rules)
        self.redis_url, self.dsn = s.redis.url, s.postgres.dsn
        if "embedded" in (self.redis_url, self.dsn):
            from ratebox import embedded

            self.redis_url, self.dsn, self.servers_started = embedded.resolve(
                s.redis.url, s.postgres.dsn, s.embedded.dir
            )
        self._abort_if_asked()
        # The lease before migrations: a duplicate is refused before it touches the database.
        self.redis = stream.connect_quick(self.redis_url, cluster=s.redis.cluster)
        try:
            holder = self._take_lease()
        except stream.OUTAGE_ERRORS as exc:
            raise ServerUnavailable(f"cannot take the lease: {stream.reason(exc)}") from None
        if holder is not None:
            raise RateboxError(s.lease_refusal(holder))
        self.lease_due = self.clock() + LEASE_REFRESH_S
        if s.postgres.migrate_on_start:
            from ratebox import migrate

            if applied := migrate.run(self.dsn):
                log.info("applied migrations: %s", ", ".join(applied))
        self._abort_if_asked()
        self.status_path = s.status_path()
        os.makedirs(os.path.dirname(self.status_path), exist_ok=True)
        log.info(
            "supervising %d workers on %s/%s", self.worker_count, s.stream.name, s.stream.group
        )

    def loop(self) -> None:
        """One turn: wait, act on signals, reap, kill the silent, converge, keep the lease, report."""
        self.wait_for_signals(self._next_wake())
        self.handle_signals()
        if self.stop_mode is not None:
            return
        now = self.clock()
        self.reap(now)
        self.notice_up()
        self.kill_silent(now)
        self.converge(now)
        self.follow_backlog(now)
        self.keep_lease(now)
        self.report(now)

    def follow_backlog(self, now: float) -> None:
        """With workers.autoscale on: sample when due and scale as the decision says."""
        if self.redis is None or not self.lease_held:
            return
        decision = self.scaler.step(self.redis, now, self.worker_count)
        if decision is not None and decision.count != self.worker_count:
            self.scale(decision.count, decision.reason)

    def stop_children(self) -> int:
        """Stop every child, gracefully unless told otherwise; returns the exit status."""
        # The order is deliberate. systemd hears first, so it does not take the exits below
        # for a crash. Every child gets TERM at once: each worker finishes and acknowledges
        # its own batch, so stopping them one by one would only be slower. The lease and the
        # servers stay until the last child is gone (release_everything): they still use both.
        systemd.notify("STOPPING=1")
        graceful = self.stop_mode == "graceful"
        grace = self.settings.workers.shutdown_timeout_s if graceful else 0.0
        how = f"gracefully (up to {grace:g} s)" if graceful else "at once"
        log.info("stopping %d children %s", len(self.pids), how)
        for child in self.children.values():
            # One already stopping (scaled down, restarting) had its TERM: a second one
            # would make it drop its batch.
            if not graceful or child.state != "stopping":
                self._kill(child, SIGTERM if graceful else SIGKILL)
        deadline = self.clock() + grace
        while self.pids and self.clock() < deadline:
            self.wait_for_signals(0.2)
            if graceful and any(s in _STOP_SIGNALS for s in self.signals):
                log.warning("second stop signal: killing the children at once")
                graceful, deadline = False, self.clock()
            self.signals.clear()
            now = self.clock()
            self.reap(now)
            self.keep_lease(now)
            self.report(now)
        if self.pids and graceful:
            log.warning("%d children still there after %g s: SIGKILL", len(self.pids), grace)
        self.kill_all()
        log.info("stopped")
        return self.exit_status

    # -- signals ---------------------------------------------------------------------------

    def _install_signals(self) -> None:
        self.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The interpreter writes a byte here for every signal, which wakes the select below.
        signal.set_wakeup_fd(self.pipe[1], warn_on_full_buffer=False)
        for signum in HANDLED:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Record only: logging, forking or killing from here can deadlock or re-enter.
        if signum != SIGCHLD:  # SIGCHLD only has to wake the loop, which reaps anyway
            self.signals.append(signum)

    def wait_for_signals(self, timeout: float) -> None:
        """Sleep until a signal arrives or ``timeout`` passes."""
        if self.pipe is None or self.signals:
            return
        if select.select([self.pipe[0]], [], [], max(0.0, timeout))[0]:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.pipe[0], 4096):
                    pass

    def handle_signals(self) -> None:
        """Act on the queued signals, in arrival order."""
        while self.signals:
            signum = self.signals.popleft()
            log.info("received %s", topology.signame(signum))
            if signum in (SIGTERM, SIGINT):
                self.stop_mode = "graceful" if self.stop_mode is None else "immediate"
            elif signum == SIGQUIT:
                self.stop_mode = "immediate"
            elif self.stop_mode is not None:
                continue
            elif signum == SIGHUP:
                self.reload()
            elif signum == SIGTTIN:
                self.scale(self.worker_count + 1, "TTIN: one worker more")
            elif signum == SIGTTOU:
                self.scale(self.worker_count - 1, "TTOU: one worker fewer")

    def _abort_if_asked(self) -> None:
        if any(s in _STOP_SIGNALS for s in self.signals):
            raise RateboxError("interrupted while starting")

    def reload(self) -> None:
        """Re-read the file; a bad one is refused and the running topology stays."""
        if self.ready:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
        try:
            new = config.load(self.config_path)
            if fixed := [k for k in FIXED_ON_RELOAD if new.get(k) != self.settings.get(k)]:
                raise ConfigError(f"{fixed[0]}: cannot change on reload; restart the supervisor")
            engine = self.engine if new.rules == self.settings.rules else compile_rules(new.rules)
        except ConfigError as exc:
            log.error("reload refused: %s", exc)
        except Exception as exc:  # a reload must never take the running service down
            log.error("reload refused: cannot load %s: %s", self.config_path, type(exc).__name__)
        else:
            changed = ", ".join(sorted(self.settings.diff(new))) or "nothing"
            self.settings, self.engine = new, engine
            log.info("reloaded %s: changed %s", self.config_path, changed)
            self.scaler.reconfigure(new)
            if self.scaler.enabled:
                # The count follows the backlog: a reload only moves it into the new bounds.
                lo, hi = new.get("workers.autoscale.min"), config.autoscale_max(new.values)
                self.scale(min(max(self.worker_count, lo), hi), f"reload: autoscale {lo}..{hi}")
            else:
                self.scale(new.workers.count, f"reload: workers.count {new.workers.count}")
        finally:
            if self.ready:
                systemd.notify(f"READY=1\nSTATUS={self.systemd_status}")

    def scale(self, count: int, reason: str | None = None) -> None:
        """Change the number of workers; converge() does the rest."""
        count = max(1, min(MAX_WORKERS, count))
        if count != self.worker_count:
            self.worker_count = count
            self.scale_reason, self.scaled_at = reason, time.time()
            log.info("scaled to %d workers%s", count, f": {reason}" if reason else "")
        self.desired = topology.desired_children(self.settings, self.worker_count)

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
            if (name := self.pids.pop(pid, None)) is not None:
                self.on_exit(self.children[name], status, now)

    def on_exit(self, child: Child, status: int, now: float) -> None:
        """Record an exit and decide what follows: nothing, a respawn now, or one later."""
        code, _, text = topology.describe_exit(status)
        uptime = now - child.started_mono
        log.info("%s (pid %s) %s after %.1f s", child.name, child.pid, text, uptime)
        if child.heartbeat is not None:
            child.heartbeat.close()
        reason = child.stop_reason
        child.pid, child.heartbeat, child.last_exit = None, None, text
        child.stop_reason, child.kill_at = None, None
        if self.stop_mode is not None or child.name not in self.desired:
            child.state = "gone"
            if self.stop_mode is None and child.role == "worker":
                self.forget_consumer(child.name)
        elif reason is not None:
            # Stopped by us for new settings, or scaled down and wanted again since: at once.
            child.state, child.not_before = "waiting", now
        else:
            boot_failure = code == EXIT_BOOT_FAILURE
            child.failures, delay = topology.respawn_delay(child.failures, uptime, boot_failure)
            child.state = "failed" if boot_failure else "waiting"
            child.not_before = now + delay
            if boot_failure:
                log.error(
                    "%s cannot boot (its error is above); retrying in %g s", child.name, delay
                )
            else:
                log.info("restarting %s in %g s", child.name, delay)

    def forget_consumer(self, name: str) -> None:
        """Delete a scaled-down worker's consumer from the group, unless it holds entries."""
        s = self.settings
        if self.redis is None:  # never initialized (tests)
            return
        deleted, pending = True, 0
        try:
            for partition in route.stream_names(s):
                gone, held = stream_lease.delete_consumer_if_idle(
                    self.redis, partition, s.stream.group, name
                )
                deleted, pending = deleted and gone, pending + held
        except stream.OUTAGE_ERRORS as exc:
            log.warning("consumer %s left for the sweeper: %s", name, stream.reason(exc))
            return
        if deleted:
            log.info("deleted consumer %s from group %s", name, s.stream.group)
        else:
            log.info("consumer %s left for the sweeper: it holds %d entries", name, pending)

    def notice_up(self) -> None:
        """A starting child is up once it has beaten; that also ends its rolling restart."""
        for child in self.children.values():
            beat = child.heartbeat if child.state == "starting" else None
            if beat is not None and time.time() - beat.age() > child.born + 0.001:
                child.state, child.restarting = "running", False

    def kill_silent(self, now: float) -> None:
        """SIGABRT a child silent for workers.timeout_s; SIGKILL it (or one that ignores TERM)
        when its time is up."""
        timeout = self.settings.workers.timeout_s
        for child in self.children.values():
            if child.pid is None or child.heartbeat is None:
                continue
            if child.kill_at is not None:
                if now >= child.kill_at:
                    log.error("%s (pid %d) is still there: SIGKILL", child.name, child.pid)
                    self._kill(child, SIGKILL)
                    child.kill_at = math.inf
            elif (age := child.heartbeat.age()) > timeout:
                why = f"no heartbeat for {age:.0f} s (workers.timeout_s {timeout:g})"
                log.error("killed %s (pid %d) as silent: %s", child.name, child.pid, why)
                self._kill(child, SIGABRT)
                child.kill_at = now + KILL_AFTER_ABORT_S

    def converge(self, now: float) -> None:
        """Carry out the plan: spawn the missing, stop the surplus, restart the stale."""
        for action in topology.plan(self.desired, self.children, now):
            child = self.children.get(action.name)
            if action.verb == "spawn":
                self.spawn(self.desired[action.name], now)
            elif action.verb == "forget":
                del self.children[action.name]
            elif action.verb == "stop" and child is not None:
                log.info("stopping %s (pid %s): no longer wanted", child.name, child.pid)
                self._stop(child, "scale", now)
            elif action.verb == "restart" and child is not None:
                changed = ", ".join(sorted(child.settings.diff(self.desired[action.name].settings)))
                log.info("restarting %s (pid %s) for %s", child.name, child.pid, changed)
                child.restarting = True
                self._stop(child, "restart", now)

    def _stop(self, child: Child, reason: str, now: float) -> None:
        child.state, child.stop_reason = "stopping", reason
        child.kill_at = now + self.settings.workers.shutdown_timeout_s
        self._kill(child, SIGTERM)

    def _kill(self, child: Child, signum: int) -> None:
        if child.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    def kill_all(self) -> None:
        """SIGKILL every child still there and reap them (a few seconds at most)."""
        for child in self.children.values():
            self._kill(child, SIGKILL)
        deadline = time.monotonic() + 5.0
        while self.pids and time.monotonic() < deadline:
            self.reap(self.clock())
            time.sleep(0.02 if self.pids else 0)

    # -- fork ------------------------------------------------------------------------------

    def spawn(self, spec: Spec, now: float) -> None:
        """Fork a process for ``spec``; the child never returns from here."""
        child = self.children.setdefault(spec.name, Child(spec.name, spec.role, spec.settings))
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
                role_child.become(
                    child,
                    beat,
                    self.pid,
                    inherited=self.pipe or (),
                    others=[c.heartbeat for c in self.children.values() if c.heartbeat],
                    log_level=self.log_level,
                    run_role=lambda pulse: self._run_role(child, pulse),
                )
        except OSError as exc:
            beat.close()
            child.state, child.not_before = "waiting", now + FORK_RETRY_S
            log.error("cannot fork %s: %s; retrying in %g s", spec.name, exc, FORK_RETRY_S)
            return
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        child.restarts += child.started_at is not None
        child.pid, child.heartbeat, child.born, child.state = pid, beat, born, "starting"
        child.started_at, child.started_mono = time.time(), now
        self.pids[pid] = spec.name
        log.info("spawned %s (pid %d)", spec.name, pid)

    def _run_role(self, child: Child, pulse: Callable[[], None]) -> int:
        module: Any = importlib.import_module(f"ratebox.{child.role}")
        s, kw = child.settings, {"beat": pulse, "parent_pid": self.pid}
        if child.role == "worker":
            status = module.run(s, child.name, self.redis_url, self.dsn, engine=self.engine, **kw)
        elif child.role == "sweeper":
            status = module.run(s, self.redis_url, self.dsn, engine=self.engine, **kw)
        else:
            live = sys.stdout.isatty()
            status = module.run(
                s, self.redis_url, self.dsn, status_path=self.status_path, live=live, **kw
            )
        return int(status or 0)

    # -- lease, status file, systemd -------------------------------------------------------

    def _take_lease(self) -> str | None:
        """None when we hold the lease now, else who does (host:pid)."""
        other = stream_lease.take_lease(self.redis, self.lease_key, self.lease_holder, LEASE_TTL_MS)
        self.lease_held = other is None
        return None if other is None else other.rsplit(":", 1)[0]

    def keep_lease(self, now: float) -> None:
        """Refresh the lease every few seconds; stop if another supervisor took it."""
        if not self.lease_held or now < self.lease_due:
            return
        self.lease_due = now + LEASE_REFRESH_S
        key, holder = self.lease_key, None
        try:
            # When the refresh fails the lease expired (Redis lost its data, or we were
            # stopped too long): take it again, unless somebody else holds it by now.
            if not stream_lease.refresh_lease(self.redis, key, self.lease_holder, LEASE_TTL_MS):
                holder = self._take_lease()
                log.warning("the lease %s had expired; %s", key, holder or "taken again")
        except stream.OUTAGE_ERRORS as exc:
            if not self.lease_trouble:
                log.warning("cannot refresh the lease: %s", stream.reason(exc))
            self.lease_trouble = True
            return
        if self.lease_trouble:
            log.info("lease refreshed again")
            self.lease_trouble = False
        if holder is not None:
            log.error("another supervisor (%s) holds the lease %s; stopping", holder, key)
            self.exit_status = EXIT_FAILURE
            self.stop_mode = self.stop_mode or "graceful"

    def report(self, now: float) -> None:
        """Status file for the monitor; STATUS, READY and WATCHDOG for systemd."""
        children, workers = self.snapshot(), self.workers_status()
        last_at, last = self.status_written
        if self.status_path and ((children, workers) != last or now - last_at >= STATUS_EVERY_S):
            self.status_written = (now, (children, workers))
            document = {
                "supervisor_pid": self.pid,
                "started_at": self.started_at,
                "workers": workers,
                "children": children,
            }
            try:
                write_atomically(self.status_path, json.dumps(document, indent=1).encode())
            except OSError as exc:
                log.warning("cannot write %s: %s", self.status_path, exc.strerror)
        line = topology.status_line(self.desired, self.children)
        if self.scaler.enabled:
            line += f" (autoscale: {self.scale_reason or 'start'})"
        if line != self.systemd_status:
            self.systemd_status = line
            systemd.notify(f"STATUS={line}")
        up = all(n in self.children and self.children[n].state == "running" for n in self.desired)
        if up and not self.ready and self.stop_mode is None:
            self.ready = True
            log.info("all %d children up", len(self.desired))
            systemd.notify(f"READY=1\nSTATUS={line}")
        if self.watchdog_s is not None and now >= self.watchdog_due:
            self.watchdog_due = now + self.watchdog_s
            systemd.notify("WATCHDOG=1")

    def snapshot(self) -> list[dict[str, Any]]:
        """The children as the status file shows them to the monitor."""
        ordered = sorted(self.children.values(), key=lambda c: (_ROLE_ORDER[c.role], c.name))
        return [{f: getattr(c, f) for f in STATUS_FIELDS} for c in ordered]

    def workers_status(self) -> dict[str, Any]:
        """Desired and running workers, and why the count last changed (the monitor reads it)."""
        return {
            "desired": self.worker_count,
            "running": topology.workers_running(self.children),
            "autoscale": self.scaler.enabled,
            "reason": self.scale_reason,
            "changed_at": self.scaled_at,
        }

    def release_everything(self) -> None:
        """Lease, status file, the embedded servers we started, wakeup pipe: in that order."""
        if self.lease_held:
            try:
                stream_lease.release_lease(self.redis, self.lease_key, self.lease_holder)
            except stream.OUTAGE_ERRORS as exc:
                log.warning("cannot release the lease (it expires soon): %s", stream.reason(exc))
            self.lease_held = False
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
        elif "embedded" in (self.settings.redis.url, self.settings.postgres.dsn):
            # Found running (another command started them): theirs to stop, but say so.
            log.info(
                "the embedded servers of %s were running before this supervisor and stay up;"
                " stop them with: ratebox-embedded -c FILE stop",
                os.path.abspath(self.settings.embedded.dir),
            )
        if self.pipe is not None:
            signal.set_wakeup_fd(-1)
            for fd in self.pipe:
                os.close(fd)
            self.pipe = None

    def _next_wake(self) -> float:
        now, wake = self.clock(), WAKE_S
        if self.desired.keys() - self.children.keys():
            return 0.0  # first turn, or just scaled up: nothing to wait for
        for child in self.children.values():
            if child.state == "starting":
                wake = min(wake, 0.2)  # see it up soon, for READY and rolling restarts
            elif not child.alive and child.state != "gone":
                wake = min(wake, child.not_before - now)
        if self.watchdog_s is not None:
            wake = min(wake, self.watchdog_due - now)
        if self.scaler.enabled:
            wake = min(wake, self.scaler.due - now)
        return max(0.0, wake)


def write_atomically(path: str, data: bytes) -> None:
    """Write ``path`` so that a reader sees the old content or the new, never a part."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def run(settings: Settings, config_path: str, log_level: str = "INFO") -> int:
    """Entry point of ratebox-supervisor (after the configuration was loaded)."""
    return Supervisor(settings, config_path, log_level).run()
