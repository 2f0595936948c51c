"""Turns stream entries into the rows written to raw_items; pure, shared by worker and sweeper."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from time import perf_counter
from typing import Any, NamedTuple

from ratebox import mask, message
from ratebox.rules import Engine, Failure

DONE = "done"
ERROR = "error"


class Row(NamedTuple):
    """One raw_items row, minus what the whole batch shares (stream, consumer, times).

    A named tuple, not a dataclass: one is built per message, and this is ~4x cheaper.
    """

    stream_id: str
    #: raw_items.data as JSON text.
    data: str
    source: str | None
    status: str
    error_code: int | None
    error_message: str | None
    #: Every failure; stored as raw_items.errors (orjson writes each as an object).
    errors: list[Failure]
    delivery_count: int
    batch_id: str | None
    producer: str | None
    produced_at: datetime | None
    processing_ms: float


# NamedTuple's own __new__ is a Python function; tuple.__new__ builds the same row for a
# third of the cost, and one is built per message.
_new_row = functools.partial(tuple.__new__, Row)


def _row(
    entry_id: str, decoded: message.Decoded, failures: list[Failure], deliveries: int, ms: float
) -> Row:
    first = failures[0] if failures else None
    return _new_row(
        (
            entry_id,
            decoded.text,
            decoded.source,
            ERROR if first else DONE,
            first.code if first else None,
            first.message if first else None,
            failures,
            deliveries,
            decoded.batch_id,
            decoded.producer,
            decoded.produced_at,
            ms,
        )
    )


def judge(
    entry_id: str, fields: Mapping[Any, Any], engine: Engine, max_bytes: int, deliveries: int = 1
) -> Row:
    """The verdict row for one entry: its pipeline error (900-902) or the rules' failures."""
    started = perf_counter()
    decoded = message.decode(fields, max_bytes)
    error = decoded.error
    failures = engine.check(decoded.item or {}) if error is None else [error]
    return _row(entry_id, decoded, failures, deliveries, (perf_counter() - started) * 1000)


def judge_all(
    entries: Sequence[tuple[str, Mapping[Any, Any]]],
    engine: Engine,
    max_bytes: int,
    deliveries: Mapping[str, int] | None = None,
) -> list[Row]:
    """Verdict rows for a batch; ``deliveries`` gives counts for redelivered entries (else 1)."""
    counts = deliveries or {}
    return [judge(i, f, engine, max_bytes, counts.get(i, 1)) for i, f in entries]


def rejected(row: Row, reason: str) -> Row:
    """The same entry recorded as refused by the database (903), its data kept as text.

    The row of last resort: every value the entry gave is made storable (text without NUL or
    lone surrogates, a timestamp only when already in UTC), whatever the entry held.
    """
    failure = message.pipeline_failure(
        message.DB_REJECTED, f"Rejected by the database: {mask.mask_text(_storable(reason))}"
    )
    at = row.produced_at
    return row._replace(
        data=message.dumps({"_raw": _storable(row.data[: message.RAW_KEEP_CHARS])}),
        source=_storable(row.source) if row.source else None,
        status=ERROR,
        error_code=failure.code,
        error_message=failure.message,
        errors=[failure],
        batch_id=_storable(row.batch_id) if row.batch_id else None,
        producer=_storable(row.producer) if row.producer else None,
        produced_at=at if at is not None and at.utcoffset() == _ZERO else None,
    )


def bare(row: Row, reason: str) -> Row:
    """The 903 row with nothing from the entry but its ID: for when even ``rejected`` is refused."""
    failure = message.pipeline_failure(message.DB_REJECTED, f"Rejected by the database: {reason}")
    return rejected(row, "")._replace(
        data=message.dumps({"_raw": ""}),
        source=None,
        batch_id=None,
        producer=None,
        produced_at=None,
        error_message=failure.message,
        errors=[failure],
    )


_ZERO = timedelta(0)


def _storable(text: str) -> str:
    # PostgreSQL text holds neither U+0000 nor a lone surrogate (which has no UTF-8 form).
    text = text.replace("\x00", "\ufffd")
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode()
    return text


def dead_lettered(
    entry_id: str, fields: Mapping[Any, Any], max_bytes: int, deliveries: int, reason: str
) -> Row:
    """The row of an entry given up after too many deliveries (910); the rules are not run again."""
    decoded = message.decode(fields, max_bytes)
    failure = message.pipeline_failure(
        message.DEAD_LETTERED, f"Dead-lettered after {deliveries} deliveries: {reason}"
    )
    return _row(entry_id, decoded, [failure], deliveries, 0.0)
