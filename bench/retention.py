"""Steady load with a short retention: XLEN must stay bounded and no entry may be lost.

    .venv/bin/python bench/retention.py --rate 1000 --minutes 10 --retention 1m

Runs the supervisor (2 workers, sweeper every 5 s) against a scratch schema and stream,
publishes RATE messages a second for MINUTES, samples XLEN every 10 s, then waits for the
group to drain and checks one row per published message and an empty dead-letter stream.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import redis
import yaml
from common import ROOT, clean_env, machine_up, scratch, servers, wait_drained

from ratebox import producer


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rate", type=float, default=1000)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--retention", default="1m")
    p.add_argument("--servers", choices=["machine", "embedded"], default=None)
    args = p.parse_args()
    srv = servers(args.servers or ("machine" if machine_up() else "embedded"))
    try:
        with scratch(srv, "retention") as s:
            return run(srv.redis_url, s.dsn, s.stream, s.group, s.dead_letter, args)
    finally:
        srv.stop()


def run(
    redis_url: str, dsn: str, name: str, group: str, dead: str, args: argparse.Namespace
) -> int:
    work = ROOT / "var" / "bench" / f"retention-{name}"
    work.mkdir(parents=True, exist_ok=True)
    path = work / "ratebox.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "redis": {"url": redis_url},
                "postgres": {"dsn": dsn, "migrate_on_start": False},
                "stream": {
                    "name": name,
                    "group": group,
                    "dead_letter": dead,
                    "retention": args.retention,
                },
                "workers": {"count": 2},
                "sweeper": {"interval_s": 5},
                "monitor": {"enabled": False, "metrics_listen": None},
                "embedded": {"dir": str(work)},
            }
        )
    )
    client = redis.Redis.from_url(redis_url)
    log = open(work / "supervisor.log", "wb")  # noqa: SIM115 - closed at the end
    sup = subprocess.Popen(
        [sys.executable, str(ROOT / "bin" / "ratebox-supervisor"), "-c", str(path)],
        env=clean_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + args.minutes * 60
    sent = [0]
    publisher = threading.Thread(
        target=lambda: sent.__setitem__(
            0, producer.continuous(client, name, args.rate, lambda: time.monotonic() < deadline)
        )
    )
    started = time.monotonic()
    publisher.start()
    samples: list[tuple[float, int, int]] = []
    while publisher.is_alive():
        time.sleep(10)
        samples.append(
            (round(time.monotonic() - started), client.xlen(name), _memory(client, name))
        )
        print(
            f"t={samples[-1][0]:>4}s  XLEN {samples[-1][1]:>7}  memory {samples[-1][2] / 1e6:.1f} MB",
            flush=True,
        )
    publisher.join()
    wait_drained(client, name, group, [sup])
    sup.send_signal(signal.SIGTERM)
    status = sup.wait(60)
    log.close()
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT stream_id) FROM raw_items")
        rows, distinct = cur.fetchone()
    conn.close()
    steady = [x for t, x, _ in samples if t > 120]
    result = {
        "rate": args.rate,
        "minutes": args.minutes,
        "retention": args.retention,
        "published": sent[0],
        "rows": rows,
        "distinct_rows": distinct,
        "dead_lettered": client.xlen(dead),
        "pending": int(client.xpending(name, group)["pending"]),
        "xlen_max_after_2min": max(steady) if steady else None,
        "xlen_last": samples[-1][1] if samples else None,
        "supervisor_exit": status,
        "samples": samples,
    }
    out = Path(__file__).with_name("results-retention.json")
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    ok = rows == distinct == sent[0] and result["dead_lettered"] == 0 and result["pending"] == 0
    print("OK: every message has exactly one row" if ok else "FAILED")
    return 0 if ok else 1


def _memory(client: redis.Redis, name: str) -> int:
    return int(client.memory_usage(name, samples=0) or 0)


if __name__ == "__main__":
    sys.exit(main())
