"""Speaks Redis for the workers, sweeper and monitor: connect, read as a consumer, ack, claim,
trim, inspect.

Its siblings: the dead-letter stream's steps in stream_dead, lag in stream_lag, cluster
routing in stream_cluster, the supervisor's lease in stream_lease."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import chain, groupby, islice
from operator import itemgetter
from typing import Any

import hiredis
import redis

from ratebox import stream_cluster
from ratebox.errors import ServerUnavailable
from ratebox.mask import mask_url
from ratebox.stream_lag import LagCounter, group_lag  # noqa: F401  (callers use stream.*)

#: A stream entry as read: its ID and its fields (empty when the entry was trimmed or deleted).
Entry = tuple[str, dict[bytes, bytes]]

#: Errors that mean "the server is not there right now", as opposed to a bad command.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
    ConnectionError,
    OSError,
    *stream_cluster.CLUSTER_OUTAGE_ERRORS,
)


def connect(url: str, block_ms: int = 0, check: bool = True, cluster: bool = False) -> redis.Redis:
    """A client for ``url`` (bytes replies); ``check`` pings once and raises ServerUnavailable.

    With ``cluster``, a RedisCluster discovered from the node ``url`` names.
    """
    make: Any = stream_cluster.connect_cluster if cluster else redis.Redis.from_url
    options: dict[str, Any] = dict(
        decode_responses=False,
        socket_connect_timeout=5,
        # A blocked XREADGROUP must not look like a dead socket.
        socket_timeout=block_ms / 1000 + 10,
        # TCP only: redis-py's unix socket connection refuses the keyword.
        **({} if url.startswith("unix://") else {"socket_keepalive": True}),
        health_check_interval=30,
    )
    if check:
        try:
            client = make(url, **options)  # a cluster client reads the slot map right here
            client.ping()
        except OUTAGE_ERRORS as exc:
            raise ServerUnavailable(
                f"cannot reach Redis at {mask_url(url)}: {reason(exc)}"
            ) from None
    else:
        client = make(url, **options)
    # XREADGROUP replies are parsed once, by _entries(), rather than first into redis-py's
    # tuples and dicts and then again: about 1 µs less client CPU per entry read.
    client.set_response_callback("XREADGROUP", _raw_reply)
    stream_cluster.on_every_node(
        client, lambda node: node.set_response_callback("XREADGROUP", _raw_reply)
    )
    return client


def reason(exc: BaseException) -> str:
    """A short, one-line reason for a Redis error."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def ensure_group(client: redis.Redis, stream: str, group: str) -> bool:
    """Create the stream and group when missing (from the stream's start); never reset one."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
        return True
    except redis.ResponseError as exc:
        if "BUSYGROUP" in str(exc):
            return False
        raise


def join_group(client: redis.Redis, stream: str, group: str, consumer: str) -> None:
    """Register this consumer in the group now: reading no entry registers none on Redis 7.0,
    and a worker must show in XINFO CONSUMERS from its start, busy or not."""
    client.xgroup_createconsumer(stream, group, consumer)


def is_nogroup(exc: BaseException) -> bool:
    """True when the group (or its stream) is gone, e.g. after a Redis restart without data."""
    return isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc)


def _raw_reply(response: Any, **options: Any) -> Any:
    return response


def _entries(reply: Any) -> list[Entry]:
    """XREADGROUP's reply as [(id, fields)]: raw (clients from connect()) or redis-py's shape."""
    out: list[Entry] = []
    if not reply:
        return out
    # RESP3 map {stream: entries} or RESP2 list of [stream, entries].
    streams = reply.values() if isinstance(reply, dict) else [item[1] for item in reply]
    for entries in streams:
        if entries and type(entries[0][0]) is tuple:  # redis-py's RESP3 shape: [[(id, f), ...]]
            entries = entries[0]
        for entry_id, fields in entries:
            key = entry_id.decode() if type(entry_id) is bytes else entry_id
            if type(fields) is list:  # raw: field, value, field, value, ...
                pairs = iter(fields)
                fields = dict(zip(pairs, pairs, strict=False))  # one iterator: pairs
            # No fields: a pending entry whose payload was trimmed or deleted.
            out.append((key, fields or {}))
    return out


def read(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    count: int,
    start: str = ">",
    block_ms: int | None = None,
) -> list[Entry]:
    """XREADGROUP: new entries (``>``) or this consumer's own pending entries after ``start``."""
    # Straight to the slot's master: the cluster client would first ask a node for the
    # command's keys (COMMAND GETKEYS), one more round trip per read. A MOVED is an outage.
    client = stream_cluster.node_for(client, stream)
    reply = client.xreadgroup(group, consumer, {stream: start}, count=count, block=block_ms)
    return _entries(reply)


# Lua: an entry's fields, or what stands for them (message.TOO_LARGE_FIELD) when larger
# than max.
_SHRINK = """
local function shrink(f, max, keep)
  local size = 0
  for j = 1, #f do size = size + #f[j] end
  if size <= max then return f end
  local kept = {'ratebox:too-large', tostring(size)}
  for j = 1, #f - 1, 2 do
    local k = f[j]
    if k == 'data' then
      kept[#kept + 1] = k
      kept[#kept + 1] = string.sub(f[j + 1], 1, keep)
    elseif (k == 'source' or k == 'producer' or k == 'batch_id' or k == 'timestamp')
        and #f[j + 1] <= 256 then
      kept[#kept + 1] = k
      kept[#kept + 1] = f[j + 1]
    end
  end
  return kept
end
"""

# New entries for this consumer, without blocking, each shrunk: a batch takes at most
# count x max bytes of the worker's memory, whatever producers send.
_READ_NEW = (
    _SHRINK
    + """
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                         'STREAMS', KEYS[1], '>')
if not reply then return {} end
local entries = reply[1][2]
local max, keep = tonumber(ARGV[4]), tonumber(ARGV[5])
for _, e in ipairs(entries) do e[2] = shrink(e[2], max, keep) end
return entries
"""
)

# This consumer's pending entries after an ID with their delivery counts, read without
# counting a delivery: XREADGROUP from an ID would count one for every entry of the page, and
# a page re-read after each crash would walk innocent entries to the dead-letter stream.
_OWN_PENDING = (
    _SHRINK
    + """
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], '+', ARGV[4], ARGV[2])
local max, keep = tonumber(ARGV[5]), tonumber(ARGV[6])
local out = {}
for i, row in ipairs(rows) do
  local found = redis.call('XRANGE', KEYS[1], row[1], row[1])
  out[i] = {row[1], row[4], found[1] and shrink(found[1][2], max, keep) or {}}
end
return out
"""
)


#: SHA1 of each script sent on every batch, so the batch sends the digest, not the text.
_SHAS = {script: hashlib.sha1(script.encode()).hexdigest() for script in (_READ_NEW, _OWN_PENDING)}


def _run(client: redis.Redis, script: str, numkeys: int, *args: Any) -> Any:
    """EVALSHA, and EVAL once where the server does not have the script yet."""
    try:
        return client.evalsha(_SHAS[script], numkeys, *args)
    except redis.exceptions.NoScriptError:
        return client.eval(script, numkeys, *args)


def read_new(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    count: int,
    max_bytes: int,
    keep_bytes: int,
) -> list[Entry]:
    """Up to ``count`` new entries, without blocking; one larger than ``max_bytes`` comes as
    message.TOO_LARGE_FIELD (its size), its metadata and the first ``keep_bytes`` of its data."""
    reply: Any = _run(
        client, _READ_NEW, 1, stream, group, consumer, int(count), max_bytes, keep_bytes
    )
    return [(_id(entry_id), _pairs(flat)) for entry_id, flat in reply or []]


def _pairs(flat: Sequence[Any]) -> dict[bytes, bytes]:
    pairs = iter(flat)
    return dict(zip(pairs, pairs, strict=False))  # one iterator: pairs


def own_pending(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    after: str,
    count: int,
    max_bytes: int,
    keep_bytes: int,
) -> list[tuple[Entry, int]]:
    """This consumer's pending entries after ``after`` ("0": from the start), each with its
    delivery count, shrunk as by read_new; a trimmed or deleted entry comes with no fields.
    Counts no delivery."""
    start = "-" if after == "0" else f"({after}"
    reply: Any = _run(
        client, _OWN_PENDING, 1, stream, group, consumer, start, int(count), max_bytes, keep_bytes
    )
    return [((_id(i), _pairs(flat)), int(delivered)) for i, delivered, flat in reply or []]


def count_delivery(
    client: redis.Redis, stream: str, group: str, consumer: str, entry_id: str
) -> bool:
    """Count one more delivery of an entry this consumer holds (it is about to be tried
    alone); False when the entry is no longer in the stream."""
    reply: Any = client.xclaim(stream, group, consumer, 0, [entry_id])
    return bool(reply and reply[0] and reply[0][0] is not None and reply[0][1])


def pending_idle(
    client: redis.Redis, stream: str, group: str, min_idle_ms: int, count: int, start: str = "-"
) -> list[dict[str, Any]]:
    """Pending entries idle at least ``min_idle_ms``: id, consumer, idle ms, times delivered."""
    rows = client.xpending_range(stream, group, min=start, max="+", count=count, idle=min_idle_ms)
    return [
        {
            "id": _id(r["message_id"]),
            "consumer": _id(r["consumer"]),
            "idle_ms": int(r["time_since_delivered"]),
            "deliveries": int(r["times_delivered"]),
        }
        for r in rows
    ]


def _id(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def ack(client: redis.Redis, stream: str, group: str, ids: Sequence[str]) -> int:
    """XACK the given IDs in one round trip."""
    return int(client.xack(stream, group, *ids)) if ids else 0


def claim(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    min_idle_ms: int,
    ids: Sequence[str],
) -> list[Entry]:
    """XCLAIM entries still idle for ``min_idle_ms`` to ``consumer`` (counts a delivery)."""
    if not ids:
        return []
    reply: Any = client.xclaim(stream, group, consumer, min_idle_ms, list(ids))
    return [(_id(entry_id), fields or {}) for entry_id, fields in reply]


def touch(client: redis.Redis, stream: str, group: str, consumer: str, ids: Sequence[str]) -> None:
    """Reset the idle time of entries this consumer holds, without counting a delivery."""
    if ids:
        client.xclaim(stream, group, consumer, 0, list(ids), justid=True)


# Many XADDs in one call, all of the same fields. ARGV: whether to return the IDs (1) or just
# how many (0), the entry count, the number of fields each entry has its own value for and their
# names, the number of arguments of the fields every entry shares and those name/value pairs,
# then the own values entry after entry. One command of a few thousand arguments costs the
# client far less than 1,000 pipelined commands, and one reused argument table costs Redis far
# less than a new table per entry.
_ADD_MANY = """
local want_ids, count, own = ARGV[1] == '1', tonumber(ARGV[2]), tonumber(ARGV[3])
local shared = tonumber(ARGV[4 + own])
local fields = {}
for j = 1, own do fields[2 * j - 1] = ARGV[3 + j] end
for j = 1, shared do fields[2 * own + j] = ARGV[4 + own + j] end
local ids, v, key = {}, 5 + own + shared, KEYS[1]
for e = 1, count do
  for j = 1, own do
    fields[2 * j] = ARGV[v]
    v = v + 1
  end
  local id = redis.call('XADD', key, '*', unpack(fields))
  if want_ids then ids[e] = id end
end
if want_ids then return ids end
return count
"""

#: Script calls kept in flight: Redis adds one chunk while this process builds the next, and a
#: slower chunk on either side does not stall the other.
_IN_FLIGHT = 2


def publish(
    client: redis.Redis, stream: str, messages: Iterable[Mapping[str, Any]], chunk: int = 1000
) -> list[str]:
    """XADD many entries, ``chunk`` per script call; returns their IDs."""
    ids: list[str] = []
    for reply in _add_many(client, stream, _columns_of(messages, chunk), want_ids=True):
        ids += _ids(reply)
    return ids


def publish_columns(
    client: redis.Redis, stream: str, batches: Iterable[Mapping[str, Sequence[Any]]]
) -> int:
    """XADD each batch (field -> its value for each entry) in one script call; returns how many.

    For a producer that has its entries as columns already and does not need their IDs.
    """
    return sum(_add_many(client, stream, batches, want_ids=False))


def _add_many(
    client: redis.Redis,
    stream: str,
    batches: Iterable[Mapping[str, Sequence[Any]]],
    want_ids: bool,
) -> Iterator[Any]:
    """The reply of each _ADD_MANY call, _IN_FLIGHT calls pipelined on one connection."""
    cluster = client
    client = stream_cluster.node_for(cluster, stream)  # the calls go to the slot's master
    sha = client.script_load(_ADD_MANY)
    conn = client.connection_pool.get_connection()
    in_flight = 0
    try:
        for columns in batches:
            args = ("EVALSHA", sha, 1, stream, int(want_ids), *_add_many_args(columns))
            try:
                # hiredis directly: redis-py's packer looks at each of the thousands of arguments
                command = hiredis.pack_command(args)
            except TypeError as exc:
                raise redis.DataError(str(exc)) from None
            conn.send_packed_command([command])
            if in_flight == _IN_FLIGHT:
                yield conn.read_response()
            else:
                in_flight += 1
        for _ in range(in_flight):
            yield conn.read_response()
    except BaseException as exc:
        conn.disconnect()  # replies may still be on the way: this socket is unusable
        if isinstance(exc, OUTAGE_ERRORS):
            stream_cluster.forget_slots(cluster)  # the slot may have moved: ask again
        raise
    finally:
        client.connection_pool.release(conn)


def _columns_of(
    messages: Iterable[Mapping[str, Any]], chunk: int
) -> Iterable[dict[str, list[Any]]]:
    """Up to ``chunk`` consecutive entries of the same fields at a time, as columns."""
    rest = iter(messages)
    while batch := list(islice(rest, chunk)):
        if not all(batch):
            raise redis.DataError("XADD fields must be a non-empty dict")
        columns = _columns(batch)
        if columns is not None:
            yield columns
            continue
        # The fields change within the batch: one call per run of entries with the same ones.
        for _, run in groupby(batch, key=lambda fields: set(fields)):
            entries = list(run)
            yield {key: [fields[key] for fields in entries] for key in entries[0]}


def _columns(batch: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]] | None:
    """Each field's values, or None when the entries of ``batch`` do not have the same fields."""
    if len(set(map(len, batch))) > 1:
        return None
    try:
        return {key: list(map(itemgetter(key), batch)) for key in batch[0]}
    except KeyError:
        return None


def _add_many_args(columns: Mapping[str, Sequence[Any]]) -> list[Any]:
    lengths = {len(values) for values in columns.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"a batch needs fields with one value per entry, got lengths {lengths}")
    # Fields with one value across the call (producer, batch_id, timestamp) are sent once.
    own = {key: values for key, values in columns.items() if values.count(values[0]) < len(values)}
    shared = [(key, values[0]) for key, values in columns.items() if key not in own]
    args: list[Any] = [lengths.pop(), len(own), *own, 2 * len(shared), *chain.from_iterable(shared)]
    args += chain.from_iterable(zip(*own.values(), strict=True))
    return args


def _ids(reply: list[Any]) -> list[str]:
    return list(map(bytes.decode, reply)) if reply and isinstance(reply[0], bytes) else reply


def uptime_s(client: redis.Redis, stream: str) -> int | None:
    """Seconds since the server holding ``stream`` started (None if it does not say)."""
    try:
        info: Any = stream_cluster.node_for(client, stream).info("server")
    except redis.ResponseError:  # INFO refused (an ACL without it): the idle stays unqualified
        return None
    value = info.get("uptime_in_seconds") if isinstance(info, dict) else None
    return int(value) if value is not None else None


def stream_info(client: redis.Redis, stream: str) -> dict[str, Any] | None:
    """XINFO STREAM, or None when the stream does not exist."""
    try:
        return client.xinfo_stream(stream)
    except redis.ResponseError:
        return None


def groups(client: redis.Redis, stream: str) -> list[dict[str, Any]]:
    """XINFO GROUPS (empty when the stream does not exist)."""
    try:
        return client.xinfo_groups(stream)
    except redis.ResponseError:
        return []


def consumers(client: redis.Redis, stream: str, group: str) -> list[dict[str, Any]]:
    """XINFO CONSUMERS (empty when the stream or group does not exist)."""
    try:
        return client.xinfo_consumers(stream, group)
    except redis.ResponseError:
        return []


# -- monitor ----------------------------------------------------------------------------------
# Read-only figures for ratebox.monitor; a group's lag is ratebox.stream_lag's.


def memory_usage(client: redis.Redis, stream: str) -> int | None:
    """MEMORY USAGE of the stream in bytes (Redis samples its nodes: approximate)."""
    try:
        value = client.memory_usage(stream)
    except redis.ResponseError:
        return None
    return int(value) if value is not None else None


def length(client: redis.Redis, stream: str) -> int:
    """XLEN (0 when the stream does not exist)."""
    return int(client.xlen(stream))


_OLDEST_PENDING = """
local summary = redis.call('XPENDING', KEYS[1], ARGV[1])
local now = redis.call('TIME')
return {summary[2] or '', now[1], now[2]}
"""


def oldest_pending_age_ms(client: redis.Redis, stream: str, group: str) -> int:
    """Milliseconds since the group's oldest unacknowledged entry was added (0: none pending).

    The XPENDING summary names the smallest pending ID, whose first part is the time Redis
    added it; Redis's own clock (TIME) measures the age, so a skewed monitor host does not.
    """
    # One script: one round trip, and on a cluster both run on the stream's own node.
    try:
        smallest, seconds, micros = client.eval(_OLDEST_PENDING, 1, stream, group)
    except redis.ResponseError:
        return 0  # no such stream or group: nothing pending
    if not smallest:
        return 0
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    return max(now_ms - int(_id(smallest).partition("-")[0] or 0), 0)


# -- end of monitor ---------------------------------------------------------------------------


# -- sweeper, dead letters and replay ---------------------------------------------------------
# Used by ratebox.sweeper, ratebox.deadletter and ratebox.replay. Every step that must not
# race with a worker (trimming, removing a consumer, replaying) is one Lua script, so Redis
# runs it atomically.

#: claim_one outcomes: the entry is ours now; its payload was trimmed or deleted; someone else
#: has it (a worker touched or acknowledged it since XPENDING listed it).
CLAIMED, GONE, TAKEN = "claimed", "gone", "taken"

# Compares stream IDs as text (no leading zeros: longer is larger), so a 64-bit sequence
# never loses precision in a Lua number.
_ID_LESS = """
local function less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if #am ~= #bm then return #am < #bm end
  if am ~= bm then return am < bm end
  if #as ~= #bs then return #as < #bs end
  return as < bs
end
"""

# Trims entries older than the retention, but never at or past any group's oldest pending
# entry nor past its last-delivered ID; with no group at all nothing was delivered, so
# nothing goes. Redis's own clock sets the cutoff: entry IDs are stamped with it.
_TRIM = (
    _ID_LESS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, ''} end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return {0, ''} end
local now = redis.call('TIME')
local cutoff_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[1])
if cutoff_ms <= 0 then return {0, ''} end
local bound = string.format('%d-0', cutoff_ms)
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  if less(info['last-delivered-id'], bound) then bound = info['last-delivered-id'] end
  if tonumber(info['pending']) > 0 then
    local oldest = redis.call('XPENDING', KEYS[1], info['name'])[2]
    if oldest and less(oldest, bound) then bound = oldest end
  end
end
return {redis.call('XTRIM', KEYS[1], 'MINID', bound), bound}
"""
)

# Removes a consumer only while it holds nothing and has been idle long enough, checked in the
# same atomic step: DELCONSUMER drops the pending entries of the consumer it deletes.
_DEL_IDLE_CONSUMER = """
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if info['name'] == ARGV[2] then
    if tonumber(info['pending']) == 0 and tonumber(info['idle']) >= tonumber(ARGV[3]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
      return 1
    end
    return 0
  end
end
return 0
"""


def claim_one(
    client: redis.Redis, stream: str, group: str, consumer: str, min_idle_ms: int, entry_id: str
) -> tuple[str, Entry | None]:
    """XCLAIM one entry still idle ``min_idle_ms`` (counts a delivery): CLAIMED, GONE or TAKEN."""
    reply: Any = client.xclaim(stream, group, consumer, min_idle_ms, [entry_id])
    if reply:
        claimed_id, fields = reply[0]
        # Redis 6.2 claims a deleted entry and answers nil for it: the caller must ack it.
        if claimed_id is None or not fields:
            return GONE, None
        return CLAIMED, (_id(claimed_id), fields)
    # Redis 7 drops a deleted entry from the group and answers nothing, as it does for an
    # entry that is no longer idle: only the stream itself tells them apart.
    if not client.xrange(stream, entry_id, entry_id, count=1):
        return GONE, None
    return TAKEN, None


def trim_acknowledged(
    client: redis.Redis, stream: str, retention_ms: int
) -> tuple[int, str | None]:
    """XTRIM MINID entries older than the retention, never past what any group still needs."""
    trimmed, bound = client.eval(_TRIM, 1, stream, int(retention_ms))
    return int(trimmed), (_id(bound) or None)


def remove_idle_consumer(
    client: redis.Redis, stream: str, group: str, consumer: str, min_idle_ms: int
) -> bool:
    """XGROUP DELCONSUMER, only if the consumer holds no entry and is idle ``min_idle_ms``."""
    return bool(client.eval(_DEL_IDLE_CONSUMER, 1, stream, group, consumer, int(min_idle_ms)))


def entries_between(
    client: redis.Redis, stream: str, start: str, end: str, count: int
) -> list[Entry]:
    """XRANGE from ``start`` to ``end`` (``(`` before an ID excludes it), at most ``count``."""
    reply: Any = client.xrange(stream, start, end, count=count)
    return [(_id(entry_id), fields or {}) for entry_id, fields in reply or []]


# -- end of sweeper, dead letters and replay ----------------------------------------------------


def connect_quick(url: str, timeout_s: float = 2.0, cluster: bool = False) -> redis.Redis:
    """A client with short timeouts for the supervisor's loop; pings once (ServerUnavailable)."""
    make: Any = stream_cluster.connect_cluster if cluster else redis.Redis.from_url
    try:
        client = make(
            url, decode_responses=False, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
        )
        client.ping()
    except OUTAGE_ERRORS as exc:
        raise ServerUnavailable(f"cannot reach Redis at {mask_url(url)}: {reason(exc)}") from None
    return client
