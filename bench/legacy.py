"""Moving off database polling, measured end to end. Prints figures.

    /work/venv/bin/python bench/legacy.py [--judged 1000000] [--pending 20000]
        [--arrivals 30000] [--rate 1000] [--bridge-kills 3] [--worker-kills 4]
        [--servers machine|embedded]

The done-when scenario, on a legacy raw_items of ``--judged`` judged rows and ``--pending``
pending ones in a scratch schema (a stream of its own; both removed afterwards):

1. A legacy poller thread runs from the start -- SELECT ... WHERE status = 'pending' ORDER
   BY id LIMIT 10 FOR UPDATE SKIP LOCKED, UPDATE with its own verdict, commit -- and
   bin/ratebox-migrate adopts the table under it: the poller's longest cycle during the
   adoption (must be under 1 s) and whether any judged row changed (a checksum).
2. bin/ratebox-supervisor (2 workers and the sweeper) and bin/ratebox-bridge --follow run
   while legacy producer threads INSERT ``--arrivals`` more pending rows at ``--rate``/s.
   The bridge is SIGKILLed ``--bridge-kills`` times (restarted here), a worker
   ``--worker-kills`` times (the supervisor restarts it), and the poller is stopped
   half-way. Once nothing is pending: rows with exactly one verdict (by the poller, by
   RateBox), rows with none or both (must be 0), rows beyond the legacy ones (must be 0),
   XPENDING (must be 0), and the statistics against RateBox's verdicts.
3. ratebox-compare's rows/s over the judged rows; then, on a table of ``--pending`` rows
   of its own, the bridge's rows/s and one worker's drain of legacy entries against
   ordinary ones.

Exits 1 when a figure that must hold does not. Servers: the machine's (127.0.0.1:6379 and
:5432) when both answer, else embedded ones under var/bench (see bench/README.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import psycopg2
import redis
from common import ROOT, Servers, clean_env, machine_up, servers, with_search_path

from ratebox import bridge, compare, config, migrate, producer, stream
from ratebox.rules import compile_rules
from ratebox.worker import Worker

LEGACY_TABLE = (
    "CREATE TABLE raw_items (id bigserial PRIMARY KEY, data jsonb NOT NULL,"
    " status text NOT NULL DEFAULT 'pending', source text, error_code integer,"
    " error_message text, created_at timestamptz NOT NULL DEFAULT now(),"
    " processed_at timestamptz, poller text)"
)
#: The judged rows' legacy columns, hashed before adoption, after it and at the very end.
CHECKSUM = (
    "SELECT md5(string_agg(concat_ws('|', id, data, status, source, error_code, error_message,"
    " created_at, processed_at, poller), ',' ORDER BY id)) FROM raw_items WHERE id <= %s"
)
#: The legacy poller's own verdict: a phone of fewer than 10 characters is an error.
POLL = (
    "UPDATE raw_items SET status = CASE WHEN length(data->>'phone') >= 10 THEN 'done'"
    " ELSE 'error' END, error_code = CASE WHEN length(data->>'phone') >= 10 THEN NULL"
    " ELSE 101 END, processed_at = now(), poller = 'legacy' WHERE id = ANY(%s)"
)
ITEM = (
    "jsonb_build_object('phone', CASE WHEN i %% 5 = 0 THEN '123' ELSE '0912345678' END,"
    " 'bank_account', '12345678901', 'name', 'Nguyen Van A', 'n', i)"
)
TMP = Path(tempfile.gettempdir()) / "ratebox-bench"


def sql(dsn: str, text: str, params: object = None) -> list[tuple[Any, ...]]:
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        conn.autocommit = text.startswith("VACUUM")
        cur.execute(text, params)
        found = cur.fetchall() if cur.description else []
        conn.commit()
        return found


class Poller(threading.Thread):
    """A legacy poller: judges the oldest pending rows, ten at a time, every ``pause_s``."""

    def __init__(self, dsn: str, pause_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.dsn, self.pause_s = dsn, pause_s
        self.stop = threading.Event()
        #: (start, seconds) of every cycle: SELECT ... FOR UPDATE SKIP LOCKED, UPDATE, commit.
        self.cycles: list[tuple[float, float]] = []
        self.judged = 0

    def run(self) -> None:
        with closing(psycopg2.connect(self.dsn, application_name="legacy-poller")) as conn:
            while not self.stop.is_set():
                started = time.monotonic()
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT id FROM raw_items WHERE status = 'pending' ORDER BY id LIMIT 10"
                        " FOR UPDATE SKIP LOCKED"
                    )
                    ids = [i for (i,) in cur.fetchall()]
                    if ids:
                        cur.execute(POLL, (ids,))
                conn.commit()
                self.cycles.append((started, time.monotonic() - started))
                self.judged += len(ids)
                time.sleep(self.pause_s)

    def longest(self, since: float = 0.0, until: float = float("inf")) -> float:
        """The longest cycle overlapping [since, until], in seconds."""
        return max((s for t, s in self.cycles if t <= until and t + s >= since), default=0.0)


class LegacyProducer(threading.Thread):
    """INSERTs pending rows, ``per`` a transaction, at ``rate`` rows/s; keeps their ids."""

    def __init__(self, dsn: str, total: int, rate: float, per: int = 10) -> None:
        super().__init__(daemon=True)
        self.dsn, self.total, self.rate, self.per = dsn, total, rate, per
        self.ids: list[int] = []

    def run(self) -> None:
        with closing(psycopg2.connect(self.dsn, application_name="legacy-producer")) as conn:
            started = time.monotonic()
            while len(self.ids) < self.total:
                n = min(self.per, self.total - len(self.ids))
                with conn.cursor() as cur:
                    cur.execute(
                        f"INSERT INTO raw_items (data, source) SELECT {ITEM}, 'shop'"
                        " FROM generate_series(%s, %s) i RETURNING id",
                        (len(self.ids), len(self.ids) + n - 1),
                    )
                    found = [i for (i,) in cur.fetchall()]
                conn.commit()
                self.ids.extend(found)
                ahead = started + len(self.ids) / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)


def write_config(path: Path, srv: Servers, dsn: str, name: str, group: str) -> None:
    data = {
        "redis": {"url": srv.redis_url},
        "postgres": {"dsn": dsn, "migrate_on_start": False},
        "stream": {"name": name, "group": group, "dead_letter": f"{name}:dead"},
        "workers": {"count": 2},
        "monitor": {"enabled": False, "metrics_listen": None},
        "embedded": {"dir": str(path.parent / "var")},
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")


def spawn(command: str, path: Path, log: str, *extra: str) -> subprocess.Popen[bytes]:
    """Start bin/COMMAND -c PATH, its output appended to $TMPDIR/ratebox-bench/LOG."""
    TMP.mkdir(exist_ok=True)
    with open(TMP / log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "bin" / command), "-c", str(path), *extra],
            cwd=ROOT,
            env=clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def workers_of(supervisor: subprocess.Popen[bytes]) -> dict[str, int]:
    """The supervisor's worker children by name (their process titles name them)."""
    found = {}
    for child in psutil.Process(supervisor.pid).children():
        try:
            # setproctitle pads the title with empty arguments.
            title = " ".join(child.cmdline()).strip()
        except psutil.Error:
            continue
        if "ratebox: worker " in title:
            found[title.rsplit(" ", 1)[-1]] = child.pid
    return found


def group_state(client: redis.Redis, name: str, group: str) -> tuple[int, bool]:
    """(XPENDING count, whether the group has delivered the stream's last entry)."""
    if not client.exists(name):
        return 0, True
    last = client.xinfo_stream(name)["last-generated-id"]
    info = next(g for g in client.xinfo_groups(name) if g["name"] in (group, group.encode()))
    return int(client.xpending(name, group)["pending"]), info["last-delivered-id"] == last


def adopt(dsn: str, path: Path, judged: int, pending: int, poller: Poller) -> bool:
    """Phase 1: bin/ratebox-migrate under the poller. Returns whether its figures hold."""
    before = sql(dsn, CHECKSUM, (judged,))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ROOT / "bin" / "ratebox-migrate"), "-c", str(path)],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
    )
    ended = time.monotonic()
    if done.returncode != 0:
        raise RuntimeError(f"ratebox-migrate failed: {done.stderr.strip()}")
    time.sleep(1)
    unchanged = sql(dsn, CHECKSUM, (judged,)) == before
    stall = poller.longest(started, ended)
    cycles = sum(1 for t, _ in poller.cycles if started <= t <= ended)
    alone = sorted(s for t, s in poller.cycles if t + s < started)
    print(
        f"adoption (bin/ratebox-migrate) of {judged:,} judged + {pending:,} pending rows:"
        f" {ended - started:.2f} s; legacy poller meanwhile: {cycles} cycles, longest"
        f" {stall * 1000:.0f} ms (must be < 1000; median cycle before:"
        f" {alone[len(alone) // 2] * 1000:.0f} ms); judged rows unchanged: {unchanged}",
        flush=True,
    )
    return stall < 1.0 and unchanged


def chaos(
    srv: Servers,
    dsn: str,
    path: Path,
    name: str,
    group: str,
    args: argparse.Namespace,
    poller: Poller,
) -> bool:
    """Phase 2: bridge and supervisor, SIGKILLs, the poller stopped half-way; the count."""
    client = redis.Redis.from_url(srv.redis_url)
    stream.ensure_group(client, name, group)
    legacy_before = poller.judged
    producers = [
        LegacyProducer(dsn, args.arrivals // 2 + args.arrivals % 2, args.rate / 2),
        LegacyProducer(dsn, args.arrivals // 2, args.rate / 2),
    ]
    supervisor = spawn("ratebox-supervisor", path, "legacy-supervisor.log")
    bridge_proc = spawn("ratebox-bridge", path, "legacy-bridge.log", "--follow")
    started = time.monotonic()
    for p in producers:
        p.start()
    arrived = lambda: sum(len(p.ids) for p in producers)  # noqa: E731
    # The bridge's first SIGKILL comes as soon as it has published anything: in the middle
    # of the pending backlog. The others, and the workers', are spread over the arrivals.
    bridge_at = [k / args.bridge_kills for k in range(args.bridge_kills)]
    worker_at = [(k + 0.6) / (args.worker_kills + 0.5) for k in range(args.worker_kills)]
    bridge_kills = worker_kills = holding = bridge_restarts = 0
    wanted_since: float | None = None
    killed_at: list[int] = []  # the stream's length at each of the bridge's SIGKILLs
    poller_stopped_at: float | None = None
    ok = True
    try:
        deadline = time.monotonic() + max(600.0, 10 * args.arrivals / args.rate)
        while True:
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError("the legacy rows were not all judged in time")
            if supervisor.poll() is not None:
                raise RuntimeError(f"the supervisor exited ({supervisor.returncode})")
            share = arrived() / max(args.arrivals, 1)
            if poller_stopped_at is None and share >= 0.5:
                poller.stop.set()
                poller.join()
                poller_stopped_at = now
            if bridge_proc.poll() is not None:
                # Not killed by us: a restart too soon (the old session still held the
                # one-bridge lock) says so and exits 1; start it again.
                bridge_restarts += 1
                time.sleep(0.5)
                bridge_proc = spawn("ratebox-bridge", path, "legacy-bridge.log", "--follow")
            elif (
                bridge_kills < len(bridge_at)
                and share >= bridge_at[bridge_kills]
                and (bridge_kills or (client.exists(name) and client.xlen(name) > 0))
            ):
                bridge_proc.send_signal(signal.SIGKILL)
                bridge_proc.wait()
                bridge_kills += 1
                killed_at.append(client.xlen(name))
                bridge_proc = spawn("ratebox-bridge", path, "legacy-bridge.log", "--follow")
            if worker_kills < len(worker_at) and share >= worker_at[worker_kills]:
                # Preferably a worker with a batch in hand (read, not yet acknowledged);
                # after 3 s of looking, whichever's turn it is.
                wanted_since = wanted_since or now
                running = workers_of(supervisor)
                busy = [
                    c["name"].decode()
                    for c in client.xpending(name, group)["consumers"]
                    if int(c["pending"]) > 0
                ]
                target = next((n for n in busy if n in running), None)
                if target is None and now - wanted_since > 3:
                    target = f"worker_{worker_kills % 2 + 1:03d}"
                if target in running:
                    os.kill(running[target], signal.SIGKILL)
                    worker_kills += 1
                    holding += target in busy
                    wanted_since = None
            if all(not p.is_alive() for p in producers) and worker_kills == len(worker_at):
                left = sql(dsn, "SELECT count(*) FROM raw_items WHERE status = 'pending'")[0][0]
                if left == 0 and group_state(client, name, group) == (0, True):
                    break
            time.sleep(0.01)
        drained_s = time.monotonic() - started
        bridge_proc.terminate()
        bridge_proc.wait(60)
        while group_state(client, name, group) != (0, True):
            time.sleep(0.1)
        supervisor.terminate()
        supervisor.wait(120)
    finally:
        for proc in (bridge_proc, supervisor):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        poller.stop.set()
    xpending, _ = group_state(client, name, group)

    legacy_ids = set(range(args.judged + 1, args.judged + args.pending + 1))
    for p in producers:
        legacy_ids.update(p.ids)
    rows = sql(
        dsn,
        "SELECT id, status, poller IS NOT NULL, consumer_name IS NOT NULL FROM raw_items"
        " WHERE id > %s",
        (args.judged,),
    )
    by_poller = by_ratebox = none = both = 0
    extra = 0
    for row_id, status, polled, ours in rows:
        if row_id not in legacy_ids:
            extra += 1
        elif status == "pending" or not (polled or ours):
            none += 1
        elif polled and ours:
            both += 1
        elif polled:
            by_poller += 1
        else:
            by_ratebox += 1
    missing = len(legacy_ids) - (len(rows) - extra)
    stats = sql(dsn, "SELECT coalesce(sum(processed), 0) FROM stream_consumer_stats")[0][0]
    entries = 0
    published: set[bytes] = set()
    cursor = "-"
    while page := client.xrange(name, cursor, "+", count=5000):
        entries += len(page)
        published.update(f[b"legacy_id"] for _, f in page)
        cursor = "(" + page[-1][0].decode()
    unchanged = sql(dsn, CHECKSUM, (args.judged,)) == args.checksum
    while_ratebox = poller.longest(started, poller_stopped_at or float("inf"))
    client.close()
    print(
        f"bridge + supervisor (2 workers): {args.arrivals:,} rows INSERTed at"
        f" {args.rate:,.0f}/s beside the {args.pending:,} pending; bridge SIGKILLed"
        f" {bridge_kills}x (stream length then: {', '.join(f'{n:,}' for n in killed_at)};"
        f" restarted; {bridge_restarts} more restarts after a refusal),"
        f" workers SIGKILLed {worker_kills}x ({holding} holding a batch; restarted by the"
        " supervisor), poller stopped"
        f" half-way; all judged {drained_s:.1f} s after the start",
        flush=True,
    )
    print(
        f"  rows with exactly one verdict: {by_poller + by_ratebox:,} of {len(legacy_ids):,}"
        f" ({by_poller:,} by the poller -- {by_poller - legacy_before:,} of them while"
        f" RateBox ran -- and {by_ratebox:,} by RateBox); none: {none}, both: {both},"
        f" lost: {missing}, extra rows: {extra}, XPENDING: {xpending}",
        flush=True,
    )
    print(
        f"  entries published: {entries:,} for {len(published):,} rows"
        f" ({entries - len(published):,} re-published after the kills); statistics count"
        f" {stats:,} verdicts for RateBox's {by_ratebox:,}; poller's longest cycle while"
        f" RateBox ran: {while_ratebox * 1000:.0f} ms; judged rows unchanged: {unchanged}",
        flush=True,
    )
    ok &= none == both == extra == missing == xpending == 0 and stats == by_ratebox
    return ok and unchanged


def drain(settings: config.Settings, redis_url: str, dsn: str, expected: int) -> float:
    worker = Worker(settings, "worker_001", redis_url, dsn)
    started = time.monotonic()
    handled = 0
    while handled < expected:
        handled += worker.loop()
    took = time.monotonic() - started
    worker.pipeline.reset()
    return expected / took


def rates(srv: Servers, dsn: str, settings: config.Settings, pending: int) -> None:
    """Phase 3: compare on the big table; the bridge and the drain on a table of their own."""
    report = compare.compare(dsn, compile_rules(settings.rules))
    print(
        f"compare: {report.compared:,} rows, {report.compared - report.agreed:,} disagree,"
        f" {report.seconds:.2f} s ({report.compared / report.seconds:,.0f} rows/s)",
        flush=True,
    )
    client = redis.Redis.from_url(srv.redis_url)
    name = settings.stream.name + "_side"
    side = config.from_mapping(
        {"stream": {"name": name, "group": settings.stream.group, "dead_letter": f"{name}:dead"}},
        {},
        source="bench",
    )
    side_dsn = with_search_path(srv.dsn, settings.stream.group + "_side")
    sql(srv.dsn, f"CREATE SCHEMA {settings.stream.group}_side")
    try:
        sql(side_dsn, LEGACY_TABLE)
        sql(
            side_dsn,
            f"INSERT INTO raw_items (data) SELECT {ITEM} FROM generate_series(1, %s) i",
            (pending,),
        )
        migrate.run(side_dsn)
        stream.ensure_group(client, name, side.stream.group)
        counts = bridge.Bridge(side, srv.redis_url, side_dsn).run(follow=False)
        took = time.monotonic() - counts.started
        print(
            f"bridge: {counts.published:,} rows published in {took:.2f} s"
            f" ({counts.published / took:,.0f} rows/s)",
            flush=True,
        )
        legacy_rate = drain(side, srv.redis_url, side_dsn, counts.published)
        producer.produce(client, name, pending)
        ordinary_rate = drain(side, srv.redis_url, side_dsn, pending)
        left = sql(side_dsn, "SELECT count(*) FROM raw_items WHERE status = 'pending'")[0][0]
        print(
            f"drain, one worker: legacy entries {legacy_rate:,.0f} msg/s, ordinary entries"
            f" {ordinary_rate:,.0f} msg/s (ratio {legacy_rate / ordinary_rate:.2f});"
            f" pending left {left}",
            flush=True,
        )
    finally:
        sql(srv.dsn, f"SET lock_timeout = '30s'; DROP SCHEMA {settings.stream.group}_side CASCADE")
        for key in client.scan_iter(match=f"*{name}*"):
            client.delete(key)
        client.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--judged", type=int, default=1_000_000)
    p.add_argument("--pending", type=int, default=20_000)
    p.add_argument("--arrivals", type=int, default=30_000)
    p.add_argument("--rate", type=float, default=1_000.0)
    p.add_argument("--bridge-kills", type=int, default=3)
    p.add_argument("--worker-kills", type=int, default=4)
    p.add_argument("--servers", choices=("machine", "embedded"))
    args = p.parse_args()
    srv = servers(args.servers or ("machine" if machine_up() else "embedded"))
    schema = f"bench_legacy_{uuid.uuid4().hex[:8]}"
    name, group = f"raw_items_{schema}", schema
    print(f"servers: {srv.kind} ({srv.redis_url}, PostgreSQL pid {srv.pg_pid})", flush=True)
    sql(srv.dsn, f"CREATE SCHEMA {schema}")
    dsn = with_search_path(srv.dsn, schema)
    client = redis.Redis.from_url(srv.redis_url)
    work = Path(tempfile.mkdtemp(prefix="ratebox-bench-legacy-"))
    path = work / "ratebox.yaml"
    write_config(path, srv, dsn, name, group)
    poller = Poller(dsn)
    try:
        sql(dsn, LEGACY_TABLE)
        sql(
            dsn,
            f"INSERT INTO raw_items (data, status, error_code, created_at, processed_at, poller)"
            f" SELECT {ITEM}, CASE WHEN i %% 7 = 0 THEN 'error' ELSE 'done' END,"
            " CASE WHEN i %% 7 = 0 THEN 101 END,"
            " now() - interval '2 hours' + i * interval '5 ms',"
            " now() - interval '2 hours' + i * interval '5 ms' + interval '3 s', 'legacy'"
            " FROM generate_series(1, %s) i",
            (args.judged,),
        )
        sql(
            dsn,
            f"INSERT INTO raw_items (data, source) SELECT {ITEM}, 'shop'"
            " FROM generate_series(1, %s) i",
            (args.pending,),
        )
        # The legacy system's own index for its pollers (without it each poll would walk
        # the million judged rows, and its cycles would measure that, not the adoption).
        sql(dsn, "CREATE INDEX raw_items_status_id ON raw_items (status, id)")
        sql(dsn, "VACUUM ANALYZE raw_items")
        args.checksum = sql(dsn, CHECKSUM, (args.judged,))
        poller.start()
        time.sleep(1)
        ok = adopt(dsn, path, args.judged, args.pending, poller)
        ok &= chaos(srv, dsn, path, name, group, args, poller)
        rates(srv, dsn, config.load(str(path), {}), args.pending)
    finally:
        poller.stop.set()
        if poller.is_alive():
            poller.join()
        sql(srv.dsn, f"SET lock_timeout = '30s'; DROP SCHEMA {schema} CASCADE")
        for key in client.scan_iter(match=f"*{schema}*"):
            client.delete(key)
        client.close()
        srv.stop()
    print("every figure that must hold holds" if ok else "A FIGURE THAT MUST HOLD DOES NOT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
