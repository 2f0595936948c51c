"""The children table and the supervisor's decisions about it; pure, no processes touched.

``desired_children`` says what the settings ask for, ``plan`` what to do to get there
(spawn, stop, restart, forget), ``respawn_delay`` how long a dying child waits. The
supervisor carries the actions out; tests call these directly.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from ratebox.config import Settings
from ratebox.errors import EXIT_BOOT_FAILURE

if TYPE_CHECKING:
    from ratebox.heartbeat import Heartbeat

#: First respawn delay of a child that keeps dying soon after start; doubles up to the cap.
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 30.0
#: A child that ran this long was healthy: its next crash starts the backoff from scratch.
HEALTHY_AFTER_S = 60.0
#: A child that cannot boot is retried this slowly: it will not get better by spinning.
BOOT_RETRY_S = 30.0
#: Keys only the supervisor reads: changing them never restarts a child.
SUPERVISOR_ONLY = frozenset(
    {"workers.count", "workers.timeout_s", "workers.shutdown_timeout_s", "monitor.enabled"}
    | {"postgres.migrate_on_start", "embedded.dir"}
    | {
        f"workers.autoscale.{key}"
        for key in ("enabled", "min", "max", "lag_per_worker", "interval_s", "scale_down_after_s")
    }
)
#: Keys (a trailing '.' means a whole section) each role never reads.
ROLE_IGNORES: Mapping[str, tuple[str, ...]] = {
    "worker": ("sweeper.", "monitor."),
    "sweeper": ("monitor.",),
    "monitor": ("rules", "limits.", "sweeper.", "workers."),
}


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
    #: starting (no heartbeat yet) | running | stopping | waiting (to respawn)
    #: | failed (cannot boot; slow retry) | gone (stopped for good, to be forgotten)
    state: str = "waiting"
    pid: int | None = None
    heartbeat: Heartbeat | None = None
    started_at: float | None = None  # wall clock, of the current or last process
    started_mono: float = 0.0  # the same on the monotonic clock, for uptimes
    born: float = 0.0  # wall time the heartbeat file was made: a later change is a first beat
    stop_reason: str | None = None  # why we sent TERM: scale | restart
    kill_at: float | None = None  # SIGKILL then if still there (after ABRT, or a TERM)
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
    names = [settings.consumer_name(i) for i in range(1, workers + 1)]
    # Partitioned, a worker's partitions depend on how many workers there are (see
    # ratebox.route.assigned): it must know the count it runs among.
    mine = with_worker_count(settings, workers) if settings.stream.partitions > 1 else settings
    desired = {name: Spec(name, "worker", mine) for name in names}
    desired["sweeper"] = Spec("sweeper", "sweeper", settings)
    if settings.monitor.enabled:
        desired["monitor"] = Spec("monitor", "monitor", settings)
    return desired


def with_worker_count(settings: Settings, workers: int) -> Settings:
    """``settings`` with workers.count set to ``workers`` (the same object if it already is)."""
    if settings.workers.count == workers:
        return settings
    values = MappingProxyType({**settings.values, "workers.count": workers})
    return dataclasses.replace(settings, values=values)


def needs_restart(role: str, changed: Iterable[str]) -> bool:
    """True when a key the role reads is among ``changed`` (key paths, or "rules")."""
    ignored = ROLE_IGNORES[role]
    return any(
        key not in SUPERVISOR_ONLY
        and not any(key == skip or (skip[-1] == "." and key.startswith(skip)) for skip in ignored)
        for key in changed
    )


def is_stale(child: Child, spec: Spec) -> bool:
    """True when the child runs with settings that differ in something its role reads."""
    if child.settings is spec.settings:
        return False
    changed = child.settings.diff(spec.settings)
    if (
        child.role == "worker"
        and spec.settings.stream.partitions > 1
        and "workers.count" in changed
    ):
        return True  # its partitions change with the count
    return needs_restart(child.role, changed)


def plan(desired: Mapping[str, Spec], children: Mapping[str, Child], now: float) -> list[Action]:
    """Steps that bring the running children towards the desired ones; touches nothing."""
    actions: list[Action] = []
    # Surplus first, highest names first, so that the names in use stay _001 ... _00n.
    for name in sorted(children.keys() - desired.keys(), reverse=True):
        if not children[name].alive:
            actions.append(Action("forget", name))
        elif children[name].state != "stopping":
            actions.append(Action("stop", name))
    for name in desired:
        missing = children.get(name)
        if missing is None or (not missing.alive and now >= missing.not_before):
            actions.append(Action("spawn", name))
    # Restarts for new settings go one at a time, the next once the last is up: settings
    # that break the children take down one of them, not all.
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
    failures = 1 if uptime >= HEALTHY_AFTER_S else failures + 1
    return failures, min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** min(failures - 1, 16))


def describe_exit(status: int) -> tuple[int | None, int | None, str]:
    """(exit code, signal, text) of a wait status."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return None, signum, f"was killed by {signame(signum)}"
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


def workers_running(children: Mapping[str, Child]) -> int:
    """Worker processes up and working (not starting, not stopping)."""
    return sum(1 for c in children.values() if c.role == "worker" and c.state == "running")


def signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
