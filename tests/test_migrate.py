"""Migrations: the §6 contract in the database, applied once, safely, and never edited."""

from __future__ import annotations

import hashlib
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import psycopg2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ratebox import migrate, store
from ratebox.errors import ConfigError, ServerUnavailable

COLUMNS = {
    "raw_items": """id data source status error_code error_message errors created_at processed_at
        stream_name stream_id consumer_name delivery_count batch_id producer produced_at
        processing_ms""",
    "stream_consumer_stats": """stream_name consumer_name group_name processed errors
        dead_lettered total_processing_ms avg_processing_ms last_active hostname pid started_at
        processing_buckets""",
    "stream_processing_metrics": """minute stream_name consumer_name processed errors
        dead_lettered total_processing_ms avg_processing_ms max_processing_ms""",
    "stream_error_metrics": "minute stream_name error_code field count sample_message",
    "schema_migrations": "version filename checksum applied_at",
    "bridge_progress": "stream_name last_id updated_at",
    "v_stream_status": "status count",
    "v_recent_activity": "status count avg_processing_ms",
    "v_top_errors": "error_code field count sample_message",
}


def rows(dsn: str, statement: str, params: tuple = ()) -> list[tuple]:
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(statement, params)
        found = cur.fetchall() if cur.description else []
        conn.commit()
        return found


def migration(version: str, sql: str = "SELECT 1;") -> store.Migration:
    checksum = hashlib.sha256(sql.encode()).hexdigest()
    return (version, f"{version}_m.sql", checksum, sql)


class TestPending:
    def test_everything_is_pending_on_an_empty_database(self):
        files = [migration("001"), migration("002")]
        assert migrate.pending(files, {}) == files

    def test_applied_files_are_skipped_and_the_rest_kept_in_order(self):
        one, two, three = migration("001"), migration("002", "x"), migration("010", "y")
        assert migrate.pending([one, two, three], {"001": one[2]}) == [two, three]

    def test_a_version_matches_whatever_its_zero_padding(self):
        one = migration("001")
        assert migrate.pending([one], {"1": one[2]}) == []

    def test_a_changed_applied_file_is_refused_by_name(self):
        with pytest.raises(migrate.MigrationError, match=r"001_m\.sql was changed"):
            migrate.pending([migration("001", "SELECT 2;")], {"001": migration("001")[2]})

    def test_a_new_file_numbered_below_an_applied_one_is_refused(self):
        files = [migration("001"), migration("002"), migration("003")]
        applied = {"001": files[0][2], "003": files[2][2]}
        with pytest.raises(migrate.MigrationError, match=r"002_m\.sql is new but numbered below"):
            migrate.pending(files, applied)

    @given(st.integers(min_value=0, max_value=6), st.integers(min_value=0, max_value=6))
    def test_pending_is_what_follows_the_applied_prefix(self, total, done):
        files = [migration(f"{n:03d}", f"SELECT {n};") for n in range(1, total + 1)]
        applied = {v: checksum for v, _, checksum, _ in files[:done]}
        assert migrate.pending(files, applied) == files[done:]


class TestLoad:
    def test_files_come_in_numeric_order_with_their_sha256(self, tmp_path):
        for name in ("010_c.sql", "002_b.sql", "001_a.sql"):
            (tmp_path / name).write_text(f"-- {name}\nSELECT 1;\n")
        files = migrate.load(tmp_path)
        assert [f[1] for f in files] == ["001_a.sql", "002_b.sql", "010_c.sql"]
        raw = (tmp_path / "002_b.sql").read_bytes()
        assert files[1] == ("002", "002_b.sql", hashlib.sha256(raw).hexdigest(), raw.decode())

    @pytest.mark.parametrize("files", [["init.sql"], ["001_a.sql", "1_b.sql"], ["001_a.sql"]])
    def test_badly_named_duplicate_or_empty_files_are_refused(self, tmp_path, files):
        for name in files:
            (tmp_path / name).write_text("" if files == ["001_a.sql"] else "SELECT 1;")
        with pytest.raises(migrate.MigrationError):
            migrate.load(tmp_path)

    def test_the_schema_dir_of_the_checkout_is_found(self):
        assert migrate.schema_dir() == migrate.SCHEMA_DIR
        assert migrate.load(migrate.SCHEMA_DIR)[0][1] == "001_init.sql"


class TestSchema:
    def test_the_contract_tables_columns_and_views_exist(self, pg_schema_dsn):
        found: dict[str, set[str]] = {}
        for table, column in rows(
            pg_schema_dsn,
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema()",
        ):
            found.setdefault(table, set()).add(column)
        assert found == {table: set(columns.split()) for table, columns in COLUMNS.items()}
        views = rows(
            pg_schema_dsn,
            "SELECT table_name FROM information_schema.views WHERE table_schema = current_schema()",
        )
        assert {v for (v,) in views} == {"v_stream_status", "v_recent_activity", "v_top_errors"}

    def test_averages_are_generated_and_rows_are_unique_per_stream_entry(self, pg_schema_dsn):
        generated = rows(
            pg_schema_dsn,
            "SELECT table_name FROM information_schema.columns WHERE table_schema ="
            " current_schema() AND column_name = 'avg_processing_ms' AND is_generated = 'ALWAYS'",
        )
        assert {t for (t,) in generated} == {"stream_consumer_stats", "stream_processing_metrics"}
        insert = "INSERT INTO raw_items (data, status, stream_name, stream_id) VALUES ('{}', 'done', 's', '1-0')"
        rows(pg_schema_dsn, insert)
        with pytest.raises(psycopg2.errors.UniqueViolation):
            rows(pg_schema_dsn, insert)
        with pytest.raises(psycopg2.errors.CheckViolation):
            rows(pg_schema_dsn, insert.replace("'done'", "'lost'").replace("1-0", "2-0"))

    def test_time_range_queries_on_raw_items_use_the_brin_index(self, pg_schema_dsn):
        rows(
            pg_schema_dsn,
            "INSERT INTO raw_items (data, status, stream_name, stream_id, processed_at)"
            " SELECT '{}', 'done', 's', i::text, now() - i * interval '1 second'"
            " FROM generate_series(1, 20000) AS i; ANALYZE raw_items",
        )
        indexes = rows(
            pg_schema_dsn,
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
            " AND tablename = 'raw_items' AND indexdef LIKE '%%(processed_at)'",
        )
        assert [(name, "USING brin" in sql) for name, sql in indexes] == [
            ("raw_items_processed_at_brin", True)
        ]
        plan = rows(
            pg_schema_dsn,
            "EXPLAIN SELECT count(*) FROM raw_items WHERE processed_at < now() - interval '5 hours'",
        )
        assert any("raw_items_processed_at_brin" in line for (line,) in plan)

    def test_the_views_summarise_the_last_hour_of_metrics(self, pg_schema_dsn):
        rows(
            pg_schema_dsn,
            """
            INSERT INTO stream_processing_metrics
                (minute, stream_name, consumer_name, processed, errors, total_processing_ms)
            VALUES (date_trunc('minute', now()), 's', 'w1', 10, 3, 20),
                   (date_trunc('minute', now()) - interval '5 minutes', 's', 'w2', 30, 1, 60),
                   (now() - interval '2 hours', 's', 'w1', 1000, 1000, 1);
            INSERT INTO stream_error_metrics (minute, stream_name, error_code, field, count, sample_message)
            VALUES (date_trunc('minute', now()), 's', 101, 'phone', 2, 'newest'),
                   (date_trunc('minute', now()) - interval '1 minute', 's', 101, 'phone', 1, 'older'),
                   (date_trunc('minute', now()), 's', 900, '', 5, 'malformed'),
                   (now() - interval '2 hours', 's', 200, 'bank_account', 99, 'too old');
            """,
        )
        assert rows(pg_schema_dsn, "SELECT * FROM v_recent_activity ORDER BY status") == [
            ("done", 36, 2.0),
            ("error", 4, 2.0),
        ]
        assert rows(pg_schema_dsn, "SELECT * FROM v_top_errors") == [
            (900, "", 5, "malformed"),
            (101, "phone", 3, "newest"),
        ]


class TestRun:
    def test_a_second_run_applies_nothing(self, pg_schema_dsn):
        assert migrate.run(pg_schema_dsn) == []
        recorded = rows(pg_schema_dsn, "SELECT version, filename, checksum FROM schema_migrations")
        files = migrate.load(migrate.schema_dir())
        assert recorded == [(v, name, checksum) for v, name, checksum, _ in files]

    def test_concurrent_runs_apply_each_file_once(self, empty_schema_dsn):
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(migrate.run, [empty_schema_dsn] * 4))
        every_file = [name for _, name, _, _ in migrate.load(migrate.schema_dir())]
        assert sorted(results) == [[], [], [], every_file]
        assert rows(empty_schema_dsn, "SELECT count(*) FROM schema_migrations") == [
            (len(every_file),)
        ]

    def test_a_changed_applied_file_is_refused(self, empty_schema_dsn, tmp_path):
        shutil.copy(migrate.schema_dir() / "001_init.sql", tmp_path)
        assert migrate.run(empty_schema_dsn, tmp_path) == ["001_init.sql"]
        with open(tmp_path / "001_init.sql", "a") as fh:
            fh.write("\n-- a harmless looking edit\n")
        with pytest.raises(migrate.MigrationError, match=r"001_init\.sql was changed") as failure:
            migrate.run(empty_schema_dsn, tmp_path)
        assert "\n" not in str(failure.value)

    def test_a_failing_file_leaves_nothing_of_itself_behind(self, empty_schema_dsn, tmp_path):
        (tmp_path / "001_a.sql").write_text("CREATE TABLE a (id int);")
        (tmp_path / "002_b.sql").write_text("CREATE TABLE b (id int);\nSELEC broken;")
        with pytest.raises(migrate.MigrationError, match=r"^002_b\.sql failed: syntax error"):
            migrate.run(empty_schema_dsn, tmp_path)
        assert rows(empty_schema_dsn, "SELECT filename FROM schema_migrations") == [("001_a.sql",)]
        assert rows(empty_schema_dsn, "SELECT to_regclass('b')") == [(None,)]
        (tmp_path / "002_b.sql").write_text("CREATE TABLE b (id int);")
        assert migrate.run(empty_schema_dsn, tmp_path) == ["002_b.sql"]


class TestConnect:
    @pytest.mark.parametrize(
        "dsn",
        [
            "postgresql://ratebox:s3cret@127.0.0.1:1/validator",
            "host=127.0.0.1 port=1 user=ratebox password='s3 cret' dbname=validator",
            "postgresql://127.0.0.1:1/validator?user=ratebox&password=s3cret",
        ],
    )
    def test_an_unreachable_server_is_named_without_its_password(self, dsn):
        with pytest.raises(ServerUnavailable, match="cannot reach PostgreSQL at") as failure:
            store.connect(dsn)
        message = str(failure.value)
        assert "s3" not in message and "***" in message and "127.0.0.1" in message
        assert "\n" not in message

    def test_an_invalid_dsn_is_a_configuration_error_without_its_password(self):
        with pytest.raises(ConfigError) as failure:
            store.connect("host=h password=se cret")
        assert "cret" not in str(failure.value)

    def test_the_connection_carries_the_application_name(self, postgres_dsn):
        with closing(store.connect(postgres_dsn, application_name="ratebox test")) as conn:
            with conn.cursor() as cur:
                cur.execute("SHOW application_name")
                assert cur.fetchone() == ("ratebox test",)
            assert not conn.autocommit
