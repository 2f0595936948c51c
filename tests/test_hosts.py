"""Two VMs on one Redis Cluster, simulated with network namespaces: one is cut off for 20 s.

Each "host" is a network namespace joined to this one by a veth pair; the cluster listens on
this side of the first pair, so taking that host's link down cuts it off from Redis (and
only from Redis: PostgreSQL is reached over its unix socket, which no namespace separates).
Skipped, saying why, where namespaces cannot be made (not root, or a kernel that refuses).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ratebox import embedded, migrate, producer
from ratebox.route import Router
from tests import cluster as test_cluster
from tests.test_cluster import (
    _held_by,
    assert_one_row_each,
    cleanup,
    client_of,
    cluster_config,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Host:
    """A network namespace with a link to this one: ``ip`` is its side, ``gateway`` ours."""

    name: str
    link: str  # our end of the veth pair
    ip: str
    gateway: str

    def cut(self) -> None:
        _ip("link", "set", self.link, "down")

    def mend(self) -> None:
        _ip("link", "set", self.link, "up")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_hosts() -> Iterator[list[Host]]:
    """Two namespaces, 10.231.{1,2}.2, each routed to us through 10.231.{1,2}.1; removed after."""
    tag = f"rb{os.getpid() % 10000}"
    hosts = [Host(f"{tag}h{i}", f"{tag}v{i}", f"10.231.{i}.2", f"10.231.{i}.1") for i in (1, 2)]
    made: list[Host] = []
    try:
        for host in hosts:
            try:
                _ip("netns", "add", host.name)
            except (OSError, subprocess.CalledProcessError) as exc:
                pytest.skip(f"network namespaces unavailable here ({exc}): the layer is skipped")
            made.append(host)
            _ip(
                "link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.name
            )
            _ip("addr", "add", f"{host.gateway}/24", "dev", host.link)
            _ip("link", "set", host.link, "up")
            inside = ("netns", "exec", host.name, "ip")
            _ip(*inside, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _ip(*inside, "link", "set", "eth0", "up")
            _ip(*inside, "link", "set", "lo", "up")
            _ip(*inside, "route", "add", "default", "via", host.gateway)
        yield hosts
    finally:
        for host in made:
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                _ip("netns", "del", host.name)  # takes its veth pair with it
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                _ip("link", "del", host.link)


def _start_in(host: Host, path: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["ip", "netns", "exec", host.name, sys.executable, str(ROOT / "bin" / "ratebox-supervisor"),
         "-c", str(path)],
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )  # fmt: skip


def _stop(sup: subprocess.Popen[bytes]) -> None:
    if sup.poll() is None:
        os.killpg(sup.pid, signal.SIGTERM)
    try:
        sup.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(sup.pid, signal.SIGKILL)
        sup.wait(30)


@pytest.mark.timeout(900)
def test_a_host_cut_off_from_the_cluster_for_20_s_loses_nothing_and_duplicates_nothing(
    two_hosts: list[Host], names: Any, tmp_path: Path
) -> None:
    # The cluster listens on host 1's gateway: reachable from both namespaces (host 2's
    # packets are routed here, where the address is local) and from this process.
    redis_cluster = test_cluster.start_cluster(tmp_path / "cluster", host=two_hosts[0].gateway)
    var = tmp_path / "pg"
    dsn = embedded.ensure_postgres(var)  # a unix socket: reachable from any namespace
    sups: dict[str, subprocess.Popen[bytes]] = {}
    client = None
    try:
        migrate.run(dsn)
        configs = {}
        for host in ("hosta", "hostb"):
            (tmp_path / host).mkdir()
            configs[host] = cluster_config(
                tmp_path / host,
                redis_cluster,
                dsn,
                names,
                workers={"count": 2, "name_prefix": host, "batch_size": 50, "timeout_s": 60},
                sweeper={"interval_s": 0.5, "min_idle_ms": 3000},
            )
        settings = configs["hosta"][0]
        client = client_of(redis_cluster)
        assert producer.produce(client, Router.of(settings), 20000) == 20000
        for (host, (_, path)), ns in zip(configs.items(), two_hosts, strict=True):
            sups[host] = _start_in(ns, path, tmp_path / f"{host}.log")
        # Cut hostb off while its workers hold entries (again, if what they held a moment
        # before was acknowledged by then).
        for _ in range(50):
            assert wait_for(lambda: _held_by(client, settings, "hostb") > 0, 120, 0.02), (
                tmp_path / "hostb.log"
            ).read_text()[-2000:]
            two_hosts[1].cut()
            if _held_by(client, settings, "hostb") > 0:
                break
            two_hosts[1].mend()
        try:
            cut_at = time.monotonic()
            held = _held_by(client, settings, "hostb")
            # hosta's sweeper reclaims what hostb held while hostb cannot reach Redis.
            assert wait_for(lambda: _held_by(client, settings, "hostb") == 0, 60, 0.5), held
            time.sleep(max(0.0, 20 - (time.monotonic() - cut_at)))
        finally:
            two_hosts[1].mend()

        assert_one_row_each(client, settings, dsn, 20000, tmp_path / "hostb.log")
        assert held > 0
        log_b = (tmp_path / "hostb.log").read_text()
        # It was cut off (its children's sockets may simply stall until the link is back,
        # as TCP does for 20 s) and it stayed up through it, lease and all.
        assert "cannot refresh the lease" in log_b and "Traceback" not in log_b
        assert all(sup.poll() is None for sup in sups.values()), "both supervisors up"
    finally:
        for sup in sups.values():
            _stop(sup)
        if client is not None:
            with contextlib.suppress(Exception):
                cleanup(client, configs["hosta"][0])
            client.close()
        redis_cluster.stop()
        embedded.stop_postgres(var)
