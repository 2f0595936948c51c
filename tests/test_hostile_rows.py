"""Hostile entries against real PostgreSQL: whatever an entry holds, its row is written."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ratebox import store, verdict
from ratebox.rules import DEFAULT_RULES, compile_rules

ENGINE = compile_rules(DEFAULT_RULES)
GOOD = {"phone": "0123456789", "bank_account": "12345678", "email": "a@b.vn", "name": "An"}
# Examples share the test's schema: each entry gets an ID of its own.
_ids = itertools.count(1)
_shared = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)


@pytest.fixture
def conn(pg_schema_dsn: str) -> Iterator[Any]:
    with closing(store.connect(pg_schema_dsn)) as connection:
        yield connection


def consumer() -> store.Consumer:
    return store.Consumer("items", "g", "worker_001", "host", 1, datetime.now(timezone.utc))


def write(conn: Any, fields: list[dict[bytes, bytes]], deliveries: int = 1) -> list[str]:
    entries = [(f"1700000000000-{next(_ids)}", f) for f in fields]
    counts = {entry_id: deliveries for entry_id, _ in entries}
    batch = verdict.judge_all(entries, ENGINE, 65536, counts)
    store.write_batch(conn, consumer(), batch)
    return [entry_id for entry_id, _ in entries]


def stored(conn: Any, ids: list[str]) -> dict[str, tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT stream_id, error_code, produced_at FROM raw_items WHERE stream_id = ANY(%s)",
            (ids,),
        )
        found = {row[0]: row[1:] for row in cur.fetchall()}
    conn.rollback()
    return found


# ISO 8601 as producers write it, and as they get it wrong: any year Python reads, offsets
# far beyond what PostgreSQL holds, seconds and fractions in the offset, no offset at all.
_offsets = st.one_of(
    st.just(""),
    st.just("Z"),
    st.builds(
        lambda sign, h, m, rest: f"{sign}{h:02d}:{m:02d}{rest}",
        st.sampled_from("+-"),
        st.integers(0, 23),
        st.integers(0, 59),
        st.one_of(
            st.just(""),
            st.integers(0, 59).map(lambda s: f":{s:02d}"),
            st.integers(0, 59).map(lambda s: f":{s:02d}.5"),
        ),
    ),
)
_stamps = st.builds(
    lambda when, offset: when.isoformat() + offset,
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
    _offsets,
)


@_shared
@given(stamp=_stamps)
def test_any_timestamp_an_entry_holds_is_written_as_its_moment_or_not_at_all(conn, stamp):
    good = {b"data": orjson.dumps(GOOD), b"timestamp": b"2024-06-08T00:13:03+07:00"}
    ids = write(conn, [{b"data": orjson.dumps(GOOD), b"timestamp": stamp.encode()}, good])
    rows = stored(conn, ids)
    assert set(rows) == set(ids)  # the batch-mate is written too
    code, produced_at = rows[ids[0]]
    assert code is None  # a valid item: the rules judged it, the database did not refuse it
    try:
        expected = datetime.fromisoformat(stamp)
        expected = expected.replace(tzinfo=expected.tzinfo or timezone.utc)
        expected.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        assert produced_at is None
    else:
        assert produced_at == expected


_hostile_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from("\x00\\\t\n\r"),
    max_size=40,
)


@_shared
@given(source=_hostile_text, producer=_hostile_text, batch=_hostile_text, stamp=_stamps)
def test_a_row_the_database_refuses_still_gets_a_903_row_whatever_the_entry_holds(
    conn, source, producer, batch, stamp
):
    # A trigger refuses every row whose data names "refuse": the fallback row must be stored.
    with conn.cursor() as cur:
        cur.execute(
            """
            CREATE OR REPLACE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
              IF NEW.data->>'name' = 'refuse' THEN RAISE EXCEPTION 'refused: %', NEW.data; END IF;
              RETURN NEW; END $$;
            DROP TRIGGER IF EXISTS refuse ON raw_items;
            CREATE TRIGGER refuse BEFORE INSERT ON raw_items FOR EACH ROW EXECUTE FUNCTION refuse();
            """
        )
    conn.commit()
    fields = {
        b"data": orjson.dumps({**GOOD, "name": "refuse", "source": source}),
        b"source": source.encode(),
        b"producer": producer.encode(),
        b"batch_id": batch.encode(),
        b"timestamp": stamp.encode(),
    }
    ids = write(conn, [fields, {b"data": orjson.dumps(GOOD)}])
    rows = stored(conn, ids)
    assert set(rows) == set(ids)
    assert rows[ids[0]][0] == 903
    assert rows[ids[1]][0] is None


def test_an_offset_postgresql_refuses_keeps_the_batch_and_the_moment(conn):
    stamp = b"2026-12-01T00:00:00+23:59"
    ids = write(conn, [{b"data": orjson.dumps(GOOD), b"timestamp": stamp}] * 3, deliveries=2)
    rows = stored(conn, ids)
    assert [rows[i][0] for i in ids] == [None, None, None]
    assert rows[ids[0]][1] == datetime(2026, 11, 30, 0, 1, tzinfo=timezone.utc)
