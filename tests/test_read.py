"""stream.read: the same entries through a client from stream.connect (raw replies, parsed once)
and through a plain redis-py client, in RESP2 and RESP3."""

from __future__ import annotations

import pytest
import redis

from ratebox import stream


@pytest.mark.parametrize("protocol", [2, 3])
def test_read_gives_the_same_entries_through_any_client(redis_url, names, protocol) -> None:
    plain = redis.Redis.from_url(redis_url, protocol=protocol)
    ours = stream.connect(redis_url)
    ours.connection_pool.connection_kwargs["protocol"] = protocol
    try:
        sent = [{b"data": b'{"n": %d}' % i, b"source": b"s", b"empty": b""} for i in range(6)]
        for fields in sent:
            plain.xadd(names.stream, fields)
        stream.ensure_group(plain, names.stream, names.group)
        first = stream.read(ours, names.stream, names.group, "a", 3)
        second = stream.read(plain, names.stream, names.group, "b", 3)
        assert [fields for _, fields in first + second] == sent
        assert all(isinstance(entry_id, str) for entry_id, _ in first + second)
        # A pending entry whose payload is gone comes back with no fields.
        plain.xdel(names.stream, first[0][0])
        again = stream.read(ours, names.stream, names.group, "a", 3, start="0")
        assert again == [(first[0][0], {}), *first[1:]]
        assert stream.read(ours, names.stream, names.group, "a", 3, block_ms=1) == []
    finally:
        plain.delete(names.stream)
        plain.close()
        ours.close()
