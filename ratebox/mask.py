"""Masks personal data (phones, bank accounts, e-mails, passwords) for logs, dashboards, errors."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

#: What a password (or any secret) is replaced with; fixed, so its length does not leak.
HIDDEN = "***"

#: Keys whose values are phone numbers or bank accounts: all but the last 4 chars hidden.
_NUMBER_KEYS = frozenset({"phone", "bank_account"})
#: A key naming a secret: any word ending with one of these (db_password, access_token, ...).
_SECRET_WORD = (
    r"[\w-]*?(?:password|passwd|passphrase|pass|pwd|pw|pin|secret|token|api[_-]?key"
    r"|credentials?|auth)"
)
_SECRET_KEY = re.compile(rf"(?i){_SECRET_WORD}")
#: Containers nested deeper than this are replaced instead of walked (items come from JSON
#: that orjson already limits to 1024 levels, but a masked preview has no use for depth).
_MAX_DEPTH = 32

# The URL's password runs to the last '@' before the path, so an unescaped '@' in a password
# is hidden too. Only the part after ':' is hidden: a user name alone is not a secret.
_URL_RE = re.compile(r"(?<![\w+.-])([A-Za-z][\w+.-]*://[^\s:/?#@]*:)[^\s/?#]*(?=@)")
# `password=x`, `password: x`, `"password": "x"`, `'db_password': 'x'`, `?token=x&`.
_KEY_VALUE_RE = re.compile(
    rf"(?<![\w-])((?P<quote>[\"']?){_SECRET_WORD}(?P=quote)\s*[:=]\s*)"
    r"""("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|[^\s,;&'"}\]]+)""",
    re.IGNORECASE,
)
#: Lower-case words that must occur in a text before the costly key/value pattern is tried.
_SECRET_HINTS = ("pass", "pw", "pin", "secret", "token", "key", "cred", "auth")
_SCHEME = re.compile(r"[A-Za-z][\w+.-]*://")
_PASSWORD_KEY = re.compile(r"(?i)password\s*=\s*")
# A domain of labels (one will do: `john.doe@localhost`), or an address literal
# (`john.doe@[10.0.0.1]`); not a URL's user name (`redis://default@host`).
_EMAIL_RE = re.compile(r"(?<![\w.%+-])(?<!://)[\w.%+-]+@(?:[\w-]+(?:\.[\w-]+)*|\[[^\]\s]{1,64}\])")
# ISO dates and times are matched first and kept, so log timestamps stay readable; they never
# hold 8 digits in a row. The lookahead lets the engine skip quickly to the next digit.
_DIGITS_RE = re.compile(
    r"(?=[+(\d])(?:(?P<date>(?:19|20)\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])"
    r"(?:[T ][0-2]\d:[0-5]\d(?::[0-5]\d(?:[.,]\d{1,6})?)?)?)(?![\d-])"
    # Redis stream IDs (millisecond time, dash, sequence) stay readable: operators grep them.
    # Only one whose time is plausible (see _is_stream_id): `1234567890123-45` is data.
    r"|(?P<stream_id>1\d{12}-\d{1,6})(?![\d-])"
    # A phone or an account however written: spaces, dots, dashes and brackets may join its
    # digits (`+84 (912) 345-678`, `1234.5678.9012.3456`); a comma never does, which keeps the
    # program's own thousands-separated counts readable.
    r"|(?P<digits>\+?\(?\d(?:[ .()-]{0,2}\d){7,}))"
)
_NOT_DIGIT = re.compile(r"\D")


def mask_value(text: str, keep: int = 4) -> str:
    """Stars for all but the last ``keep`` characters: '12345678901' -> '*******8901'."""
    hidden = len(text) - max(keep, 0)
    if hidden <= 0:
        return "*" * len(text)
    return "*" * hidden + text[hidden:]


def mask_email(text: str) -> str:
    """First character of the local part and the domain: 'user@example.com' -> 'u***@example.com'."""
    local, at, domain = text.rpartition("@")
    if not at:
        # No domain: all of it is the local part, of which only the first character shows.
        return f"{text[:1]}{HIDDEN}"
    # A "domain" made of a phone or card number is personal data too: its digits are masked
    # like a number's, keeping the dots (`x***@****.****.****.1111`).
    return f"{local[:1]}{HIDDEN}@{_DIGITS_RE.sub(_star_digits, domain)}"


def mask_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an item that is safe to show: numbers, e-mails and secrets masked, in its
    keys as in its values."""
    return _mask_mapping(item, 1)


def _mask_mapping(item: Mapping[Any, Any], depth: int) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key, value in item.items():
        shown = mask_text(key, own=False) if isinstance(key, str) else key
        while shown in out:  # two keys that mask alike both stay
            shown = f"{shown}'"
        out[shown] = _mask_entry(key, value, depth)
    return out


def mask_url(url: str) -> str:
    """The URL or libpq DSN with its password hidden: 'redis://:pw@host' -> 'redis://:***@host'.

    Taken apart as a client would, not guessed by pattern: a URL's password is everything
    between the user's ':' and the last '@' (spaces, '#', '?', '/' included); a key=value DSN
    is parsed by libpq, and one libpq cannot parse is hidden from its password key on.
    """
    scheme = _SCHEME.match(url)
    if scheme is not None:
        rest = url[scheme.end() :]
        userinfo, at, host = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        masked = f"{scheme[0]}{user}:{HIDDEN}@{host}" if at and colon else url
        return _KEY_VALUE_RE.sub(_hide_value, masked)  # ?password=... in the query
    from psycopg2.extensions import make_dsn, parse_dsn  # a DSN: libpq's own parser

    try:
        params = parse_dsn(url)
    except Exception:
        cut = _PASSWORD_KEY.search(url)
        return url if cut is None else url[: cut.end()] + HIDDEN
    if "password" not in params:
        return url
    # Keep the operator's own spelling when a plain substitution gives exactly the same DSN
    # with the password hidden; otherwise (escapes, odd quoting) let libpq write it anew.
    masked = _KEY_VALUE_RE.sub(_hide_value, url)
    try:
        if parse_dsn(masked) == {**params, "password": HIDDEN}:
            return masked
    except Exception:
        pass
    return make_dsn(url, password=HIDDEN)


def mask_text(text: str, own: bool = True) -> str:
    """Free text (a log line) with credentials, e-mails and runs of 8+ digits masked.

    ``own``: the text is the program's own, whose stream IDs stay readable; text from a
    message (``own=False``) keeps nothing shaped like a number."""
    # Each pass runs only when a cheap test says it can match: most log lines hold no URL, no
    # secret and no e-mail, and the digits pass (last, so it also sees what the others kept)
    # is the only one they pay for.
    if "://" in text:
        text = _URL_RE.sub(_hide_url_password, text)
    lowered = text.lower()
    if any(hint in lowered for hint in _SECRET_HINTS):
        text = _KEY_VALUE_RE.sub(_hide_value, text)
    if "@" in text:
        text = _EMAIL_RE.sub(_hide_email, text)
    return _DIGITS_RE.sub(_hide_digits if own else _hide_all_digits, text)


def _hide_url_password(match: re.Match[str]) -> str:
    return match[1] + HIDDEN


def _hide_value(match: re.Match[str]) -> str:
    value = match[3]
    quote = value[0] if value[0] in "\"'" and len(value) > 1 else ""
    return f"{match[1]}{quote}{HIDDEN}{quote}"


def _hide_email(match: re.Match[str]) -> str:
    return mask_email(match[0])


def _star_digits(match: re.Match[str]) -> str:
    """The run with every digit but its last four starred, separators kept."""
    if match["digits"] is None:
        return match[0]
    run = match[0]
    hide = sum(ch.isdigit() for ch in run) - 4
    out = []
    for ch in run:
        if ch.isdigit() and hide > 0:
            out.append("*")
            hide -= 1
        else:
            out.append(ch)
    return "".join(out)


def _hide_digits(match: re.Match[str]) -> str:
    digits = match["digits"]
    if digits is None and not (match["stream_id"] and not _is_stream_id(match["stream_id"])):
        return match[0]
    return mask_value(_NOT_DIGIT.sub("", digits or match[0]))


def _hide_all_digits(match: re.Match[str]) -> str:
    if match["date"] is not None:
        return match[0]
    return mask_value(_NOT_DIGIT.sub("", match[0]))


#: Stream IDs the program prints are milliseconds since 2020 at the earliest.
_FIRST_ID_MS = 1_577_836_800_000


def _is_stream_id(text: str) -> bool:
    """An ID whose time lies between 2020 and a day from now (a 13-digit number dash a few
    digits from outside that span is data, e.g. an account number)."""
    ms = int(text.partition("-")[0])
    return _FIRST_ID_MS <= ms <= time.time() * 1000 + 86_400_000


def _mask_entry(key: Any, value: Any, depth: int) -> Any:
    name = key.lower() if isinstance(key, str) else ""
    if name in _NUMBER_KEYS:
        return mask_value(_text(value))
    if name == "email":
        return mask_email(_text(value))
    if name and _SECRET_KEY.fullmatch(name):
        return HIDDEN
    return _mask_nested(value, depth)


def _mask_nested(value: Any, depth: int) -> Any:
    # Other values are scrubbed like a log line: a phone number may hide in a "note" field.
    if isinstance(value, str):
        return mask_text(value, own=False)
    if isinstance(value, Mapping):
        if depth >= _MAX_DEPTH:
            return "(nested)"
        return _mask_mapping(value, depth + 1)
    if isinstance(value, (list, tuple)):
        if depth >= _MAX_DEPTH:
            return "(nested)"
        return [_mask_nested(v, depth + 1) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = _text(value)
        masked = mask_text(text, own=False)
        return value if masked == text else masked  # a long number becomes masked text
    return value


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except ValueError:  # an int too long to print (sys.get_int_max_str_digits)
        return "(number)"
