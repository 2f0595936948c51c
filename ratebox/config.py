"""The settings table, and loading YAML plus environment into immutable settings.

Every key is declared once in SETTINGS; validation, ``--help`` and the README table are all
made from that declaration.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import yaml

from ratebox import rules
from ratebox.errors import ConfigError

Validator = Callable[[Any], Any]


#: A value shown in an error is cut to this many characters: errors stay one short line.
SHOWN_MAX = 60


def _describe(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__name__}"  # never render a whole (maybe huge) structure
    if isinstance(value, str):
        # Control characters shown escaped: an error line stays one line.
        shown = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in value[:SHOWN_MAX])
        text = f'"{shown}"' + ("…" if len(value) > SHOWN_MAX else "")
    elif isinstance(value, int) and value.bit_length() > 64:
        text = f"an integer of {value.bit_length()} bits"  # repr() itself refuses huge ones
    else:
        text = repr(value)
    return text if len(text) <= SHOWN_MAX else text[: SHOWN_MAX - 1] + "…"


def integer(lo: int, hi: int) -> Validator:
    """An int from lo to hi (a bool is not an int here)."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"must be an integer from {lo} to {hi}, got {_describe(value)}")
        return value

    return check


def number(lo: float, hi: float) -> Validator:
    """A number (int or float) from lo to hi."""

    def check(value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not lo <= value <= hi:
            raise ValueError(f"must be a number from {lo:g} to {hi:g}, got {_describe(value)}")
        return float(value)

    return check


def boolean(value: Any) -> bool:
    """true/false (YAML) or the usual words from the environment."""
    if isinstance(value, bool):
        return value
    raise ValueError(f"must be true or false, got {_describe(value)}")


_NAME = re.compile(r"[A-Za-z0-9_.:{}\-]{1,200}")


def name(value: Any) -> str:
    """A Redis key or consumer name: letters, digits and _ . : - (no spaces)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"must be a name of letters, digits and _.:- , got {_describe(value)}")
    return value


def optional_integer(lo: int, hi: int) -> Validator:
    """null, or an int from lo to hi."""
    check = integer(lo, hi)

    def optional(value: Any) -> int | None:
        return None if value is None else check(value)

    return optional


def optional_name(value: Any) -> str | None:
    """null, or a name as for :func:`name`."""
    return None if value is None else name(value)


def text(value: Any) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a non-empty string, got {_describe(value)}")
    return value


def redis_url(value: Any) -> str:
    """``embedded`` or a redis://, rediss:// or unix:// URL."""
    value = text(value)
    if value != "embedded" and not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError('must be "embedded" or a redis://, rediss:// or unix:// URL')
    if value != "embedded":
        _check_redis_url(value)
    return value


def _check_redis_url(url: str) -> None:
    """What redis-py would refuse only at the first connect: a bad port, an unknown option."""
    import inspect

    from redis.connection import Connection, parse_url

    try:
        options = parse_url(url)
    except ValueError as exc:  # the URL is never echoed: it may hold a password
        raise ValueError(f"not a valid Redis URL ({str(exc)[:SHOWN_MAX]})") from None
    cls = options.pop("connection_class", Connection)
    known = {
        name
        for klass in cls.__mro__
        if "__init__" in vars(klass)
        for name in inspect.signature(vars(klass)["__init__"]).parameters
    }
    if unknown := sorted(set(options) - known):
        raise ValueError(f"unknown option {unknown[0][:SHOWN_MAX]!r} in the URL's query")


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)[ \t]*(ms|s|m|h|d)?")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


_YEAR_S = 365 * 86400.0


def duration(value: Any) -> float:
    """Seconds, from a number or a text like 90s, 5m, 1h, 2d (finite, at most 365 days)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= _YEAR_S:
        return float(value)
    match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"must be a duration like 30s, 5m, 1h or 2d, got {_describe(value)}")
    seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if not seconds <= _YEAR_S:
        raise ValueError(f"must be at most 365d, got {_describe(value)}")
    return seconds


def listen_address(value: Any) -> str | None:
    """host:port to listen on, or null to disable."""
    if value is None:
        return None
    host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be host:port or null, got {_describe(value)}")
    return value


@dataclass(frozen=True)
class Setting:
    """One configuration key: where it lives, what it accepts, and how to override it."""

    path: str
    default: Any
    validate: Validator
    help: str
    env: str | None = None
    # Type used to parse the environment's text; values from YAML keep their YAML type.
    env_type: Callable[[str], Any] = str


#: Every key of ratebox.yaml. The order is the order of the README table.
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "redis.url",
        "embedded",
        redis_url,
        "embedded, or redis://[:password@]host:port/db",
        "REDIS_URL",
    ),
    Setting(
        "redis.cluster",
        False,
        boolean,
        "redis.url is any node of a Redis Cluster (partitions spread over its masters)",
    ),
    Setting(
        "postgres.dsn", "embedded", text, "embedded, or a libpq URL / key=value DSN", "POSTGRES_DSN"
    ),
    Setting(
        "postgres.migrate_on_start",
        True,
        boolean,
        "apply pending schema/ migrations when the supervisor starts",
    ),
    Setting(
        "stream.name", "raw_items", name, "the Redis stream read by the workers", "REDIS_STREAM"
    ),
    Setting("stream.group", "validator_workers", name, "the consumer group", "CONSUMER_GROUP"),
    Setting(
        "stream.dead_letter",
        "raw_items:dead",
        name,
        "stream receiving entries that failed max_retries deliveries",
    ),
    Setting(
        "stream.retention",
        "10m",
        duration,
        "acknowledged entries are kept this long for replay, then trimmed",
    ),
    Setting(
        "stream.partitions",
        1,
        integer(1, 1024),
        "streams {NAME:p} the items are spread over (1 with cluster false: the stream NAME)",
    ),
    Setting(
        "stream.partition_key",
        None,
        optional_name,
        "field of data whose value picks the partition (null: round robin)",
    ),
    Setting("workers.count", 4, integer(1, 256), "worker processes under the supervisor"),
    Setting(
        "workers.autoscale.enabled",
        False,
        boolean,
        "follow the backlog between min and max workers (count is the start)",
    ),
    Setting("workers.autoscale.min", 1, integer(1, 256), "fewest workers autoscaling keeps"),
    Setting(
        "workers.autoscale.max",
        None,
        optional_integer(1, 256),
        "most workers autoscaling starts (null: the number of CPU cores)",
    ),
    Setting(
        "workers.autoscale.lag_per_worker",
        5000,
        integer(1, 10_000_000),
        "backlog (undelivered + pending entries) one worker is meant to carry",
    ),
    Setting(
        "workers.autoscale.interval_s",
        5.0,
        number(0.5, 3600),
        "how often the supervisor samples the backlog",
    ),
    Setting(
        "workers.autoscale.scale_down_after_s",
        300.0,
        number(1, 86400),
        "every wish of this window must be lower before a worker is stopped",
    ),
    Setting(
        "workers.name_prefix",
        "worker",
        name,
        "consumer names are PREFIX_001, PREFIX_002, ...; {hostname} is replaced",
    ),
    Setting(
        "workers.batch_size",
        500,
        integer(1, 10000),
        "entries read, validated and committed together",
        "BATCH_SIZE",
        int,
    ),
    Setting(
        "workers.block_ms",
        1000,
        integer(1, 60000),
        "XREADGROUP BLOCK time in milliseconds",
        "BLOCK_TIME",
        int,
    ),
    Setting(
        "workers.max_retries",
        3,
        integer(1, 1000),
        "deliveries before an entry is dead-lettered",
        "MAX_RETRIES",
        int,
    ),
    Setting(
        "workers.timeout_s",
        60.0,
        number(1, 86400),
        "a worker silent this long is killed and restarted",
    ),
    Setting(
        "workers.shutdown_timeout_s",
        30.0,
        number(0, 3600),
        "grace period on TERM before children are killed",
    ),
    Setting(
        "sweeper.interval_s", 5.0, number(0.1, 3600), "how often the sweeper looks for idle entries"
    ),
    Setting(
        "sweeper.min_idle_ms",
        60000,
        integer(100, 86_400_000),
        "an entry idle this long is reclaimed",
    ),
    Setting(
        "sweeper.ghost_idle_s",
        3600.0,
        number(1, 30 * 86400),
        "idle consumers of our prefix with nothing pending are removed after this",
    ),
    Setting("monitor.enabled", True, boolean, "run the monitor beside the workers"),
    Setting(
        "monitor.refresh_s", 2.0, number(0.1, 3600), "dashboard refresh / log snapshot interval"
    ),
    Setting(
        "monitor.metrics_listen",
        "127.0.0.1:9187",
        listen_address,
        "Prometheus /metrics address; null disables",
    ),
    Setting(
        "limits.max_message_bytes",
        65536,
        integer(64, 64 * 1024 * 1024),
        "larger entries are recorded with code 902",
    ),
    Setting(
        "embedded.dir",
        "var",
        text,
        "data directory of the embedded servers (relative to the working directory)",
    ),
)

_BY_PATH = {s.path: s for s in SETTINGS}
_SECTIONS = tuple(dict.fromkeys(s.path.split(".")[0] for s in SETTINGS))
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class Section(Mapping[str, Any]):
    """The settings of one YAML section, read-only, with attribute access."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_values", MappingProxyType(dict(values)))

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"settings are read-only: {key}")

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(key) from None

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Any:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Section({dict(self._values)!r})"


@dataclass(frozen=True)
class Settings:
    """Validated, immutable settings: ``settings.workers.count``, ``settings.rules``."""

    values: Mapping[str, Any]
    rules: tuple[rules.RuleSpec, ...]
    source: str = "<defaults>"

    def __getattr__(self, section: str) -> Section:
        if section not in _SECTIONS:
            raise AttributeError(section)
        prefix = section + "."
        return Section(
            {k[len(prefix) :]: v for k, v in self.values.items() if k.startswith(prefix)}
        )

    def get(self, path: str) -> Any:
        """The value of one key by its dotted path."""
        return self.values[path]

    def consumer_name(self, index: int) -> str:
        """The stable consumer name of worker number ``index`` (1-based): worker_001."""
        prefix = self.values["workers.name_prefix"].replace("{hostname}", socket.gethostname())
        return f"{prefix}_{index:03d}"

    def lease_key(self) -> str:
        """The Redis key of the lease a supervisor holds on this prefix's consumer names."""
        prefix = self.consumer_name(1).rsplit("_", 1)[0]
        return f"ratebox:lease:{self.values['stream.name']}:{self.values['stream.group']}:{prefix}"

    def lease_refusal(self, holder: str) -> str:
        """The one line that refuses to run consumers another supervisor's lease covers."""
        return (
            f"another supervisor ({holder}) runs consumers {self.consumer_name(1)[:-4]}_* "
            f"of group {self.values['stream.group']} on stream {self.values['stream.name']}"
        )

    def status_path(self) -> str:
        """Where the supervisor writes its status file (the monitor reads it)."""
        name = f"supervisor-{self.values['stream.name']}-{self.values['stream.group']}.json"
        return os.path.join(os.path.abspath(self.values["embedded.dir"]), name)

    def diff(self, other: Settings) -> set[str]:
        """The key paths whose values differ (``rules`` included as one key)."""
        changed = {k for k in self.values if self.values[k] != other.values.get(k)}
        if self.rules != other.rules:
            changed.add("rules")
        return changed


def _flatten(data: Any, where: str = "") -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where or 'configuration'}: must be a mapping of keys, got {_describe(data)}"
        )
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if not where and key == "rules":
            flat[path] = value
        elif not where:
            if key not in _SECTIONS:
                raise ConfigError(f"{path}: unknown section (known: {', '.join(_SECTIONS)}, rules)")
            flat.update(_flatten(value, path))
        elif path not in _BY_PATH and any(p.startswith(path + ".") for p in _BY_PATH):
            flat.update(_flatten(value, path))  # a nested group, e.g. workers.autoscale
        elif path not in _BY_PATH:
            known = ", ".join(p[len(where) + 1 :] for p in _BY_PATH if p.startswith(where + "."))
            raise ConfigError(f"{path}: unknown key (known in {where}: {known})")
        else:
            flat[path] = value
    return flat


def _from_env(setting: Setting, raw: str) -> Any:
    if setting.validate is boolean:
        lowered = raw.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        return raw
    try:
        return setting.env_type(raw.strip())
    except ValueError:
        return raw


def from_mapping(
    data: Any, environ: Mapping[str, str] | None = None, source: str = "<mapping>"
) -> Settings:
    """Validate a parsed YAML document plus environment overrides into Settings."""
    flat = _flatten(data)
    raw_rules = flat.pop("rules", None)
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        value, origin = flat.get(setting.path, setting.default), setting.path
        if setting.env and environ and environ.get(setting.env, "") != "":
            value, origin = (
                _from_env(setting, environ[setting.env]),
                f"{setting.env} ({setting.path})",
            )
        try:
            values[setting.path] = setting.validate(value)
        except ValueError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
    _check_together(values)
    specs = rules.parse_rules(raw_rules or [], "rules")
    return Settings(MappingProxyType(values), specs, source)


def autoscale_max(values: Mapping[str, Any]) -> int:
    """workers.autoscale.max, null meaning the CPU cores (more add nothing to CPU-bound work)."""
    return values["workers.autoscale.max"] or os.cpu_count() or 1


def _check_together(values: Mapping[str, Any]) -> None:
    # A worker beats once per loop turn, and a turn can block for block_ms: it must beat well
    # inside timeout_s or the supervisor would kill a healthy, idle worker.
    if values["workers.block_ms"] / 1000 > values["workers.timeout_s"] / 2:
        raise ConfigError(
            f"workers.block_ms: must be at most half of workers.timeout_s "
            f"({values['workers.timeout_s'] * 500:g} ms), got {values['workers.block_ms']}"
        )
    if values["workers.autoscale.enabled"]:
        lo, hi = values["workers.autoscale.min"], autoscale_max(values)
        if lo > hi:
            raise ConfigError(f"workers.autoscale.min: must be at most max ({hi}), got {lo}")
        if not lo <= values["workers.count"] <= hi:
            raise ConfigError(
                f"workers.count: the starting count must be from autoscale min {lo} to max {hi},"
                f" got {values['workers.count']}"
            )
    if values["stream.dead_letter"] == values["stream.name"]:
        raise ConfigError("stream.dead_letter: must differ from stream.name")
    # The embedded server is one node on a unix socket: there is no cluster to join.
    if values["redis.cluster"] and values["redis.url"].startswith(("embedded", "unix://")):
        raise ConfigError(
            "redis.cluster: needs redis.url to be a redis:// or rediss:// node of the cluster"
        )


#: A configuration file is a page of settings: anything larger is a mistake (or an attack).
MAX_FILE_BYTES = 1 << 20


class _Loader(yaml.SafeLoader):
    """SafeLoader without aliases: `*name` can expand a few lines into gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not accepted", self.peek_event().start_mark
            )
        return super().compose_node(parent, index)


def load(path: str, environ: Mapping[str, str] | None = None) -> Settings:
    """Read a YAML file and the environment; every problem is a ConfigError naming the key."""
    environ = os.environ if environ is None else environ
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES:,} bytes")
        text = raw.decode("utf-8")
        data = yaml.load(text, Loader=_Loader)
        return from_mapping(data, environ, source=path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    except ValueError as exc:  # YAML's int() of a number with thousands of digits
        raise ConfigError(f"{path}: unreadable value: {str(exc)[:SHOWN_MAX]}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = str(getattr(exc, "problem", None) or "invalid YAML")[:SHOWN_MAX]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None


def defaults() -> Settings:
    """Settings with every key at its default (no file, no environment)."""
    return from_mapping({}, {}, source="<defaults>")


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def help_text() -> str:
    """The settings as plain text for ``--help`` epilogs."""
    lines = ["configuration keys (ratebox.yaml; environment overrides in brackets):"]
    for s in SETTINGS:
        env = f" [{s.env}]" if s.env else ""
        lines.append(f"  {s.path} = {_shown(s.default)}{env}: {s.help}")
    return "\n".join(lines)


def markdown_table() -> str:
    """The settings as the README's Markdown table."""
    rows = ["| key | default | environment | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        rows.append(
            f"| `{s.path}` | `{_shown(s.default)}` | {f'`{s.env}`' if s.env else ''} | {s.help} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
