"""Decoding stream entries: items, pipeline errors 900-902, NUL and metadata handling."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratebox import message
from ratebox.message import (
    MALFORMED,
    MISSING_DATA,
    TOO_LARGE,
    Decoded,
    decode,
    pipeline_failure,
    sanitize,
)

LIMIT = 65536
ITEM = {
    "phone": "0123456789",
    "bank_account": "12345678901",
    "email": "user@example.com",
    "name": "Nguyen Van A",
    "source": "web_crawler",
}
ENTRY = {
    b"data": orjson.dumps(ITEM),
    b"source": b"web_crawler",
    b"timestamp": b"2024-06-08T00:13:03+07:00",
    b"producer": b"crawler_worker",
    b"batch_id": b"batch_001",
}


def stored(decoded: Decoded) -> object:
    """What raw_items.data gets, parsed back."""
    return orjson.loads(decoded.text)


def error_of(decoded: Decoded) -> tuple[int, str] | None:
    return None if decoded.error is None else (decoded.error.code, decoded.error.message)


def test_a_well_formed_entry_gives_its_item_and_metadata():
    decoded = decode(ENTRY, LIMIT)
    assert decoded.error is None
    assert decoded.item == ITEM
    assert decoded.text == ENTRY[b"data"].decode()
    assert decoded.source == "web_crawler"
    assert decoded.producer == "crawler_worker"
    assert decoded.batch_id == "batch_001"
    assert decoded.produced_at == datetime(
        2024, 6, 8, 0, 13, 3, tzinfo=timezone(timedelta(hours=7))
    )


def test_str_fields_decode_like_bytes_fields():
    as_text = {k.decode(): v.decode() for k, v in ENTRY.items()}
    assert decode(as_text, LIMIT) == decode(ENTRY, LIMIT)


def test_the_items_source_wins_over_the_entrys():
    entry = {**ENTRY, b"data": orjson.dumps({**ITEM, "source": "api"})}
    assert decode(entry, LIMIT).source == "api"


@pytest.mark.parametrize("source", [None, "", "  ", 5, ["api"]])
def test_the_entrys_source_is_used_when_the_item_has_none(source):
    entry = {**ENTRY, b"data": orjson.dumps({**ITEM, "source": source})}
    assert decode(entry, LIMIT).source == "web_crawler"


def test_missing_or_empty_metadata_is_none():
    decoded = decode({b"data": b"{}", b"producer": b"  ", b"batch_id": b""}, LIMIT)
    assert (decoded.source, decoded.producer, decoded.batch_id, decoded.produced_at) == (None,) * 4


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (b"2024-06-08T00:13:03Z", datetime(2024, 6, 8, 0, 13, 3, tzinfo=timezone.utc)),
        (b"2024-06-08 00:13:03", datetime(2024, 6, 8, 0, 13, 3, tzinfo=timezone.utc)),
        (b"yesterday", None),
        (b"1717780383", None),
        (b"\xff\xfe", None),
    ],
)
def test_the_timestamp_is_parsed_and_a_naive_one_is_utc(timestamp, expected):
    assert decode({b"data": b"{}", b"timestamp": timestamp}, LIMIT).produced_at == expected


# -- pipeline errors -------------------------------------------------------------------------

PIPELINE_CASES = [
    ("json array", b"[1, 2]", "Malformed message: data is a JSON array, expected an object"),
    ("json string", b'"hi"', "Malformed message: data is a JSON string, expected an object"),
    ("json number", b"42", "Malformed message: data is a JSON number, expected an object"),
    ("json null", b"null", "Malformed message: data is a JSON null, expected an object"),
    ("json boolean", b"true", "Malformed message: data is a JSON boolean, expected an object"),
    ("not json", b"{phone: 1}", "Malformed message: data is not valid JSON"),
    ("empty data", b"", "Malformed message: data is not valid JSON"),
    ("truncated json", b'{"phone": "01', "Malformed message: data is not valid JSON"),
    ("invalid utf-8", b'{"name": "\xff"}', "Malformed message: data is not valid UTF-8"),
    ("utf-8 surrogate", b'{"name": "\xed\xa0\x80"}', "Malformed message: data is not valid UTF-8"),
]


@pytest.mark.parametrize(
    ("data", "expected"), [c[1:] for c in PIPELINE_CASES], ids=[c[0] for c in PIPELINE_CASES]
)
def test_malformed_data_is_error_900_with_the_spec_message(data, expected):
    decoded = decode({b"data": data, b"source": b"api"}, LIMIT)
    assert error_of(decoded) == (MALFORMED, expected)
    assert decoded.item is None
    assert decoded.error is not None and decoded.error.field == "data"
    assert decoded.source == "api"


def test_a_refused_entry_keeps_its_text_as_raw():
    decoded = decode({b"data": b'[{"phone": "0123456789"}]'}, LIMIT)
    assert stored(decoded) == {"_raw": '[{"phone": "0123456789"}]'}


def test_a_missing_data_field_is_error_901():
    decoded = decode({b"Data": b"{}", b"source": b"api"}, LIMIT)
    assert error_of(decoded) == (MISSING_DATA, "Missing data field")
    assert stored(decoded) == {"_raw": '{"Data":"{}","source":"api"}'}
    assert decoded.source == "api"


def test_an_empty_entry_is_error_901():
    assert error_of(decode({}, LIMIT)) == (MISSING_DATA, "Missing data field")


def test_a_one_megabyte_payload_is_error_902():
    payload = orjson.dumps({"name": "x" * 1_000_000})
    decoded = decode({b"data": payload}, LIMIT)
    size = len(b"data") + len(payload)
    assert error_of(decoded) == (TOO_LARGE, f"Message too large: {size} bytes, maximum 65536")
    assert len(stored(decoded)["_raw"]) == 1000
    assert stored(decoded)["_raw"].startswith('{"name":"xxx')


def test_size_counts_every_key_and_value_in_bytes():
    entry = {"data": "{}", "name": "é" * 10}  # 4 + 2 + 4 + 20 bytes
    assert decode(entry, 30).error is None
    assert error_of(decode(entry, 29)) == (TOO_LARGE, "Message too large: 30 bytes, maximum 29")


def test_too_large_is_checked_before_missing_data():
    assert error_of(decode({b"payload": b"x" * 100}, 50))[0] == TOO_LARGE  # type: ignore[index]


def test_ten_thousand_levels_of_nesting_is_error_900():
    deep = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    assert error_of(decode({b"data": deep}, 10**6)) == (
        MALFORMED,
        "Malformed message: data is not valid JSON",
    )


def test_raw_text_keeps_at_most_a_thousand_characters_of_multibyte_text():
    payload = ("[" + '"ễ",' * 2000 + '"x"]').encode()
    raw = stored(decode({b"data": payload}, 10**6))["_raw"]
    assert len(raw) == 1000 and "\ufffd" not in raw


def test_pipeline_messages_do_not_echo_the_payload():
    for data in [b'["0123456789"]', b'"user@example.com"', b"12345678901"]:
        decoded = decode({b"data": data}, LIMIT)
        assert decoded.error is not None
        assert data.decode().strip('"[]') not in decoded.error.message


def test_pipeline_failure_is_reported_against_the_data_field():
    failure = pipeline_failure(message.DEAD_LETTERED, "Dead-lettered after 4 deliveries")
    assert failure.as_dict() == {
        "code": 910,
        "field": "data",
        "message": "Dead-lettered after 4 deliveries",
    }
    assert (message.MALFORMED, message.MISSING_DATA, message.TOO_LARGE) == (900, 901, 902)
    assert message.DB_REJECTED == 903


# -- NUL ------------------------------------------------------------------------------------


def test_a_nul_inside_a_string_is_replaced():
    decoded = decode(
        {b"data": b'{"name": "A\\u0000B", "k\\u0000": ["\\u0000", {"x": "\\u0000"}]}'}, LIMIT
    )
    assert decoded.item == {"name": "A\ufffdB", "k\ufffd": ["\ufffd", {"x": "\ufffd"}]}
    assert stored(decoded) == decoded.item


def test_the_text_is_stored_as_sent_so_numbers_keep_their_digits():
    text = b'{"amount": 0.10000000000000000555, "big": 123456789012345678901234567890,\n\t"n": 1}'
    decoded = decode({b"data": text}, LIMIT)
    assert decoded.error is None
    assert decoded.text == text.decode()


def test_mixed_bytes_and_str_values_decode_like_bytes():
    mixed = {**ENTRY, b"producer": "crawler_worker", b"timestamp": "2024-06-08T00:13:03+07:00"}
    assert decode(mixed, LIMIT) == decode(ENTRY, LIMIT)


def test_a_nul_in_metadata_and_raw_text_is_replaced():
    decoded = decode({b"data": b"[\x00]", b"source": b"a\x00b", b"producer": b"\x00p"}, LIMIT)
    assert stored(decoded) == {"_raw": "[\ufffd]"}
    assert (decoded.source, decoded.producer) == ("a\ufffdb", "\ufffdp")


def test_sanitize_walks_deep_values_without_recursion():
    value: object = "\x00"
    for _ in range(50_000):
        value = [{"k": value}]
    cleaned = sanitize(value)
    for _ in range(50_000):
        cleaned = cleaned[0]["k"]  # type: ignore[index]
    assert cleaned == "\ufffd"


def test_sanitize_leaves_other_values_alone():
    value = {"n": 1, "f": 1.5, "b": True, "z": None, "s": "ok", "l": [1, "a"]}
    assert sanitize(value) == value
    assert sanitize("a\x00") == "a\ufffd"
    assert sanitize(7) == 7


# -- properties -----------------------------------------------------------------------------

field_bytes = st.binary(max_size=64) | st.sampled_from([b"data", b"source", b"timestamp"])
json_objects = st.dictionaries(
    st.text(max_size=5),
    st.text(max_size=10) | st.integers(-(2**63), 2**63 - 1) | st.none(),
    max_size=4,
).map(orjson.dumps)


@given(st.dictionaries(field_bytes, st.binary(max_size=200) | json_objects, max_size=6))
def test_decode_never_raises_and_gives_an_item_or_a_pipeline_error(fields):
    decoded = decode(fields, 256)
    if decoded.error is None:
        assert isinstance(decoded.item, dict)
        assert isinstance(decoded.item, dict)
        assert stored(decoded) == decoded.item
    else:
        assert decoded.item is None
        assert decoded.error.code in {900, 901, 902}
        raw = stored(decoded)["_raw"]
        assert isinstance(raw, str) and len(raw) <= 1000


@given(st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=5))
def test_any_json_object_as_data_decodes_to_itself_without_nul(obj):
    decoded = decode({b"data": orjson.dumps(obj)}, LIMIT)
    assert decoded.error is None
    assert decoded.item == sanitize(obj)
    assert len(decoded.item) == len({k.replace("\x00", "\ufffd") for k in obj})
    assert not any("\x00" in k or "\x00" in v for k, v in decoded.item.items())


@pytest.mark.parametrize(
    ("number", "text"),
    [
        ("123456789012345678901234567890", "123456789012345678901234567890"),
        ("1e400", "1e400"),
        ("9" * 5000, "9" * 5000),
        ("-1E-400000", None),  # underflows to 0.0: a float holds it
    ],
)
def test_numbers_past_64_bits_or_a_doubles_range_are_judged_by_their_text(
    number: str, text: str | None
) -> None:
    from ratebox.rules import DEFAULT_RULES, compile_rules

    data = f'{{"phone": {number}, "bank_account": "12345678901", "email": "a@b.co"}}'.encode()
    decoded = decode({b"data": data}, 1 << 20)
    assert decoded.error is None
    assert decoded.text == data.decode()  # stored as sent
    phone = decoded.item["phone"]
    if text is not None:
        assert str(phone) == text
        failures = compile_rules(DEFAULT_RULES).check(decoded.item)
        assert [f.code for f in failures if f.field == "phone"] == ([101] if len(text) < 10 else [])


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_non_json_constants_stay_malformed(constant: str) -> None:
    decoded = decode({b"data": f'{{"phone": {constant}}}'.encode()}, 1 << 20)
    assert decoded.error is not None and decoded.error.code == MALFORMED
