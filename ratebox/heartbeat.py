"""Liveness between a child and its supervisor: the ctime of an unlinked temporary file.

The supervisor makes the file before fork; the child flips its mode bits each loop turn
(cheap, no data written); the supervisor reads how long ago that happened. Unlinked at
once, so nothing is left behind whatever dies.
"""

from __future__ import annotations

import os
import tempfile
import time


class Heartbeat:
    """One child's heartbeat file."""

    def __init__(self) -> None:
        fd, path = tempfile.mkstemp(prefix="ratebox-hb-")
        os.unlink(path)
        self.fd = fd
        self._spin = False
        self._last = 0.0

    def beat(self) -> None:
        """Called by the child: mark it alive now (at most a few times a second)."""
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        self._spin = not self._spin
        os.fchmod(self.fd, 0o600 if self._spin else 0o400)

    def age(self) -> float:
        """Called by the supervisor: seconds since the child last beat."""
        return time.time() - os.fstat(self.fd).st_ctime

    def close(self) -> None:
        """Release the file (in the supervisor once the child is reaped)."""
        try:
            os.close(self.fd)
        except OSError:
            pass
