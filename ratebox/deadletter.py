"""The dead-letter stream's tools: list (masked), replay onto the main stream, purge."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from ratebox import inert, mask, stream, stream_dead

log = logging.getLogger(__name__)

#: Fields the pipeline adds when it dead-letters an entry (ratebox.pipeline.Pipeline.dead_letter);
#: a replay drops them, so the replayed entry carries the original fields only.
ADDED_FIELDS = (
    "original_id",
    "original_stream",
    "reason",
    "delivery_count",
    "consumer",
    "dead_lettered_at",
)
#: Characters of a masked payload shown per entry.
PREVIEW_CHARS = 200
#: Entries read per XRANGE round trip when walking the whole stream.
PAGE = 500


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered entry as shown to an operator: metadata and a masked preview."""

    id: str
    original_id: str | None
    reason: str | None
    delivery_count: int | None
    consumer: str | None
    dead_lettered_at: str | None
    preview: str

    def line(self) -> str:
        """One line for ``ratebox-dlq list``; every field shown inert (they come from Redis)."""
        return inert.text(
            f"{self.id}  original {self.original_id or '?'}  deliveries {self.delivery_count or '?'}"
            f"  at {self.dead_lettered_at or '?'}  by {self.consumer or '?'}"
            f"  reason: {self.reason or '?'}  data: {self.preview}"
        )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _fields(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k) or "": _text(v) or "" for k, v in raw.items()}


def preview(data: str | None, limit: int = PREVIEW_CHARS) -> str:
    """The payload with personal data masked, cut to ``limit`` characters."""
    if data is None:
        return "(no data field)"
    try:
        item = orjson.loads(data)
    except orjson.JSONDecodeError:
        item = None
    # Masked as an item when it is one (keys say what a value is); as free text otherwise.
    shown = (
        orjson.dumps(mask.mask_item(item)).decode()
        if isinstance(item, dict)
        else mask.mask_text(data)
    )
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _entry(entry_id: str, raw: Mapping[Any, Any]) -> DeadLetter:
    fields = _fields(raw)
    count = fields.get("delivery_count", "")
    return DeadLetter(
        id=entry_id,
        original_id=fields.get("original_id"),
        reason=mask.mask_text(fields["reason"]) if "reason" in fields else None,
        delivery_count=int(count) if count.isdigit() else None,
        consumer=fields.get("consumer"),
        dead_lettered_at=fields.get("dead_lettered_at"),
        preview=preview(fields.get("data")),
    )


def list_entries(client: redis.Redis, dead: str, count: int | None = None) -> list[DeadLetter]:
    """Dead-lettered entries, oldest first (at most ``count``), with personal data masked."""
    out: list[DeadLetter] = []
    start = "-"
    while count is None or len(out) < count:
        page = PAGE if count is None else min(PAGE, count - len(out))
        entries = stream.entries_between(client, dead, start, "+", page)
        out.extend(_entry(entry_id, fields) for entry_id, fields in entries)
        if len(entries) < page:
            break
        start = "(" + entries[-1][0]
    return out


def all_ids(client: redis.Redis, dead: str) -> list[str]:
    """The IDs of every entry in the dead-letter stream, oldest first."""
    return [entry.id for entry in list_entries(client, dead)]


@dataclass(frozen=True)
class Replayed:
    """The outcome of a replay: (dead-letter ID, new main-stream ID) pairs, and IDs not found."""

    moved: list[tuple[str, str]]
    missing: list[str]


def replay(
    client: redis.Redis, dead: str, target: str, ids: Sequence[str] | None = None
) -> Replayed:
    """Put entries (``None``: all) back onto ``target`` with their original fields, each at most once.

    Each entry is deleted from the dead-letter stream in the same atomic step that adds its
    copy, so a second replay of the same ID (concurrent or later) finds nothing to move.
    """
    moved: list[tuple[str, str]] = []
    missing: list[str] = []
    for entry_id in all_ids(client, dead) if ids is None else ids:
        new_id = stream_dead.replay_entry(client, dead, target, entry_id, ADDED_FIELDS)
        if new_id is None:
            missing.append(entry_id)
        else:
            moved.append((entry_id, new_id))
            log.info("replayed dead-lettered %s onto %s as %s", entry_id, target, new_id)
    return Replayed(moved, missing)


def purge(client: redis.Redis, dead: str, ids: Sequence[str] | None = None) -> int:
    """Drop entries (``None``: the whole dead-letter stream); returns how many were dropped."""
    dropped = (
        stream_dead.drop_stream(client, dead)
        if ids is None
        else stream_dead.delete_entries(client, dead, ids)
    )
    log.warning("purged %d dead-lettered entries from %s", dropped, dead)
    return dropped
