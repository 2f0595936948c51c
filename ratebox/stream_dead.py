"""Redis steps of the dead-letter stream: move an entry there, replay it back, drop entries.

Each move is atomic for any entry Redis accepts. A Lua script is the fast path, but Lua
passes a command at most ~8,000 arguments, so an entry of thousands of fields takes the
other path: a short lock key, then XADD and XACK (or XDEL) in one MULTI/EXEC, which Redis
applies whole or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import redis

from ratebox import stream_cluster

#: Arguments a Lua script may pass to one redis.call (Lua's C stack holds 8,000, less the
#: command, its keys and a margin).
LUA_ARGS = 7_900

#: How long a lock on one entry's move lives if its holder dies holding it.
LOCK_MS = 60_000

# XACK and XADD in one atomic step, and the copy only when this call removed the entry from
# the pending list: two processes dead-lettering the same entry leave exactly one copy.
_MOVE = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 1 then
  redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
end
return acked
"""

# Deleting the dead-letter entry and adding its copy in one step: a replay happens at most
# once even when two operators replay the same entry at the same time. An entry too big for
# one Lua call is answered 'big' before anything is written.
_REPLAY = """
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return false end
local drop = {}
for i = 3, #ARGV do drop[ARGV[i]] = true end
local fields = {}
local stored = found[1][2]
for i = 1, #stored, 2 do
  if not drop[stored[i]] then
    fields[#fields + 1] = stored[i]
    fields[#fields + 1] = stored[i + 1]
  end
end
if #fields == 0 then return false end
if #fields > tonumber(ARGV[2]) then return 'big' end
redis.call('XDEL', KEYS[1], ARGV[1])
return redis.call('XADD', KEYS[2], '*', unpack(fields))
"""

# Counts and drops the whole stream in one step, so the count is what was dropped.
_PURGE = """
local n = redis.call('XLEN', KEYS[1])
redis.call('DEL', KEYS[1])
return n
"""


def lock_key(dead: str, entry_id: str) -> str:
    """The key that serializes moves of one entry (same hash slot as ``dead``)."""
    return f"{dead}:lock:{entry_id}"


def move_to_dead_letter(
    client: redis.Redis,
    stream: str,
    group: str,
    target: str,
    entry_id: str,
    fields: Mapping[Any, Any],
    extra: Mapping[str, str],
) -> bool:
    """Ack an entry and copy it (fields plus ``extra``) to ``target``, atomically and at most once."""
    flat: list[Any] = []
    for key, value in {**dict(fields), **{k.encode(): v for k, v in extra.items()}}.items():
        flat.extend((key, value))
    if len(flat) <= LUA_ARGS:
        return bool(client.eval(_MOVE, 2, stream, target, group, entry_id, *flat))
    node = stream_cluster.node_for(client, stream)
    lock = lock_key(target, entry_id)
    if not node.set(lock, "moving", nx=True, px=LOCK_MS):
        return False  # another process is moving it now
    try:
        still = node.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
        if not still:
            return False  # someone else moved or acknowledged it
        with node.pipeline(transaction=True) as tx:
            tx.execute_command("XADD", target, "*", *flat)
            tx.xack(stream, group, entry_id)
            tx.execute()
        return True
    finally:
        node.delete(lock)


def replay_entry(
    client: redis.Redis, dead: str, target: str, entry_id: str, drop: Sequence[str]
) -> str | None:
    """Move a dead-letter entry back onto ``target`` minus ``drop`` fields; its new ID or None."""
    new_id = client.eval(_REPLAY, 2, dead, target, entry_id, LUA_ARGS, *drop)
    if new_id in (b"big", "big"):
        return _replay_big(stream_cluster.node_for(client, dead), dead, target, entry_id, drop)
    return _id(new_id) if new_id else None


def _replay_big(
    node: redis.Redis, dead: str, target: str, entry_id: str, drop: Sequence[str]
) -> str | None:
    lock = lock_key(dead, entry_id)
    if not node.set(lock, "replaying", nx=True, px=LOCK_MS):
        return None
    try:
        found: Any = node.xrange(dead, entry_id, entry_id, count=1)
        if not found:
            return None
        dropped = {name.encode() for name in drop}
        flat = [x for k, v in found[0][1].items() if k not in dropped for x in (k, v)]
        with node.pipeline(transaction=True) as tx:
            tx.execute_command("XADD", target, "*", *flat)
            tx.xdel(dead, entry_id)
            new_id, _ = tx.execute()
        return _id(new_id)
    finally:
        node.delete(lock)


def delete_entries(client: redis.Redis, stream: str, ids: Sequence[str]) -> int:
    """XDEL the given IDs; returns how many existed."""
    return int(client.xdel(stream, *ids)) if ids else 0


def drop_stream(client: redis.Redis, stream: str) -> int:
    """Delete the whole stream; returns how many entries it held."""
    return int(client.eval(_PURGE, 1, stream))


def _id(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
