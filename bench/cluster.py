"""One Redis against a Redis Cluster: the same backlog drained by the same workers, in one run.

    /work/venv/bin/python bench/cluster.py [--items N] [--workers W] [--partitions P]

The single node is the machine's Redis when it answers (else an embedded one); the cluster
is three masters with a replica each, started here from redis-server on loopback ports (as
the tests do) and stopped afterwards. Both runs write to the same PostgreSQL. Prints both
rates in messages/s and the cluster's cost as a share of the single node's rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT, machine_up, row_span, scratch, servers, stop
from run import spawn

from ratebox import config, producer, route, stream
from ratebox.route import Router
from tests.cluster import start_cluster


def _config(
    path: Path, url: str, dsn: str, s: Any, cluster: bool, partitions: int, workers: int
) -> config.Settings:
    data = {
        "redis": {"url": url, "cluster": cluster},
        "postgres": {"dsn": dsn, "migrate_on_start": False},
        "stream": {
            "name": s.stream,
            "group": s.group,
            "dead_letter": s.dead_letter,
            "partitions": partitions,
        },
        "workers": {"count": workers, "block_ms": 200},
        "monitor": {"enabled": False, "metrics_listen": None},
        "embedded": {"dir": str(path.parent / "var")},
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return config.load(str(path), {})


def _rows(dsn: str, names: list[str]) -> tuple[int, float]:
    spans = [row_span(dsn, name) for name in names]
    return sum(n for n, _ in spans), max(span for _, span in spans)


def drain(settings: config.Settings, path: Path, dsn: str, items: int) -> float:
    """Publish the backlog, start the workers, wait for every row; msg/s from first to last row."""
    client = stream.connect(settings.redis.url, cluster=settings.redis.cluster)
    try:
        producer.produce(client, Router.of(settings), items)
    finally:
        client.close()
    procs = [
        spawn(
            [sys.executable, str(ROOT / "bin" / "ratebox-worker"), "-c", str(path)],
            f"worker_{k:03d}",
            CONSUMER_NAME=settings.consumer_name(k),
        )
        for k in range(1, settings.workers.count + 1)
    ]
    names = route.stream_names(settings)
    try:
        deadline = time.monotonic() + 600
        while (done := _rows(dsn, names))[0] < items:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"workers did not drain the backlog: {done[0]}/{items} rows")
            time.sleep(0.2)
    finally:
        stop(procs)
    rows, span = _rows(dsn, names)
    return rows / max(span, 1e-9)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=60_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--partitions", type=int, default=6)
    args = ap.parse_args()
    srv = servers("machine" if machine_up() else "embedded")
    base = Path(tempfile.mkdtemp(prefix="ratebox-bench-cluster-"))
    cluster = start_cluster(base / "nodes")
    try:
        rates = {}
        for kind, url, on_cluster, partitions in (
            ("one Redis", srv.redis_url, False, 1),
            (f"cluster, {args.partitions} partitions", cluster.url, True, args.partitions),
        ):
            with scratch(srv, "cluster") as s:
                path = base / f"{len(rates)}.yaml"
                settings = _config(path, url, s.dsn, s, on_cluster, partitions, args.workers)
                try:
                    rates[kind] = drain(settings, path, s.dsn, args.items)
                finally:
                    if on_cluster:
                        client = stream.connect(url, cluster=True)
                        for name, dead in route.settings_streams(settings):
                            client.delete(name)
                            client.delete(dead)
                        client.close()
            print(f"{kind:>28}: {rates[kind]:>9,.0f} msg/s ({args.items:,} items)", flush=True)
        single, multi = rates.values()
        print(f"{'cluster / one Redis':>28}: {multi / single:.2f} (cost {1 - multi / single:+.0%})")
    finally:
        cluster.stop()
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
