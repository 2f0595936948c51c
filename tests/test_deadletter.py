"""Dead-letter tools and replay on real servers: masked listing, replay at most once, purge,
re-validation after a rules change, and the command lines."""

from __future__ import annotations

import threading
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import pytest
import redis

from ratebox import cli, deadletter, replay, stream
from ratebox.config import Settings
from ratebox.pipeline import Pipeline
from ratebox.rules import compile_rules
from tests.test_sweeper import (
    VALID,
    entries,
    make_settings,
    publish,
    read_as,
    rows,
    write_config,
)

SECRET_ITEM = dict(
    VALID,
    phone="0912345678",
    bank_account="9876543210123",
    email="secret.person@example.com",
    password="hunter2-very-secret",
)
SECRETS = ("0912345678", "9876543210123", "secret.person@example.com", "hunter2-very-secret")


@pytest.fixture
def pipeline(settings: Settings, redis_url: str, pg_schema_dsn: str) -> Any:
    """The sweeper's pipeline, as used to dead-letter entries; closed afterwards."""
    p = Pipeline(settings, "sweeper", redis_url, pg_schema_dsn, compile_rules(settings.rules))
    yield p
    p.reset()


@pytest.fixture
def settings(names: Any) -> Settings:
    return make_settings(names)


@pytest.fixture
def config_file(tmp_path: Path, names: Any, redis_url: str, pg_schema_dsn: str) -> str:
    """A ratebox.yaml for the command-line tests, on this test's servers and names."""
    return write_config(tmp_path, names, redis_url, pg_schema_dsn)


def dead_letter(
    client: redis.Redis, settings: Settings, pipeline: Pipeline, items: list[dict[str, Any]]
) -> list[str]:
    """Publish the items, deliver them, and dead-letter each as the sweeper would."""
    publish(client, settings, items)
    s = settings.stream
    stream.ensure_group(client, s.name, s.group)
    for entry in stream.read(client, s.name, s.group, "worker_009", 100):
        pipeline.dead_letter(entry, 4, "processing failed on 3 deliveries")
    return [entry_id for entry_id, _ in entries(client, s.dead_letter)]


def test_list_masks_personal_data_and_passwords(
    redis_client: redis.Redis, settings: Settings, pipeline: Pipeline
) -> None:
    ids = dead_letter(redis_client, settings, pipeline, [SECRET_ITEM])

    (entry,) = deadletter.list_entries(redis_client, settings.stream.dead_letter)

    assert entry.id == ids[0]
    assert entry.delivery_count == 4
    assert entry.reason == "processing failed on 3 deliveries"
    line = entry.line()
    for secret in SECRETS:
        assert secret not in line
    assert "******5678" in line and "*********0123" in line and "s***@example.com" in line


def test_list_masks_a_payload_that_is_not_json(
    redis_client: redis.Redis, settings: Settings
) -> None:
    redis_client.xadd(
        settings.stream.dead_letter, {"data": "call 0912345678 or secret.person@example.com"}
    )
    (entry,) = deadletter.list_entries(redis_client, settings.stream.dead_letter)
    assert "0912345678" not in entry.preview and "secret.person" not in entry.preview


def test_replay_puts_the_original_fields_back_at_most_once(
    redis_client: redis.Redis, settings: Settings, pipeline: Pipeline
) -> None:
    s = settings.stream
    first, second = dead_letter(
        redis_client, settings, pipeline, [VALID, dict(VALID, name="Le Van B")]
    )
    originals = dict(entries(redis_client, s.name))
    length = redis_client.xlen(s.name)

    done = deadletter.replay(redis_client, s.dead_letter, s.name, [first])
    again = deadletter.replay(redis_client, s.dead_letter, s.name, [first])

    assert [old for old, _ in done.moved] == [first] and done.missing == []
    assert again.moved == [] and again.missing == [first]
    assert redis_client.xlen(s.name) == length + 1
    new_id, fields = entries(redis_client, s.name)[-1]
    assert new_id == done.moved[0][1]
    assert fields == next(iter(originals.values()))  # the original fields, nothing added
    assert [entry_id for entry_id, _ in entries(redis_client, s.dead_letter)] == [second]

    everything = deadletter.replay(redis_client, s.dead_letter, s.name)
    assert [old for old, _ in everything.moved] == [second]
    assert redis_client.xlen(s.dead_letter) == 0


def test_concurrent_replays_of_one_entry_move_it_once(
    redis_client: redis.Redis, settings: Settings, pipeline: Pipeline, redis_url: str
) -> None:
    s = settings.stream
    (dead_id,) = dead_letter(redis_client, settings, pipeline, [VALID])
    length = redis_client.xlen(s.name)
    results: list[deadletter.Replayed] = []

    def replay_it() -> None:
        with closing(redis.Redis.from_url(redis_url)) as client:
            results.append(deadletter.replay(client, s.dead_letter, s.name, [dead_id]))

    threads = [threading.Thread(target=replay_it) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sum(len(r.moved) for r in results) == 1
    assert redis_client.xlen(s.name) == length + 1


def test_purge_drops_everything_and_says_how_much(
    redis_client: redis.Redis, settings: Settings, pipeline: Pipeline
) -> None:
    dead_letter(redis_client, settings, pipeline, [VALID, VALID, VALID])
    assert deadletter.purge(redis_client, settings.stream.dead_letter) == 3
    assert redis_client.xlen(settings.stream.dead_letter) == 0
    assert deadletter.purge(redis_client, settings.stream.dead_letter) == 0


def test_replay_range_updates_verdicts_after_a_rules_change(
    redis_client: redis.Redis, redis_url: str, pg_schema_dsn: str, names: Any, pipeline: Pipeline
) -> None:
    settings = make_settings(names)
    items = [
        dict(VALID, name="Nguyen Van Anh"),
        dict(VALID, name="Vo Thi Ba"),
        dict(VALID, phone="0123"),
        dict(VALID, name="Do Minh Quang"),
    ]
    ids = publish(redis_client, settings, items)
    published = entries(redis_client, settings.stream.name)
    read_as(redis_client, settings, "worker_001")
    pipeline.process(published[:3])  # the fourth entry has no row yet
    before = rows(pg_schema_dsn, settings)
    assert [before[i]["status"] for i in ids[:3]] == ["done", "done", "error"]

    # The new rules: names of at least 12 characters, and a phone may be short again.
    stricter = make_settings(
        names,
        rules=[
            {"code": 101, "enabled": False},
            {
                "field": "name",
                "check": "min_length",
                "params": {"min": 12},
                "code": 401,
                "message": "Name too short for the CMS: {length} chars, minimum {min}",
            },
        ],
    )
    counts = replay.replay_range(stricter, redis_url, pg_schema_dsn, ids[0], ids[-1])

    assert (counts.read, counts.changed, counts.unchanged, counts.missing) == (4, 2, 1, 1)
    after = rows(pg_schema_dsn, settings)
    assert after[ids[0]]["status"] == "done"  # 14 characters: unchanged
    assert (after[ids[1]]["status"], after[ids[1]]["error_code"]) == ("error", 401)
    assert (after[ids[2]]["status"], after[ids[2]]["error_code"]) == ("done", None)
    assert ids[3] not in after
    with closing(psycopg2.connect(pg_schema_dsn)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT errors, processed_at > created_at FROM raw_items WHERE stream_id = %s",
            (ids[1],),
        )
        errors, later = cur.fetchone() or (None, None)
    assert errors == [
        {"code": 401, "field": "name", "message": "Name too short for the CMS: 9 chars, minimum 12"}
    ]
    assert later

    again = replay.replay_range(stricter, redis_url, pg_schema_dsn, ids[0], "+")
    assert (again.changed, again.unchanged) == (0, 3)

    # Back to lenient rules: one error becomes done, and the consumer's total follows.
    lenient = make_settings(names, rules=[{"code": 101, "enabled": False}])
    replay.replay_range(lenient, redis_url, pg_schema_dsn, ids[0], "+")
    with closing(psycopg2.connect(pg_schema_dsn)) as conn, conn.cursor() as cur:
        cur.execute("SELECT sum(errors) FROM stream_consumer_stats")
        stats_errors = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM raw_items WHERE status = 'error'")
        assert stats_errors == cur.fetchone()[0] == 0


def test_replay_range_leaves_dead_lettered_rows_alone(
    redis_client: redis.Redis,
    redis_url: str,
    pg_schema_dsn: str,
    settings: Settings,
    pipeline: Pipeline,
) -> None:
    dead_letter(redis_client, settings, pipeline, [VALID])
    counts = replay.replay_range(settings, redis_url, pg_schema_dsn, "-")
    assert (counts.read, counts.skipped, counts.changed) == (1, 1, 0)
    assert {r["error_code"] for r in rows(pg_schema_dsn, settings).values()} == {910}


def test_times_become_millisecond_ids() -> None:
    assert replay.to_stream_id("2024-06-08T00:13:03+07:00") == "1717780383000"
    assert replay.to_stream_id("2024-06-07T17:13:03") == "1717780383000"  # UTC without offset
    assert replay.to_stream_id("2024-06-07T17:13:03Z") == "1717780383000"
    assert replay.to_stream_id("1717780383000-5") == "1717780383000-5"
    assert replay.to_stream_id("-") == "-"
    with pytest.raises(ValueError):
        replay.to_stream_id("yesterday")


def test_dlq_command_lists_masked_replays_and_purges(
    redis_client: redis.Redis,
    settings: Settings,
    pipeline: Pipeline,
    config_file: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ids = dead_letter(redis_client, settings, pipeline, [SECRET_ITEM, VALID, VALID])

    assert cli.main_dlq(["-c", config_file, "list"]) == 0
    out = capsys.readouterr().out
    assert all(i in out for i in ids)
    assert not any(secret in out for secret in SECRETS)

    assert cli.main_dlq(["-c", config_file, "replay", ids[0]]) == 0
    assert "replayed 1 entries" in capsys.readouterr().out
    assert cli.main_dlq(["-c", config_file, "replay", ids[0]]) == 1
    assert ids[0] in capsys.readouterr().err

    assert cli.main_dlq(["-c", config_file, "purge"]) == 2
    assert "--yes" in capsys.readouterr().err
    assert redis_client.xlen(settings.stream.dead_letter) == 2
    assert cli.main_dlq(["-c", config_file, "purge", "--yes"]) == 0
    assert "purged 2 entries" in capsys.readouterr().out
    assert redis_client.xlen(settings.stream.dead_letter) == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["replay"],
        ["replay", "1-0", "--all"],
        ["replay", "not-an-id"],
        ["list", "--count", "0"],
        ["drop"],
    ],
)
def test_dlq_command_refuses_bad_arguments_in_one_line(
    argv: list[str], config_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main_dlq(["-c", config_file, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")


@pytest.mark.parametrize("argv", [[], ["--from", "yesterday"], ["--from", "-", "--to", "soon"]])
def test_replay_command_refuses_bad_arguments_in_one_line(
    argv: list[str], config_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main_replay(["-c", config_file, *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")


def test_replay_command_reports_counts(
    redis_client: redis.Redis,
    settings: Settings,
    pipeline: Pipeline,
    config_file: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    publish(redis_client, settings, [VALID, VALID])
    published = entries(redis_client, settings.stream.name)
    read_as(redis_client, settings, "worker_001")
    pipeline.process(published)
    assert cli.main_replay(["-c", config_file, "--from", "2000-01-01T00:00:00Z"]) == 0
    assert "re-validated 2 entries: 0 changed verdict, 2 unchanged" in capsys.readouterr().out


def test_dead_letter_payload_preview_is_cut(redis_client: redis.Redis, settings: Settings) -> None:
    redis_client.xadd(settings.stream.dead_letter, {"data": orjson.dumps({"note": "x" * 1000})})
    (entry,) = deadletter.list_entries(redis_client, settings.stream.dead_letter)
    assert len(entry.preview) == deadletter.PREVIEW_CHARS and entry.preview.endswith("...")
