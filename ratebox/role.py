"""What every child process shares: stop flags, orphan check, and the loop that waits out outages.

A role (worker, sweeper, monitor) subclasses Role and provides ``loop()`` (one turn), and may
override ``between_turns()``, ``on_outage()``, ``on_group_lost()`` and ``shutdown()``.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from types import FrameType

from ratebox import privileges, stream
from ratebox.errors import EXIT_OK
from ratebox.pipeline import OUTAGE_ERRORS, Outage, sleep

log = logging.getLogger(__name__)

#: Exit status of a role stopped at once by a second signal (work in hand stays pending).
EXIT_INTERRUPTED = 130


class Role:
    """The lifecycle of one child process: ``run()`` = ``initialize()``, turns, ``shutdown()``."""

    #: Shown in the outage log lines ("worker worker_001: server unavailable ...").
    title = "role"
    #: Status of an immediate exit on a second signal; a role holding no work may say 0.
    interrupted_status = EXIT_INTERRUPTED

    def __init__(self, beat: Callable[[], None], parent_pid: int | None) -> None:
        self.beat = beat
        self.parent_pid = parent_pid
        self.stopping = False
        self.outage = Outage(self.title)

    def initialize(self) -> None:
        """Post-fork setup: TERM/INT (and HUP when run by hand) stop after the turn, QUIT at once."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        signal.signal(signal.SIGQUIT, lambda *_: os._exit(self.interrupted_status))
        # Under the supervisor, HUP means nothing here (it restarts a child whose settings
        # changed). Run by hand, HUP is the terminal going away: stop as for TERM, not linger.
        signal.signal(signal.SIGHUP, signal.SIG_IGN if self.parent_pid else self._on_stop)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            # A second signal: leave now; whatever is in hand stays pending and is redelivered.
            os._exit(self.interrupted_status)
        self.stopping = True

    def keep_going(self) -> bool:
        """False once told to stop, or once orphaned (no supervisor would watch us)."""
        return not self.stopping and (self.parent_pid is None or os.getppid() == self.parent_pid)

    def run(self) -> int:
        """Turn until stopped; outages are waited out, a lost group recreated. Exit status."""
        self.initialize()
        try:
            while self.keep_going():
                self.beat()
                try:
                    self.loop()
                    self.outage.recovered()
                except OUTAGE_ERRORS as exc:
                    self.on_outage()
                    sleep(self.outage.failed(exc), self.keep_going, self.outage_tick)
                    continue
                except Exception as exc:
                    if (missing := privileges.refused(exc)) is not None:
                        raise missing from None  # one line: waiting will not grant it
                    if not stream.is_nogroup(exc):
                        raise
                    log.warning("the group is gone (Redis lost its data?); creating it again")
                    self.on_group_lost()
                self.between_turns()
        finally:
            self.shutdown()
        return EXIT_OK

    def loop(self) -> object:
        """One turn of work."""
        raise NotImplementedError

    def between_turns(self) -> None:
        """Called after each turn (a sweeper or monitor waits its interval here)."""

    def on_outage(self) -> None:
        """Called when a server went away, before waiting (drop connections here)."""

    def outage_tick(self) -> None:
        """Called every fraction of a second while an outage is waited out."""
        self.beat()

    def on_group_lost(self) -> None:
        """Called when the consumer group vanished; it is created again on the next turn."""

    def shutdown(self) -> None:
        """Release what the role holds."""
