"""Hostile entries mixed into ordinary traffic, end to end under the supervisor.

Everything stays up, every entry gets exactly one verdict, and no output (log, report,
--json, /metrics, dlq list) holds a control character or markup from a message, or a
personal datum or password in full.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import redis
import yaml

from ratebox import producer
from tests.conftest import Names
from tests.test_monitor import assert_no_personal_data, free_port, server_free_environ
from tests.test_supervisor import Running, pending, row_count, titles, wait_for

ROOT = Path(__file__).resolve().parent.parent
PHONE, ACCOUNT, EMAIL, SECRET = "0912345678", "123456789012", "john.doe@example.com", "hunter2"
#: What a message may carry that must never reach a terminal: escapes and other controls
#: (markup shows as its own text, inert, so it is checked by the forged line instead).
FORBIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x9b]")


def hostile(rng: random.Random) -> dict[bytes, bytes]:
    """One entry of a hostile class, with payloads varied by ``rng``."""
    n = rng.randrange(10_000)
    stamp = rng.choice(
        ["2026-12-01T00:00:00+23:59", "2026-12-01T00:00:00+05:30:15.5", "99999-01-01", "\x1b[5m"]
    )
    item: Any = rng.choice(
        [
            {"email": f"a{n}@[/]", "name": "Tran Van A"},
            {"email": f"a{n}@\x1b]0;OWNED\x1b\\\x1b[5;41mFAKE", "phone": PHONE},
            {"email": f"[link=http://evil.example/]X{n}[/link]", "name": "[blink]B[/blink]"},
            {"name": f"Ng\r\nFORGED LINE {n}", "phone": f"+84 (912) 345-{n % 1000:03d}"},
            {PHONE: 1, EMAIL: 2, "pw": SECRET, "note": f"acct {ACCOUNT}"},
            {"email": f"john.doe{n}@localhost", "bank_account": ACCOUNT},
            {"phone": 10**29 + n, "bank_account": "1e400"},
        ]
    )
    kind = rng.randrange(5)
    if kind == 0:
        data = json.dumps(item).encode()  # integers past 64 bits too
    elif kind == 1:
        data = bytes(rng.randrange(256) for _ in range(64))  # binary garbage
    elif kind == 2:
        data = b'{"phone": 1e400, "name": "' + b"9" * 5000 + b'"}'
    elif kind == 3:
        data = b'{"name": "' + b"x" * 200_000 + b'"}'  # beyond max_message_bytes
    else:
        fields = {f"f{i}".encode(): b"\x1b[31m" for i in range(rng.choice([10, 5000]))}
        return {**fields, b"data": json.dumps(item).encode(), b"timestamp": stamp.encode()}
    return {b"data": data, b"timestamp": stamp.encode(), b"source": b"\x1b]0;OWNED\x07"}


def test_hostile_entries_in_ordinary_traffic_leave_every_output_clean_and_every_row_once(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis, pg_schema_dsn: str, names: Names
) -> None:
    port = free_port()
    path = tmp_path / "ratebox.yaml"
    document = {
        "redis": {"url": redis_url},
        "postgres": {"dsn": pg_schema_dsn, "migrate_on_start": False},
        "stream": {"name": names.stream, "group": names.group, "dead_letter": names.dead_letter},
        "workers": {"count": 2, "batch_size": 50, "block_ms": 200, "timeout_s": 10},
        "sweeper": {"interval_s": 1},
        "monitor": {"enabled": True, "refresh_s": 0.5, "metrics_listen": f"127.0.0.1:{port}"},
        "embedded": {"dir": str(tmp_path / "var")},
    }
    path.write_text(yaml.safe_dump(document))
    # One dead-lettered entry as hostile as the rest, for dlq list to show.
    redis_client.xadd(
        names.dead_letter,
        {
            b"data": orjson.dumps({"email": "x@[link=http://evil/]y", PHONE: 1, "pw": SECRET}),
            b"original_id": b"1-1",
            b"reason": f"\r\nFORGED LINE phone {PHONE} pw={SECRET}".encode(),
            b"delivery_count": b"4",
        },
    )
    running = Running(path, tmp_path / "supervisor.log")
    try:
        running.wait_titles(titles(1, 2) | {"ratebox: monitor"}, timeout=60)
        rng = random.Random(20261202)
        sent = 0
        for _ in range(6):
            sent += producer.produce(redis_client, names.stream, 500)
            with redis_client.pipeline(transaction=False) as pipe:
                for _ in range(40):
                    pipe.xadd(names.stream, hostile(rng))
                pipe.execute()
            sent += 40
        wait_for(
            f"{sent} rows",
            lambda: (
                row_count(pg_schema_dsn) == sent
                and pending(redis_client, names.stream, names.group) == 0
            ),
            180,
        )
        assert running.proc.poll() is None
        assert set(running.titles()) == titles(1, 2) | {"ratebox: monitor"}
        env = server_free_environ()

        def command(script: str, *args: str) -> str:
            done = subprocess.run(
                [sys.executable, str(ROOT / "bin" / script), "-c", str(path), *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            return done.stdout + done.stderr

        report = command("ratebox-monitor")
        as_json = command("ratebox-monitor", "--json")
        assert json.loads(as_json)["database"]["processed"] >= sent
        dlq = command("ratebox-dlq", "list")
        assert "1-1" in dlq
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
            metrics = reply.read().decode()
        assert "ratebox_processed_total" in metrics
        log = running.text()
        assert "Traceback" not in log and "restarting" not in log  # no child died
        outputs = [report, as_json, dlq, metrics, log]
        for output in outputs:
            shown = FORBIDDEN.search(output)
            assert shown is None, f"{shown[0]!r} reached an output" if shown else ""
        for output in outputs:  # a CR LF in a message never starts a line of its own
            assert not any(line.lstrip(" │|").startswith("FORGED") for line in output.splitlines())
        assert_no_personal_data(outputs, [PHONE, ACCOUNT, EMAIL, SECRET, "john.doe"])
    finally:
        running.stop()
