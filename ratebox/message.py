"""Turns a Redis stream entry's fields into an item or a pipeline error (900/901/902); pure."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, NamedTuple

import orjson

from ratebox.rules import Failure

#: `data` is not a JSON object, or not valid UTF-8.
MALFORMED = 900
#: The entry has no `data` field.
MISSING_DATA = 901
#: The entry is larger than limits.max_message_bytes.
TOO_LARGE = 902
#: The database refused the row (the rest of its batch still commits).
DB_REJECTED = 903
#: Given up after max_retries deliveries and copied to the dead-letter stream.
DEAD_LETTERED = 910
#: Pipeline failures are reported against this field.
DATA_FIELD = "data"
#: How much of a refused entry's text is kept in raw_items.data, in characters.
RAW_KEEP_CHARS = 1000

# PostgreSQL refuses U+0000 in text and jsonb; it becomes the replacement character.
_NUL = "\x00"
_REPLACEMENT = "\ufffd"
# JSON cannot hold a raw NUL byte inside a string, only this escape: if the text lacks it, the
# parsed item holds no NUL and the sanitizing walk can be skipped.
_NUL_ESCAPE = b"\\u0000"
# A UTF-8 character is at most 4 bytes: this many bytes always decode to enough characters.
RAW_KEEP_BYTES = 4 * RAW_KEEP_CHARS + 4
#: The field that stands for an entry larger than limits.max_message_bytes, holding its size:
#: such an entry leaves Redis as this, its metadata and the start of its data, never whole.
TOO_LARGE_FIELD = b"ratebox:too-large"
_JSON_KIND = {str: "string", int: "number", float: "number", bool: "boolean", list: "array"}


class Decoded(NamedTuple):
    """A decoded entry: the item (or the pipeline error) and the JSON text to store."""

    item: dict[str, Any] | None
    #: What raw_items.data gets, as JSON text: the entry's own text when it can be stored as
    #: sent, else the sanitized item, else {"_raw": what is kept of a refused entry}.
    text: str
    error: Failure | None
    source: str | None
    producer: str | None
    batch_id: str | None
    produced_at: datetime | None


def pipeline_failure(code: int, message: str) -> Failure:
    """A failure of the pipeline (900 and above), reported against the `data` field."""
    return Failure(code, DATA_FIELD, message)


class JSONNumber(str):
    """A JSON number no int or float holds exactly, kept as the text it was sent as."""


def _int_or_text(text: str) -> Any:
    return int(text) if len(text) <= 18 else JSONNumber(text)


def _float_or_text(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else JSONNumber(text)


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")  # json accepts NaN and Infinity; JSON does not


def loads_exact(data: bytes | str) -> Any:
    """JSON like orjson.loads, but numbers beyond 64 bits or a double's range kept as text."""
    # UTF-8 only: json.loads would guess UTF-16 or UTF-32 from the first bytes.
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    return json.loads(
        text, parse_int=_int_or_text, parse_float=_float_or_text, parse_constant=_no_constant
    )


def decode(fields: Mapping[bytes | str, bytes | str], max_bytes: int) -> Decoded:
    """The entry's item and metadata, or the first pipeline error (902, then 901, then 900)."""
    # The common case, as redis-py delivers it: bytes keys and values, a JSON object without
    # NUL. Done with direct lookups; anything else takes the general path below.
    data = fields.get(b"data")
    # find(), not `in`: bytes.__contains__ first tries the argument as an integer, and pays
    # for a formatted TypeError on every call.
    if type(data) is bytes and data.find(_NUL_ESCAPE) < 0 and TOO_LARGE_FIELD not in fields:
        try:
            size = sum(map(len, fields)) + sum(map(len, fields.values()))
            item = orjson.loads(data) if size <= max_bytes else None
        except (ValueError, RecursionError, TypeError):
            item = None
        if type(item) is dict and any(type(v) is float for v in item.values()):
            # orjson turns an integer past 64 bits into a float: a 30-digit phone must be
            # judged by its digits, so such an item is read again, exactly.
            item = loads_exact(data)
        if type(item) is dict:
            get = fields.get
            source = item.get("source")
            source = _item_source(source) if type(source) is str else None
            # orjson accepted the text, so it is valid UTF-8 and valid JSON: stored as sent.
            return _new_decoded(
                (
                    item,
                    data.decode(),
                    None,
                    _meta(get(b"source")) if source is None else source,
                    _meta(get(b"producer")),
                    _meta(get(b"batch_id")),
                    _timestamp(get(b"timestamp")),
                )
            )
    return _decode_any(fields, max_bytes)


# NamedTuple's own __new__ is a Python function; this is a third of the cost per message.
_new_decoded = functools.partial(tuple.__new__, Decoded)


def _decode_any(fields: Mapping[bytes | str, bytes | str], max_bytes: int) -> Decoded:
    entry: dict[str, bytes] = {}
    size = 0
    for key, value in fields.items():
        if type(key) is not bytes:  # redis-py gives bytes unless decode_responses is set
            key = _as_bytes(key)
        if type(value) is not bytes:
            value = _as_bytes(value)
        size += len(key) + len(value)
        entry[key.decode("utf-8", "replace")] = value
    data = entry.get(DATA_FIELD)
    stood_for = entry.pop(TOO_LARGE_FIELD.decode(), None)
    if stood_for is not None and stood_for.isdigit():
        size = int(stood_for)  # Redis sent what stands for the entry (stream.read_new)
    if size > max_bytes:
        return _refused(entry, TOO_LARGE, f"Message too large: {size} bytes, maximum {max_bytes}")
    if data is None:
        return _refused(entry, MISSING_DATA, "Missing data field")
    try:
        item = orjson.loads(data)
    except (ValueError, RecursionError, TypeError):  # orjson.JSONDecodeError is a ValueError
        try:  # valid JSON that orjson refuses: a number past a double's range (1e400, 5000 digits)
            item = loads_exact(data)
        except (ValueError, RecursionError, TypeError):
            why = f"Malformed message: data is not valid {_which(data)}"
            return _refused(entry, MALFORMED, why)
    if type(item) is not dict:
        kind = _JSON_KIND.get(type(item), "null")
        return _refused(
            entry, MALFORMED, f"Malformed message: data is a JSON {kind}, expected an object"
        )
    if _NUL_ESCAPE in data:
        item = sanitize(item)
        text = dumps(item)
    else:
        text = data.decode()
    return Decoded(
        item=item,
        text=text,
        error=None,
        source=_source(item.get("source"), entry.get("source")),
        producer=_meta(entry.get("producer")),
        batch_id=_meta(entry.get("batch_id")),
        produced_at=_timestamp(entry.get("timestamp")),
    )


def dumps(value: Any) -> str:
    """JSON text of a decoded value; integers beyond 64 bits fall back to the json module."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False)


def sanitize(value: Any) -> Any:
    """A copy with U+0000 replaced by U+FFFD in every string and key, at any depth."""
    if isinstance(value, str):
        return value.replace(_NUL, _REPLACEMENT)
    if not isinstance(value, (Mapping, list, tuple)):
        return value
    root = _empty_like(value)
    # An explicit stack, not recursion: the depth of the data must not meet the interpreter's
    # recursion limit (orjson allows 1024 levels, Python's default limit is 1000).
    todo: list[tuple[Any, Any]] = [(value, root)]
    while todo:
        source, target = todo.pop()
        if isinstance(source, Mapping):
            for key, item in source.items():
                target[sanitize(key) if isinstance(key, str) else key] = _child(item, todo)
        else:
            target.extend(_child(item, todo) for item in source)
    return root


def _child(value: Any, todo: list[tuple[Any, Any]]) -> Any:
    if isinstance(value, str):
        return value.replace(_NUL, _REPLACEMENT)
    if isinstance(value, (Mapping, list, tuple)):
        target = _empty_like(value)
        todo.append((value, target))
        return target
    return value


def _empty_like(value: Any) -> Any:
    return {} if isinstance(value, Mapping) else []


def _as_bytes(value: Any) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, str):
        try:
            return value.encode()
        except UnicodeEncodeError:
            # Text decoded with surrogateescape gets its original bytes back; any other lone
            # surrogate is kept as (invalid) UTF-8, which is then reported as such.
            try:
                return value.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                return value.encode("utf-8", "surrogatepass")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8", "surrogatepass")


def _which(data: bytes) -> str:
    try:
        data.decode()
    except UnicodeDecodeError:
        return "UTF-8"
    return "JSON"


def _refused(entry: Mapping[str, bytes], code: int, message: str) -> Decoded:
    # Not through the caches: a refused entry's fields may be huge, and seen once.
    meta, stamp = _meta.__wrapped__, _timestamp.__wrapped__
    return Decoded(
        item=None,
        text=dumps({"_raw": _raw_text(entry)}),
        error=pipeline_failure(code, message),
        source=meta(entry.get("source")),
        producer=meta(entry.get("producer")),
        batch_id=meta(entry.get("batch_id")),
        produced_at=stamp(entry.get("timestamp")),
    )


def _raw_text(entry: Mapping[str, bytes]) -> str:
    # The data field's text when there is one; else the whole entry, so an operator can see
    # what was sent instead (a misspelt "Data", a "payload" field, ...).
    data = entry.get(DATA_FIELD)
    if data is not None:
        text = data[:RAW_KEEP_BYTES].decode("utf-8", "replace")
    else:
        shown = {k: v[:RAW_KEEP_BYTES].decode("utf-8", "replace") for k, v in entry.items()}
        text = orjson.dumps(shown).decode()
    return sanitize(text[:RAW_KEEP_CHARS])


def _clean(text: str) -> str:
    return text.replace(_NUL, _REPLACEMENT) if _NUL in text else text


def _source(from_item: Any, raw: bytes | str | None) -> str | None:
    source = _item_source(from_item) if type(from_item) is str else None
    return _meta(raw) if source is None else source


# Producers stamp many entries with the same source, producer, batch and time: most calls
# are cache hits. The caches are small: a key can be as large as a whole entry.
@functools.lru_cache(maxsize=64)
def _item_source(text: str) -> str | None:
    text = text.strip()
    return _clean(text) if text else None


@functools.lru_cache(maxsize=64)
def _meta(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    text = _as_bytes(raw).decode("utf-8", "replace").strip()
    return _clean(text) if text else None


@functools.lru_cache(maxsize=64)
def _timestamp(raw: bytes | str | None) -> datetime | None:
    if raw is None or len(raw) > 64:
        return None
    try:
        moment = datetime.fromisoformat(_as_bytes(raw).decode("utf-8", "replace").strip())
    except ValueError:
        return None
    # A producer that leaves out the offset means UTC: that is what every clock here runs on.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    # Python takes offsets PostgreSQL refuses (beyond +-15:59, or with seconds): the moment is
    # kept in UTC, which any timestamptz holds. A moment outside years 1-9999 is not kept.
    try:
        return moment.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        return None
