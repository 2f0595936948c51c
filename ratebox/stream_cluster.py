"""Redis Cluster for ratebox.stream: the client, its outage errors, and the node that holds a key.

Every other module keeps calling ratebox.stream; with ``redis.cluster: true`` the client it
is handed is a RedisCluster, which routes each single-key command and each script (by its
KEYS) to the master of the key's slot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MasterDownError,
    ReadOnlyError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

#: A cluster between two states is an outage: a slot moving (MOVED/ASK, TRYAGAIN), a master
#: down before its replica is promoted (CLUSTERDOWN, MASTERDOWN), a demoted master (READONLY),
#: a slot nobody serves yet. Waited out like a refused connection; never a message's fault.
CLUSTER_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    AskError,  # and MovedError, its subclass
    TryAgainError,
    ClusterDownError,
    MasterDownError,
    ClusterError,
    ReadOnlyError,
    SlotNotCoveredError,
    # Raised by the client when no node it knows answers any more (a host cut off from the
    # cluster): "Redis Cluster cannot be connected". Its other uses are mistakes in the
    # commands sent (keys of several slots), which RateBox's one-slot steps never make.
    RedisClusterException,
)


def connect_cluster(url: str, **options: Any) -> RedisCluster:
    """A RedisCluster from any node's URL (password and TLS as in the URL), bytes replies."""
    # The client discovers the other nodes from this one, follows a MOVED/ASK by itself a
    # few times, and reads the slot map again after a fail-over; what still fails reaches our
    # loops as an outage.
    try:
        # RESP2, as for one node: redis-py's cluster client would pick RESP3 and, with it,
        # maintenance notifications that cost a second socket read per command.
        return RedisCluster.from_url(url, **{"decode_responses": False, "protocol": 2, **options})
    except RedisClusterException as exc:
        # Raised when no node answers the slot map: for us, Redis is not there right now.
        raise redis.ConnectionError(str(exc)) from None


def is_cluster(client: Any) -> bool:
    """True for a RedisCluster client."""
    return isinstance(client, RedisCluster)


def node_for(client: Any, key: str) -> redis.Redis:
    """The plain client of the master that holds ``key``'s slot (``client`` itself off cluster)."""
    if not isinstance(client, RedisCluster):
        return client
    return client.get_redis_connection(client.get_node_from_key(key))


def forget_slots(client: Any) -> None:
    """After a redirection seen outside the cluster client: read the slot map again next time."""
    if isinstance(client, RedisCluster):
        client.nodes_manager.initialize()


def on_every_node(client: Any, do: Callable[[redis.Redis], None]) -> None:
    """Apply ``do`` to the client of every node known now (nothing off cluster)."""
    if isinstance(client, RedisCluster):
        for node in client.get_nodes():
            do(client.get_redis_connection(node))
