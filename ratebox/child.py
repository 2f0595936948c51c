"""A forked child's side: undo what it inherited from the supervisor, run its role, exit.

It leaves by os._exit only: a child never returns into the supervisor's loop.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from collections.abc import Callable, Iterable
from signal import SIGHUP, SIGTERM, SIGTTIN, SIGTTOU
from typing import NoReturn

from ratebox import heartbeat
from ratebox import log as ratebox_log
from ratebox.errors import EXIT_BOOT_FAILURE, EXIT_FAILURE, EXIT_OK, RateboxError
from ratebox.topology import Child

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
#: The signals the supervisor handles (and blocks around fork); a child takes them back.
HANDLED = (SIGHUP, SIGTTIN, SIGTTOU, SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD)


class Pulse:
    """The child's heartbeat callable; remembers whether the role got as far as beating."""

    def __init__(self, beat: heartbeat.Heartbeat) -> None:
        self.beat, self.seen = beat, False

    def __call__(self) -> None:
        self.seen = True
        self.beat.beat()


def become(
    child: Child,
    beat: heartbeat.Heartbeat,
    supervisor_pid: int,
    inherited: Iterable[int],
    others: Iterable[heartbeat.Heartbeat],
    log_level: str,
    run_role: Callable[[Pulse], int],
) -> NoReturn:
    """Set up the forked process, run its role, and exit with the role's status."""
    status, pulse = EXIT_BOOT_FAILURE, Pulse(beat)
    try:
        _setup(child, beat, supervisor_pid, inherited, others, log_level)
        status = run_role(pulse)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException as exc:
        # Before the first heartbeat the role never got going: a boot failure, which the
        # supervisor retries slowly. After it, an ordinary crash.
        what = "crashed" if pulse.seen else "cannot boot"
        if isinstance(exc, RateboxError):
            log.error("%s %s: %s", child.name, what, exc)
        else:
            log.exception("%s %s", child.name, what)
        status = EXIT_FAILURE if pulse.seen else EXIT_BOOT_FAILURE
    finally:
        logging.shutdown()
        os._exit(status)


def _setup(
    child: Child,
    beat: heartbeat.Heartbeat,
    supervisor_pid: int,
    inherited: Iterable[int],
    others: Iterable[heartbeat.Heartbeat],
    log_level: str,
) -> None:
    signal.set_wakeup_fd(-1)
    for signum in HANDLED:
        signal.signal(signum, signal.SIG_DFL)
    # Reload and rescale are the supervisor's business; TTIN/TTOU would stop us by default.
    for signum in (SIGHUP, SIGTTIN, SIGTTOU):
        signal.signal(signum, signal.SIG_IGN)
    # Out of the terminal's process group: ^C reaches the supervisor alone, which then
    # stops each worker once, gracefully, instead of each getting INT and then TERM.
    os.setpgid(0, 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
    _die_with_parent()
    if os.getppid() != supervisor_pid:  # the parent died before prctl took effect
        os._exit(EXIT_OK)
    for fd in inherited:
        os.close(fd)
    for other in others:
        if other is not beat:
            other.close()
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(key, None)  # only the supervisor talks to systemd
    title = f"worker {child.name}" if child.role == "worker" else child.role
    proctitle(title)
    ratebox_log.setup(title, log_level)


def _die_with_parent() -> None:
    # A second guard besides the workers' getppid() check: the kernel sends SIGTERM when the
    # supervisor dies, even to a child stuck in a long call that never checks.
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the getppid() check remains
        pass


def proctitle(title: str) -> None:
    """Show ``ratebox: title`` in ps and top."""
    try:
        import setproctitle

        setproctitle.setproctitle(f"ratebox: {title}")
    except ImportError:  # pragma: no cover - a dependency; titles help operators, nothing more
        pass
