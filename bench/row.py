"""The row every baseline writes: parse the entry's data, run ratebox.rules' engine on it.

Kept apart from bench/common.py so that the baseline processes import nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from ratebox.rules import DEFAULT_RULES, Engine, compile_rules

#: The default rules, compiled once per process.
ENGINE: Engine = compile_rules(DEFAULT_RULES)

#: The columns judge() fills, in its order (processed_at is now() on top).
COLUMNS = (
    "data, source, status, error_code, error_message, errors, stream_name, stream_id, consumer_name"
)
INSERT = (
    f"INSERT INTO raw_items ({COLUMNS}, processed_at) VALUES %s"
    " ON CONFLICT (stream_name, stream_id) DO NOTHING"
)
TEMPLATE = "(%s::jsonb, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, now())"


def judge(
    stream_name: str, consumer: str, entry_id: str, fields: dict[Any, Any]
) -> tuple[Any, ...]:
    """Parse the entry's data, run the rules, and return the raw_items values (TEMPLATE order)."""
    data = fields.get(b"data", fields.get("data"))
    try:
        item = orjson.loads(data)
    except (TypeError, ValueError):
        item = None
    if type(item) is not dict:
        message = "Malformed message: data is not valid JSON"
        errors = orjson.dumps([{"code": 900, "field": "data", "message": message}]).decode()
        return ("{}", None, "error", 900, message, errors, stream_name, entry_id, consumer)
    failures = ENGINE.check(item)
    first = failures[0] if failures else None
    return (
        data.decode() if isinstance(data, bytes) else data,
        item.get("source"),
        "error" if failures else "done",
        first.code if first else None,
        first.message if first else None,
        orjson.dumps([f.as_dict() for f in failures]).decode(),
        stream_name,
        entry_id,
        consumer,
    )
