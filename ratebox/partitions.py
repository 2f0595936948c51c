"""The monitor's figures over partitions: each partition's own, and the totals across them.

Pure apart from the ``one`` callable the monitor passes in, which reads one partition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ratebox import route

Snapshot = dict[str, Any]
ReadOne = Callable[[Any, str, str], tuple[Snapshot, list[Snapshot]]]


def partitioned_figures(
    client: Any, settings: Any, one: ReadOne
) -> tuple[Snapshot, list[Snapshot], list[Snapshot]]:
    """(stream totals, groups summed over partitions, one row per partition)."""
    every = route.settings_streams(settings)
    if not route.is_partitioned(settings.stream.partitions, settings.redis.cluster):
        figures, groups = one(client, *every[0])
        return figures, groups, []
    read = [(name, *one(client, name, dead)) for name, dead in every]
    rows = [
        partition_row(p, name, figures, groups) for p, (name, figures, groups) in enumerate(read)
    ]
    totals = stream_totals(settings.stream.name, [figures for _, figures, _ in read])
    return totals, merge_groups([groups for _, _, groups in read]), rows


def partition_row(
    p: int, name: str, figures: Mapping[str, Any], groups: Iterable[Mapping[str, Any]]
) -> Snapshot:
    """One partition's line: length, dead letters, and its groups' pending and lag summed."""
    groups = list(groups)
    lags = [g["lag"] for g in groups if g["lag"] is not None]
    return {
        "partition": p,
        "name": name,
        "length": figures["length"],
        "dead_letter": figures["dead_letter"]["length"],
        "pending": sum(g["pending"] for g in groups),
        "lag": sum(lags) if lags or not groups else None,
        "consumers": sum(g["consumers"] for g in groups),
    }


def stream_totals(name: str, parts: list[Mapping[str, Any]]) -> Snapshot:
    """The stream section for all partitions together: lengths and memory summed."""
    ids = [(p["first_id"], p["last_id"]) for p in parts if p["exists"]]
    memory = [p["memory_bytes"] for p in parts if p["memory_bytes"] is not None]
    return {
        "name": f"{name} ({len(parts)} partitions)",
        "exists": any(p["exists"] for p in parts),
        "length": sum(p["length"] for p in parts),
        "first_id": min((first for first, _ in ids if first), key=_id_key, default=None),
        "last_id": max((last for _, last in ids if last), key=_id_key, default=None),
        "last_generated_id": None,
        "memory_bytes": sum(memory) if memory else None,
        "dead_letter": {
            "name": f"{{{name}:*}}:dead",
            "length": sum(p["dead_letter"]["length"] for p in parts),
        },
    }


def merge_groups(per_partition: Iterable[Iterable[Mapping[str, Any]]]) -> list[Snapshot]:
    """Each group over every partition: pending and lag summed, a consumer's pending summed."""
    merged: dict[str, Snapshot] = {}
    for groups in per_partition:
        for g in groups:
            into = merged.setdefault(
                g["name"],
                {
                    "name": g["name"],
                    "consumers": 0,
                    "pending": 0,
                    "oldest_pending_s": 0.0,
                    "lag": 0,
                    "lag_source": "read",
                    "last_delivered": None,
                    "consumer_list": [],
                },
            )
            into["pending"] += g["pending"]
            into["oldest_pending_s"] = max(into["oldest_pending_s"], g.get("oldest_pending_s", 0.0))
            into["lag"] = (
                None if into["lag"] is None or g["lag"] is None else into["lag"] + g["lag"]
            )
            if g["lag_source"] == "unknown" or into["lag_source"] == "unknown":
                into["lag_source"] = "unknown"
            elif g["lag_source"] == "counted":
                into["lag_source"] = "counted"
            last = [x for x in (into["last_delivered"], g["last_delivered"]) if x]
            into["last_delivered"] = max(last, key=_id_key, default=None)
            into["consumer_list"].extend(g["consumer_list"])
    for group in merged.values():
        group["consumer_list"] = _merge_consumers(group["consumer_list"])
        group["consumers"] = len(group["consumer_list"])
    return list(merged.values())


def _merge_consumers(consumers: list[Mapping[str, Any]]) -> list[Snapshot]:
    by_name: dict[str, Snapshot] = {}
    for c in consumers:
        seen = by_name.get(c["name"])
        if seen is None:
            by_name[c["name"]] = dict(c)
        else:
            seen["pending"] += c["pending"]
            seen["idle_s"] = min(seen["idle_s"], c["idle_s"])
    return sorted(by_name.values(), key=lambda c: c["name"])


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)


def merge_consumer_rows(rows: Iterable[Mapping[str, Any]]) -> list[Snapshot]:
    """The database's per-(partition, consumer) performance rows as one row per consumer."""
    merged: dict[str, Snapshot] = {}
    for row in rows:
        seen = merged.get(row["name"])
        if seen is None:
            merged[row["name"]] = dict(row)
            continue
        for key in ("processed", "errors", "dead_lettered", "total_ms"):
            seen[key] = (seen.get(key) or 0) + (row.get(key) or 0)
        maxes = [m for m in (seen.get("max_ms_1h"), row.get("max_ms_1h")) if m is not None]
        seen["max_ms_1h"] = max(maxes) if maxes else None
        if row.get("last_active") and (
            not seen.get("last_active") or row["last_active"] > seen["last_active"]
        ):
            for key in ("last_active", "hostname", "pid", "started_at"):
                seen[key] = row.get(key)
    for row in merged.values():
        processed = row.get("processed") or 0
        row["error_rate"] = (row.get("errors") or 0) / processed if processed else 0.0
        if processed and row.get("total_ms") is not None:
            row["avg_ms"] = row["total_ms"] / processed
    return sorted(merged.values(), key=lambda r: r["name"])
