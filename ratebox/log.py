"""Logging for every process: one line per event on stderr, titled, personal data masked."""

from __future__ import annotations

import logging
import sys

from ratebox import inert
from ratebox.mask import mask_text

FORMAT = "%(asctime)s %(levelname)-7s [%(title)s] %(message)s"


class MaskingFilter(logging.Filter):
    """Masks personal data and passwords in every record, whoever logged it."""

    def __init__(self, title: str) -> None:
        super().__init__()
        self.title = title

    def filter(self, record: logging.LogRecord) -> bool:
        record.title = self.title
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        # One record, one line: a CR or LF from a message must not forge a line of its own.
        record.msg, record.args = inert.text(mask_text(message)), None
        if record.exc_text:
            record.exc_text = inert.lines(mask_text(record.exc_text))
        return True


def setup(title: str, level: str | int = "INFO") -> None:
    """(Re)configure the root logger for a process titled ``title`` (e.g. 'worker worker_001')."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(MaskingFilter(title))
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
