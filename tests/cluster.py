"""A real Redis Cluster for tests: three masters with a replica each, on loopback.

Started from the ``redis-server`` binary (Redis 7; REDIS_SERVER_BIN names another one), on
free ports whose cluster bus (port + 10,000) is free as well; stopped by PID, its
directories removed. Nodes can be killed and started again, to test fail-overs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

#: Where the cluster's node binaries are looked for, first found wins.
SERVER_CANDIDATES = ("redis-server", "/usr/bin/redis-server", "/usr/local/bin/redis-server")
#: A master silent this long is failed over by its replica: short, so tests do not wait long.
NODE_TIMEOUT_MS = 2000
#: The port range this suite's clusters use (each node's bus listens 10,000 above).
PORTS = range(22000, 23000)


def find_server() -> str | None:
    """The redis-server binary to run cluster nodes with, or None."""
    wanted = os.environ.get("REDIS_SERVER_BIN")
    for name in (wanted,) if wanted else SERVER_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, start: int | None = None) -> list[int]:
    """``count`` ports from PORTS that are free, each with its bus port free too."""
    ports: list[int] = []
    first = start if start is not None else PORTS.start + (os.getpid() * 7) % 500
    candidates = [*range(first, PORTS.stop), *range(PORTS.start, first)]
    for port in candidates:
        if _free(port) and _free(port + 10000):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise RuntimeError(f"no {count} free ports with free bus ports in {PORTS}")


@dataclass
class Node:
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    #: The address the node listens on and announces (loopback unless hosts must reach it).
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(
            host=self.host, port=self.port, socket_timeout=5, socket_connect_timeout=2
        )


@dataclass
class Cluster:
    """Six nodes; ``url`` is any one of them, as an operator would configure it."""

    binary: str
    base: Path
    nodes: list[Node] = field(default_factory=list)
    host: str = "127.0.0.1"
    #: Each node keeps an append-only file (fsync every second), as a production node does.
    appendonly: bool = True

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start_node(self, node: Node) -> None:
        node.dir.mkdir(parents=True, exist_ok=True)
        log = open(node.dir / "node.log", "ab")  # noqa: SIM115 - kept for the process's life
        node.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(node.port),
                "--bind",
                node.host,
                "--cluster-announce-ip",
                node.host,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                "everysec",  # the default of a production node; "always" costs every write
                "--save",
                "",
                "--dir",
                str(node.dir),
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        _wait(lambda: _pings(node), 30, f"cluster node {node.port} did not start")

    def kill(self, node: Node) -> None:
        """SIGKILL one node (a crashed VM, as far as the cluster can tell)."""
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(30)
        node.proc = None

    def stop(self) -> None:
        for node in self.nodes:
            self.kill(node)
        shutil.rmtree(self.base, ignore_errors=True)

    def masters(self) -> list[Node]:
        """The nodes that are masters now, by their own word."""
        out = []
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                if node.client().info("replication")["role"] == "master":
                    out.append(node)
            except redis.RedisError:
                continue
        return out

    def wait_promoted(self, limit_s: float = 120) -> None:
        """Until the running nodes count three masters again: a killed master's replica won."""
        _wait(lambda: len(self.masters()) == 3, limit_s, "no replica was promoted")

    def wait_ok(self, limit_s: float = 60) -> None:
        """Until every running node says cluster_state:ok and sees three masters serving."""

        def ok() -> bool:
            for node in self.nodes:
                if node.proc is None:
                    continue
                try:
                    info = node.client().cluster("info")
                except redis.RedisError:
                    return False
                state = info.get("cluster_state") if isinstance(info, dict) else None
                if state != "ok":
                    return False
            return True

        _wait(ok, limit_s, "the cluster did not reach cluster_state:ok")


def _pings(node: Node) -> bool:
    try:
        return bool(node.client().ping())
    except redis.RedisError:
        return False


def _wait(predicate, limit_s: float, message: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise RuntimeError(message)


def start_cluster(base: Path, host: str = "127.0.0.1", appendonly: bool = True) -> Cluster:
    """Six nodes on free ports of ``host`` (loopback by default), joined as three masters
    with a replica each."""
    binary = find_server()
    if binary is None:
        raise RuntimeError(
            "no redis-server binary for the cluster tests: install redis-server (Redis 7) "
            "or set REDIS_SERVER_BIN"
        )
    cli = shutil.which("redis-cli") or str(Path(binary).with_name("redis-cli"))
    cluster = Cluster(binary, base, host=host, appendonly=appendonly)
    try:
        for port in free_ports(6):
            node = Node(port, base / str(port), host=host)
            cluster.nodes.append(node)
            cluster.start_node(node)
        if os.path.exists(cli):
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(f"{host}:{n.port}" for n in cluster.nodes),
                    "--cluster-replicas",
                    "1",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
        else:
            _create_by_hand(cluster)
        cluster.wait_ok(120)
        # Replicas must have synced once, or a fail-over has nothing to promote.
        _wait(lambda: len(cluster.masters()) == 3 and _replicas_linked(cluster), 60, "no sync")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _replicas_linked(cluster: Cluster) -> bool:
    for node in cluster.nodes:
        try:
            info = node.client().info("replication")
        except redis.RedisError:
            return False
        if info["role"] == "slave" and info.get("master_link_status") != "up":
            return False
    return True


def _create_by_hand(cluster: Cluster) -> None:
    """Without redis-cli: MEET, ADDSLOTSRANGE on three masters, REPLICATE on the others."""
    first = cluster.nodes[0].client()
    for node in cluster.nodes[1:]:
        first.execute_command("CLUSTER", "MEET", cluster.host, node.port)
    thirds = [(0, 5460), (5461, 10922), (10923, 16383)]
    for node, (lo, hi) in zip(cluster.nodes[:3], thirds, strict=True):
        node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
    _wait(lambda: len(first.execute_command("CLUSTER", "NODES").splitlines()) == 6, 30, "meet")
    for master, replica in zip(cluster.nodes[:3], cluster.nodes[3:], strict=True):
        master_id = master.client().execute_command("CLUSTER", "MYID")
        _wait(
            lambda r=replica, m=master_id: _try_replicate(r, m),
            30,
            "replicate",
        )


def _try_replicate(replica: Node, master_id: bytes) -> bool:
    try:
        replica.client().execute_command("CLUSTER", "REPLICATE", master_id)
        return True
    except redis.RedisError:
        return False
