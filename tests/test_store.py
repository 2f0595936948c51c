"""Batch writes: the direct COPY of first deliveries, the careful path, and their statistics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest

from ratebox import store, verdict
from ratebox.rules import DEFAULT_RULES, compile_rules

ENGINE = compile_rules(DEFAULT_RULES)
GOOD = {"phone": "0123456789", "bank_account": "12345678", "email": "a@b.vn", "name": "An"}
BAD = {"phone": "01", "bank_account": "", "email": "nope", "name": "An"}


@pytest.fixture
def conn(pg_schema_dsn: str) -> Iterator[Any]:
    with closing(store.connect(pg_schema_dsn)) as connection:
        yield connection


def consumer(name: str = "worker_001") -> store.Consumer:
    return store.Consumer("items", "g", name, "host", 1, datetime.now(timezone.utc))


def rows(first: int, count: int, deliveries: int = 1, item: Any = None) -> list[verdict.Row]:
    entries = [
        (f"1700000000000-{i}", {b"data": orjson.dumps(item or (GOOD if i % 3 else BAD))})
        for i in range(first, first + count)
    ]
    counts = {entry_id: deliveries for entry_id, _ in entries}
    return verdict.judge_all(entries, ENGINE, 65536, counts)


def query(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(sql)
        result = cur.fetchall()
    conn.rollback()
    return result


def totals(conn: Any) -> tuple[Any, ...]:
    (stats,) = query(conn, "SELECT processed, errors, dead_lettered FROM stream_consumer_stats")
    (minute,) = query(conn, "SELECT sum(processed), sum(errors) FROM stream_processing_metrics")
    return stats + minute


def test_first_deliveries_are_written_with_their_statistics(conn):
    batch = rows(0, 30)
    assert store.write_batch(conn, consumer(), batch) == 30
    errors = sum(r.status == "error" for r in batch)
    assert totals(conn) == (30, errors, 0, 30, errors)
    counted = dict(
        ((code, field), n)
        for code, field, n in query(
            conn, "SELECT error_code, field, count FROM stream_error_metrics"
        )
    )
    assert counted == {(101, "phone"): 10, (200, "bank_account"): 10, (300, "email"): 10}
    (stored,) = query(conn, "SELECT errors FROM raw_items WHERE stream_id = '1700000000000-0'")
    assert stored == ([f.as_dict() for f in batch[0].errors],)
    assert [e["code"] for e in stored[0]] == [101, 200, 300]
    (processed_at,) = query(conn, "SELECT count(DISTINCT processed_at) FROM raw_items")
    assert processed_at == (1,)


def test_a_first_delivery_batch_meeting_existing_rows_adds_only_the_new_ones(conn):
    store.write_batch(conn, consumer(), rows(0, 10))
    # Delivery count 1 although rows exist: a replayed stream, or another writer. The direct
    # COPY fails on the unique key and the careful path keeps what is there.
    overlapping = rows(5, 10, item={"name": "changed"})
    assert store.write_batch(conn, consumer(), overlapping) == 5
    assert query(conn, "SELECT count(*) FROM raw_items") == [(15,)]
    kept = query(conn, "SELECT data->>'name' FROM raw_items WHERE stream_id = '1700000000000-5'")
    assert kept == [("An",)]
    assert totals(conn)[0] == 15
    assert totals(conn)[3] == 15


def test_a_redelivered_batch_changes_nothing(conn):
    store.write_batch(conn, consumer(), rows(0, 10))
    before = totals(conn)
    assert store.write_batch(conn, consumer(), rows(0, 10, deliveries=2)) == 0
    assert totals(conn) == before


def test_a_row_the_database_refuses_is_isolated_on_either_path(conn):
    with conn.cursor() as cur:
        cur.execute(
            """
            CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
              IF NEW.data->>'name' = 'Refuse Me' THEN RAISE EXCEPTION 'refused'; END IF;
              RETURN NEW; END $$;
            CREATE TRIGGER refuse BEFORE INSERT ON raw_items FOR EACH ROW EXECUTE FUNCTION refuse();
            """
        )
    conn.commit()
    batch = rows(0, 8)
    batch[3] = rows(3, 1, item={**GOOD, "name": "Refuse Me"})[0]
    assert store.write_batch(conn, consumer(), batch) == 8
    codes = query(conn, "SELECT stream_id, error_code FROM raw_items WHERE error_code = 903")
    assert codes == [("1700000000000-3", 903)]
    assert totals(conn)[0] == 8


def test_text_needing_copy_escapes_is_stored_exactly(conn):
    data = b'{"name":\t"tab\\there",\n"path": "C:\\\\dir", "quote": "say \\"hi\\""}\r\n'
    batch = verdict.judge_all(
        [("1700000000000-0", {b"data": data, b"source": b"a\\b\tc"})], ENGINE, 65536
    )
    assert store.write_batch(conn, consumer(), batch) == 1
    (stored,) = query(conn, "SELECT data, source FROM raw_items")
    assert stored == (orjson.loads(data), "a\\b\tc")
