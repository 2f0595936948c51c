"""ratebox.route: partition names, routing and assignment, as properties."""

from __future__ import annotations

import zlib
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from ratebox import config, route
from ratebox.route import Router

values = st.one_of(st.text(), st.integers(), st.booleans(), st.floats(allow_nan=False))


@given(workers=st.integers(1, 64), partitions=st.integers(1, 64))
def test_every_partition_is_read_by_some_worker_and_no_worker_reads_nothing(
    workers: int, partitions: int
) -> None:
    read = [route.assigned(k, workers, partitions) for k in range(1, workers + 1)]
    assert set().union(*map(set, read)) == set(range(partitions))
    assert all(read)
    if workers <= partitions:  # each partition has exactly one reader then
        assert sorted(p for ps in read for p in ps) == list(range(partitions))


@given(item=st.dictionaries(st.text(), values), key=st.text(), p=st.integers(1, 1024))
def test_routing_by_key_is_the_crc32_of_the_text_and_stable(item, key, p) -> None:
    first = route.route(item, p, key, counter=0)
    assert 0 <= first < p
    assert route.route(item, p, key, counter=12345) == first or item.get(key) is None
    if isinstance(item.get(key), str):
        assert first == zlib.crc32(item[key].encode("utf-8")) % p


@given(p=st.integers(1, 50), rounds=st.integers(1, 20))
def test_round_robin_without_a_key_is_even(p: int, rounds: int) -> None:
    router = Router([f"s{i}" for i in range(p)], key=None)
    got = Counter(router.target('{"phone": "1"}') for _ in range(p * rounds))
    assert set(got.values()) == {rounds} and len(got) == p


def test_items_without_the_key_go_round_robin_and_keep_the_keyed_ones_in_place() -> None:
    router = Router(["a", "b", "c"], key="source")
    keyed = {router.target('{"source": "web_crawler"}') for _ in range(10)}
    assert len(keyed) == 1
    assert [router.target("{}") for _ in range(3)] == ["a", "b", "c"]
    assert router.target("not json") in {"a", "b", "c"}


def test_names_follow_the_hash_tag_rule_and_the_default_keeps_the_plain_stream() -> None:
    assert route.streams("raw_items", "raw_items:dead", 1, False) == [
        ("raw_items", "raw_items:dead")
    ]
    assert route.streams("raw_items", "raw_items:dead", 1, True) == [
        ("{raw_items:0}", "{raw_items:0}:dead")
    ]
    assert route.stream_names(config.from_mapping({"stream": {"partitions": 3}}, {})) == [
        "{raw_items:0}",
        "{raw_items:1}",
        "{raw_items:2}",
    ]


def test_a_router_splits_columns_by_partition_in_order() -> None:
    router = Router(["a", "b"], key="k")
    cols = {"data": [b'{"k": "x"}', b'{"k": "y"}', b'{"k": "x"}'], "n": [b"1", b"2", b"3"]}
    split = router.split_columns(cols)
    assert sum(len(c["n"]) for c in split.values()) == 3
    x = router.target(b'{"k": "x"}')
    mine = [n for n in split[x]["n"] if n != b"2"]
    assert mine == [b"1", b"3"]  # the entries of one key keep their order


def test_partitioned_workers_learn_the_live_count_and_restart_when_it_changes() -> None:
    from ratebox import topology
    from ratebox.topology import Child

    plain = config.from_mapping({"workers": {"count": 2}}, {})
    assert topology.desired_children(plain, 3)["worker_001"].settings is plain
    split = config.from_mapping({"workers": {"count": 2}, "stream": {"partitions": 6}}, {})
    before = topology.desired_children(split, 2)
    after = topology.desired_children(split, 3)
    assert after["worker_001"].settings.workers.count == 3
    child = Child("worker_001", "worker", before["worker_001"].settings)
    assert not topology.is_stale(child, topology.desired_children(split, 2)["worker_001"])
    assert topology.is_stale(child, after["worker_001"])
    # The sweeper reads every partition whatever the count: never restarted for it.
    sweeper = Child("sweeper", "sweeper", before["sweeper"].settings)
    assert not topology.is_stale(sweeper, after["sweeper"])
