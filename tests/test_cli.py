"""The commands as an operator runs them: one clear line and the right exit status."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg2
import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    "supervisor",
    "worker",
    "sweeper",
    "producer",
    "monitor",
    "migrate",
    "dlq",
    "replay",
    "bridge",
    "compare",
    "embedded",
]


def run(
    command: str, *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bin" / f"ratebox-{command}"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_listing_the_configuration_keys(command: str) -> None:
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "workers.batch_size" in result.stdout


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (
            "workers:\n  count: four\n",
            'workers.count: must be an integer from 1 to 256, got "four"',
        ),
        ("workers:\n  conut: 2\n", "workers.conut: unknown key"),
        (
            "rules:\n  - {field: phone, check: min_length, code: 101, message: x}\n",
            "rules[0].params",
        ),
        ("workers: [1,\n", "invalid YAML"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(
    tmp_path: Path, yaml_text: str, expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    for command in ("worker", "migrate", "producer"):
        args = ["-c", str(path)] + (["info"] if command == "producer" else [])
        result = run(command, *args)
        assert result.returncode == 2, (command, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [["produce"], ["produce", "-5"], ["produce", "ten"], ["continuous", "0"], ["bogus"], []],
)
def test_bad_producer_arguments_exit_2_with_one_line(args: list[str]) -> None:
    result = run("producer", "-c", str(ROOT / "ratebox.yaml"), *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run("worker", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "configuration file not found" in result.stderr


def test_an_unreachable_redis_exits_1_with_one_masked_line(tmp_path: Path) -> None:
    path = tmp_path / "down.yaml"
    path.write_text("redis:\n  url: redis://:s3cret-pw@127.0.0.1:1/0\n")
    result = run("producer", "-c", str(path), "info")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach Redis" in lines[0], result.stderr
    assert "s3cret-pw" not in result.stderr


def test_migrate_twice_leaves_one_schema(make_config) -> None:
    settings, path = make_config()
    first = run("migrate", "-c", str(path))
    second = run("migrate", "-c", str(path))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "applied 0 migration(s)" in second.stdout
    with psycopg2.connect(settings.postgres.dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM schema_migrations")
        files = len(list((ROOT / "schema").glob("*.sql")))
        assert cur.fetchone()[0] == files
    conn.close()


def test_producer_publishes_and_info_reports_it(make_config, redis_client, names) -> None:
    _, path = make_config()
    result = run("producer", "-c", str(path), "produce", "2500")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        rf"published 2500 messages to {names.stream} in \d+\.\d\d s \([\d,]+/s\)\n", result.stdout
    )
    assert redis_client.xlen(names.stream) == 2500
    info = run("producer", "-c", str(path), "info")
    assert f"stream {names.stream}: length 2500" in info.stdout


def test_producer_on_a_real_redis_loads_neither_postgres_nor_the_embedded_servers(
    tmp_path: Path, redis_url: str, names
) -> None:
    # Its start-up counts in its throughput (README, Performance).
    path = tmp_path / "ratebox.yaml"
    path.write_text(f"redis:\n  url: {redis_url}\nstream:\n  name: {names.stream}\n")
    code = (
        "import sys; from ratebox.cli import main_producer; "
        f"assert main_producer(['-c', {str(path)!r}, 'produce', '10']) == 0; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('psycopg2', 'rich', 'psutil', 'prometheus_client') or m == 'ratebox.embedded'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


def test_producer_file_publishes_one_entry_per_line(
    make_config, redis_client, names, tmp_path: Path
) -> None:
    _, path = make_config()
    data = tmp_path / "items.jsonl"
    data.write_text('{"phone": "0912345678", "bank_account": "12345678"}\n\nnot json\n[1]\n')
    result = run("producer", "-c", str(path), "file", str(data))
    assert result.returncode == 0, result.stderr
    entries = redis_client.xrange(names.stream)
    assert [fields[b"data"] for _, fields in entries] == [
        b'{"phone": "0912345678", "bank_account": "12345678"}',
        b"not json",
        b"[1]",
    ]


def test_a_standalone_worker_refuses_names_a_supervisors_lease_covers(
    make_config: Any, redis_client: Any
) -> None:
    settings, path = make_config()
    # What a running supervisor on another host holds (host:pid:random).
    redis_client.set(settings.lease_key(), "vm-7:4242:0123456789ab", px=60_000)
    try:
        result = run("worker", "-c", str(path), timeout=60)
    finally:
        redis_client.delete(settings.lease_key())
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "another supervisor (vm-7:4242) runs consumers worker_*" in lines[0]
    assert "not starting worker_001" in lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_version_and_describes_its_options(command: str) -> None:
    from ratebox import __version__

    result = run(command, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"ratebox-{command} {__version__}"
    shown = run(command, "--help").stdout
    assert "least severe log lines" in shown


def test_produce_help_describes_its_arguments() -> None:
    shown = run("producer", "produce", "--help").stdout
    assert "how many messages to publish" in shown
    assert "seconds between messages" in shown


def test_embedded_servers_a_command_leaves_running_are_named_and_stoppable(
    tmp_path: Path,
) -> None:
    var = tmp_path / "var"
    path = tmp_path / "ratebox.yaml"
    path.write_text(f"embedded:\n  dir: {var}\n", encoding="utf-8")
    env = {"REDIS_URL": "", "POSTGRES_DSN": ""}
    try:
        migrated = run("migrate", "-c", str(path), env=env, timeout=180)
        assert migrated.returncode == 0, migrated.stderr
        # migrate needs no Redis, so it starts none; what it started it names, and how to stop.
        assert "note: the embedded PostgreSQL started for this command keep running" in (
            migrated.stderr
        )
        assert f"ratebox-embedded -c {path} stop" in migrated.stderr
        status = run("embedded", "-c", str(path), "status", env=env)
        assert status.returncode == 0, status.stderr
        assert re.search(r"embedded PostgreSQL of .*: running, pid \d+", status.stdout)
        assert "embedded Redis of" in status.stdout and "Redis of " + str(
            var
        ) + ": not running" in (status.stdout)
        # A second command reuses the running server and starts nothing: no note.
        again = run("migrate", "-c", str(path), env=env, timeout=180)
        assert again.returncode == 0 and "note:" not in again.stderr, again.stderr
    finally:
        stopped = run("embedded", "-c", str(path), "stop", env=env, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert re.search(r"PostgreSQL of .*: stopped \(was pid \d+\)", stopped.stdout)
    after = run("embedded", "-c", str(path), "status", env=env)
    assert after.stdout.count("not running") == 2, after.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["dlq", "replay", "99999999999999999999-0"],
        ["dlq", "replay", "1-18446744073709551616"],
        ["dlq", "replay", "１２３-0"],
        ["replay", "--from", "99999999999999999999999"],
        ["replay", "--from", "1-99999999999999999999"],
        ["replay", "--from", "１２３"],
        ["replay", "--from", "0", "--to", "99999999999999999999999"],
    ],
)
def test_ids_redis_would_refuse_are_bad_usage_not_a_traceback(args: list[str]) -> None:
    result = run(args[0], *args[1:], env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
