"""Test-data producer: ``produce N``, ``continuous RATE``, ``file PATH`` and ``info``."""

from __future__ import annotations

import functools
import logging
import random
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from itertools import islice
from typing import IO, Any

import orjson
import redis

from ratebox import stream
from ratebox.route import Router

log = logging.getLogger(__name__)

FAMILY = [
    "Nguyễn",
    "Trần",
    "Lê",
    "Phạm",
    "Hoàng",
    "Huỳnh",
    "Phan",
    "Vũ",
    "Võ",
    "Đặng",
    "Bùi",
    "Đỗ",
    "Hồ",
    "Ngô",
    "Dương",
    "Lý",
]
MIDDLE = ["Văn", "Thị", "Hữu", "Đức", "Minh", "Ngọc", "Thanh", "Quốc", "Xuân", "Gia", "Bảo", "Kim"]
GIVEN = [
    "An",
    "Anh",
    "Bình",
    "Cường",
    "Dũng",
    "Duy",
    "Hà",
    "Hải",
    "Hạnh",
    "Hiếu",
    "Hoa",
    "Hùng",
    "Hương",
    "Huy",
    "Khánh",
    "Khoa",
    "Lan",
    "Linh",
    "Long",
    "Mai",
    "Nam",
    "Nga",
    "Nhung",
    "Phong",
    "Phúc",
    "Phương",
    "Quân",
    "Quang",
    "Sơn",
    "Tâm",
    "Thảo",
    "Thắng",
    "Trang",
    "Trí",
    "Tú",
    "Tuấn",
    "Vy",
    "Yến",
]
ASCII = str.maketrans(
    "àáảãạăằắẳẵặâầấẩẫậèéẻẽẹêềếểễệìíỉĩịòóỏõọôồốổỗộơờớởỡợùúủũụưừứửữựỳýỷỹỵđ"
    "ÀÁẢÃẠĂẰẮẲẴẶÂẦẤẨẪẬÈÉẺẼẸÊỀẾỂỄỆÌÍỈĨỊÒÓỎÕỌÔỒỐỔỖỘƠỜỚỞỠỢÙÚỦŨỤƯỪỨỬỮỰỲÝỶỸỴĐ",
    "aaaaaaaaaaaaaaaaaeeeeeeeeeeeiiiiiooooooooooooooooouuuuuuuuuuuyyyyyd"
    "AAAAAAAAAAAAAAAAAEEEEEEEEEEEIIIIIOOOOOOOOOOOOOOOOOUUUUUUUUUUUYYYYYD",
)
MOBILE_PREFIXES = [
    "032",
    "033",
    "034",
    "035",
    "036",
    "037",
    "038",
    "039",
    "056",
    "058",
    "070",
    "076",
    "077",
    "078",
    "079",
    "081",
    "082",
    "083",
    "084",
    "085",
    "086",
    "088",
    "089",
    "090",
    "093",
    "094",
    "096",
    "097",
    "098",
    "099",
]
MAIL_DOMAINS = ["gmail.com", "yahoo.com", "outlook.com", "fpt.vn", "vnpt.vn"]
SOURCES = ("web_crawler", "api", "mobile_app")
TZ = timezone(timedelta(hours=7))
#: The stream's ``producer`` field for generated entries.
PRODUCER = "ratebox_producer"
#: Generated entries per batch_id (and per timestamp).
BATCH = 1000

#: One way for an item to fail, per code of SPEC §5: the field it spoils and how, each breaking
#: exactly that rule. A spoiler gets the UTF-8 value and a random byte; None takes the field out.
INVALID_KINDS: tuple[tuple[int, str, Callable[[bytes, int], bytes | None]], ...] = (
    (100, "phone", lambda value, r: None),
    (101, "phone", lambda value, r: value[: 3 + r % 7]),
    (200, "bank_account", lambda value, r: b""),
    (201, "bank_account", lambda value, r: value[: 4 + r % 4]),
    (300, "email", lambda value, r: value.replace(b"@", (b"", b"@@", b" @")[r % 3])),
    (400, "name", lambda value, r: GIVEN[r % len(GIVEN)][0].encode()),
)

# fake_data() works on UTF-8 bytes, a column at a time, and picks with random bytes: formatting
# str with diacritics, encoding it and drawing numbers one by one cost more than the rest.
# No piece needs escaping inside a JSON string.
_GIVEN_NAMES = [given.encode() for given in GIVEN]
_LOCAL_PARTS = [
    [f"{given}.{family}".translate(ASCII).lower().encode() for given in GIVEN] for family in FAMILY
]
#: Rows: each family name with each middle name; columns: the given names. A cell is the full
#: name and its e-mail local part.
_PEOPLE = tuple(
    tuple(zip([b" ".join((first, given)) for given in _GIVEN_NAMES], local_parts, strict=True))
    for family, local_parts in zip(FAMILY, _LOCAL_PARTS, strict=True)
    for first in [f"{family} {middle}".encode() for middle in MIDDLE]
)
_PREFIXES = tuple(prefix.encode() for prefix in MOBILE_PREFIXES)
#: What follows an e-mail local part: "123@gmail.com", every number below 1,000 at every domain,
#: five numbers a row.
_ADDRESSES = tuple(
    tuple(
        b"%d@%b" % (number, domain)
        for number in range(row, row + 5)
        for domain in [domain.encode() for domain in MAIL_DOMAINS]
    )
    for row in range(0, 1000, 5)
)
_SOURCES = tuple(source.encode() for source in SOURCES)
_DIGITS = b"0123456789"
_FIELDS = ("phone", "bank_account", "email", "name", "source")


def _template(fields: Iterable[str]) -> bytes:
    """Compact JSON of an object of these string fields, their values to fill in with %."""
    return b"{" + b",".join(b'"%b":"%%b"' % field.encode() for field in fields) + b"}"


#: An item with every field, in the order of the columns of fake_data().
_ITEM = _template(_FIELDS)
#: An item without one of its fields.
_ITEM_WITHOUT = {gone: _template(f for f in _FIELDS if f != gone) for gone in _FIELDS}


def fake_data(
    rng: random.Random, n: int, invalid_share: float = 0.3
) -> tuple[list[bytes], list[bytes]]:
    """``n`` realistic Vietnamese contacts as compact JSON (UTF-8), and their sources.

    With probability ``invalid_share`` an item breaks exactly one rule, each kind of
    INVALID_KINDS equally often.
    """
    people = [
        _PEOPLE[row][column]
        for row, column in zip(
            _uniform(rng, n, len(_PEOPLE)), _uniform(rng, n, len(GIVEN)), strict=True
        )
    ]
    columns = {  # in the order of _FIELDS
        "phone": [
            _PREFIXES[prefix] + digits
            for prefix, digits in zip(
                _uniform(rng, n, len(_PREFIXES)),
                _cut(_uniform(rng, 7 * n, _DIGITS), 7),
                strict=True,
            )
        ],
        "bank_account": [
            digits[: 8 + extra]  # 8 to 14 digits
            for digits, extra in zip(
                _cut(_uniform(rng, 14 * n, _DIGITS), 14), _uniform(rng, n, 7), strict=True
            )
        ],
        "email": [
            local + _ADDRESSES[row][column]
            for (_, local), row, column in zip(
                people,
                _uniform(rng, n, len(_ADDRESSES)),
                _uniform(rng, n, len(_ADDRESSES[0])),
                strict=True,
            )
        ],
        "name": [name for name, _ in people],
        "source": [_SOURCES[i] for i in _uniform(rng, n, len(_SOURCES))],
    }
    limit = int(invalid_share * 65536)
    draws = memoryview(rng.randbytes(2 * n)).cast("H")
    kinds, params = _uniform(rng, n, len(INVALID_KINDS)), rng.randbytes(n)
    taken_out: list[tuple[int, str]] = []
    for i in [i for i, draw in enumerate(draws) if draw < limit]:
        _, field, spoil = INVALID_KINDS[kinds[i]]
        value = spoil(columns[field][i], params[i])
        if value is None:  # written again below, without the field
            taken_out.append((i, field))
        columns[field][i] = b"" if value is None else value
    data = [_ITEM % row for row in zip(*columns.values(), strict=True)]
    for i, gone in taken_out:
        data[i] = _ITEM_WITHOUT[gone] % tuple(v[i] for key, v in columns.items() if key != gone)
    return data, columns["source"]


def _uniform(rng: random.Random, n: int, alphabet: bytes | int) -> bytes:
    """``n`` random bytes of ``alphabet`` (or below it, if a number up to 256), equally likely."""
    table, uneven = _byte_map(bytes(range(alphabet)) if isinstance(alphabet, int) else alphabet)
    out = b""
    while len(out) < n:
        out += rng.randbytes(n - len(out) + n // 8 + 8).translate(table, uneven)
    return out[:n]


@functools.cache
def _byte_map(alphabet: bytes) -> tuple[bytes, bytes]:
    """Translation of random bytes onto ``alphabet``, and the bytes to drop to keep it even."""
    k = len(alphabet)
    return bytes(alphabet[b % k] for b in range(256)), bytes(range(256 - 256 % k, 256))


def _cut(buffer: bytes, width: int) -> tuple[bytes, ...]:
    """``buffer`` in pieces of ``width`` bytes (struct cuts in C)."""
    return _cutter(len(buffer) // width, width).unpack(buffer)


@functools.lru_cache(maxsize=16)
def _cutter(n: int, width: int) -> struct.Struct:
    return struct.Struct(f"{width}s" * n)


def fake_item(rng: random.Random, invalid_share: float = 0.3) -> dict[str, Any]:
    """A realistic Vietnamese contact; with probability ``invalid_share`` it breaks one rule."""
    item: dict[str, Any] = orjson.loads(fake_data(rng, 1, invalid_share)[0][0])
    return item


def entry(
    item: Any,
    batch_id: str,
    producer: str = PRODUCER,
    data: str | None = None,
    timestamp: str | None = None,
) -> dict[str, str]:
    """The stream fields of SPEC §4 for one item (``data`` given as text wins)."""
    source = item.get("source") if isinstance(item, dict) else None
    return {
        "data": data if data is not None else orjson.dumps(item).decode(),
        "source": source if isinstance(source, str) else "file",
        "timestamp": timestamp or now_text(),
        "producer": producer,
        "batch_id": batch_id,
    }


def now_text() -> str:
    """The current time as SPEC §4 writes it: ISO 8601 with the +07:00 offset."""
    return datetime.now(TZ).isoformat(timespec="seconds")


def generate(
    n: int, seed: int | None = None, invalid_share: float = 0.3
) -> Iterator[dict[str, str]]:
    """``n`` entries of fake items, in batches of 1,000 sharing a batch_id and a timestamp."""
    for fields in _entries(n, seed, invalid_share):
        yield {key: value.decode() for key, value in fields.items()}


def _entries(
    n: int, seed: int | None = None, invalid_share: float = 0.3
) -> Iterator[dict[str, bytes]]:
    """What generate() yields, with the values as UTF-8 bytes (Redis takes them as they are)."""
    for columns in _batches(n, seed, invalid_share):
        for values in zip(*columns.values(), strict=True):
            yield dict(zip(columns, values, strict=True))


def _batches(
    n: int,
    seed: int | None = None,
    invalid_share: float = 0.3,
    progress: Callable[[int], None] | None = None,
) -> Iterator[dict[str, list[bytes]]]:
    """The entries of _entries(), a batch at a time, as columns (field -> value per entry)."""
    rng = random.Random(seed)
    run = f"{int(time.time()):x}"
    producer = PRODUCER.encode()
    for start in range(0, n, BATCH):
        size = min(BATCH, n - start)
        data, sources = fake_data(rng, size, invalid_share)
        yield {
            "data": data,
            "source": sources,
            "timestamp": [now_text().encode()] * size,
            "producer": [producer] * size,
            "batch_id": [f"batch_{run}_{start // BATCH:05d}".encode()] * size,
        }
        if progress:
            progress(size)


def _router(name: str | Router) -> Router:
    return name if isinstance(name, Router) else Router([name])


def produce(
    client: redis.Redis,
    name: str | Router,
    n: int,
    delay: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Publish ``n`` entries: pipelined 1,000 per script call, or one every ``delay`` seconds.

    ``name`` is a stream, or a Router that sends each entry to its partition.
    """
    router = _router(name)
    if delay <= 0:
        if len(router.targets) == 1:
            return stream.publish_columns(client, router.targets[0], _batches(n, progress=progress))
        sent = 0
        for columns in _batches(n, progress=progress):
            for target, part in router.split_columns(columns).items():
                sent += stream.publish_columns(client, target, [part])
        return sent
    sent = 0
    for fields in _entries(n):
        client.xadd(router.target(fields["data"]), fields)  # type: ignore[arg-type]
        sent += 1
        if progress:
            progress(1)
        time.sleep(delay)
    return sent


def continuous(
    client: redis.Redis,
    name: str | Router,
    rate: float,
    keep_going: Callable[[], bool],
    tick_s: float = 0.01,
) -> int:
    """Publish ``rate`` entries a second until ``keep_going()`` is false; holds the rate by clock."""
    started = time.monotonic()
    sent = 0
    items = _entries(sys.maxsize)
    while keep_going():
        due = int((time.monotonic() - started) * rate) - sent
        if due > 0:
            sent += publish_routed(client, name, islice(items, min(due, 5000)))
        else:
            time.sleep(tick_s)
    return sent


def from_lines(lines: Iterable[str]) -> Iterator[dict[str, str]]:
    """One entry per non-blank line; the line is the data as it is (bad JSON gets its 900 row)."""
    batch = f"file_{int(time.time()):x}"
    for line in lines:
        text = line.strip()
        if not text:
            continue
        try:
            item = orjson.loads(text)
        except orjson.JSONDecodeError:
            item = None
        yield entry(item, batch, data=text)


def publish_file(client: redis.Redis, name: str | Router, handle: IO[str]) -> int:
    """Publish one entry per JSON line of an open file."""
    return publish_routed(client, name, from_lines(handle))


def publish_routed(
    client: redis.Redis, name: str | Router, messages: Iterable[Any], chunk: int = 1000
) -> int:
    """Publish entries to their partitions, ``chunk`` at a time; returns how many."""
    router = _router(name)
    if len(router.targets) == 1:
        return len(stream.publish(client, router.targets[0], messages))
    sent, rest = 0, iter(messages)
    while batch := list(islice(rest, chunk)):
        for target, part in router.split(batch).items():
            sent += len(stream.publish(client, target, part))
    return sent


def info(client: redis.Redis, name: str) -> dict[str, Any]:
    """Stream length, first/last entry IDs, and each group's pending and lag."""
    raw = stream.stream_info(client, name)
    if raw is None:
        return {"stream": name, "exists": False}
    first, last = raw.get("first-entry"), raw.get("last-entry")
    return {
        "stream": name,
        "exists": True,
        "length": raw.get("length", 0),
        "first_id": _id(first[0]) if first else None,
        "last_id": _id(last[0]) if last else None,
        "groups": [
            {
                "name": _id(g["name"]),
                "consumers": g.get("consumers", 0),
                "pending": g.get("pending", 0),
                "last_delivered": _id(g.get("last-delivered-id", b"")),
                "lag": g.get("lag"),
            }
            for g in stream.groups(client, name)
        ],
    }


def _id(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
