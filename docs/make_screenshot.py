"""Saves docs/dashboard.svg (and docs/dashboard-80x24.svg): the dashboard after real load.

    .venv/bin/python docs/make_screenshot.py

Starts private embedded Redis and PostgreSQL servers in a temporary directory, a real
ratebox-supervisor with four workers and the sweeper (the monitor itself is off: this script
draws the picture), publishes a backlog plus a steady load with some malformed messages, then
renders one snapshot with the supervisor's status file and exports it with Rich.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.screen import Screen  # noqa: E402

from ratebox import config, embedded, migrate, monitor, producer, store, stream  # noqa: E402

BACKLOG = 60_000
RATE, LOAD_S = 2_000, 12.0
MALFORMED = ['{"phone": "0912345678", "bank_account": ', "not json at all", "[1, 2, 3]"]


def write_config(directory: Path, redis_url: str, dsn: str) -> Path:
    path = directory / "ratebox.yaml"
    data = {
        "redis": {"url": redis_url},
        "postgres": {"dsn": dsn, "migrate_on_start": False},
        "workers": {"count": 4, "batch_size": 500},
        "monitor": {"enabled": False, "metrics_listen": None},
        "embedded": {"dir": str(directory / "var")},
    }
    path.write_text(yaml.safe_dump(data))
    return path


def wait_for_file(path: str, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"the supervisor wrote no status file at {path}")
        time.sleep(0.2)


def load(client: object, name: str) -> None:
    """A steady RATE a second for LOAD_S seconds, with a few malformed lines among them."""
    deadline = time.monotonic() + LOAD_S
    producer.continuous(client, name, RATE, lambda: time.monotonic() < deadline)  # type: ignore[arg-type]
    for line in MALFORMED * 7:
        client.xadd(name, producer.entry(None, "batch_file", data=line))  # type: ignore[attr-defined]


def save(snap: dict, width: int, height: int | None, target: Path) -> None:
    """An SVG of the printed report (no height) or of one live screen (width x height)."""
    with open(os.devnull, "w") as devnull:
        console = Console(width=width, height=height or 25, record=True, file=devnull)
        if height is None:
            console.print(monitor.render(snap))
        else:
            # Exactly one screenful, as the live view shows it.
            console.print(Screen(monitor.render(snap, screen=True)))
    console.save_svg(str(target), title=f"ratebox-monitor ({width}x{height or 'report'})")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="rbshot"))
    var = work / "var"
    redis_url, dsn, started = embedded.resolve("embedded", "embedded", var)
    supervisor = None
    try:
        migrate.run(dsn)
        path = write_config(work, redis_url, dsn)
        settings = config.load(str(path), {})
        client = stream.connect(redis_url)
        producer.produce(client, settings.stream.name, BACKLOG)
        with open(work / "supervisor.log", "wb") as log:
            supervisor = subprocess.Popen(
                [sys.executable, str(ROOT / "bin" / "ratebox-supervisor"), "-c", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        status = settings.status_path()
        wait_for_file(status)
        load(client, settings.stream.name)
        # A consumer that read and never came back: its entries stay pending for the sweeper.
        stream.read(client, settings.stream.name, settings.stream.group, "worker_005", 120)
        producer.produce(client, settings.stream.name, 3_000)  # a little lag at the end
        time.sleep(0.5)
        conn = store.connect(dsn, application_name="ratebox screenshot")
        sampler = monitor.ProcessSampler()
        monitor.collect(settings, client, conn, status, sampler=sampler)
        time.sleep(1.0)  # CPU % is measured between two looks
        snap = monitor.collect(settings, client, conn, status, sampler=sampler)
        conn.close()
        save(snap, 150, None, ROOT / "docs" / "dashboard.svg")
        save(snap, 80, 24, ROOT / "docs" / "dashboard-80x24.svg")
        print(monitor.snapshot_line(snap))
        print("saved docs/dashboard.svg and docs/dashboard-80x24.svg")
    finally:
        if supervisor is not None and supervisor.poll() is None:
            supervisor.send_signal(signal.SIGTERM)
            try:
                supervisor.wait(timeout=60)
            except subprocess.TimeoutExpired:
                supervisor.kill()
                supervisor.wait()
        embedded.stop(started, var)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
