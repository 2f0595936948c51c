"""The supervisor's Redis steps: its lease on the consumer names, and forgetting a consumer.

A supervisor holds one key per (stream, group, name prefix) while its children use those
consumer names. The value names the holder (host:pid:random) so that only the holder can
refresh or release it, and a dead holder's key simply expires.
"""

from __future__ import annotations

import redis

from ratebox.stream import is_nogroup

# Refresh only a lease we still hold: after an expiry another supervisor may own the key.
_LEASE_REFRESH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Check and delete in one step, so an entry delivered between the two cannot be orphaned.
_DELETE_IDLE_CONSUMER = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1000, ARGV[2])
if #pending > 0 then
  return {0, #pending}
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return {1, 0}
"""


def take_lease(client: redis.Redis, key: str, holder: str, ttl_ms: int) -> str | None:
    """SET NX PX: None when taken (or already ours), else the current holder's value."""
    if client.set(key, holder, nx=True, px=ttl_ms):
        return None
    current = client.get(key)
    if current is None:  # expired between the two commands: try once more
        return None if client.set(key, holder, nx=True, px=ttl_ms) else _id(client.get(key) or b"?")
    current_text = _id(current)
    if current_text == holder:
        client.pexpire(key, ttl_ms)
        return None
    return current_text


def lease_holder(client: redis.Redis, key: str) -> str | None:
    """Who holds the lease (host:pid:random), or None."""
    value = client.get(key)
    return None if value is None else _id(value)


def refresh_lease(client: redis.Redis, key: str, holder: str, ttl_ms: int) -> bool:
    """Extend the lease if we still hold it; False when it expired or belongs to another."""
    return bool(client.eval(_LEASE_REFRESH, 1, key, holder, ttl_ms))


def release_lease(client: redis.Redis, key: str, holder: str) -> bool:
    """Delete the lease if we still hold it."""
    return bool(client.eval(_LEASE_RELEASE, 1, key, holder))


def delete_consumer_if_idle(
    client: redis.Redis, stream: str, group: str, consumer: str
) -> tuple[bool, int]:
    """XGROUP DELCONSUMER only when the consumer holds nothing: (deleted, pending held)."""
    try:
        deleted, pending = client.eval(_DELETE_IDLE_CONSUMER, 1, stream, group, consumer)
    except redis.ResponseError as exc:
        if is_nogroup(exc):
            return False, 0
        raise
    return bool(deleted), int(pending)


def _id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
