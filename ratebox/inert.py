"""Makes text from outside (messages, Redis, servers) inert before a terminal or a log shows it.

Control characters would let a producer drive the operator's terminal (ESC sequences set the
title, blink, open OSC 8 links; CR and LF forge log lines) and bidirectional overrides reorder
what is read. Each becomes a visible escape such as ``\\x1b`` or ``\\u202e``.
Markup is not escaped here: the dashboard never hands such text to Rich's markup parser at
all (its cells are Text objects), which is safer than any escaping of it.
"""

from __future__ import annotations

import re

# C0 controls, DEL and C1 controls; the bidirectional embeddings, overrides and isolates; the
# marks and separators that move or break lines in terminals and log viewers; the BOM.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _visible(match: re.Match[str]) -> str:
    char = match[0]
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def text(value: object, limit: int | None = None) -> str:
    """One line safe for a terminal or a log: every control character shown as an escape.

    With ``limit``, the result is cut to at most that many characters (ending in '…').
    """
    shown = value if isinstance(value, str) else str(value)
    if _UNSAFE.search(shown) is not None:
        shown = _UNSAFE.sub(_visible, shown)
    if limit is not None and len(shown) > limit:
        shown = shown[: max(limit - 1, 0)] + "…"
    return shown


def lines(value: str) -> str:
    """Multi-line text (a traceback) made inert line by line: only its own line breaks stay."""
    return "\n".join(text(line) for line in value.split("\n"))
