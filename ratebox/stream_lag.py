"""A group's lag: read from Redis when it says, else counted, never guessed.

Redis 7 and Valkey report a group's ``lag`` in XINFO GROUPS; Redis 6.2 does not, and Redis 7
answers a nil lag after deletions. Then the entries after the group's last-delivered ID are
counted inside Redis in chunks (one short script call each, so the server never stalls). A
``LagCounter`` that lives across samples (monitor, supervisor) keeps its last count and only
counts what was added and delivered since, so a steady sample costs a few calls whatever the
backlog. A backlog too long to count in one sample is reported as unknown (None), never as a
confident wrong number.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

#: Entries counted per script call: a few milliseconds of Redis time.
CHUNK = 10_000
#: Calls one sample may spend counting: beyond CHUNK * MAX_CHUNKS entries the lag is unknown.
MAX_CHUNKS = 100
#: A kept count is made again from scratch this often, so deletions cannot skew it for long.
RECOUNT_S = 60.0

READ, COUNTED, UNKNOWN = "read", "counted", "unknown"

# Counts entries in [start, end] (at most ARGV[3]) without sending them; returns the count and
# the last ID counted, where the next chunk starts (exclusively).
_COUNT_RANGE = """
local r = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
if #r == 0 then return {0, ''} end
return {#r, r[#r][1]}
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)


def count_between(client: redis.Redis, stream: str, after: str, upto: str) -> int | None:
    """Entries with after < ID <= upto, counted in Redis; None when more than MAX_CHUNKS allow."""
    total, start = 0, "(" + after
    for _ in range(MAX_CHUNKS):
        n, last = client.eval(_COUNT_RANGE, 1, stream, start, upto, CHUNK)
        total += int(n)
        if int(n) < CHUNK:
            return total
        start = "(" + _text(last)
    return None


@dataclass
class _Kept:
    delivered: str
    last: str
    lag: int
    at: float


class LagCounter:
    """Keeps each (stream, group)'s last count so the next sample counts only the change."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self.kept: dict[tuple[str, str], _Kept] = {}

    def lag(
        self, client: redis.Redis, stream: str, group: str, delivered: str, last: str
    ) -> int | None:
        """Entries after ``delivered`` up to ``last``; None when too many to count now."""
        key, now = (stream, group), self.clock()
        was = self.kept.get(key)
        lag: int | None = None
        fresh = was is not None and now - was.at < RECOUNT_S
        if (
            was is not None
            and fresh
            and _key(delivered) >= _key(was.delivered)
            and _key(last) >= _key(was.last)
        ):
            # Added since minus delivered since: an entry that came and went counts in both.
            added = (
                count_between(client, stream, was.last, last) if _key(last) > _key(was.last) else 0
            )
            gone = (
                count_between(client, stream, was.delivered, delivered)
                if _key(delivered) > _key(was.delivered)
                else 0
            )
            if added is not None and gone is not None:
                lag = max(was.lag + added - gone, 0)
                self.kept[key] = _Kept(delivered, last, lag, was.at)
                return lag
        lag = count_between(client, stream, delivered, last)
        if lag is None:
            self.kept.pop(key, None)
        else:
            self.kept[key] = _Kept(delivered, last, lag, now)
        return lag


def group_lag(
    client: redis.Redis,
    stream: str,
    group: Mapping[str, Any],
    info: Mapping[str, Any],
    counter: LagCounter | None = None,
) -> tuple[int | None, str]:
    """Entries never delivered to the group, and how the figure was had: read, counted, unknown."""
    lag = group.get("lag")
    if lag is not None:
        return int(lag), READ
    size = int(info.get("length", 0))
    first, last = info.get("first-entry"), info.get("last-entry")
    if not size or not first or not last:
        return 0, COUNTED
    delivered = _text(group.get("last-delivered-id", b"0-0"))
    first_id, last_id = _text(first[0]), _text(last[0])
    if _key(last_id) <= _key(delivered):
        return 0, COUNTED
    if _key(first_id) > _key(delivered):
        return size, COUNTED
    name = _text(group.get("name", b""))
    if counter is not None:
        counted = counter.lag(client, stream, name, delivered, last_id)
    else:
        counted = count_between(client, stream, delivered, last_id)
    return (counted, COUNTED) if counted is not None else (None, UNKNOWN)


def group_backlog(
    client: redis.Redis, stream: str, group: str, counter: LagCounter | None = None
) -> tuple[int | None, int]:
    """(entries not yet delivered to the group, entries pending) of one stream: one XINFO
    GROUPS call, plus XINFO STREAM and a count only when Redis gives no lag."""
    try:
        found = client.xinfo_groups(stream)
    except redis.ResponseError:
        return 0, 0  # no stream yet: nothing waits
    for g in found:
        if _text(g.get("name", b"")) == group:
            if g.get("lag") is not None:
                return int(g["lag"]), int(g.get("pending", 0))
            try:
                info = client.xinfo_stream(stream)
            except redis.ResponseError:
                return 0, int(g.get("pending", 0))
            lag, _ = group_lag(client, stream, g, info, counter)
            return lag, int(g.get("pending", 0))
    return None, 0  # no group yet: the stream's length is not ours to judge
