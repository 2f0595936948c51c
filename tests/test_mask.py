"""Masking of personal data and secrets for logs, dashboards and error messages."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratebox.mask import mask_email, mask_item, mask_text, mask_url, mask_value

EIGHT_DIGITS = re.compile(r"\d{8,}")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("12345678901", "*******8901"),
        ("0123456789", "******6789"),
        ("12345", "*2345"),
        ("1234", "****"),
        ("12", "**"),
        ("", ""),
    ],
)
def test_mask_value_stars_all_but_the_last_four(value, expected):
    assert mask_value(value) == expected


def test_mask_value_keeps_as_many_as_asked():
    assert mask_value("12345678", keep=2) == "******78"
    assert mask_value("12345678", keep=0) == "********"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("user@example.com", "u***@example.com"),
        ("a@b.co", "a***@b.co"),
        ("@example.com", "***@example.com"),
        ("a@b@example.com", "a***@example.com"),
        ("not-an-email", "n***"),  # no domain: all of it is the local part
    ],
)
def test_mask_email_keeps_the_first_letter_and_the_domain(value, expected):
    assert mask_email(value) == expected


def test_mask_item_masks_personal_fields_and_secrets():
    item = {
        "phone": "0123456789",
        "bank_account": 12345678901,
        "email": "user@example.com",
        "name": "Nguyen Van A",
        "Password": "hunter2",
        "api_key": 42,
        "db_secret": {"nested": True},
        "access_token": "abc",
        "source": "web_crawler",
    }
    assert mask_item(item) == {
        "phone": "******6789",
        "bank_account": "*******8901",
        "email": "u***@example.com",
        "name": "Nguyen Van A",
        "Password": "***",
        "api_key": "***",
        "db_secret": "***",
        "access_token": "***",
        "source": "web_crawler",
    }


def test_mask_item_does_not_change_its_argument():
    item = {"phone": "0123456789"}
    mask_item(item)
    assert item == {"phone": "0123456789"}


def test_mask_item_masks_nested_items_and_numbers_in_free_text():
    item = {"contacts": [{"phone": "0987654321"}], "note": "call 0912 345 678"}
    assert mask_item(item) == {"contacts": [{"phone": "******4321"}], "note": "call ******5678"}


def test_mask_item_masks_long_numbers_under_any_key_and_keeps_short_ones():
    item = {"account_no": 12345678901, "count": 3, "ratio": 0.5, "ok": True, "none": None}
    assert mask_item(item) == {**item, "account_no": "*******8901"}


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@localhost:6379/0", "redis://:***@localhost:6379/0"),
        (
            "rediss://default:s3cret@cache.internal:6380/1",
            "rediss://default:***@cache.internal:6380/1",
        ),
        (
            "postgresql://ratebox:p@ss@db:5432/validator",
            "postgresql://ratebox:***@db:5432/validator",
        ),
        ("postgresql://ratebox@db/validator", "postgresql://ratebox@db/validator"),
        (
            "host=db user=ratebox password=s3cret dbname=v",
            "host=db user=ratebox password=*** dbname=v",
        ),
        ("host=db password='s3 cret' dbname=v", "host=db password='***' dbname=v"),
        (
            "postgresql://db/v?password=s3cret&sslmode=require",
            "postgresql://db/v?password=***&sslmode=require",
        ),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("embedded", "embedded"),
    ],
)
def test_mask_url_hides_the_password_only(url, expected):
    assert mask_url(url) == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            "cannot reach Redis at redis://:s3cret@10.0.0.5:6379/0: Connection refused",
            "cannot reach Redis at redis://:***@10.0.0.5:6379/0: Connection refused",
        ),
        (
            '{"phone": "0123456789", "password": "hunter2"}',
            '{"phone": "******6789", "password": "***"}',
        ),
        ("{'db_password': \"it's\", 'x': 1}", "{'db_password': \"***\", 'x': 1}"),
        ("login user@example.com failed", "login u***@example.com failed"),
        ("phone +84 912-345-678 rejected", "phone *******5678 rejected"),
        ("account 12345678901", "account *******8901"),
        ("short 1234567 stays", "short 1234567 stays"),
        ("secret=abc token: xyz tokens: 500", "secret=*** token: *** tokens: 500"),
        (
            "2024-06-08 00:13:03,123 INFO worker_001 done in 12.5 ms",
            "2024-06-08 00:13:03,123 INFO worker_001 done in 12.5 ms",
        ),
        ("produced 2024-06-08T00:13:03+07:00", "produced 2024-06-08T00:13:03+07:00"),
    ],
)
def test_mask_text_scrubs_a_log_line(line, expected):
    assert mask_text(line) == expected


def test_mask_text_leaves_no_digits_in_the_user_of_a_url_or_a_domain():
    assert mask_text("redis://123456789:pw@host") == "redis://*****6789:***@host"
    assert mask_text("x@123456789.com") == "x***@*****6789.com"


def test_mask_text_is_idempotent_on_its_own_output():
    line = "user@example.com 0123456789 password=x redis://:pw@h"
    once = mask_text(line)
    assert mask_text(once) == once


def test_mask_text_stays_linear_on_long_hostile_lines():
    # Would take minutes with a backtracking pattern; a few milliseconds here.
    for line in ["a" * 50_000, "1 " * 25_000, "a." * 25_000, "password=" * 5_000, "a@" * 25_000]:
        assert len(mask_text(line)) <= 2 * len(line)  # `a@a` shows as `a***@a`


digits_and_noise = st.text(alphabet="0123456789 -+@.:=/abcxyz_'\"", max_size=120)


STREAM_ID = re.compile(r"1\d{12}-\d{1,6}(?![\d-])")


@given(digits_and_noise | st.text(max_size=80))
def test_no_run_of_eight_digits_survives_mask_text_but_stream_ids(text):
    assert not EIGHT_DIGITS.search(STREAM_ID.sub("", mask_text(text)))


def test_stream_ids_stay_readable_in_log_lines():
    line = "dead-lettered 1795636060449-0 after 4 deliveries; phone 0912345678"
    assert mask_text(line) == "dead-lettered 1795636060449-0 after 4 deliveries; phone ******5678"


@given(st.text(alphabet="0123456789", min_size=8, max_size=40), st.text(max_size=20))
def test_a_long_number_never_appears_in_the_masked_text(number, around):
    masked = mask_text(f"{around} {number} {around}")
    assert number not in masked


@given(st.text(max_size=40))
def test_mask_value_keeps_the_length_and_at_most_four_characters(text):
    masked = mask_value(text)
    assert len(masked) == len(text)
    assert masked[-4:] == text[-4:] or len(text) <= 4
    assert set(masked[: max(len(text) - 4, 0)]) <= {"*"}


_count = st.integers(0, 10**12)


@given(
    length=_count,
    dead=_count,
    consumers=st.integers(0, 10_000),
    pending=_count,
    lag=st.none() | _count,
    totals=st.lists(_count, min_size=4, max_size=4),
    rates=st.lists(st.floats(0, 1e9), min_size=3, max_size=3),
    top=st.lists(st.tuples(st.integers(100, 999), _count), max_size=3),
)
def test_the_monitors_own_log_line_survives_the_mask(
    length, dead, consumers, pending, lag, totals, rates, top
) -> None:
    from ratebox.dashboard import snapshot_line

    snap = {
        "servers": {"redis": {"available": True}, "postgres": {"available": True}},
        "stream": {
            "name": "raw_items",
            "length": length,
            "memory_bytes": None,
            "dead_letter": {"length": dead},
        },
        "groups": [{"name": "validators", "consumers": consumers, "pending": pending, "lag": lag}],
        "database": {
            "totals": dict(zip(("done", "error", "pending", "dead_lettered"), totals, strict=True))
        },
        "throughput": dict(zip(("per_s_now", "per_s_1m", "per_s_5m"), rates, strict=True)),
        "top_errors": [{"code": code, "count": count} for code, count in top],
        "processes": None,
    }
    line = snapshot_line(snap)
    assert mask_text(line) == line


def test_counts_beside_each_other_are_not_an_account_number() -> None:
    line = "top 300x10,223 200x10,121 100x10,052"
    assert mask_text(line) == line


_password = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="@"),
    min_size=6,
    max_size=30,
) | st.from_regex(r"[A-Za-z0-9]{3,10} [#?/&=]{1,3}[A-Za-z0-9@]{3,10}", fullmatch=True)


@given(password=_password)
def test_a_redis_urls_password_is_hidden_whatever_it_holds(password: str) -> None:
    for url in (f"redis://:{password}@db.example:6379/0", f"rediss://app:{password}@h:1/2?x=1"):
        shown = mask_url(url)
        assert password not in shown
        assert shown.endswith(url.rpartition("@")[2])  # the host part stays readable


@given(password=st.text(alphabet="abcXYZ019 '\\#=", min_size=4, max_size=20))
def test_a_dsns_password_is_hidden_as_libpq_reads_it(password: str) -> None:
    from psycopg2.extensions import make_dsn, parse_dsn

    dsn = make_dsn(host="db.example", dbname="validator", password=password)
    shown = mask_url(dsn)
    assert parse_dsn(dsn)["password"] == password
    assert parse_dsn(shown)["password"] == "***" and "db.example" in shown
    if len(password.strip()) >= 4:
        assert password.strip() not in shown.replace("***", "")


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("call +84 (912) 345-678 now", "912"),
        ("call (091) 234-5678 now", "234"),
        ("card 1234.5678.9012.3456", "5678.9012"),
        ("mail john.doe@[10.0.0.1]", "john.doe"),
        ("Invalid email format: x@4111.1111.1111.1111", "4111.1111.1111"),
        ("Invalid email format: n@0912.345.678", "0912"),
    ],
)
def test_personal_data_however_written_is_masked(text: str, hidden: str) -> None:
    assert hidden not in mask_text(text)


def test_a_domain_made_of_a_number_keeps_its_shape_and_last_four_digits() -> None:
    assert mask_email("x@4111.1111.1111.1111") == "x***@****.****.****.1111"
    assert mask_email("user@mail2.example.com") == "u***@mail2.example.com"


_digits_12 = st.text(alphabet="0123456789", min_size=8, max_size=16)
_local = st.from_regex(r"[a-z][a-z0-9._%+-]{3,15}", fullmatch=True)
_label = st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True)


@given(number=_digits_12, local=_local, label=_label, value=st.integers(0, 9))
def test_keys_of_an_item_are_masked_like_values(number, local, label, value) -> None:
    email = f"{local}@{label}.example"
    shown = repr(mask_item({number: value, email: {number: value}, "note": value}))
    assert number not in shown
    assert f"'{local[0]}***@{label}.example'" in shown
    assert not EIGHT_DIGITS.search(shown)
    assert len(mask_item({number: 1, number + "0": 2})) == 2  # keys that mask alike both stay


_secret_key = st.sampled_from(
    ["pw", "pass", "password", "passphrase", "pin", "db_password", "api-key", "auth", "secret"]
) | st.builds(lambda a, b: a + b, st.sampled_from(["", "db_", "user-", "X"]), st.just("Pwd"))
_secret = st.from_regex(r"[A-Za-z0-9!$%^*]{6,20}", fullmatch=True)


@given(key=_secret_key, secret=_secret)
def test_a_value_under_a_password_like_key_is_hidden_in_items_and_in_text(key, secret) -> None:
    assert mask_item({key: secret}) == {key: "***"}
    for text in (f"{key}={secret}", f'{{"{key}": "{secret}"}}', f"{key}: {secret} next"):
        assert secret not in mask_text(text), text


@given(local=_local, domain=_label | st.sampled_from(["localhost", "[10.0.0.1]", "[::1]"]))
def test_an_email_on_a_one_label_domain_or_an_address_literal_is_masked(local, domain) -> None:
    assert mask_text(f"from {local}@{domain} today") == f"from {local[0]}***@{domain} today"


@given(ms=st.integers(10**12, 1_790_000_000_000), seq=st.integers(0, 999))
def test_something_shaped_like_a_stream_id_is_masked_in_data(ms, seq) -> None:
    text = f"{ms}-{seq}"
    assert mask_item({"note": text})["note"] != text  # a message's text keeps no number
    # The program's own lines keep IDs readable, only those of a plausible time (2020 on).
    kept = mask_text(f"entry {text} done") == f"entry {text} done"
    assert kept == (ms >= 1_577_836_800_000)


def test_an_invalid_email_without_a_domain_shows_its_first_character_only() -> None:
    assert mask_email("john.doe.example.com") == "j***"
    assert mask_email("0912345678") == "0***"
