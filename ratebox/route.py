"""Where items live: partition names, routing an item to a partition, and which worker reads what.

Pure functions, no I/O. The routing rule is meant to be written again in any producer's
language: ``zlib.crc32(text) % partitions``, text being the UTF-8 of ``data[key]`` as a string.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import orjson


def is_partitioned(partitions: int, cluster: bool) -> bool:
    """False only for one partition on one node: then the stream keeps its plain name."""
    return partitions > 1 or cluster


def partition_name(name: str, p: int) -> str:
    """The stream of partition ``p``: ``{NAME:p}`` (the braces are the cluster hash tag)."""
    return f"{{{name}:{p}}}"


def dead_letter_name(name: str, p: int) -> str:
    """The dead-letter stream of partition ``p``; it shares the partition's slot."""
    return partition_name(name, p) + ":dead"


def streams(name: str, dead_letter: str, partitions: int, cluster: bool) -> list[tuple[str, str]]:
    """Every partition as (stream, dead-letter stream), in partition order."""
    if not is_partitioned(partitions, cluster):
        return [(name, dead_letter)]
    return [(partition_name(name, p), dead_letter_name(name, p)) for p in range(partitions)]


def key_text(value: Any) -> str:
    """A field's value as the text routing hashes: a string as it is, anything else as JSON."""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def route(item: Any, partitions: int, key: str | None, counter: int) -> int:
    """The partition of an item: crc32 of ``item[key]``'s text mod P, else ``counter`` mod P.

    ``counter`` is the producer's running count of items sent: without a key (or when the
    item lacks the field) items go round robin.
    """
    if partitions <= 1:
        return 0
    if key is not None and isinstance(item, Mapping) and item.get(key) is not None:
        return zlib.crc32(key_text(item[key]).encode("utf-8")) % partitions
    return counter % partitions


def assigned(k: int, workers: int, partitions: int) -> list[int]:
    """The partitions worker ``k`` (1 … W) reads: p mod W = k − 1 when W ≤ P, else (k − 1) mod P."""
    if workers <= partitions:
        return [p for p in range(partitions) if p % workers == k - 1]
    return [(k - 1) % partitions]


def settings_streams(settings: Any) -> list[tuple[str, str]]:
    """Every partition of the configured stream as (stream, dead-letter stream)."""
    s = settings.stream
    return streams(s.name, s.dead_letter, s.partitions, settings.redis.cluster)


def stream_names(settings: Any) -> list[str]:
    """The configured partitions' stream keys (one name when not partitioned), e.g. for sampling."""
    return [stream for stream, _ in settings_streams(settings)]


class Router:
    """Routes items to their partition's stream, keeping the round robin count between calls."""

    def __init__(self, targets: list[str], key: str | None = None) -> None:
        self.targets = targets
        self.key = key
        self.counter = 0

    @classmethod
    def of(cls, settings: Any) -> Router:
        """The router of the configured partitions and partition key."""
        return cls(stream_names(settings), settings.stream.partition_key)

    def target(self, data: Any) -> str:
        """The stream of one item (``data`` as a mapping, or its JSON text)."""
        if len(self.targets) == 1:
            return self.targets[0]
        item = data
        if self.key is not None and isinstance(data, (str, bytes)):
            try:
                item = orjson.loads(data)
            except orjson.JSONDecodeError:
                item = None  # malformed: any partition judges it the same (code 900)
        p = route(item, len(self.targets), self.key, self.counter)
        if self.key is None or not isinstance(item, Mapping) or item.get(self.key) is None:
            self.counter += 1
        return self.targets[p]

    def split(self, messages: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
        """Stream entries grouped by their partition's stream, in order within each."""
        out: dict[str, list[Mapping[str, Any]]] = {}
        for fields in messages:
            out.setdefault(self.target(fields.get("data")), []).append(fields)
        return out

    def split_columns(self, columns: Mapping[str, list[Any]]) -> dict[str, dict[str, list[Any]]]:
        """A batch of entries as columns, split into one such batch per partition."""
        if len(self.targets) == 1:
            return {self.targets[0]: dict(columns)}
        rows: dict[str, list[int]] = {}
        for i, data in enumerate(columns["data"]):
            rows.setdefault(self.target(data), []).append(i)
        return {
            target: {field: [values[i] for i in picked] for field, values in columns.items()}
            for target, picked in rows.items()
        }
