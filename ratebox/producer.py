"""Test-data producer: ``produce N``, ``continuous RATE``, ``file PATH`` and ``info``."""

from __future__ import annotations

import logging
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from typing import IO, Any

import orjson
import redis

from ratebox import stream

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

#: One way for an item to fail, per code of SPEC §5: each breaks exactly that rule.
INVALID_KINDS: tuple[tuple[int, Callable[[dict[str, Any], random.Random], None]], ...] = (
    (100, lambda item, rng: item.pop("phone")),
    (101, lambda item, rng: item.update(phone=item["phone"][: rng.randint(3, 9)])),
    (200, lambda item, rng: item.update(bank_account="")),
    (201, lambda item, rng: item.update(bank_account=item["bank_account"][: rng.randint(4, 7)])),
    (
        300,
        lambda item, rng: item.update(
            email=item["email"].replace("@", rng.choice(["", "@@", " @"]))
        ),
    ),
    (400, lambda item, rng: item.update(name=rng.choice(GIVEN)[0])),
)


#: Every full name with its e-mail local part, made once: the generator picks by index.
PEOPLE = tuple(
    (f"{family} {middle} {given}", f"{given}.{family}".translate(ASCII).lower())
    for family in FAMILY
    for middle in MIDDLE
    for given in GIVEN
)


def fake_item(rng: random.Random, invalid_share: float = 0.3) -> dict[str, Any]:
    """A realistic Vietnamese contact; with probability ``invalid_share`` it breaks one rule."""
    # rng.random() and indexing: several times faster than choice()/randint(), and the
    # producer must publish 100,000 items a second.
    r = rng.random
    name, local = PEOPLE[int(r() * len(PEOPLE))]
    digits = 8 + int(r() * 7)
    item: dict[str, Any] = {
        "phone": f"{MOBILE_PREFIXES[int(r() * len(MOBILE_PREFIXES))]}{int(r() * 10_000_000):07d}",
        "bank_account": f"{int(r() * 10**digits):0{digits}d}",
        "email": f"{local}{int(r() * 1000)}@{MAIL_DOMAINS[int(r() * len(MAIL_DOMAINS))]}",
        "name": name,
        "source": SOURCES[int(r() * len(SOURCES))],
    }
    if r() < invalid_share:
        INVALID_KINDS[int(r() * len(INVALID_KINDS))][1](item, rng)
    return item


def entry(
    item: Any,
    batch_id: str,
    producer: str = "ratebox_producer",
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
    rng = random.Random(seed)
    run = f"{int(time.time()):x}"
    for i in range(n):
        if i % 1000 == 0:
            batch, stamp = f"batch_{run}_{i // 1000:05d}", now_text()
        yield entry(fake_item(rng, invalid_share), batch, timestamp=stamp)


def produce(
    client: redis.Redis,
    name: str,
    n: int,
    delay: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Publish ``n`` entries: pipelined 1,000 per round trip, or one every ``delay`` seconds."""
    sent = 0
    items = generate(n)
    if delay <= 0:
        for chunk in _chunks(items, 1000):
            stream.publish(client, name, chunk)
            sent += len(chunk)
            if progress:
                progress(len(chunk))
        return sent
    for fields in items:
        client.xadd(name, fields)  # type: ignore[arg-type]
        sent += 1
        if progress:
            progress(1)
        time.sleep(delay)
    return sent


def continuous(
    client: redis.Redis,
    name: str,
    rate: float,
    keep_going: Callable[[], bool],
    tick_s: float = 0.01,
) -> int:
    """Publish ``rate`` entries a second until ``keep_going()`` is false; holds the rate by clock."""
    started = time.monotonic()
    sent = 0
    items = generate(sys.maxsize)
    while keep_going():
        due = int((time.monotonic() - started) * rate) - sent
        if due > 0:
            chunk = [next(items) for _ in range(min(due, 5000))]
            stream.publish(client, name, chunk)
            sent += len(chunk)
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


def publish_file(client: redis.Redis, name: str, handle: IO[str]) -> int:
    """Publish one entry per JSON line of an open file."""
    sent = 0
    for chunk in _chunks(from_lines(handle), 1000):
        stream.publish(client, name, chunk)
        sent += len(chunk)
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


def _chunks(items: Iterable[dict[str, str]], size: int) -> Iterator[list[dict[str, str]]]:
    chunk: list[dict[str, str]] = []
    for fields in items:
        chunk.append(fields)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
