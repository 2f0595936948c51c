"""The test-data producer: realistic items, the documented mix of valid and invalid ones, and
publishing them whole and fast."""

from __future__ import annotations

import random
import re
import time
from collections import Counter

import orjson
import pytest
import redis

from ratebox import producer, rules, stream

FIELDS = ["phone", "bank_account", "email", "name", "source"]


@pytest.fixture(scope="module")
def items() -> list[tuple[bytes, bytes]]:
    rng = random.Random(11)
    out: list[tuple[bytes, bytes]] = []
    for _ in range(20):
        data, sources = producer.fake_data(rng, 1000)
        out += zip(data, sources, strict=True)
    return out


def test_items_are_compact_json_objects_of_the_five_fields(items) -> None:
    for data, source in items:
        item = orjson.loads(data)
        assert orjson.dumps(item) == data  # compact, as orjson writes it
        assert list(item) == [field for field in FIELDS if field in item]
        assert set(FIELDS) - set(item) <= {"phone"}  # code 100 takes the phone out
        assert all(type(value) is str for value in item.values())
        assert item["source"].encode() == source


def test_three_items_in_ten_break_exactly_one_rule_spread_over_every_code(items) -> None:
    engine = rules.compile_rules(rules.DEFAULT_RULES)
    codes: Counter[int] = Counter()
    for data, _ in items:
        failures = engine.check(orjson.loads(data))
        assert len(failures) <= 1, (data, failures)
        codes[failures[0].code if failures else 0] += 1
    assert 0.68 < codes.pop(0) / len(items) < 0.72
    assert set(codes) == {100, 101, 200, 201, 300, 400}
    invalid = sum(codes.values())
    assert all(0.8 < count / (invalid / 6) < 1.2 for count in codes.values()), codes


def test_valid_items_are_realistic_and_varied(items) -> None:
    engine = rules.compile_rules(rules.DEFAULT_RULES)
    valid = [item for item in (orjson.loads(data) for data, _ in items) if not engine.check(item)]
    assert {len(item["bank_account"]) for item in valid} == set(range(8, 15))
    assert {item["phone"][:3] for item in valid} == set(producer.MOBILE_PREFIXES)
    assert all(re.fullmatch(r"0\d{9}", item["phone"]) for item in valid)
    assert {item["email"].split("@")[1] for item in valid} == set(producer.MAIL_DOMAINS)
    assert {item["source"] for item in valid} == set(producer.SOURCES)
    assert len({item["name"] for item in valid}) > 5000  # of 7,296 names
    assert len({item["phone"] for item in valid}) > 0.99 * len(valid)
    assert any(not item["name"].isascii() for item in valid)  # diacritics, as UTF-8


def test_fake_item_is_one_item_as_a_dict() -> None:
    item = producer.fake_item(random.Random(3), invalid_share=0)
    assert list(item) == FIELDS
    assert not rules.compile_rules(rules.DEFAULT_RULES).check(item)


def test_generate_repeats_itself_with_a_seed_and_shares_batch_fields_per_thousand() -> None:
    first = list(producer.generate(2500, seed=5))
    assert [e["data"] for e in first] == [e["data"] for e in producer.generate(2500, seed=5)]
    batches = Counter(e["batch_id"] for e in first)
    assert sorted(batches.values()) == [500, 1000, 1000]
    for entry in first[:1000]:
        assert entry["batch_id"] == first[0]["batch_id"]
        assert entry["timestamp"] == first[0]["timestamp"]
    assert {e["producer"] for e in first} == {"ratebox_producer"}


def test_produce_publishes_every_entry_with_the_fields_of_the_spec(redis_client, names) -> None:
    reported: list[int] = []
    sent = producer.produce(redis_client, names.stream, 2500, progress=reported.append)
    assert sent == sum(reported) == redis_client.xlen(names.stream) == 2500
    entries = redis_client.xrange(names.stream)
    for _, fields in entries:
        assert sorted(fields) == [b"batch_id", b"data", b"producer", b"source", b"timestamp"]
        assert orjson.loads(fields[b"data"])["source"].encode() == fields[b"source"]
        assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+07:00", fields[b"timestamp"])
        assert fields[b"producer"] == b"ratebox_producer"
    assert len({fields[b"batch_id"] for _, fields in entries}) == 3


def test_produce_with_a_delay_sends_one_entry_at_a_time(redis_client, names) -> None:
    assert producer.produce(redis_client, names.stream, 3, delay=0.01) == 3
    assert redis_client.xlen(names.stream) == 3


def test_continuous_holds_the_rate_by_the_clock(redis_client, names) -> None:
    deadline = time.monotonic() + 0.5
    sent = producer.continuous(
        redis_client, names.stream, 2000, lambda: time.monotonic() < deadline
    )
    assert 600 <= sent <= 1000
    assert redis_client.xlen(names.stream) == sent


def test_publish_makes_one_call_per_run_of_entries_with_the_same_fields(
    redis_client, names
) -> None:
    messages = [
        {"data": "1"},
        {"data": "2", "x": "y"},
        {"x": "z", "data": "3"},
        {"data": "4"},
        {"data": "5", "b": "q"},
        {"data": "6", "b": "q"},
        {"b": "q", "c": "7"},
    ]
    ids = stream.publish(redis_client, names.stream, messages, chunk=4)
    stored = redis_client.xrange(names.stream)
    assert [i.decode() for i, _ in stored] == ids
    got = [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in stored]
    assert got == messages


def test_publish_refuses_an_entry_without_fields_before_sending_anything(
    redis_client, names
) -> None:
    with pytest.raises(redis.DataError):
        stream.publish(redis_client, names.stream, [{"data": "1"}, {}])
    assert redis_client.exists(names.stream) == 0
    assert redis_client.ping()


def test_publish_columns_refuses_columns_of_different_lengths(redis_client, names) -> None:
    with pytest.raises(ValueError, match="one value per entry"):
        stream.publish_columns(redis_client, names.stream, [{"data": [b"1", b"2"], "x": [b"y"]}])
    assert redis_client.exists(names.stream) == 0
    assert redis_client.ping()
