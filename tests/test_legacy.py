"""Moving off database polling: adopting a legacy raw_items, its verdicts, bridge, compare."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import yaml
from psycopg2.extensions import make_dsn, parse_dsn

from ratebox import bridge, compare, legacy, migrate, rules, store_adopt
from ratebox.rules import compile_rules
from ratebox.worker import Worker

LEGACY = """
CREATE TABLE raw_items (
    id serial PRIMARY KEY, data jsonb NOT NULL, status text NOT NULL DEFAULT 'pending',
    source text, error_code integer, error_message text,
    created_at timestamptz NOT NULL DEFAULT now(), processed_at timestamptz,
    poller text, note varchar(20) DEFAULT 'legacy'
);
"""
GOOD = '{"phone": "0123456789", "bank_account": "12345678901", "name": "An"}'
SHORT_PHONE = '{"phone": "123", "bank_account": "12345678901"}'


def run(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(sql, params)
        found = cur.fetchall() if cur.description else []
        conn.commit()
        return found


ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILES = sorted((ROOT / "schema").glob("*.sql"))


def legacy_db(dsn: str, pending: int = 6, judged: int = 6) -> None:
    run(dsn, LEGACY)
    run(
        dsn,
        "INSERT INTO raw_items (data, status, error_code, processed_at, poller)"
        " SELECT %s::jsonb, CASE WHEN i %% 2 = 0 THEN 'done' ELSE 'error' END,"
        " CASE WHEN i %% 2 = 0 THEN NULL ELSE 101 END, now(), 'p1'"
        " FROM generate_series(1, %s) i",
        (SHORT_PHONE, judged),
    )
    run(
        dsn,
        "INSERT INTO raw_items (data) SELECT %s::jsonb FROM generate_series(1, %s)",
        (GOOD, pending),
    )


def catalog(dsn: str) -> list[tuple[Any, ...]]:
    return run(
        dsn,
        """
        SELECT c.relname::text, a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid)
        FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
        LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
        WHERE c.relnamespace = current_schema()::regnamespace AND NOT a.attisdropped
        UNION ALL
        SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid), '', indisvalid, NULL
        FROM pg_index WHERE indrelid IN (SELECT oid FROM pg_class
                                         WHERE relnamespace = current_schema()::regnamespace)
        UNION ALL
        SELECT conname, pg_get_constraintdef(oid), '', convalidated, NULL FROM pg_constraint
        WHERE connamespace = current_schema()::regnamespace
        ORDER BY 1, 2
        """,
    )


class TestAdoption:
    def test_a_fresh_database_gets_exactly_the_schema_files(
        self, postgres_dsn, pg_schema_dsn, names
    ):
        # pg_schema_dsn went through migrate.run; the same files applied by hand elsewhere.
        raw_schema = f"{names.schema}_raw"
        run(postgres_dsn, f"CREATE SCHEMA {raw_schema}")
        raw = schema_dsn(postgres_dsn, raw_schema)
        try:
            for _, _, _, sql in migrate.load(migrate.schema_dir()):
                run(raw, sql)
            mine = [r for r in catalog(pg_schema_dsn) if not r[0].startswith("schema_migrations")]
            theirs = catalog(raw)
            assert str(mine).replace(names.schema + ".", "").split("), (") == str(theirs).replace(
                raw_schema + ".", ""
            ).split("), (")
        finally:
            run(postgres_dsn, f"DROP SCHEMA {raw_schema} CASCADE")

    def test_a_legacy_table_is_adopted_without_changing_its_rows(self, empty_schema_dsn):
        legacy_db(empty_schema_dsn)
        before = run(empty_schema_dsn, "SELECT * FROM raw_items ORDER BY id")
        applied = migrate.run(empty_schema_dsn)
        assert applied and applied[0].startswith("adopted raw_items")
        after = run(
            empty_schema_dsn,
            "SELECT id, data, status, source, error_code, error_message, created_at,"
            " processed_at, poller, note FROM raw_items ORDER BY id",
        )
        assert after == before
        assert run(
            empty_schema_dsn, "SELECT count(*) FROM raw_items WHERE stream_id IS NOT NULL"
        ) == [(0,)]
        kinds = dict(
            run(
                empty_schema_dsn,
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = 'raw_items'",
            )
        )
        assert kinds["id"] == "integer" and kinds["note"] == "character varying"
        assert {"stream_name", "stream_id", "errors", "consumer_name", "processing_ms"} <= set(
            kinds
        )
        invalid = run(
            empty_schema_dsn,
            "SELECT count(*) FROM pg_index WHERE indrelid = 'raw_items'::regclass AND NOT indisvalid",
        )
        assert invalid == [(0,)]
        assert migrate.run(empty_schema_dsn) == []
        versions = {v for (v,) in run(empty_schema_dsn, "SELECT version FROM schema_migrations")}
        # 001-003 are adopted; later files apply as on any database.
        assert versions == {path.name[:3] for path in SCHEMA_FILES} | {"legacy"}

    def test_two_runs_at_once_adopt_once(self, empty_schema_dsn):
        legacy_db(empty_schema_dsn)
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(migrate.run, [empty_schema_dsn] * 2))
        assert sorted(len(r) for r in results)[0] == 0  # the second found nothing left to do
        count = run(empty_schema_dsn, "SELECT count(*) FROM schema_migrations")
        assert count == [(len(SCHEMA_FILES) + 1,)]

    def test_an_invalid_index_left_by_a_crash_is_rebuilt(self, empty_schema_dsn):
        legacy_db(empty_schema_dsn)
        run(
            empty_schema_dsn,
            "ALTER TABLE raw_items ADD COLUMN stream_name text, ADD COLUMN stream_id text",
        )
        # What a CREATE INDEX CONCURRENTLY killed half-way leaves behind.
        run(
            empty_schema_dsn,
            "INSERT INTO raw_items (data, stream_name, stream_id) VALUES ('{}', 's', '1'), ('{}', 's', '1')",
        )
        with pytest.raises(psycopg2.Error), closing(psycopg2.connect(empty_schema_dsn)) as conn:
            conn.autocommit = True
            conn.cursor().execute(
                "CREATE UNIQUE INDEX CONCURRENTLY raw_items_stream_entry_key ON raw_items (stream_name, stream_id)"
            )
        assert run(
            empty_schema_dsn,
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'raw_items_stream_entry_key'::regclass",
        ) == [(False,)]
        run(empty_schema_dsn, "DELETE FROM raw_items WHERE stream_id IS NOT NULL")
        migrate.run(empty_schema_dsn)
        assert run(
            empty_schema_dsn,
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'raw_items_stream_entry_key'::regclass",
        ) == [(True,)]
        assert run(
            empty_schema_dsn,
            "SELECT contype FROM pg_constraint WHERE conrelid = 'raw_items'::regclass AND conname = 'raw_items_stream_entry_key'",
        ) == [("u",)]

    def test_a_migrate_sigkilled_mid_index_build_is_finished_by_the_next_run(
        self, empty_schema_dsn, tmp_path
    ):
        legacy_db(empty_schema_dsn, pending=20_000, judged=280_000)
        checksum = (
            "SELECT count(*), md5(string_agg(concat_ws('|', id, data, status, source, error_code,"
            " error_message, created_at, processed_at, poller, note), ',' ORDER BY id))"
            " FROM raw_items"
        )
        before = run(empty_schema_dsn, checksum)
        path = tmp_path / "ratebox.yaml"
        path.write_text(
            yaml.safe_dump({"postgres": {"dsn": empty_schema_dsn, "migrate_on_start": False}}),
            encoding="utf-8",
        )
        command = [sys.executable, str(ROOT / "bin" / "ratebox-migrate"), "-c", str(path)]
        # A transaction holding an old snapshot: each CREATE INDEX CONCURRENTLY builds, then
        # waits for it before marking the index valid. The migrate is killed in that wait.
        blocker = psycopg2.connect(empty_schema_dsn)
        try:
            blocker.set_session(isolation_level="REPEATABLE READ")
            blocker.cursor().execute("SELECT 1")
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                deadline = time.monotonic() + 120
                while True:
                    assert proc.poll() is None, proc.communicate()
                    found = run(
                        empty_schema_dsn,
                        "SELECT pid FROM pg_stat_progress_create_index"
                        " WHERE relid = to_regclass('raw_items')"
                        " AND index_relid = to_regclass('raw_items_stream_entry_key')"
                        " AND phase = 'waiting for old snapshots'",
                    )
                    if found:
                        break
                    assert time.monotonic() < deadline, "the index build never started"
                    time.sleep(0.05)
                backend = found[0][0]
            finally:
                proc.kill()
                proc.communicate()
            assert proc.returncode == -signal.SIGKILL
            # Its server session notices the client has gone and abandons the build: the
            # index stays invalid and the migration lock is free (never a build finished
            # behind the operator's back, nor a second run waiting on a dead one).
            deadline = time.monotonic() + 60
            while run(
                empty_schema_dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,)
            ):
                assert time.monotonic() < deadline, "the killed migrate's session is still there"
                time.sleep(0.1)
        finally:
            blocker.close()
        assert run(
            empty_schema_dsn,
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'raw_items_stream_entry_key'::regclass",
        ) == [(False,)]
        assert run(empty_schema_dsn, "SELECT to_regclass('schema_migrations')") == [(None,)]

        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "adopted raw_items" in done.stdout
        assert run(
            empty_schema_dsn,
            "SELECT count(*) FILTER (WHERE NOT indisvalid), count(*) FROM pg_index"
            " WHERE indrelid = 'raw_items'::regclass",
        ) == [(0, len(store_adopt.INDEXES) + 1)]
        assert run(
            empty_schema_dsn,
            "SELECT contype FROM pg_constraint WHERE conrelid = 'raw_items'::regclass"
            " AND conname = 'raw_items_stream_entry_key'",
        ) == [("u",)]
        recorded = run(
            empty_schema_dsn, "SELECT version, filename, checksum FROM schema_migrations"
        )
        files = migrate.load(migrate.schema_dir())
        assert sorted(recorded) == sorted(
            [(v, name, checksum) for v, name, checksum, _ in files]
            + [(store_adopt.ADOPTED_VERSION, "adopted raw_items", "")]
        )
        assert run(empty_schema_dsn, checksum) == before
        assert run(
            empty_schema_dsn, "SELECT count(*) FROM raw_items WHERE stream_id IS NOT NULL"
        ) == [(0,)]

    @pytest.mark.parametrize(
        ("table", "column"),
        [
            ("id text PRIMARY KEY, data jsonb, status text", "column id is text"),
            ("id serial PRIMARY KEY, data text, status text", "column data is text"),
            ("id serial PRIMARY KEY, data jsonb, status integer", "column status is integer"),
            ("id serial PRIMARY KEY, status text", "no data column"),
        ],
    )
    def test_a_table_that_cannot_be_adopted_is_refused_before_any_change(
        self, empty_schema_dsn, table, column
    ):
        run(empty_schema_dsn, f"CREATE TABLE raw_items ({table})")
        before = catalog(empty_schema_dsn)
        with pytest.raises(migrate.MigrationError, match=column) as failure:
            migrate.run(empty_schema_dsn)
        assert "\n" not in str(failure.value)
        assert catalog(empty_schema_dsn) == before


def test_as_id_takes_only_bigint_text():
    assert legacy.as_id("42") == 42 and legacy.as_id(" 7 ") == 7
    assert legacy.as_id("x") is None and legacy.as_id("1e3") is None
    assert legacy.as_id(str(2**63)) is None and legacy.as_id("") is None


def schema_dsn(postgres_dsn: str, schema: str) -> str:
    options = parse_dsn(postgres_dsn).get("options", "")
    return make_dsn(postgres_dsn, options=f"{options} -c search_path={schema}".strip())


@pytest.fixture
def adopted(postgres_dsn, names):
    """A DSN on a schema of its own holding a legacy raw_items, adopted."""
    schema = f"{names.schema}_legacy"
    run(postgres_dsn, f"CREATE SCHEMA {schema}")
    dsn = schema_dsn(postgres_dsn, schema)
    legacy_db(dsn)
    migrate.run(dsn)
    yield dsn
    run(postgres_dsn, f"SET lock_timeout = '10s'; DROP SCHEMA {schema} CASCADE")


def config_for(make_config, adopted, **sections):
    settings, path = make_config(postgres={"dsn": adopted, "migrate_on_start": False}, **sections)
    return settings, path


def drain(settings, redis_url, dsn, limit_s=60):
    worker = Worker(settings, "worker_001", redis_url, dsn)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if not worker.loop() and not any(worker.cursors):
            break
    worker.pipeline.reset()


def test_workers_write_legacy_verdicts_on_pending_rows_only(
    make_config, redis_client, redis_url, adopted, names
):
    settings, _ = config_for(make_config, adopted)
    pending = [
        i for (i,) in run(adopted, "SELECT id FROM raw_items WHERE status = 'pending' ORDER BY id")
    ]
    judged = run(adopted, "SELECT id FROM raw_items WHERE status <> 'pending' ORDER BY id")[0][0]
    entries = [{"data": SHORT_PHONE, "legacy_id": str(i)} for i in pending]
    entries += [{"data": GOOD, "legacy_id": str(pending[0])}]  # a duplicate
    entries += [{"data": GOOD, "legacy_id": str(judged)}]  # judged by the poller
    entries += [{"data": GOOD, "legacy_id": "99999"}, {"data": GOOD, "legacy_id": "abc"}]
    entries += [{"data": GOOD}]
    from ratebox import stream

    stream.ensure_group(redis_client, names.stream, names.group)
    stream.publish(redis_client, names.stream, entries)
    drain(settings, redis_url, adopted)
    rows = run(
        adopted,
        "SELECT id, status, error_code, consumer_name IS NOT NULL FROM raw_items ORDER BY id",
    )
    by_id = {r[0]: r for r in rows}
    assert all(by_id[i][1:] == ("error", 101, True) for i in pending)
    assert by_id[judged][3] is False  # the poller's verdict stands
    extra = [r for r in rows if r[0] > max(pending)]
    assert sorted(str(r[2]) for r in extra) == ["904", "904", "None"]
    stats = run(
        adopted,
        "SELECT processed, errors FROM stream_consumer_stats WHERE consumer_name = 'worker_001'",
    )
    assert stats == [(len(pending) + 3, len(pending) + 2)]
    assert redis_client.xpending(names.stream, names.group)["pending"] == 0


def poller(dsn: str, stop: threading.Event, judged: list[int]) -> None:
    with closing(psycopg2.connect(dsn)) as conn:
        while not stop.is_set():
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT id FROM raw_items WHERE status = 'pending' ORDER BY id"
                    " LIMIT 5 FOR UPDATE SKIP LOCKED"
                )
                ids = [i for (i,) in cur.fetchall()]
                if ids:
                    cur.execute(
                        "UPDATE raw_items SET status = 'done', processed_at = now(), poller = 'p'"
                        " WHERE id = ANY(%s)",
                        (ids,),
                    )
            conn.commit()
            judged.extend(ids)
            time.sleep(0.01)


def test_bridge_beside_a_legacy_poller_gives_each_row_one_verdict(
    make_config, redis_client, redis_url, adopted, names
):
    run(
        adopted,
        "INSERT INTO raw_items (data) SELECT %s::jsonb FROM generate_series(1, 3000)",
        (SHORT_PHONE,),
    )
    settings, _ = config_for(make_config, adopted)
    total = run(adopted, "SELECT count(*) FROM raw_items")[0][0]
    stop, judged = threading.Event(), []
    thread = threading.Thread(target=poller, args=(adopted, stop, judged))
    thread.start()
    try:
        counts = bridge.Bridge(settings, redis_url, adopted).run(follow=False)
        assert counts.published > 0
        drain(settings, redis_url, adopted)
    finally:
        stop.set()
        thread.join()
    # A second bridge run publishes what is still pending (rows the poller left), then drain.
    bridge.Bridge(settings, redis_url, adopted).run(follow=False)
    drain(settings, redis_url, adopted)
    assert run(adopted, "SELECT count(*) FROM raw_items") == [(total,)]
    assert run(adopted, "SELECT count(*) FROM raw_items WHERE status = 'pending'") == [(0,)]
    both = run(
        adopted, "SELECT count(*) FROM raw_items WHERE poller = 'p' AND consumer_name IS NOT NULL"
    )
    assert both == [(0,)]
    ours = run(adopted, "SELECT count(*) FROM raw_items WHERE consumer_name IS NOT NULL")[0][0]
    assert ours + len(judged) + 6 == total
    stats = run(adopted, "SELECT sum(processed) FROM stream_consumer_stats")[0][0]
    assert stats == ours


def test_a_restarted_bridge_publishes_nothing_twice_once_settled(
    make_config, redis_client, redis_url, adopted, names
):
    settings, _ = config_for(make_config, adopted)
    first = bridge.Bridge(settings, redis_url, adopted).run(follow=False)
    assert first.published == 6
    assert bridge.Bridge(settings, redis_url, adopted).run(follow=False).published == 0
    run(adopted, "INSERT INTO raw_items (data) VALUES (%s::jsonb)", (GOOD,))
    assert bridge.Bridge(settings, redis_url, adopted).run(follow=False).published == 1
    fields = [f for _, f in redis_client.xrange(names.stream)]
    assert {f[b"producer"] for f in fields} == {b"ratebox-bridge"}
    assert len({f[b"legacy_id"] for f in fields}) == 7


def test_a_bridge_sigkilled_mid_run_and_restarted_leaves_one_verdict_per_row(
    make_config, redis_client, redis_url, adopted, names
):
    import os
    import signal
    import subprocess
    import sys

    run(
        adopted,
        "INSERT INTO raw_items (data) SELECT %s::jsonb FROM generate_series(1, 60000)",
        (GOOD,),
    )
    settings, path = config_for(make_config, adopted)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, os.path.join(root, "bin", "ratebox-bridge"), "-c", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while redis_client.exists(names.stream) == 0 or redis_client.xlen(names.stream) < 5000:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run(
        [sys.executable, os.path.join(root, "bin", "ratebox-bridge"), "-c", str(path)],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert b"published" in done.stdout
    ids = {int(f[b"legacy_id"]) for _, f in redis_client.xrange(names.stream)}
    pending = {i for (i,) in run(adopted, "SELECT id FROM raw_items WHERE status = 'pending'")}
    assert pending <= ids
    drain(settings, redis_url, adopted, limit_s=120)
    assert run(adopted, "SELECT count(*) FROM raw_items WHERE status = 'pending'") == [(0,)]
    assert run(adopted, "SELECT count(*) FROM raw_items") == [(60012,)]
    assert run(adopted, "SELECT sum(processed) FROM stream_consumer_stats") == [(60006,)]


def test_compare_counts_agreement_and_disagreements(adopted):
    # The six judged rows have short phones (the rules say 101); the legacy said done for three.
    report = compare.compare(adopted, compile_rules(rules.DEFAULT_RULES))
    assert report.compared == 6
    assert report.agreed == 3
    assert report.confusion == {("done", "101"): 3, ("101", "101"): 3}
    samples = report.samples[("done", "101")]
    assert len(samples) == 3 and all("12345678901" not in s for s in samples)
    assert report.as_dict()["legacy"]["rows"] == 6
    assert run(adopted, "SELECT count(*) FROM raw_items WHERE consumer_name IS NOT NULL") == [(0,)]
    assert compare.compare(adopted, compile_rules(rules.DEFAULT_RULES), limit=2).compared == 2


def test_the_bridge_routes_rows_to_partitions_like_any_producer(
    make_config, redis_client, redis_url, adopted, names
):
    settings, _ = config_for(
        make_config, adopted, stream={"partitions": 3, "partition_key": "source"}
    )
    sources = ["crawler_a", "crawler_b", "api", "crawler_a", "api", "import"]
    pending = [
        i for (i,) in run(adopted, "SELECT id FROM raw_items WHERE status = 'pending' ORDER BY id")
    ]
    for i, source in zip(pending, sources, strict=True):
        run(
            adopted,
            "UPDATE raw_items SET data = data || jsonb_build_object('source', %s::text) WHERE id = %s",
            (source, i),
        )
    assert bridge.Bridge(settings, redis_url, adopted).run(follow=False).published == 6
    seen = {}
    for p in range(3):
        ids = [int(f[b"legacy_id"]) for _, f in redis_client.xrange(f"{{{names.stream}:{p}}}")]
        assert ids == sorted(ids)  # id order within each partition
        seen.update(dict.fromkeys(ids, p))
    want = {i: zlib.crc32(source.encode()) % 3 for i, source in zip(pending, sources, strict=True)}
    assert seen == want
    drain(settings, redis_url, adopted)
    rows = run(adopted, "SELECT id, stream_name FROM raw_items WHERE id = ANY(%s)", (pending,))
    assert {i: name for i, name in rows} == {i: f"{{{names.stream}:{p}}}" for i, p in want.items()}


SWEEPER = {"interval_s": 0.2, "min_idle_ms": 300, "ghost_idle_s": 3600}


def legacy_entries(redis_client, names, ids, data=GOOD):
    """Publish one entry per legacy row id, as the bridge does; returns {entry ID: row id}."""
    from ratebox import stream

    stream.ensure_group(redis_client, names.stream, names.group)
    entries = [
        {"data": data, "legacy_id": str(i), "producer": bridge.PRODUCER, "source": ""} for i in ids
    ]
    return dict(zip(stream.publish(redis_client, names.stream, entries), ids, strict=True))


def read_and_die(redis_client, names, consumer="worker_009"):
    """Deliver every new entry to ``consumer``, which never acknowledges them (it died)."""
    from ratebox import stream

    return [e for e, _ in stream.read(redis_client, names.stream, names.group, consumer, 1000)]


def table(dsn):
    """Every row of raw_items by id: status, code, consumer, deliveries, stream ID, poller."""
    found = run(
        dsn,
        "SELECT id, status, error_code, consumer_name, delivery_count, stream_id, poller"
        " FROM raw_items ORDER BY id",
    )
    return {r[0]: r[1:] for r in found}


def consumer_stats(dsn):
    found = run(
        dsn, "SELECT consumer_name, processed, errors, dead_lettered FROM stream_consumer_stats"
    )
    return {r[0]: r[1:] for r in found if any(r[1:])}


def sweep_until_settled(sweeper, redis_client, names, limit_s=60):
    deadline = time.monotonic() + limit_s
    while redis_client.xpending(names.stream, names.group)["pending"]:
        assert time.monotonic() < deadline, "the sweeper left entries pending"
        sweeper.loop()
        time.sleep(0.1)


def pending_ids(dsn):
    return [i for (i,) in run(dsn, "SELECT id FROM raw_items WHERE status = 'pending' ORDER BY id")]


def test_the_sweeper_puts_a_dead_consumers_legacy_verdicts_on_their_rows_once(
    make_config, redis_client, redis_url, adopted, names
):
    from ratebox.sweeper import NAME, Sweeper

    settings, _ = config_for(make_config, adopted, sweeper=SWEEPER)
    before = table(adopted)
    ids = pending_ids(adopted)
    published = legacy_entries(redis_client, names, ids, SHORT_PHONE)
    assert read_and_die(redis_client, names) == list(published)
    sweeper = Sweeper(settings, redis_url, adopted)
    try:
        sweep_until_settled(sweeper, redis_client, names)
        for _ in range(3):  # more sweeps change nothing
            sweeper.loop()
    finally:
        sweeper.shutdown()
    # The dead consumer's name comes back: nothing of its own is left to judge again.
    drain(settings, redis_url, adopted)
    after = table(adopted)
    assert sorted(after) == sorted(before)  # no row added
    for entry_id, i in published.items():
        assert after[i] == ("error", 101, NAME, 2, entry_id, None)
    assert all(after[i] == before[i] for i in before if i not in ids)
    assert consumer_stats(adopted) == {NAME: (len(ids), len(ids), 0)}
    assert redis_client.xpending(names.stream, names.group)["pending"] == 0


def test_a_dead_lettered_legacy_entry_gets_its_910_on_its_row_and_a_replay_adds_nothing(
    make_config, redis_client, redis_url, adopted, names
):
    from ratebox import cli, stream
    from ratebox.sweeper import NAME, Sweeper

    settings, path = config_for(make_config, adopted, sweeper=SWEEPER, workers={"max_retries": 3})
    before = table(adopted)
    ids = pending_ids(adopted)
    published = legacy_entries(redis_client, names, ids)
    pill = list(published)[2]
    read_and_die(redis_client, names)
    # Two more deliveries that each crashed before committing (as in test_sweeper).
    for _ in range(settings.workers.max_retries - 1):
        stream.claim(redis_client, names.stream, names.group, NAME, 0, [pill])
    sweeper = Sweeper(settings, redis_url, adopted)
    try:
        sweep_until_settled(sweeper, redis_client, names)
        assert (sweeper.totals.processed, sweeper.totals.dead_lettered) == (len(ids) - 1, 1)
    finally:
        sweeper.shutdown()
    after = table(adopted)
    assert sorted(after) == sorted(before)  # the 910 went on the row, not on a new one
    assert after[published[pill]] == ("error", 910, NAME, 4, pill, None)
    assert all(after[published[e]][:2] == ("done", None) for e in published if e != pill)
    judged = consumer_stats(adopted)
    assert judged == {NAME: (len(ids), 1, 1)}
    ((dead_id, fields),) = stream.entries_between(redis_client, names.dead_letter, "-", "+", 10)
    assert fields[b"legacy_id"] == str(published[pill]).encode()

    # Replayed after the cause is fixed: the row already holds its one verdict, the 910.
    assert cli.main_dlq(["-c", str(path), "replay", dead_id]) == 0
    assert redis_client.xlen(names.dead_letter) == 0
    replayed = stream.entries_between(redis_client, names.stream, "(" + pill, "+", 100)
    assert replayed[-1][1][b"legacy_id"] == str(published[pill]).encode()
    drain(settings, redis_url, adopted)
    assert table(adopted) == after
    assert consumer_stats(adopted) == judged
    assert redis_client.xpending(names.stream, names.group)["pending"] == 0


def test_replay_re_judges_the_legacy_rows_ratebox_judged_and_no_others(
    make_config, redis_client, redis_url, adopted, names, capsys
):
    from ratebox import cli

    settings, path = config_for(make_config, adopted)
    ids = pending_ids(adopted)
    polled = run(adopted, "SELECT id FROM raw_items WHERE status = 'done' ORDER BY id")[0][0]
    published = legacy_entries(redis_client, names, [*ids, polled])  # the last one lost the race
    drain(settings, redis_url, adopted)
    before = table(adopted)
    assert all(before[i][:3] == ("done", None, "worker_001") for i in ids)

    # The new rules: names of at least 12 characters ("An" has 2).
    stricter = [
        {
            "field": "name",
            "check": "min_length",
            "params": {"min": 12},
            "code": 401,
            "message": "Name too short for the CMS: {length} chars, minimum {min}",
        }
    ]
    config_for(make_config, adopted, rules=stricter)
    capsys.readouterr()
    assert cli.main_replay(["-c", str(path), "--from", "-"]) == 0
    out = capsys.readouterr().out
    assert out == (
        f"re-validated {len(published)} entries: {len(ids)} changed verdict, 0 unchanged,"
        " 0 skipped (pipeline verdicts), 0 without a row yet,"
        " 1 legacy rows judged by another (left alone)\n"
    )
    after = table(adopted)
    assert sorted(after) == sorted(before)  # updated in place, no row added
    for entry_id, i in published.items():
        if i == polled:
            assert after[i] == before[i]  # the poller's verdict stands
        else:
            assert after[i] == ("error", 401, "worker_001", 1, entry_id, None)
    assert all(after[i] == before[i] for i in before if i not in ids)
    errors = run(adopted, "SELECT errors FROM raw_items WHERE id = %s", (ids[0],))[0][0]
    assert [e["code"] for e in errors] == [401]
    assert consumer_stats(adopted) == {"worker_001": (len(ids), len(ids), 0)}
