"""stream.publish: many entries per script call, one call in flight, nothing lost or altered."""

from __future__ import annotations

from ratebox import stream


def test_publish_keeps_every_entry_and_field_in_order(redis_client, names) -> None:
    messages = [
        {"data": f'{{"n": {i}}}', "batch_id": f"b{i // 7}", "producer": "p", "source": "s\tx"}
        for i in range(2503)
    ]
    ids = stream.publish(redis_client, names.stream, messages, chunk=100)
    assert len(ids) == len(messages) == len(set(ids))
    stored = redis_client.xrange(names.stream)
    assert [i.decode() for i, _ in stored] == ids
    for (_, fields), sent in zip(stored, messages, strict=True):
        assert {k.decode(): v.decode() for k, v in fields.items()} == sent


def test_publish_of_nothing_sends_nothing(redis_client, names) -> None:
    assert stream.publish(redis_client, names.stream, []) == []
    assert redis_client.exists(names.stream) == 0


def test_the_client_stays_usable_after_publishing(redis_client, names) -> None:
    stream.publish(redis_client, names.stream, [{"data": "{}"}] * 1500)
    assert redis_client.xlen(names.stream) == 1500
    assert redis_client.ping()
