"""Command-line entry points: the only place that reads argv, prints usage errors or exits."""

from __future__ import annotations

import argparse
import atexit
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ratebox import __version__, config, inert, log
from ratebox.child import proctitle
from ratebox.errors import EXIT_OK, RateboxError, UsageError


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def parser(prog: str, description: str) -> Parser:
    """A parser with the options every command shares."""
    p = Parser(
        prog=prog,
        description=description,
        epilog=config.help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-c",
        "--config",
        default="ratebox.yaml",
        metavar="FILE",
        help="YAML topology (default ./ratebox.yaml)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="least severe log lines written to stderr (default INFO)",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def guarded(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Turn RateboxError into one line on stderr and its exit status; never a traceback."""

    def wrapper(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except RateboxError as exc:
            # Errors may quote a value from a file or a server: shown inert, on one line.
            print(f"error: {inert.text(str(exc), 500)}", file=sys.stderr)
            return exc.exit_status
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:
            return EXIT_OK

    wrapper.__name__ = main.__name__
    wrapper.__doc__ = main.__doc__
    return wrapper


def servers(
    settings: config.Settings,
    need_pg: bool = True,
    need_redis: bool = True,
    config_path: str = "ratebox.yaml",
) -> tuple[str, str]:
    """The Redis URL and DSN to use, ``embedded`` resolved to running servers.

    A command other than the supervisor leaves the servers it started running (the next
    command needs them) and says so when it ends, with the command that stops them.
    """
    from ratebox import embedded

    redis_url, dsn, started = embedded.resolve(
        settings.redis.url if need_redis else "unused",
        settings.postgres.dsn if need_pg else "unused",
        settings.embedded.dir,
    )
    if started:
        atexit.register(_say_left_running, started, settings.embedded.dir, config_path)
    return redis_url, dsn


def _say_left_running(started: list[str], var_dir: str, config_path: str) -> None:
    names = " and ".join({"redis": "Redis", "postgres": "PostgreSQL"}[n] for n in started)
    command = os.path.join(os.path.dirname(sys.argv[0]), "ratebox-embedded")
    print(
        f"note: the embedded {names} started for this command keep running "
        f"(data in {os.path.abspath(var_dir)}); stop with: {command} -c {config_path} stop",
        file=sys.stderr,
    )


def settings_and_servers(
    args: argparse.Namespace, title: str, need_pg: bool = True, need_redis: bool = True
) -> tuple[config.Settings, str, str]:
    """Load the configuration, set up logging, and resolve ``embedded`` to running servers."""
    settings = config.load(args.config)
    log.setup(title, args.log_level)
    return settings, *servers(settings, need_pg, need_redis, args.config)


@guarded
def main_supervisor(argv: Sequence[str] | None = None) -> int:
    """The whole system in the foreground: workers, sweeper and monitor under one supervisor."""
    args = parser("ratebox-supervisor", main_supervisor.__doc__ or "").parse_args(argv)
    # Not settings_and_servers(): the supervisor starts the embedded servers itself, after
    # its signal handlers are in place, and stops those it started when it exits.
    settings = config.load(args.config)
    log.setup("supervisor", args.log_level)
    from ratebox import supervisor

    return supervisor.run(settings, args.config, args.log_level)


@guarded
def main_worker(argv: Sequence[str] | None = None) -> int:
    """One consumer in the foreground, named by CONSUMER_NAME (default <prefix>_001)."""
    p = parser("ratebox-worker", main_worker.__doc__ or "")
    args = p.parse_args(argv)
    settings = config.load(args.config)
    name = os.environ.get("CONSUMER_NAME") or settings.consumer_name(1)
    try:
        config.name(name)
    except ValueError as exc:
        raise UsageError(f"CONSUMER_NAME: {exc}") from None
    proctitle(f"worker {name}")
    log.setup(f"worker {name}", args.log_level)
    redis_url, dsn = servers(settings, config_path=args.config)
    _refuse_if_supervised(settings, name, redis_url)
    if settings.postgres.migrate_on_start:
        from ratebox import migrate

        migrate.run(dsn)
    from ratebox import worker

    return worker.run(settings, name, redis_url, dsn)


def _refuse_if_supervised(settings: config.Settings, name: str, redis_url: str) -> None:
    """A name of a prefix whose lease a supervisor holds is that supervisor's to run."""
    prefix = settings.consumer_name(1).rsplit("_", 1)[0]
    if not re.fullmatch(rf"{re.escape(prefix)}_[0-9]+", name):
        return
    from ratebox import stream, stream_lease

    client = stream.connect_quick(redis_url, cluster=settings.redis.cluster)
    try:
        holder = stream_lease.lease_holder(client, settings.lease_key())
    finally:
        client.close()
    if holder is not None:
        raise RateboxError(
            f"{settings.lease_refusal(holder.rsplit(':', 1)[0])}: not starting {name}"
        )


@guarded
def main_embedded(argv: Sequence[str] | None = None) -> int:
    """Status of the embedded Redis and PostgreSQL of embedded.dir, or stop them."""
    p = parser("ratebox-embedded", main_embedded.__doc__ or "")
    p.add_argument(
        "action", choices=["status", "stop"], help="status: what runs; stop: stop both servers"
    )
    args = p.parse_args(argv)
    settings = config.load(args.config)
    log.setup("embedded", args.log_level)
    from ratebox import embedded

    var = os.path.abspath(settings.embedded.dir)
    pids = embedded.running(var)
    titles = {"redis": "Redis", "postgres": "PostgreSQL"}
    if args.action == "stop":
        embedded.stop([name for name, pid in pids.items() if pid is not None], var)
    for name, pid in pids.items():
        if pid is None:
            state = "not running"
        else:
            state = f"stopped (was pid {pid})" if args.action == "stop" else f"running, pid {pid}"
        print(f"embedded {titles[name]} of {var}: {state}")
    return EXIT_OK


@guarded
def main_migrate(argv: Sequence[str] | None = None) -> int:
    """Apply pending migrations from schema/; safe to run twice or concurrently."""
    args = parser("ratebox-migrate", main_migrate.__doc__ or "").parse_args(argv)
    _, _, dsn = settings_and_servers(args, "migrate", need_redis=False)
    from ratebox import migrate

    applied = migrate.run(dsn)
    print(f"applied {len(applied)} migration(s){': ' + ', '.join(applied) if applied else ''}")
    return EXIT_OK


@guarded
def main_producer(argv: Sequence[str] | None = None) -> int:
    """Publish test messages: produce N [DELAY] | continuous RATE | file PATH | info."""
    p = parser("ratebox-producer", main_producer.__doc__ or "")
    sub = p.add_subparsers(dest="mode", required=True, parser_class=Parser)
    sp = sub.add_parser("produce", help="publish N messages, DELAY seconds apart (0: pipelined)")
    sp.add_argument("n", type=_positive_int, metavar="N", help="how many messages to publish")
    sp.add_argument(
        "delay",
        type=_non_negative_float,
        nargs="?",
        default=0.0,
        metavar="DELAY",
        help="seconds between messages (default 0: pipelined, 1,000 per round trip)",
    )
    sp = sub.add_parser("continuous", help="publish RATE messages/second until interrupted")
    sp.add_argument("rate", type=_positive_float, metavar="RATE", help="messages per second")
    sp = sub.add_parser("file", help="one message per JSON line of PATH (- = stdin)")
    sp.add_argument("path", metavar="PATH", help="a file of JSON objects, one a line; - for stdin")
    sub.add_parser("info", help="stream length, first/last entry, groups, pending")
    args = p.parse_args(argv)
    settings = config.load(args.config)
    log.setup("producer", args.log_level)
    # Only an embedded Redis needs the embedded module (and the PostgreSQL driver it imports):
    # the producer's start-up counts in its throughput.
    redis_url = settings.redis.url
    if redis_url == "embedded":
        redis_url, _ = servers(settings, need_pg=False, config_path=args.config)
    from ratebox import producer, stream
    from ratebox.route import Router

    client = stream.connect(redis_url, cluster=settings.redis.cluster)
    router = Router.of(settings)
    name = settings.stream.name if len(router.targets) == 1 else f"{len(router.targets)} partitions"
    if args.mode == "info":
        for partition in router.targets:
            _print_info(producer.info(client, partition))
    elif args.mode == "produce":
        started = time.monotonic()
        with _progress(args.n) as advance:
            sent = producer.produce(client, router, args.n, args.delay, advance)
        took = time.monotonic() - started
        print(
            f"published {sent} messages to {name} in {took:.2f} s ({sent / max(took, 1e-9):,.0f}/s)"
        )
    elif args.mode == "continuous":
        stop = _stop_flag()
        sent = producer.continuous(client, router, args.rate, lambda: not stop)
        print(f"published {sent} messages to {name}")
    else:
        try:
            # stdin must not be closed by a with block; the file is closed below
            handle = (
                sys.stdin
                if args.path == "-"
                else open(args.path, encoding="utf-8", errors="replace")  # noqa: SIM115
            )
        except OSError as exc:
            raise UsageError(
                f"ratebox-producer file: cannot open {args.path}: {exc.strerror}"
            ) from None
        with handle:
            sent = producer.publish_file(client, router, handle)
        print(f"published {sent} messages to {name}")
    return EXIT_OK


def _stop_flag() -> list[int]:
    """A list that gets an item when SIGINT or SIGTERM arrives (truthy = stop)."""
    flag: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: flag.append(signum))
    return flag


class _progress:
    """A Rich progress bar on a terminal for long runs; nothing otherwise."""

    def __init__(self, total: int, what: str = "publishing") -> None:
        self.total = total
        self.what = what
        self.bar: Any = None

    def __enter__(self) -> Callable[[int], None] | None:
        if self.total < 10_000 or not sys.stderr.isatty():
            return None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task(self.what, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def _print_info(data: dict[str, Any]) -> None:
    if not data["exists"]:
        print(f"stream {data['stream']}: does not exist yet")
        return
    print(
        f"stream {data['stream']}: length {data['length']}, first {data['first_id']}, last {data['last_id']}"
    )
    for g in data["groups"]:
        print(
            f"  group {g['name']}: consumers {g['consumers']}, pending {g['pending']}, "
            f"lag {g['lag'] if g['lag'] is not None else 'unknown'}, last delivered {g['last_delivered']}"
        )


def _number(
    cast: Callable[[str], Any], ok: Callable[[Any], bool], what: str
) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return convert


_positive_int = _number(int, lambda v: v > 0, "a positive integer")
_positive_float = _number(float, lambda v: v > 0, "a positive number")
_non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")


# -- sweeper, dead letters and replay -----------------------------------------------------------


@guarded
def main_sweeper(argv: Sequence[str] | None = None) -> int:
    """The reclaim sweeper alone, in the foreground."""
    args = parser("ratebox-sweeper", main_sweeper.__doc__ or "").parse_args(argv)
    proctitle("sweeper")
    settings, redis_url, dsn = settings_and_servers(args, "sweeper")
    if settings.postgres.migrate_on_start:
        from ratebox import migrate

        migrate.run(dsn)
    from ratebox import sweeper

    return sweeper.run(settings, redis_url, dsn)


@guarded
def main_dlq(argv: Sequence[str] | None = None) -> int:
    """Inspect, replay or drop dead-lettered entries: list | replay [IDS...|--all] | purge [--yes]."""
    p = parser("ratebox-dlq", main_dlq.__doc__ or "")
    sub = p.add_subparsers(dest="action", required=True, parser_class=Parser)
    sp = sub.add_parser("list", help="dead-lettered entries, oldest first, personal data masked")
    sp.add_argument("--count", type=_positive_int, default=None, metavar="N", help="at most N")
    sp = sub.add_parser("replay", help="put entries back onto the main stream, each at most once")
    sp.add_argument("ids", nargs="*", type=_entry_id, metavar="ID", help="dead-letter entry IDs")
    sp.add_argument("--all", action="store_true", help="every dead-lettered entry")
    sp = sub.add_parser("purge", help="drop every dead-lettered entry")
    sp.add_argument("--yes", action="store_true", help="confirm (without it nothing is dropped)")
    args = p.parse_args(argv)
    if args.action == "replay" and bool(args.ids) == args.all:
        raise UsageError("ratebox-dlq replay: give dead-letter entry IDs or --all, not both")
    settings, redis_url, _ = settings_and_servers(args, "dlq", need_pg=False)
    from ratebox import deadletter, stream
    from ratebox.errors import EXIT_FAILURE
    from ratebox.route import settings_streams

    client = stream.connect(redis_url, cluster=settings.redis.cluster)
    partitions = settings_streams(settings)
    if args.action == "list":
        for _, dead in partitions:
            entries = deadletter.list_entries(client, dead, args.count)
            for entry in entries:
                print(entry.line())
            print(
                f"{len(entries)} dead-lettered entries shown from {dead} (length {stream.length(client, dead)})"
            )
        return EXIT_OK
    if args.action == "replay":
        wanted: list[str] | None = None if args.all else list(args.ids)
        for target, dead in partitions:
            # An entry goes back onto its own partition: its dead letters share its slot.
            done = deadletter.replay(client, dead, target, wanted)
            if done.moved or len(partitions) == 1:
                print(f"replayed {len(done.moved)} entries onto {target}")
            if wanted is not None:
                wanted = list(done.missing)
                if not wanted:
                    break
        if wanted:
            where = partitions[0][1] if len(partitions) == 1 else "any dead-letter stream"
            print(
                f"error: not in {where} (already replayed or purged?): {' '.join(wanted)}",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        return EXIT_OK
    total = sum(stream.length(client, dead) for _, dead in partitions)
    if not args.yes:
        where = (
            partitions[0][1] if len(partitions) == 1 else f"{len(partitions)} dead-letter streams"
        )
        raise UsageError(
            f"ratebox-dlq purge: would drop {total} entries from {where}; add --yes to confirm"
        )
    for _, dead in partitions:
        print(f"purged {deadletter.purge(client, dead)} entries from {dead}")
    return EXIT_OK


@guarded
def main_replay(argv: Sequence[str] | None = None) -> int:
    """Re-validate retained entries with the current rules and update their rows."""
    p = parser("ratebox-replay", main_replay.__doc__ or "")
    p.add_argument(
        "--from",
        dest="start",
        required=True,
        type=_bound,
        metavar="ID|TIME",
        help="first entry: an ID (1718000000000-0) or an ISO 8601 time (UTC without offset)",
    )
    p.add_argument(
        "--to",
        dest="end",
        default="+",
        type=_bound,
        metavar="ID|TIME",
        help="last entry (default: the newest)",
    )
    args = p.parse_args(argv)
    settings, redis_url, dsn = settings_and_servers(args, "replay")
    from ratebox import replay

    c = replay.replay_range(settings, redis_url, dsn, args.start, args.end)
    print(
        f"re-validated {c.read} entries: {c.changed} changed verdict, {c.unchanged} unchanged, "
        f"{c.skipped} skipped (pipeline verdicts), {c.missing} without a row yet"
        f"{replay.another(c)}"
    )
    return EXIT_OK


def _entry_id(text: str) -> str:
    from ratebox.replay import is_entry_id

    if not is_entry_id(text):
        raise argparse.ArgumentTypeError(
            f"must be an entry ID like 1718000000000-0, got {inert.text(text, 40)!r}"
        )
    return text


def _bound(text: str) -> str:
    from ratebox.replay import to_stream_id

    try:
        return to_stream_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- end of sweeper, dead letters and replay ----------------------------------------------------


# -- monitor ------------------------------------------------------------------------------------


@guarded
def main_monitor(argv: Sequence[str] | None = None) -> int:
    """One report of the stream, groups, consumers, database and processes; or a live view."""
    p = parser("ratebox-monitor", main_monitor.__doc__ or "")
    p.add_argument("mode", nargs="?", choices=["continuous"], help="refresh until interrupted")
    p.add_argument("seconds", nargs="?", type=_refresh_seconds, metavar="SECONDS")
    p.add_argument(
        "--json", action="store_true", help="the same figures as JSON (one document a refresh)"
    )
    p.add_argument(
        "--status", metavar="FILE", help="supervisor status file (default: the one it writes)"
    )
    p.add_argument(
        "--metrics",
        nargs="?",
        const=True,
        default=None,
        type=config.listen_address,
        metavar="HOST:PORT",
        help="continuous only: also serve /metrics, on HOST:PORT or on monitor.metrics_listen "
        "(off by default: the supervisor's monitor serves it)",
    )
    args = p.parse_args(argv)
    if args.metrics is not None and args.mode != "continuous":
        raise UsageError("ratebox-monitor: --metrics needs continuous SECONDS")
    if args.mode == "continuous" and args.seconds is None:
        raise UsageError(
            "ratebox-monitor continuous: give the refresh interval in SECONDS (see --help)"
        )
    settings, redis_url, dsn = settings_and_servers(args, "monitor")
    from ratebox import monitor

    status = args.status or settings.status_path()
    if args.mode == "continuous":
        proctitle("monitor")
        return monitor.run(
            settings,
            redis_url,
            dsn,
            status_path=status,
            refresh_s=args.seconds,
            as_json=args.json,
            metrics_listen=args.metrics,
        )
    snap = monitor.report(settings, redis_url, dsn, status)
    if args.json:
        import json

        print(json.dumps(snap, indent=2, default=str))
    else:
        from rich.console import Console

        Console().print(monitor.render(snap))
    down = [f"{name}: {s['error']}" for name, s in snap["servers"].items() if not s["available"]]
    if down:
        from ratebox.errors import ServerUnavailable

        raise ServerUnavailable(f"unavailable: {'; '.join(down)}")
    return EXIT_OK


_refresh_seconds = _number(
    float, lambda v: 0.1 <= v <= 3600, "a number of seconds from 0.1 to 3600"
)


# -- end of monitor -----------------------------------------------------------------------------


# -- moving off database polling: bridge and compare ---------------------------------------------


@guarded
def main_bridge(argv: Sequence[str] | None = None) -> int:
    """Publish the legacy raw_items table's pending rows to the stream, in id order."""
    p = parser("ratebox-bridge", main_bridge.__doc__ or "")
    p.add_argument(
        "--follow", action="store_true", help="keep publishing rows that appear, until TERM"
    )
    args = p.parse_args(argv)
    proctitle("bridge")
    settings, redis_url, dsn = settings_and_servers(args, "bridge")
    from ratebox import bridge

    stop = _stop_flag()
    runner = bridge.Bridge(settings, redis_url, dsn, keep_going=lambda: not stop)
    try:
        runner.connect()
        with _progress(runner.to_publish(), "publishing legacy rows") as advance:
            runner.advance = advance
            counts = runner.run(args.follow)
    finally:
        runner.close()
    print(bridge.summary(counts, settings.stream.name))
    return EXIT_OK


@guarded
def main_compare(argv: Sequence[str] | None = None) -> int:
    """Re-judge rows the legacy system judged with the configured rules; changes nothing."""
    p = parser("ratebox-compare", main_compare.__doc__ or "")
    p.add_argument("--since", type=_time, metavar="TIME", help="rows processed at or after TIME")
    p.add_argument("--until", type=_time, metavar="TIME", help="rows processed before TIME")
    p.add_argument("--limit", type=_positive_int, metavar="N", help="compare at most N rows")
    p.add_argument("--json", action="store_true", help="the report as one JSON document")
    args = p.parse_args(argv)
    settings, _, dsn = settings_and_servers(args, "compare", need_pg=True)
    from ratebox import compare, store_bridge
    from ratebox.rules import compile_rules

    engine = compile_rules(settings.rules)
    total = args.limit or store_bridge.estimate_rows(dsn) or 0
    with _progress(total, "comparing") as advance:
        report = compare.compare(dsn, engine, args.since, args.until, args.limit, advance)
    if args.json:
        import json

        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        for line in report.lines():
            print(line)
    return EXIT_OK


def _time(text: str) -> Any:
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an ISO 8601 time, got {text!r}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


# -- end of bridge and compare --------------------------------------------------------------------
