"""Partitioned streams on a real Redis Cluster: every module through the cluster client,
and a master killed under load while workers run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import zlib
from contextlib import closing
from pathlib import Path
from typing import Any

import psutil
import psycopg2
import pytest
import redis
import yaml
from redis.cluster import RedisCluster

from ratebox import config, producer, route, rules, stream, stream_dead, verdict
from ratebox.route import Router
from ratebox.sweeper import Sweeper
from ratebox.worker import Worker

ROOT = Path(__file__).resolve().parent.parent


def cluster_config(
    tmp_path: Path, cluster: Any, dsn: str, names: Any, **sections: dict[str, Any]
) -> tuple[config.Settings, Path]:
    data: dict[str, Any] = {
        "redis": {"url": cluster.url, "cluster": True},
        "postgres": {"dsn": dsn, "migrate_on_start": False},
        "stream": {
            "name": names.stream,
            "group": names.group,
            "dead_letter": names.dead_letter,
            "partitions": 6,
            "partition_key": "source",
        },
        "workers": {"count": 2, "timeout_s": 20, "block_ms": 200, "batch_size": 200},
        "sweeper": {"interval_s": 0.5, "min_idle_ms": 3000},
        "monitor": {"enabled": False, "metrics_listen": None},
        "embedded": {"dir": str(tmp_path / "var")},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "ratebox.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return config.load(str(path), {}), path


def client_of(cluster: Any) -> RedisCluster:
    return RedisCluster.from_url(cluster.url)


def rows_by_stream(dsn: str) -> dict[str, dict[str, tuple[Any, ...]]]:
    out: dict[str, dict[str, tuple[Any, ...]]] = {}
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute("SELECT stream_name, stream_id, status, error_code, data FROM raw_items")
        for name, entry_id, status, code, data in cur.fetchall():
            assert entry_id not in out.setdefault(name, {}), f"two rows for {name} {entry_id}"
            out[name][entry_id] = (status, code, data)
    return out


def wait_for(predicate: Any, limit_s: float = 120, step: float = 0.2) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def total_pending(client: Any, settings: config.Settings) -> int:
    total = 0
    for name in route.stream_names(settings):
        try:
            total += int(client.xpending(name, settings.stream.group)["pending"])
        except redis.ResponseError:
            pass
    return total


def cleanup(client: Any, settings: config.Settings) -> None:
    for name, dead in route.settings_streams(settings):
        client.delete(name)
        client.delete(dead)


def test_the_partitions_spread_over_the_masters_and_each_step_stays_on_one_slot(
    redis_cluster, names
) -> None:
    every = route.streams(names.stream, names.dead_letter, 6, True)
    client = client_of(redis_cluster)
    try:
        slots = {client.keyslot(name) for name, _ in every}
        # A partition and its dead letters share a slot: one Lua step can touch both.
        assert all(client.keyslot(name) == client.keyslot(dead) for name, dead in every)
        masters = {client.get_node_from_key(name).name for name, _ in every}
        assert len(slots) == 6 and len(masters) >= 2
        # The dead-letter script (both keys) runs on the cluster.
        name, dead = every[0]
        stream.ensure_group(client, name, "g")
        [entry_id] = stream.publish(client, name, [{"data": "{}"}])
        assert stream.read(client, name, "g", "c", 10)[0][0] == entry_id
        assert stream_dead.move_to_dead_letter(
            client, name, "g", dead, entry_id, {b"data": b"{}"}, {}
        )
        assert stream.length(client, dead) == 1
    finally:
        for name, dead in every:
            client.delete(name)
            client.delete(dead)
        client.close()


def test_a_cluster_config_needs_a_node_url_and_partitions_are_fixed_on_reload() -> None:
    with pytest.raises(config.ConfigError, match=r"redis\.cluster"):
        config.from_mapping({"redis": {"cluster": True}}, {})
    with pytest.raises(config.ConfigError, match=r"stream\.partitions: must be an integer from 1"):
        config.from_mapping({"stream": {"partitions": 0}}, {})
    from ratebox.supervisor import FIXED_ON_RELOAD

    assert {"redis.cluster", "stream.partitions", "stream.partition_key"} <= set(FIXED_ON_RELOAD)


def test_workers_and_sweeper_drain_every_partition_through_the_cluster(
    redis_cluster, pg_schema_dsn, names, tmp_path
) -> None:
    settings, _ = cluster_config(tmp_path, redis_cluster, pg_schema_dsn, names)
    client = client_of(redis_cluster)
    try:
        router = Router.of(settings)
        sent = producer.produce(client, router, 3000)
        assert sent == 3000
        lengths = {name: client.xlen(name) for name in router.targets}
        assert sum(lengths.values()) == 3000
        # Routed by the key: every entry of a partition has the source crc32 picks for it.
        for p, name in enumerate(router.targets):
            for _, fields in client.xrange(name, count=50):
                source = fields[b"source"].decode()
                assert zlib.crc32(source.encode()) % 6 == p
        workers = [
            Worker(settings, settings.consumer_name(k), redis_redis(redis_cluster), pg_schema_dsn)
            for k in (1, 2)
        ]
        assert sorted(n for w in workers for n, _ in w.partitions) == sorted(router.targets)
        deadline = time.monotonic() + 180
        while sum(len(v) for v in rows_by_stream(pg_schema_dsn).values()) < 3000:
            assert time.monotonic() < deadline, "workers did not drain the partitions"
            for w in workers:
                w.loop()
        rows = rows_by_stream(pg_schema_dsn)
        for name in router.targets:
            ids = [entry_id.decode() for entry_id, _ in client.xrange(name)]
            assert set(rows.get(name, {})) == set(ids)
        assert total_pending(client, settings) == 0
        # The sweeper visits every partition (nothing idle, nothing to trim yet).
        sweep = Sweeper(settings, redis_redis(redis_cluster), pg_schema_dsn).loop()
        assert sweep.dead_lettered == 0 and sweep.failed == 0
        for w in workers:
            w.pipeline.reset()
    finally:
        cleanup(client, settings)
        client.close()


def redis_redis(cluster: Any) -> str:
    return cluster.url


def test_a_worker_with_several_partitions_reads_the_busy_one_while_another_is_empty(
    redis_cluster, pg_schema_dsn, names, tmp_path
) -> None:
    settings, _ = cluster_config(
        tmp_path,
        redis_cluster,
        pg_schema_dsn,
        names,
        workers={"count": 1, "block_ms": 5000, "timeout_s": 20},
        stream={"partitions": 3, "partition_key": None},
    )
    client = client_of(redis_cluster)
    try:
        worker = Worker(settings, settings.consumer_name(1), redis_cluster.url, pg_schema_dsn)
        assert len(worker.partitions) == 3
        last = route.stream_names(settings)[2]
        stream.publish(client, last, [{"data": '{"phone": "0123456789"}'}] * 5)
        started = time.monotonic()
        handled = 0
        for _ in range(4):  # never more than one short block per empty round
            handled += worker.loop()
            if handled:
                break
        assert handled == 5
        # Nothing waited block_ms (5 s) on an empty partition first: a loose bound for busy CI.
        assert time.monotonic() - started < 4.5
        worker.pipeline.reset()
    finally:
        cleanup(client, settings)
        client.close()


def test_the_producer_command_routes_by_the_same_rule(
    redis_cluster, pg_schema_dsn, names, tmp_path
) -> None:
    settings, path = cluster_config(tmp_path, redis_cluster, pg_schema_dsn, names)
    client = client_of(redis_cluster)
    try:
        done = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bin" / "ratebox-producer"),
                "-c",
                str(path),
                "produce",
                "500",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert done.returncode == 0, done.stderr
        counted = 0
        for p, name in enumerate(route.stream_names(settings)):
            for _, fields in client.xrange(name):
                assert zlib.crc32(fields[b"source"]) % 6 == p
                counted += 1
        assert counted == 500
    finally:
        cleanup(client, settings)
        client.close()


def assert_one_row_each(
    client: Any, settings: config.Settings, dsn: str, total: int, log: Path
) -> None:
    """Once drained (and a cut-off host's late commits had time to land): exactly one row for
    each of the ``total`` entries the cluster holds, nothing dead-lettered."""

    def drained() -> bool:
        rows = rows_by_stream(dsn)
        return sum(map(len, rows.values())) >= total and not total_pending(client, settings)

    assert wait_for(drained, 300, 1.0), log.read_text()[-2000:]
    time.sleep(3)  # late commits, if any, would land now
    rows = rows_by_stream(dsn)  # raises on a second row for one entry
    for name in route.stream_names(settings):
        ids = {entry_id.decode() for entry_id, _ in client.xrange(name)}
        assert set(rows.get(name, {})) == ids
    assert sum(map(len, rows.values())) == total
    assert sum(client.xlen(d) for _, d in route.settings_streams(settings)) == 0


def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)


def _kill_a_worker(sup: subprocess.Popen[bytes]) -> bool:
    """SIGKILL one running worker of a supervisor; False when none is up just now."""
    for child in psutil.Process(sup.pid).children():
        with contextlib.suppress(psutil.Error):
            if " ".join(child.cmdline()).startswith("ratebox: worker"):
                child.send_signal(signal.SIGKILL)
                return True
    return False


@pytest.mark.timeout(900)
def test_a_master_killed_under_load_is_waited_out_and_every_entry_gets_one_row(
    redis_cluster, pg_schema_dsn, names, tmp_path
) -> None:
    """Two supervisors of two workers, 30,000 items, four worker SIGKILLs and one master."""
    paths = {}
    for host in ("hosta", "hostb"):
        (tmp_path / host).mkdir()
        settings, paths[host] = cluster_config(
            tmp_path / host,
            redis_cluster,
            pg_schema_dsn,
            names,
            workers={"count": 2, "name_prefix": host, "batch_size": 100, "timeout_s": 30},
        )
    client = client_of(redis_cluster)
    sups: list[subprocess.Popen[bytes]] = []
    try:
        produced = producer.produce(client, Router.of(settings), 30000)
        assert produced == 30000
        sups = [_start_supervisor(paths[h], tmp_path / f"{h}.log") for h in paths]

        def rows_now() -> int:
            return sum(map(len, rows_by_stream(pg_schema_dsn).values()))

        # Under load: two workers killed, then the master of partition 0, then two more.
        assert wait_for(lambda: rows_now() > 1000)
        for sup in sups:
            assert wait_for(lambda sup=sup: _kill_a_worker(sup), 60)
        victim_port = client.get_node_from_key(route.stream_names(settings)[0]).port
        victim = next(n for n in redis_cluster.nodes if n.port == victim_port)
        redis_cluster.kill(victim)
        # Its replica is promoted (after the node timeout); the cluster is whole again
        # without the old master, which then comes back as a replica.
        redis_cluster.wait_promoted(120)
        assert victim not in redis_cluster.masters()
        redis_cluster.wait_ok(120)
        for sup in sups:
            assert wait_for(lambda sup=sup: _kill_a_worker(sup), 60)
        redis_cluster.start_node(victim)  # comes back as a replica of the promoted one
        redis_cluster.wait_ok(120)
        client.close()
        client = client_of(redis_cluster)

        def held() -> dict[str, set[str]]:
            return {
                name: {entry_id.decode() for entry_id, _ in client.xrange(name)}
                for name in route.stream_names(settings)
            }

        def drained() -> bool:
            rows = rows_by_stream(pg_schema_dsn)
            return all(
                ids <= set(rows.get(name, {})) for name, ids in held().items()
            ) and not total_pending(client, settings)

        assert wait_for(drained, 300, 1.0), (tmp_path / "hosta.log").read_text()[-3000:]
        rows = rows_by_stream(pg_schema_dsn)
        entries = held()
        for name, ids in entries.items():
            # Every entry the cluster holds has exactly one row, under its partition's name;
            # an acknowledged XADD lost with the old master may leave a row of no entry.
            assert ids <= set(rows.get(name, {}))
        assert sum(len(ids) for ids in entries.values()) >= 30000 - 1000
        engine = rules.compile_rules(settings.rules)
        for name in route.stream_names(settings):
            for entry_id, fields in client.xrange(name):
                expected = verdict.judge(entry_id.decode(), fields, engine, 65536)
                status, code, _ = rows[name][entry_id.decode()]
                assert (status, code) == (expected.status, expected.error_code)
        dead = [d for _, d in route.settings_streams(settings)]
        assert sum(client.xlen(d) for d in dead) == 0, "nothing is dead-lettered"
        with closing(psycopg2.connect(pg_schema_dsn)) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM raw_items WHERE error_code = 910")
            assert cur.fetchone()[0] == 0
        assert all(sup.poll() is None for sup in sups), "both supervisors are up"
    finally:
        for sup in sups:
            _signal(sup, signal.SIGTERM)
        for sup in sups:
            try:
                sup.wait(60)
            except subprocess.TimeoutExpired:
                _signal(sup, signal.SIGKILL)
                sup.wait(30)
        try:
            cleanup(client, settings)
        finally:
            client.close()


def _start_supervisor(path: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "bin" / "ratebox-supervisor"), "-c", str(path)],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,  # its own process group: frozen and stopped as one host
    )


def _held_by(client: Any, settings: config.Settings, prefix: str) -> int:
    held = 0
    for name in route.stream_names(settings):
        try:
            summary = client.xpending(name, settings.stream.group)
        except redis.ResponseError:
            continue
        for c in summary.get("consumers") or []:
            if c["name"].decode().startswith(prefix):
                held += int(c["pending"])
    return held


@pytest.mark.timeout(900)
def test_two_hosts_on_one_cluster_one_cut_off_for_20_s_nothing_lost_nothing_twice(
    redis_cluster, pg_schema_dsn, names, tmp_path
) -> None:
    """Two supervisors (name prefixes hosta, hostb) share the group; hostb is frozen for 20 s.

    Its processes send nothing and answer nothing, as if its network were cut: what it held
    goes idle, hosta's sweeper reclaims it, and when hostb wakes its late commits and acks
    change nothing.
    """
    hosts = {}
    for host in ("hosta", "hostb"):
        (tmp_path / host).mkdir()
        hosts[host] = cluster_config(
            tmp_path / host,
            redis_cluster,
            pg_schema_dsn,
            names,
            workers={"count": 2, "name_prefix": host, "batch_size": 50, "timeout_s": 60},
            sweeper={"interval_s": 0.5, "min_idle_ms": 3000},
        )
    settings = hosts["hosta"][0]
    client = client_of(redis_cluster)
    sups: dict[str, subprocess.Popen[bytes]] = {}
    try:
        assert producer.produce(client, Router.of(settings), 20000) == 20000
        for host, (_, path) in hosts.items():
            sups[host] = _start_supervisor(path, tmp_path / f"{host}.log")
        # Cut hostb off while its workers hold entries: what they hold a moment before the
        # freeze may be acknowledged by then, so freeze again until something is held.
        for _ in range(50):
            assert wait_for(lambda: _held_by(client, settings, "hostb") > 0, 120, 0.02)
            # The supervisor and every child (they run in process groups of their own).
            frozen = [psutil.Process(sups["hostb"].pid)]
            frozen += frozen[0].children(recursive=True)
            for proc in frozen:
                proc.send_signal(signal.SIGSTOP)
            if _held_by(client, settings, "hostb") > 0:
                break
            for proc in frozen:
                proc.send_signal(signal.SIGCONT)
        try:
            stopped_at = time.monotonic()
            held = _held_by(client, settings, "hostb")
            # hosta reclaims what hostb held (and drains the rest) while hostb is away.
            assert wait_for(lambda: _held_by(client, settings, "hostb") == 0, 60, 0.5), held
            time.sleep(max(0.0, 20 - (time.monotonic() - stopped_at)))
        finally:
            for proc in frozen:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(signal.SIGCONT)

        assert_one_row_each(client, settings, pg_schema_dsn, 20000, tmp_path / "hostb.log")
        # What hostb held left its consumers while it was frozen: only a sweeper (hosta's,
        # claiming under the name "sweeper") can have taken it. Rows may name hostb's
        # workers still: one that committed but had not acknowledged before the freeze.
        assert held > 0
        assert all(sup.poll() is None for sup in sups.values()), "both supervisors up"
    finally:
        for sup in sups.values():
            _signal(sup, signal.SIGCONT)
            _signal(sup, signal.SIGTERM)
        for sup in sups.values():
            try:
                sup.wait(60)
            except subprocess.TimeoutExpired:
                _signal(sup, signal.SIGKILL)
                sup.wait(30)
        cleanup(client, settings)
        client.close()


def test_the_monitor_and_metrics_show_each_partition_and_the_totals(
    redis_cluster, pg_schema_dsn, names, tmp_path
) -> None:
    from prometheus_client.exposition import generate_latest
    from rich.console import Console

    from ratebox import monitor
    from ratebox.dashboard import render
    from ratebox.metrics import registry_for

    settings, _ = cluster_config(
        tmp_path, redis_cluster, pg_schema_dsn, names, stream={"partition_key": None}
    )
    client = client_of(redis_cluster)
    try:
        names_ = route.stream_names(settings)
        for name in names_:
            stream.ensure_group(client, name, settings.stream.group)
        producer.produce(client, Router.of(settings), 60)  # round robin: 10 each
        # worker_002 reads partition 1 (1 mod 2 = 2 − 1): it holds 4 of its entries.
        stream.read(client, names_[1], settings.stream.group, settings.consumer_name(2), 4)
        snap = monitor.report(settings, redis_cluster.url, pg_schema_dsn)
        assert [r["length"] for r in snap["partitions"]] == [10] * 6
        assert [r["pending"] for r in snap["partitions"]] == [0, 4, 0, 0, 0, 0]
        assert snap["stream"]["length"] == 60
        [group] = snap["groups"]
        assert (group["pending"], group["lag"]) == (4, 56)
        text = generate_latest(registry_for(lambda: snap)).decode()
        assert 'ratebox_partition_pending{partition="1",stream="' + names_[1] + '"} 4.0' in text
        assert "ratebox_group_lag{" in text and "} 56.0" in text
        console = Console(width=100, record=True, color_system=None)
        console.print(render(snap))
        shown = console.export_text()
        assert "Partitions 6" in shown
        assert "pending 4" in shown  # partition 1's line
        # The database figures cover every partition, a consumer's rows summed over them.
        workers = [
            Worker(settings, settings.consumer_name(k), redis_cluster.url, pg_schema_dsn)
            for k in (1, 2)
        ]
        deadline = time.monotonic() + 120
        while sum(map(len, rows_by_stream(pg_schema_dsn).values())) < 60:
            assert time.monotonic() < deadline
            for w in workers:
                w.loop()
        for w in workers:
            w.pipeline.reset()
        snap = monitor.report(settings, redis_cluster.url, pg_schema_dsn)
        assert snap["database"]["processed"] == 60
        perf = {c["name"]: c["processed"] for c in snap["consumer_performance"]}
        assert sum(perf.values()) == 60 and len(perf) == 2
    finally:
        cleanup(client, settings)
        client.close()
