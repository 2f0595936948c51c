"""During a backlog, compares the monitor's lag and current rate with the truth.

    .venv/bin/python bench/backlog_figures.py [--servers embedded|machine] [--entries N]

Publishes N entries (600,000 by default), starts one bin/ratebox-worker on them, and every
2 s takes a monitor snapshot beside the truth: lag = published - (rows committed + pending),
and rows/s counted in PostgreSQL over the same ~10 s the monitor's current rate covers.
Prints one line per sample and the worst error of each figure.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg2
import redis
import yaml

from bench.common import ROOT, clean_env, scratch, servers, stop
from ratebox import config, monitor, producer, stream
from ratebox.rate import RateWindow


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--servers", choices=["embedded", "machine"], default="embedded")
    p.add_argument("--entries", type=int, default=600_000)
    p.add_argument("--samples", type=int, default=15)
    args = p.parse_args()
    srv = servers(args.servers)
    try:
        with scratch(srv, args.servers) as names:
            return _run(srv.redis_url, names, args)
    finally:
        srv.stop()


def _run(redis_url: str, names, args) -> int:  # type: ignore[no-untyped-def]
    client = redis.Redis.from_url(redis_url)
    stream.ensure_group(client, names.stream, names.group)
    producer.produce(client, names.stream, args.entries)
    path = Path(f"/tmp/{names.suffix}.yaml")
    data = {
        "redis": {"url": redis_url},
        "postgres": {"dsn": names.dsn, "migrate_on_start": False},
        "stream": {"name": names.stream, "group": names.group, "dead_letter": names.dead_letter},
        "monitor": {"enabled": False, "metrics_listen": None},
    }
    path.write_text(yaml.safe_dump(data))
    settings = config.load(str(path), {})
    worker = subprocess.Popen(
        [sys.executable, str(ROOT / "bin" / "ratebox-worker"), "-c", str(path)],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    window, truth = RateWindow(), RateWindow()
    worst_lag = worst_rate = 0.0
    try:
        with closing(psycopg2.connect(names.dsn)) as conn:
            conn.autocommit = True
            for _ in range(args.samples):
                time.sleep(2.0)
                snap = monitor.collect(settings, client, conn)
                at = time.monotonic()
                with conn.cursor() as cur:
                    cur.execute("SELECT count(*) FROM raw_items")
                    (rows,) = cur.fetchone()
                pending = int(client.xpending(names.stream, names.group)["pending"])
                (group,) = snap["groups"]
                true_lag = args.entries - rows - pending
                window.add(at, snap["database"]["processed"])
                truth.add(at, rows)
                now, real = window.rate(), truth.rate()
                lag_err = abs((group["lag"] or 0) - true_lag) / max(true_lag, 1)
                rate_err = abs((now or 0) - (real or 0)) / real if real else 0.0
                if true_lag > 1000:
                    worst_lag = max(worst_lag, lag_err)
                if real and window.span_s() >= 8:
                    worst_rate = max(worst_rate, rate_err)
                print(
                    f"lag {group['lag']!s:>8} ({group['lag_source']:>7}) truth {true_lag:>8,}"
                    f" | rate {now or 0:>9,.0f}/s db {real or 0:>9,.0f}/s"
                    f" over {window.span_s():4.1f}s"
                )
                if true_lag <= 0:
                    break
    finally:
        stop([worker])
        client.close()
    print(f"worst lag error {worst_lag:.1%}; worst current-rate error {worst_rate:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
