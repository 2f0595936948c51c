"""Entries that name a row of the legacy raw_items table (field ``legacy_id``); pure.

The bridge publishes each pending legacy row as such an entry; the worker writes the
verdict onto that row instead of adding one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ratebox import message
from ratebox.verdict import ERROR, Row

#: The entry names a legacy row that does not exist (or an id no row can have).
NO_ROW = 904
#: Characters of a bad legacy_id kept in the 904 message.
SHOWN_CHARS = 40
#: The range of a PostgreSQL bigint: anything outside names no row.
_BIGINT = (-(2**63), 2**63 - 1)

#: (the row id, or None when the text is not an integer; the text as sent)
Target = tuple[int | None, str]


def as_id(text: str) -> int | None:
    """The row id a legacy_id names, or None when it is not a bigint in decimal digits."""
    digits = text.strip()
    body = digits[1:] if digits[:1] == "-" else digits
    if not body or not body.isascii() or not body.isdigit() or len(body) > 19:
        return None
    value = int(digits)
    return value if _BIGINT[0] <= value <= _BIGINT[1] else None


def targets(entries: Sequence[tuple[str, Mapping[Any, Any]]]) -> dict[str, Target]:
    """Stream ID -> target row of each entry that has a ``legacy_id`` field (usually none)."""
    found: dict[str, Target] = {}
    for entry_id, fields in entries:
        raw = fields.get(b"legacy_id")
        if raw is None:
            raw = fields.get("legacy_id")
            if raw is None:
                continue
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        found[entry_id] = (as_id(text), text)
    return found


def no_row(row: Row, text: str) -> Row:
    """The row of its own that an entry naming no legacy row gets (904), its data kept."""
    shown = message.sanitize(text.strip()[:SHOWN_CHARS])
    failure = message.pipeline_failure(NO_ROW, f"Legacy row not found: legacy_id {shown!r}")
    return row._replace(
        status=ERROR, error_code=NO_ROW, error_message=failure.message, errors=[failure]
    )
