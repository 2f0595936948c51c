"""The monitor on real servers: its figures are what was published and processed, it shows
them on a real terminal and over /metrics, survives outages, and never shows personal data."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from collections.abc import Callable, Iterable
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
import yaml
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from ratebox import config, dashboard, embedded, monitor, producer, store, stream, stream_lag
from ratebox.config import Settings
from ratebox.metrics import registry_for
from ratebox.rate import RateWindow
from ratebox.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
MONITOR = [sys.executable, str(ROOT / "bin" / "ratebox-monitor")]

#: Published, then 600 processed by worker_001, 400 by worker_002, 50 held by worker_003.
PUBLISHED, FIRST, SECOND, HELD = 1200, 600, 400, 50
BATCH = 200
#: Personal data and a password the outputs must never show in full.
SECRET = "s3cretPa55"
PII_SAMPLE = "Invalid email format: nguyen.van.a@example.com, phone 0912345678, acct 123456789012"
PII = ("nguyen.van.a@example.com", "0912345678", "123456789012", SECRET)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]")


# -- helpers ----------------------------------------------------------------------------------


def make_settings(names: Any, **sections: dict[str, Any]) -> Settings:
    data = {
        "stream": {"name": names.stream, "group": names.group, "dead_letter": names.dead_letter},
        "workers": {"batch_size": BATCH},
        **sections,
    }
    return config.from_mapping(data, {})


def write_config(tmp_path: Path, redis_url: str, dsn: str, names: Any, **monitor_keys: Any) -> Path:
    path = tmp_path / "ratebox.yaml"
    data = {
        "redis": {"url": redis_url},
        "postgres": {"dsn": dsn, "migrate_on_start": False},
        "stream": {"name": names.stream, "group": names.group, "dead_letter": names.dead_letter},
        "monitor": {"refresh_s": 0.5, "metrics_listen": None, **monitor_keys},
        "embedded": {"dir": str(tmp_path / "var")},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def server_free_environ() -> dict[str, str]:
    """This environment without the overrides, so the test's YAML decides."""
    overrides = ("REDIS_URL", "POSTGRES_DSN", "REDIS_STREAM", "CONSUMER_GROUP")
    return {k: v for k, v in os.environ.items() if k not in overrides}


def sql(dsn: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(statement, params)
        found = cur.fetchall() if cur.description else []
        conn.commit()
        return found


def fill(settings: Settings, client: redis.Redis, redis_url: str, dsn: str) -> None:
    """Publish, process with real workers, and leave some entries pending and some undelivered."""
    producer.produce(client, settings.stream.name, PUBLISHED)
    for name, batches in (("worker_001", FIRST // BATCH), ("worker_002", SECOND // BATCH)):
        worker = Worker(settings, name, redis_url, dsn)
        for _ in range(batches):
            assert worker.loop() == BATCH
        worker.pipeline.reset()
    stream.read(client, settings.stream.name, settings.stream.group, "worker_003", HELD)


def expected_db(dsn: str) -> dict[str, Any]:
    """The same figures counted the slow, obvious way from raw_items."""
    by_status = dict(sql(dsn, "SELECT status, count(*) FROM raw_items GROUP BY status"))
    by_consumer = {
        name: (total, errors)
        for name, total, errors in sql(
            dsn,
            "SELECT consumer_name, count(*), count(*) FILTER (WHERE status = 'error')"
            " FROM raw_items GROUP BY consumer_name",
        )
    }
    failures = {
        (code, field): n
        for code, field, n in sql(
            dsn,
            "SELECT (f->>'code')::int, coalesce(f->>'field', ''), count(*)"
            " FROM raw_items, jsonb_array_elements(errors) AS f GROUP BY 1, 2",
        )
    }
    return {"status": by_status, "consumers": by_consumer, "failures": failures}


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], limit_s: float = 30, step: float = 0.1) -> Any:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(step)
    return predicate()


def scrape(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            return reply.read().decode()
    except OSError:
        return ""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics text by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def assert_no_personal_data(outputs: Iterable[str], values: Iterable[str]) -> None:
    # As a whole token: an 8-digit account may occur by chance inside a 13-digit stream ID.
    for output in outputs:
        for value in values:
            shown = re.search(rf"(?<![0-9]){re.escape(value)}(?![0-9])", output)
            assert shown is None, f"{value!r} shown in full"


def published_values(client: redis.Redis, stream_name: str) -> set[str]:
    """Every phone, bank account and e-mail that went into the stream (long enough to matter)."""
    found: set[str] = set()
    for _, fields in client.xrange(stream_name) or []:
        item = json.loads((fields or {})[b"data"])
        for key in ("phone", "bank_account", "email"):
            value = item.get(key)
            if isinstance(value, str) and len(value) >= 8:
                found.add(value)
    return found


def as_text(renderable: Any, width: int = 160) -> str:
    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


@pytest.fixture
def filled(names, redis_client, redis_url, pg_schema_dsn) -> Settings:
    settings = make_settings(names)
    fill(settings, redis_client, redis_url, pg_schema_dsn)
    return settings


# -- figures ----------------------------------------------------------------------------------


def test_the_report_shows_what_was_published_and_processed(
    filled, redis_client, pg_schema_dsn
) -> None:
    conn = store.connect(pg_schema_dsn)
    try:
        snap = monitor.collect(filled, redis_client, conn)
    finally:
        conn.close()
    assert snap["servers"] == {
        "redis": {"available": True, "error": None},
        "postgres": {"available": True, "error": None},
    }
    assert snap["stream"]["length"] == PUBLISHED
    assert snap["stream"]["memory_bytes"] > 0
    assert snap["stream"]["dead_letter"]["length"] == 0
    ids = [entry_id.decode() for entry_id, _ in redis_client.xrange(filled.stream.name)]
    assert (snap["stream"]["first_id"], snap["stream"]["last_id"]) == (ids[0], ids[-1])
    (group,) = snap["groups"]
    delivered = FIRST + SECOND + HELD
    assert group["name"] == filled.stream.group
    assert (group["consumers"], group["pending"]) == (3, HELD)
    assert (group["lag"], group["lag_source"] in ("read", "counted")) == (
        PUBLISHED - delivered,
        True,
    )
    assert group["last_delivered"] == ids[delivered - 1]
    pending = {c["name"]: c["pending"] for c in group["consumer_list"]}
    assert pending == {"worker_001": 0, "worker_002": 0, "worker_003": HELD}
    assert all(0 <= c["idle_s"] < 600 for c in group["consumer_list"])

    truth = expected_db(pg_schema_dsn)
    totals = snap["database"]["totals"]
    assert {k: totals[k] for k in ("done", "error")} == {
        "done": truth["status"].get("done", 0),
        "error": truth["status"].get("error", 0),
    }
    assert (totals["pending"], totals["dead_lettered"]) == (0, 0)
    assert snap["database"]["processed"] == FIRST + SECOND
    perf = {c["name"]: c for c in snap["consumer_performance"]}
    assert {n: (c["processed"], c["errors"]) for n, c in perf.items()} == truth["consumers"]
    assert perf["worker_001"]["error_rate"] == pytest.approx(
        truth["consumers"]["worker_001"][1] / FIRST
    )
    assert all(c["hostname"] and c["pid"] and c["last_active_s"] < 600 for c in perf.values())
    recent = {r["status"]: r["count"] for r in snap["recent_activity"]}
    assert recent == {k: v for k, v in truth["status"].items() if v}
    top = {(e["code"], e["field"]): e["count"] for e in snap["top_errors"]}
    assert top == truth["failures"]  # six codes: all fit in the top ten
    assert snap["throughput"]["per_s_1m"] > 0
    assert sum(m["processed"] for m in snap["throughput"]["minutes"]) == FIRST + SECOND
    json.dumps(snap)  # the snapshot is the JSON report: it must encode as it is


def test_the_database_section_gives_one_exact_row_figure_and_no_estimate(
    filled, redis_client, pg_schema_dsn
) -> None:
    """'processed' counts this stream's rows exactly; a planner estimate beside it disagreed."""
    conn = store.connect(pg_schema_dsn)
    try:
        snap = monitor.collect(filled, redis_client, conn)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM raw_items")
            (rows,) = cur.fetchone()
    finally:
        conn.close()
    assert snap["database"]["processed"] == rows == FIRST + SECOND
    assert set(snap["database"]) == {"totals", "processed"}
    text = as_text(monitor.render(snap))
    assert "raw_items rows" not in text and f"{rows:,}" in text


def test_server_state_is_told_in_words_not_only_colour(filled, redis_client) -> None:
    snap = monitor.collect(filled, redis_client, None, pg_error="connection refused")
    text = as_text(monitor.render(snap))
    header = text.splitlines()[0]
    assert "redis up" in header and "postgres DOWN" in header


def _deliver_and_ack(client: redis.Redis, names: Any, n: int) -> None:
    """n entries delivered to worker_001 and acknowledged, as a worker would."""
    while n > 0:
        entries = stream.read(client, names.stream, names.group, "worker_001", min(n, 10_000))
        stream.ack(client, names.stream, names.group, [entry_id for entry_id, _ in entries])
        n -= len(entries)


def _as_redis_62(client: redis.Redis, names: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """XINFO GROUPS as Redis 6.2 answers it (no lag), whatever server this test runs on."""
    info = stream.stream_info(client, names.stream)
    assert info is not None
    (group,) = stream.groups(client, names.stream)
    return {k: v for k, v in group.items() if k not in ("lag", "entries-read")}, info


def test_lag_without_a_lag_field_is_counted_behind_older_retained_entries(
    names, redis_client
) -> None:
    # An hour of retained, acknowledged entries, then a burst: the IDs' timestamps say nothing
    # about how many are queued, so only a count is right.
    producer.produce(redis_client, names.stream, 50_000)
    stream.ensure_group(redis_client, names.stream, names.group)
    _deliver_and_ack(redis_client, names, 50_000)
    producer.produce(redis_client, names.stream, 200_000)
    group, info = _as_redis_62(redis_client, names)
    assert stream.group_lag(redis_client, names.stream, group, info) == (200_000, "counted")

    counter = stream.LagCounter()
    assert stream.group_lag(redis_client, names.stream, group, info, counter) == (
        200_000,
        "counted",
    )
    # Then workers take 30,000 and producers add 7,000: the kept count follows both.
    _deliver_and_ack(redis_client, names, 30_000)
    producer.produce(redis_client, names.stream, 7_000)
    group, info = _as_redis_62(redis_client, names)
    assert stream.group_lag(redis_client, names.stream, group, info, counter) == (
        177_000,
        "counted",
    )


def test_a_backlog_too_long_to_count_in_one_sample_is_unknown_not_a_guess(
    names, redis_client, monkeypatch
) -> None:
    producer.produce(redis_client, names.stream, 100)
    stream.ensure_group(redis_client, names.stream, names.group)
    stream.read(redis_client, names.stream, names.group, "worker_001", 30)
    group, info = _as_redis_62(redis_client, names)
    assert stream.group_lag(redis_client, names.stream, group, info) == (70, "counted")
    monkeypatch.setattr(stream_lag, "CHUNK", 10)
    monkeypatch.setattr(stream_lag, "MAX_CHUNKS", 3)
    assert stream.group_lag(redis_client, names.stream, group, info) == (None, "unknown")
    snap = {"lag": None, "lag_source": "unknown"}
    assert dashboard._lag(snap) == "unknown"


def test_the_current_rate_of_committed_rows_sits_beside_the_minute_history(
    filled, redis_client, pg_schema_dsn
) -> None:
    conn = store.connect(pg_schema_dsn)
    try:
        snap = monitor.collect(filled, redis_client, conn)
    finally:
        conn.close()
    assert "last ~10 s" in as_text(monitor.render(snap))  # one report: no second sample yet
    window = RateWindow()
    processed = snap["database"]["processed"]
    window.add(time.monotonic() - 5.0, processed - 5_000)  # 5,000 rows in the last 5 s
    monitor._add_current_rate(snap, window)
    assert 900 < snap["throughput"]["per_s_now"] <= 1_000
    text = as_text(monitor.render(snap))
    assert "last ~10 s" in text and "last 1–2 min" in text and "msg/s" in text
    assert " (10s) " in dashboard.snapshot_line(snap)


def test_the_process_tree_comes_from_the_status_file_with_cpu_and_memory(
    filled, redis_client, pg_schema_dsn, tmp_path
) -> None:
    status = tmp_path / "status.json"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        status.write_text(
            json.dumps(
                {
                    "supervisor_pid": os.getpid(),
                    "started_at": time.time() - 90,
                    "children": [
                        {
                            "name": "worker_001",
                            "role": "worker",
                            "pid": sleeper.pid,
                            "state": "running",
                            "restarts": 2,
                            "started_at": time.time() - 5,
                            "last_exit": f"killed by SIGKILL; redis://:{SECRET}@db:6379/0",
                        },
                        {
                            "name": "sweeper",
                            "role": "sweeper",
                            "pid": 999_999_999,
                            "state": "backoff",
                            "restarts": 5,
                            "started_at": None,
                            "last_exit": "exited with status 1",
                        },
                    ],
                }
            )
        )
        sampler = monitor.ProcessSampler()
        snap = monitor.collect(filled, redis_client, None, str(status), sampler=sampler)
        snap = monitor.collect(filled, redis_client, None, str(status), sampler=sampler)
    finally:
        sleeper.kill()
        sleeper.wait()
    procs = snap["processes"]
    assert procs["supervisor_up"] and procs["rss_bytes"] > 0
    worker, sweeper = procs["children"]
    assert (worker["alive"], worker["restarts"], worker["rss_bytes"] > 0) == (True, 2, True)
    assert worker["cpu_percent"] is not None and SECRET not in worker["last_exit"]
    assert (sweeper["alive"], sweeper["cpu_percent"], sweeper["restarts"]) == (False, None, 5)
    families = samples(generate_latest(registry_for(lambda: snap)).decode())
    restarts = ("ratebox_worker_restarts_total", (("name", "sweeper"), ("role", "sweeper")))
    assert families[restarts] == 5
    assert families[("ratebox_supervisor_up", ())] == 1
    assert "worker_001" in as_text(monitor.render(snap))


def test_desired_and_running_workers_and_the_last_reason_come_from_the_status_file(
    filled, redis_client, tmp_path
) -> None:
    status = tmp_path / "status.json"
    worker = {"role": "worker", "pid": None, "restarts": 0, "started_at": None}
    children = [
        {**worker, "name": "worker_001", "state": "running"},
        {**worker, "name": "worker_002", "state": "running"},
        {**worker, "name": "worker_003", "state": "starting"},
    ]
    reason = "backlog 48,210 for 2 workers > 5,000 each: 2 → 4\x1b[2J"
    workers = {"desired": 4, "running": 2, "autoscale": True, "reason": reason, "changed_at": 1.0}
    document = {"supervisor_pid": os.getpid(), "started_at": time.time(), "children": children}
    status.write_text(json.dumps({**document, "workers": workers}))
    snap = monitor.collect(filled, redis_client, None, str(status))
    families = samples(generate_latest(registry_for(lambda: snap)).decode())
    assert families[("ratebox_workers_desired", ())] == 4
    assert families[("ratebox_workers_running", ())] == 2
    shown = as_text(monitor.render(snap))
    assert "workers 2/4 running (autoscale)" in shown
    assert "backlog 48,210 for 2 workers > 5,000 each: 2 → 4\\x1b[2J" in shown
    assert "\x1b" not in snap["processes"]["workers"]["reason"]
    assert "workers 2/4 running" in monitor.snapshot_line(snap)

    # A status file without the figures: running is counted, desired is not guessed.
    status.write_text(json.dumps(document))
    snap = monitor.collect(filled, redis_client, None, str(status))
    families = samples(generate_latest(registry_for(lambda: snap)).decode())
    assert families[("ratebox_workers_running", ())] == 2
    assert ("ratebox_workers_desired", ()) not in families
    assert "workers 2/? running" in as_text(monitor.render(snap))


# -- outages ----------------------------------------------------------------------------------


def test_unreachable_servers_show_as_unavailable_with_their_passwords_hidden(
    names, tmp_path
) -> None:
    settings = make_settings(names)
    client = stream.connect(f"redis://:{SECRET}@127.0.0.1:1/0", check=False)
    snap = monitor.report(
        settings,
        f"redis://:{SECRET}@127.0.0.1:1/0",
        f"postgresql://ratebox:{SECRET}@127.0.0.1:1/validator",
        str(tmp_path / "no-such-status.json"),
    )
    client.close()
    assert not snap["servers"]["redis"]["available"]
    assert not snap["servers"]["postgres"]["available"]
    assert snap["stream"] is None and snap["database"] is None
    assert snap["processes"]["available"] is False
    shown = [
        json.dumps(snap),
        monitor.snapshot_line(snap),
        as_text(monitor.render(snap)),
        as_text(monitor.render(snap, screen=True), width=80),
        generate_latest(registry_for(lambda: snap)).decode(),
    ]
    assert "unavailable" in shown[1] and "unavailable" in shown[2]
    assert_no_personal_data(shown, [SECRET])
    families = samples(shown[-1])
    assert families[("ratebox_redis_up", ())] == 0 and families[("ratebox_postgres_up", ())] == 0


def test_a_database_lost_between_refreshes_is_shown_then_recovered(
    filled, redis_client, pg_schema_dsn, redis_url
) -> None:
    mon = monitor.Monitor(filled, redis_url, pg_schema_dsn, live=False)
    first = mon.loop()
    assert first["servers"]["postgres"]["available"]
    with closing(psycopg2.connect(pg_schema_dsn)) as admin:
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'ratebox monitor'"
            )
    lost = mon.loop()
    assert not lost["servers"]["postgres"]["available"]
    assert lost["stream"]["length"] == PUBLISHED  # Redis figures still shown
    back = mon.loop()
    assert back["servers"]["postgres"]["available"]
    mon.shutdown()


# -- personal data --------------------------------------------------------------------------


def test_no_output_shows_personal_data_or_passwords(
    filled, names, redis_client, redis_url, pg_schema_dsn, tmp_path
) -> None:
    # A sample written by someone else (an older version, a hand-made row) is masked too.
    sql(
        pg_schema_dsn,
        "INSERT INTO stream_error_metrics (minute, stream_name, error_code, field, count,"
        " sample_message) VALUES (date_trunc('minute', now()), %s, 399, 'email', 100000, %s)",
        (filled.stream.name, PII_SAMPLE),
    )
    values = published_values(redis_client, filled.stream.name) | set(PII)
    conn = store.connect(pg_schema_dsn)
    snap = monitor.collect(filled, redis_client, conn)
    conn.close()
    assert snap["top_errors"][0]["count"] == 100000
    path = write_config(tmp_path, redis_url, pg_schema_dsn, names)
    env = server_free_environ()
    cli_json = subprocess.run(
        [*MONITOR, "-c", str(path), "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    cli_text = subprocess.run(
        [*MONITOR, "-c", str(path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert cli_json.returncode == 0 and cli_text.returncode == 0, cli_json.stderr + cli_text.stderr
    assert json.loads(cli_json.stdout)["top_errors"][0]["count"] == 100000
    outputs = [
        json.dumps(snap),
        monitor.snapshot_line(snap),
        as_text(monitor.render(snap)),
        as_text(monitor.render(snap, screen=True), width=80),
        generate_latest(registry_for(lambda: snap)).decode(),
        cli_json.stdout,
        cli_text.stdout,
        cli_text.stderr,
    ]
    assert "@example.com" in outputs[0]  # the sample is there, masked: u***@example.com
    assert_no_personal_data(outputs, values)


# -- the command ------------------------------------------------------------------------------


def test_the_command_prints_every_section_and_the_same_figures_as_json(
    filled, names, redis_url, pg_schema_dsn, tmp_path
) -> None:
    path = write_config(tmp_path, redis_url, pg_schema_dsn, names)
    env = {**server_free_environ(), "COLUMNS": "140"}
    text = subprocess.run(
        [*MONITOR, "-c", str(path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert text.returncode == 0, text.stderr
    for title in (
        "Stream", "Consumer groups", "Consumers", "Database", "Consumer performance",
        "Recent activity (1 h)", "Top errors (1 h)", "Throughput", "Processes",
    ):  # fmt: skip
        assert title in text.stdout
    assert f"{PUBLISHED:,}" in text.stdout
    data = json.loads(
        subprocess.run(
            [*MONITOR, "-c", str(path), "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )
    assert data["stream"]["length"] == PUBLISHED
    assert data["groups"][0]["pending"] == HELD
    assert data["database"]["processed"] == FIRST + SECOND
    assert "no supervisor status file" in data["processes"]["error"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["continuous"], "give the refresh interval in SECONDS"),
        (["continuous", "soon"], "must be a number of seconds"),
        (["continuous", "0"], "must be a number of seconds"),
        (["sometimes"], "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args, message, tmp_path) -> None:
    done = subprocess.run(
        [*MONITOR, "-c", str(tmp_path / "absent.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert (
        message in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    )


def test_a_report_with_a_server_down_still_prints_and_exits_1(names, tmp_path) -> None:
    path = write_config(
        tmp_path, f"redis://:{SECRET}@127.0.0.1:1/0", "postgresql://u@127.0.0.1:1/x", names
    )
    done = subprocess.run(
        [*MONITOR, "-c", str(path)],
        env=server_free_environ(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "unavailable" in done.stdout and "Stream" in done.stdout
    assert done.stderr.startswith("error: unavailable: redis") and SECRET not in done.stderr


# -- live view, log lines and /metrics ---------------------------------------------------------


def read_screen(fd: int, seconds: float) -> str:
    out = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


def test_the_live_view_draws_every_section_on_an_80x24_terminal_and_term_exits_0(
    filled, names, redis_url, pg_schema_dsn, tmp_path
) -> None:
    path = write_config(tmp_path, redis_url, pg_schema_dsn, names)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    child = subprocess.Popen(
        [*MONITOR, "-c", str(path), "continuous", "0.5"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**server_free_environ(), "TERM": "xterm-256color"},
        start_new_session=True,
        close_fds=True,
    )
    os.close(slave)
    try:
        screen = ANSI.sub("", read_screen(master, 4))
        assert child.poll() is None, screen
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=15) == 0
        screen += ANSI.sub("", read_screen(master, 1))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(master)
    # The compact form: groups are one line each ("Group <name> ..."), not a titled table.
    for title in (
        "RateBox monitor", "Stream", f"Group {names.group}", "Consumers", "Database",
        "Recent activity (1 h)", "Top errors (1 h)", "Throughput", "Processes",
    ):  # fmt: skip
        assert title in screen
    assert f"len {PUBLISHED:,}" in screen and f"pending {HELD}" in screen
    assert "worker_003" in screen
    assert "Traceback" not in screen


def test_metrics_and_log_lines_without_a_terminal_match_the_servers(
    filled, names, redis_client, redis_url, pg_schema_dsn, tmp_path
) -> None:
    port = free_port()
    path = write_config(
        tmp_path, redis_url, pg_schema_dsn, names, metrics_listen=f"127.0.0.1:{port}"
    )
    log_path = tmp_path / "monitor.log"
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            [*MONITOR, "-c", str(path), "continuous", "0.5", "--metrics"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=server_free_environ(),
        )
    try:
        text = wait_for(lambda: (t := scrape(port)) and "ratebox_stream_length" in t and t)
        assert text, log_path.read_text()
        time.sleep(1.2)  # at least two log lines
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=15) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    found = samples(text)
    s = (("stream", names.stream),)
    g = (("group", names.group), ("stream", names.stream))
    assert found[("ratebox_stream_length", s)] == PUBLISHED
    assert found[("ratebox_group_pending", g)] == HELD
    assert found[("ratebox_group_lag", g)] == PUBLISHED - FIRST - SECOND - HELD
    assert found[("ratebox_group_consumers", g)] == 3
    held = ("ratebox_consumer_pending", (("consumer", "worker_003"), ("group", names.group)))
    assert found[held] == HELD
    truth = expected_db(pg_schema_dsn)
    for name, (processed, errors) in truth["consumers"].items():
        c = (("consumer", name),)
        assert found[("ratebox_processed_total", c)] == processed
        assert found[("ratebox_errors_total", c)] == errors
        assert found[("ratebox_dead_lettered_total", c)] == 0
        assert found[("ratebox_processing_seconds_count", c)] == processed
        assert found[("ratebox_processing_seconds_sum", c)] >= 0
        # The workers' bucket counts add up to every verdict they wrote.
        inf = ("ratebox_processing_seconds_bucket", (("consumer", name), ("le", "+Inf")))
        assert found[inf] == processed
    # worker_003 holds entries added when the test began: the oldest is older than nothing.
    assert found[("ratebox_group_oldest_pending_seconds", g)] > 0
    for (code, field), count in truth["failures"].items():
        key = ("ratebox_errors_last_hour", (("code", str(code)), ("field", field)))
        assert found[key] == count
    for status in ("done", "error"):
        assert found[("ratebox_items", (("status", status),))] == truth["status"][status]
    assert found[("ratebox_redis_up", ())] == 1 and found[("ratebox_postgres_up", ())] == 1
    assert found[("ratebox_supervisor_up", ())] == 0  # no supervisor status file
    logged = log_path.read_text()
    # Stream names are not matched: a test suffix of 8 digits is masked like a number.
    lines = [line for line in logged.splitlines() if f"len={PUBLISHED:,} " in line]
    assert len(lines) >= 2, logged
    assert "[monitor] stream " in lines[0] and f"pending={HELD}" in lines[0]
    assert_no_personal_data([logged, text], published_values(redis_client, names.stream))


def test_a_standalone_monitor_leaves_the_supervisors_metrics_port_alone(
    filled, names, redis_url, pg_schema_dsn, tmp_path
) -> None:
    # The supervisor's monitor holds the configured port; a second monitor must not fight it.
    with closing(socket.socket()) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(
            tmp_path, redis_url, pg_schema_dsn, names, metrics_listen=f"127.0.0.1:{port}"
        )
        log_path = tmp_path / "monitor.log"
        with open(log_path, "wb") as log:
            child = subprocess.Popen(
                [*MONITOR, "-c", str(path), "continuous", "0.5"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=server_free_environ(),
            )
        try:
            wait_for(lambda: "len=" in log_path.read_text())
            child.send_signal(signal.SIGTERM)
            assert child.wait(timeout=15) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    logged = log_path.read_text()
    assert "/metrics" not in logged and "ERROR" not in logged, logged


def test_an_80_column_report_shows_whole_worker_names(filled, redis_client, pg_schema_dsn) -> None:
    conn = store.connect(pg_schema_dsn)
    try:
        snap = monitor.collect(filled, redis_client, conn)
    finally:
        conn.close()
    text = as_text(monitor.render(snap), width=80)
    assert "worker_001" in text and "worker_002" in text
    assert "worker…" not in text


def test_a_live_monitor_run_by_hand_stops_when_its_terminal_hangs_up(
    names, redis_url, pg_schema_dsn, tmp_path
) -> None:
    path = write_config(tmp_path, redis_url, pg_schema_dsn, names)
    log_path = tmp_path / "monitor.log"
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            [*MONITOR, "-c", str(path), "continuous", "0.5"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=server_free_environ(),
        )
    try:
        wait_for(lambda: "len=" in log_path.read_text())
        child.send_signal(signal.SIGHUP)
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_an_idle_replayed_by_a_redis_restart_is_shown_as_a_lower_bound(
    names, pg_schema_dsn, tmp_path_factory
) -> None:
    var = tmp_path_factory.mktemp("restarted_redis")
    url = embedded.ensure_redis(var)  # with its append-only file, as the embedded one runs
    try:
        client = redis.Redis.from_url(url)
        client.xgroup_create(names.stream, names.group, id="0", mkstream=True)
        client.xadd(names.stream, {"data": "{}"})
        client.xreadgroup(names.group, "worker_001", {names.stream: ">"})
        time.sleep(3)
        embedded.stop_redis(var)
        url = embedded.ensure_redis(var)
        client = redis.Redis.from_url(url)
        time.sleep(2)  # the server's uptime is told in whole seconds
        client.xreadgroup(names.group, "worker_002", {names.stream: ">"})  # active after it
        settings = make_settings(names, redis={"url": url}, postgres={"dsn": pg_schema_dsn})
        conn = store.connect(pg_schema_dsn)
        try:
            snap = monitor.collect(settings, client, conn)
        finally:
            conn.close()
        (group,) = snap["groups"]
        seen = {c["name"]: c["idle_since_restart"] for c in group["consumer_list"]}
        assert seen == {"worker_001": True, "worker_002": False}
        text = as_text(monitor.render(snap), width=120)
        assert re.search(r"worker_001\s+│?\s*1\s+│?\s*≥\d+(\.\d)?s restart", text), text
    finally:
        embedded.stop_redis(var)
