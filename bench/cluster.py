"""One Redis against a Redis Cluster: the same backlog drained by the same workers, in one run.

    /work/venv/bin/python bench/cluster.py [--items N] [--workers W] [--partitions P] [--aof]

The single node is the machine's Redis when it answers (else an embedded one); the cluster
is three masters with a replica each, started here from redis-server on loopback ports (as
the tests do) and stopped afterwards, keeping nothing on disk like the machine's Redis
(--aof: an append-only file per node, as the tests run them). A third run uses one Redis
with one replica, the shape of each cluster master: a replica costs its master a command
per entry delivered (XREADGROUP is replicated as one XCLAIM per entry), which is the
replication's price, not the partitioning's. Both runs write to the same
PostgreSQL. Prints both rates in messages/s, the cluster's cost as a share of the single
node's rate, and the CPU seconds the Redis servers and the workers used in each run: on a
machine with few cores, six server processes take CPU from the workers.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import redis
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import ROOT, machine_up, row_span, scratch, servers, stop
from run import spawn

from ratebox import config, producer, route, stream
from ratebox.route import Router
from tests.cluster import find_server, free_ports, start_cluster


def start_replicated(base: Path, aof: bool) -> list[subprocess.Popen[bytes]]:
    """One Redis with one replica, the shape of each cluster master: master first."""
    binary = find_server() or "redis-server"
    procs: list[subprocess.Popen[bytes]] = []
    master_port, replica_port = free_ports(2)
    for port in (master_port, replica_port):
        (base / str(port)).mkdir(parents=True)
        cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "yes" if aof else "no", "--dir", str(base / str(port))]  # fmt: skip
        if port == replica_port:
            cmd += ["--replicaof", "127.0.0.1", str(master_port)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
    replica = redis.Redis(port=replica_port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if replica.info("replication").get("master_link_status") == "up":
                return procs
        except redis.RedisError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the replica did not sync")


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


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def drain(
    settings: config.Settings, path: Path, dsn: str, items: int, redis_pids: list[int]
) -> tuple[float, float, float]:
    """Publish the backlog, start the workers, wait for every row: msg/s from first to last
    row, and the CPU seconds of the Redis servers and of the workers meanwhile."""
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
    redis_before = _cpu(redis_pids)
    try:
        deadline = time.monotonic() + 600
        while (done := _rows(dsn, names))[0] < items:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"workers did not drain the backlog: {done[0]}/{items} rows")
            time.sleep(0.2)
        redis_cpu, workers_cpu = _cpu(redis_pids) - redis_before, _cpu([p.pid for p in procs])
    finally:
        stop(procs)
    rows, span = _rows(dsn, names)
    return rows / max(span, 1e-9), redis_cpu, workers_cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=60_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--aof", action="store_true", help="cluster nodes keep an append-only file")
    args = ap.parse_args()
    srv = servers("machine" if machine_up() else "embedded")
    base = Path(tempfile.mkdtemp(prefix="ratebox-bench-cluster-"))
    cluster = start_cluster(base / "nodes", appendonly=args.aof)
    pair = start_replicated(base / "pair", args.aof)
    pair_url = f"redis://127.0.0.1:{pair[0].args[2]}/0"
    try:
        rates = {}
        node_pids = [n.proc.pid for n in cluster.nodes if n.proc is not None]
        for kind, url, on_cluster, partitions, pids in (
            ("one Redis", srv.redis_url, False, 1, [srv.redis_pid]),
            ("one Redis + replica", pair_url, False, 1, [p.pid for p in pair]),
            (
                f"cluster, {args.partitions} partitions",
                cluster.url,
                True,
                args.partitions,
                node_pids,
            ),
        ):
            with scratch(srv, "cluster") as s:
                path = base / f"{len(rates)}.yaml"
                settings = _config(path, url, s.dsn, s, on_cluster, partitions, args.workers)
                try:
                    rates[kind], redis_cpu, workers_cpu = drain(
                        settings, path, s.dsn, args.items, pids
                    )
                finally:
                    if on_cluster:
                        client = stream.connect(url, cluster=True)
                        for name, dead in route.settings_streams(settings):
                            client.delete(name)
                            client.delete(dead)
                        client.close()
            print(
                f"{kind:>28}: {rates[kind]:>9,.0f} msg/s ({args.items:,} items);"
                f" CPU s: Redis {redis_cpu:.1f}, workers {workers_cpu:.1f}",
                flush=True,
            )
        single, paired, multi = rates.values()
        print(f"{'cluster / one Redis':>28}: {multi / single:.2f} (cost {1 - multi / single:+.0%})")
        print(
            f"{'cluster / Redis + replica':>28}: {multi / paired:.2f}"
            f" (cost {1 - multi / paired:+.0%}: the same replication, what partitioning costs)"
        )
    finally:
        for proc in pair:
            proc.kill()
            proc.wait(30)
        cluster.stop()
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
