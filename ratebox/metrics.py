"""Prometheus families made from a monitor snapshot, and the registry /metrics serves."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from ratebox import buckets, inert

Snapshot = dict[str, Any]


def metric_families(snap: Snapshot) -> Iterator[Metric]:
    """The snapshot as Prometheus metric families (what /metrics serves)."""
    servers = snap["servers"]
    for server in ("redis", "postgres"):
        up = GaugeMetricFamily(f"ratebox_{server}_up", f"1 when the monitor could read {server}")
        up.add_metric([], 1.0 if servers.get(server, {}).get("available") else 0.0)
        yield up
    yield _gauge(
        "ratebox_monitor_collect_seconds",
        "Time the last report took",
        [([], snap["timings_ms"]["total"] / 1000)],
    )
    yield from _stream_metrics(snap)
    yield from _partition_metrics(snap)
    yield from _database_metrics(snap)
    yield from _process_metrics(snap)


def _gauge(
    name: str, doc: str, samples: list[tuple[list[str], float]], labels: list[str] | None = None
) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels or [])
    for values, value in samples:
        family.add_metric(_labels(values), value)
    return family


def _counter(
    name: str, doc: str, samples: list[tuple[list[str], float]], labels: list[str]
) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(_labels(values), value)
    return family


def _partition_metrics(snap: Snapshot) -> Iterator[Metric]:
    """Each partition's figures (label partition); the stream and group metrics are the totals."""
    rows = snap.get("partitions") or []
    if not rows:
        return
    labels = ["partition", "stream"]
    for key, doc in (
        ("length", "Entries in the partition's stream (XLEN)"),
        ("pending", "Entries delivered and not yet acknowledged, in the partition"),
        ("lag", "Entries of the partition not yet delivered to the group"),
        ("dead_letter", "Entries in the partition's dead-letter stream"),
    ):
        yield _gauge(
            f"ratebox_partition_{key}",
            doc,
            [([str(r["partition"]), r["name"]], r[key]) for r in rows if r[key] is not None],
            labels,
        )


def _labels(values: list[str]) -> list[str]:
    # Label values come from Redis and the database (consumer, group, field names): the text
    # format escapes quotes and newlines, but not what a terminal running curl would obey.
    return [inert.text(v, 200) for v in values]


def _stream_metrics(snap: Snapshot) -> Iterator[Metric]:
    st = snap["stream"]
    if st is None:
        return
    s = [st["name"]]
    yield _gauge(
        "ratebox_stream_length", "Entries in the stream (XLEN)", [(s, st["length"])], ["stream"]
    )
    if st["memory_bytes"] is not None:
        yield _gauge(
            "ratebox_stream_memory_bytes",
            "MEMORY USAGE of the stream (sampled)",
            [(s, st["memory_bytes"])],
            ["stream"],
        )
    yield _gauge(
        "ratebox_dead_letter_length",
        "Entries in the dead-letter stream",
        [([st["dead_letter"]["name"]], st["dead_letter"]["length"])],
        ["stream"],
    )
    groups = snap["groups"]
    labels = ["stream", "group"]
    yield _gauge(
        "ratebox_group_consumers",
        "Consumers in the group",
        [([*s, g["name"]], g["consumers"]) for g in groups],
        labels,
    )
    yield _gauge(
        "ratebox_group_pending",
        "Entries delivered but not acknowledged",
        [([*s, g["name"]], g["pending"]) for g in groups],
        labels,
    )
    yield _gauge(
        "ratebox_group_oldest_pending_seconds",
        "Age of the group's oldest unacknowledged entry (since Redis added it); 0 when none",
        [([*s, g["name"]], g["oldest_pending_s"]) for g in groups],
        labels,
    )
    yield _gauge(
        "ratebox_group_lag",
        "Entries not yet delivered to the group",
        [([*s, g["name"]], g["lag"]) for g in groups if g["lag"] is not None],
        labels,
    )
    yield _gauge(
        "ratebox_group_lag_unknown",
        "1 when the lag is neither reported by Redis nor countable in one sample (then absent)",
        [([*s, g["name"]], 1.0 if g["lag"] is None else 0.0) for g in groups],
        labels,
    )
    per_consumer = [(g["name"], c) for g in groups for c in g["consumer_list"]]
    labels = ["group", "consumer"]
    yield _gauge(
        "ratebox_consumer_pending",
        "Entries the consumer holds unacknowledged",
        [([g, c["name"]], c["pending"]) for g, c in per_consumer],
        labels,
    )
    yield _gauge(
        "ratebox_consumer_idle_seconds",
        "Seconds since the consumer last read",
        [([g, c["name"]], c["idle_s"]) for g, c in per_consumer],
        labels,
    )


def _database_metrics(snap: Snapshot) -> Iterator[Metric]:
    db = snap["database"]
    if db is None:
        return
    totals = db["totals"]
    yield _gauge(
        "ratebox_items",
        "raw_items rows of the stream by status",
        [([k], totals[k]) for k in ("done", "error", "pending")],
        ["status"],
    )
    perf = snap["consumer_performance"]
    for key, doc in (
        ("processed", "Verdicts written by the consumer"),
        ("errors", "Verdicts with at least one failure"),
        ("dead_lettered", "Entries given up after max_retries deliveries (code 910)"),
    ):
        yield _counter(f"ratebox_{key}", doc, [([c["name"]], c[key]) for c in perf], ["consumer"])
    # Buckets counted by the workers in each batch transaction (ratebox.buckets): quantiles
    # with histogram_quantile(), the average with rate(_sum) / rate(_count).
    histogram = HistogramMetricFamily(
        "ratebox_processing_seconds", "Time spent judging an item", labels=["consumer"]
    )
    for c in perf:
        histogram.add_metric(
            _labels([c["name"]]),
            buckets.cumulative(c.get("buckets") or []),
            (c["total_ms"] or 0.0) / 1000,
        )
    yield histogram
    yield _gauge(
        "ratebox_processing_max_seconds",
        "Longest time spent on one item in the last hour",
        [([c["name"]], c["max_ms_1h"] / 1000) for c in perf if c["max_ms_1h"] is not None],
        ["consumer"],
    )
    yield _gauge(
        "ratebox_errors_last_hour",
        "Failures in the last hour by error code and field",
        [([str(e["code"]), e["field"]], e["count"]) for e in snap["top_errors"]],
        ["code", "field"],
    )
    tp = snap["throughput"]
    yield _gauge(
        "ratebox_throughput_messages_per_second",
        "Verdicts written per second over the window",
        [(["1m"], tp["per_s_1m"]), (["5m"], tp["per_s_5m"])],
        ["window"],
    )


def _process_metrics(snap: Snapshot) -> Iterator[Metric]:
    procs = snap["processes"]
    if procs is None:
        return
    up = procs["available"] and procs["supervisor_up"]
    yield _gauge(
        "ratebox_supervisor_up",
        "1 when the supervisor process is alive",
        [([], 1.0 if up else 0.0)],
    )
    if not procs["available"]:
        return
    workers = procs["workers"]
    if workers["desired"] is not None:
        yield _gauge(
            "ratebox_workers_desired",
            "Workers the supervisor wants (workers.count, signals, or the autoscaler)",
            [([], workers["desired"])],
        )
    yield _gauge(
        "ratebox_workers_running",
        "Worker processes up and working",
        [([], workers["running"])],
    )
    children = procs["children"]
    labels = ["name", "role"]
    yield _counter(
        "ratebox_worker_restarts",
        "Restarts of the child by the supervisor",
        [([c["name"], c["role"]], c["restarts"]) for c in children],
        labels,
    )
    yield _gauge(
        "ratebox_child_up",
        "1 when the child process is alive",
        [([c["name"], c["role"]], 1.0 if c["alive"] else 0.0) for c in children],
        labels,
    )
    yield _gauge(
        "ratebox_process_cpu_percent",
        "CPU use of the process since the previous report",
        [
            ([c["name"], c["role"]], c["cpu_percent"])
            for c in children
            if c["cpu_percent"] is not None
        ],
        labels,
    )
    yield _gauge(
        "ratebox_process_resident_memory_bytes",
        "Resident memory of the process",
        [([c["name"], c["role"]], c["rss_bytes"]) for c in children if c["rss_bytes"] is not None],
        labels,
    )


class SnapshotCollector(Collector):
    """Serves the latest snapshot; a scrape never queries the servers itself."""

    def __init__(self, latest: Callable[[], Snapshot | None]) -> None:
        self.latest = latest

    def collect(self) -> Iterator[Metric]:
        snap = self.latest()
        if snap is not None:
            yield from metric_families(snap)

    def describe(self) -> Iterator[Metric]:
        # Nothing to describe before the first snapshot; also keeps register() from collecting.
        return iter(())


def registry_for(latest: Callable[[], Snapshot | None]) -> CollectorRegistry:
    """A registry of our own (no process/platform defaults) serving the latest snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(latest))
    return registry
