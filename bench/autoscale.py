"""Autoscaling under a stepped load (quiet → burst → quiet), next to a fixed count at max.

    /work/venv/bin/python bench/autoscale.py [--burst N] [--max W] [--servers machine|embedded]

Each run starts a real supervisor, trickles 50 items/s for the quiet phases, and publishes a
burst of N items at once between them. Prints, for the autoscaled run: time from the burst
to the first scale-up, the peak backlog seen, the drain time, the time back to min; for the
fixed run at max: the drain time; and for both the rows lost or duplicated (must be none).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg2
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT, clean_env, machine_up, scratch, servers

from ratebox import producer, stream
from ratebox.stream_lag import group_backlog

TRICKLE_PER_S = 50


def _config(path: Path, url: str, s: Any, autoscale: bool, most: int) -> None:
    workers: dict[str, Any] = {"count": 1 if autoscale else most, "block_ms": 200}
    if autoscale:
        workers["autoscale"] = {
            "enabled": True,
            "min": 1,
            "max": most,
            "interval_s": 1,
            "scale_down_after_s": 15,
        }
    data = {
        "redis": {"url": url},
        "postgres": {"dsn": s.dsn, "migrate_on_start": False},
        "stream": {"name": s.stream, "group": s.group, "dead_letter": s.dead_letter},
        "workers": workers,
        "monitor": {"enabled": False, "metrics_listen": None},
        "embedded": {"dir": str(path.parent / "var")},
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")


def _rows(dsn: str) -> tuple[int, int]:
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(DISTINCT stream_id) FROM raw_items")
        total, distinct = cur.fetchone()
    return int(total), int(distinct)


def _workers(log: Path) -> int:
    """The worker count the supervisor last logged (its start count before any change)."""
    count = None
    for line in log.read_text(errors="replace").splitlines():
        if "scaled to " in line:
            count = int(line.split("scaled to ")[1].split()[0])
        elif "supervising " in line:
            count = int(line.split("supervising ")[1].split()[0])
    return count or 0


def _trickle(client: Any, name: str, seconds: float) -> int:
    sent, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        sent += producer.produce(client, name, TRICKLE_PER_S // 10)
        time.sleep(0.1)
    return sent


def run_once(srv: Any, autoscale: bool, burst: int, most: int) -> dict[str, Any]:
    with scratch(srv, "as" if autoscale else "fixed") as s:
        path = Path(f"/tmp/{s.suffix}") / "ratebox.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        _config(path, srv.redis_url, s, autoscale, most)
        log = path.parent / "supervisor.log"
        with open(log, "wb") as out:
            sup = subprocess.Popen(
                [sys.executable, str(ROOT / "bin" / "ratebox-supervisor"), "-c", str(path)],
                env=clean_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        client = stream.connect(srv.redis_url)
        try:
            time.sleep(3)
            sent = _trickle(client, s.stream, 10)
            started = time.monotonic()
            sent += producer.produce(client, s.stream, burst)
            first_up = drained = None
            peak = 0
            while time.monotonic() - started < 300:
                backlog, pending = group_backlog(client, s.stream, s.group)
                peak = max(peak, (backlog or 0) + pending)
                if first_up is None and autoscale and _workers(log) > 1:
                    first_up = time.monotonic() - started
                if (backlog or 0) + pending == 0 and _rows(s.dsn)[0] >= sent:
                    drained = time.monotonic() - started
                    break
                sent += producer.produce(client, s.stream, TRICKLE_PER_S // 10)
                time.sleep(0.1)
            back = None
            while autoscale and time.monotonic() - started < 400:
                sent += producer.produce(client, s.stream, TRICKLE_PER_S // 10)
                time.sleep(0.1)
                if _workers(log) == 1:
                    back = time.monotonic() - started
                    break
            deadline = time.monotonic() + 60
            while _rows(s.dsn)[0] < sent and time.monotonic() < deadline:
                time.sleep(0.2)
            total, distinct = _rows(s.dsn)
            return {
                "sent": sent,
                "rows": total,
                "duplicates": total - distinct,
                "lost": sent - distinct,
                "first_up_s": first_up,
                "peak_backlog": peak,
                "drain_s": drained,
                "back_to_min_s": back,
            }
        finally:
            sup.terminate()
            sup.wait(60)
            client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--burst", type=int, default=200_000)
    p.add_argument("--max", type=int, default=2, help="max workers (and the fixed count)")
    p.add_argument("--servers", choices=["machine", "embedded"], default=None)
    args = p.parse_args()
    kind = args.servers or ("machine" if machine_up() else "embedded")
    srv = servers(kind)
    auto = run_once(srv, True, args.burst, args.max)
    fixed = run_once(srv, False, args.burst, args.max)

    def show(v: Any) -> str:
        return "-" if v is None else (f"{v:,.1f}" if isinstance(v, float) else f"{v:,}")

    print(f"servers: {kind}; burst {args.burst:,} between 10 s trickles of {TRICKLE_PER_S}/s")
    print(f"{'':24}{'autoscaled 1..' + str(args.max):>18}{'fixed at ' + str(args.max):>14}")
    for key in ("first_up_s", "peak_backlog", "drain_s", "back_to_min_s", "lost", "duplicates"):
        print(f"{key:24}{show(auto[key]):>18}{show(fixed[key]):>14}")
    if auto["drain_s"] and fixed["drain_s"]:
        print(f"drain ratio autoscaled / fixed: {auto['drain_s'] / fixed['drain_s']:.2f}")


if __name__ == "__main__":
    main()
