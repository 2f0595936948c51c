"""RateBox against the bare ceiling, the naive loop and Celery: one command, one machine.

    .venv/bin/python bench/run.py                      # backlog 200,000; W = 1, 2, 4; everything
    .venv/bin/python bench/run.py --workers 1,2 --only ratebox,ceiling
    .venv/bin/python bench/run.py latency              # 1,000 msg/s for 30 s: publish -> row p99
    .venv/bin/python bench/run.py soak                 # 1,000,000 messages: worker RSS over time
    .venv/bin/python bench/run.py growth               # backlog 10k..1M, and raw_items past 5M rows
    .venv/bin/python bench/run.py profile              # py-spy of one RateBox worker, 2 x 10 s

Servers: the machine's (127.0.0.1:6379 and :5432) when both answer, else embedded ones under
var/bench (``--servers`` forces either). Every run gets its own PostgreSQL schema and stream
names, removed afterwards. Figures go to bench/results.json (bench/results-<mode>.json).
Needs: pip install -r bench/requirements.txt (Celery; py-spy for ``profile``).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import platform
import random
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import psycopg2
import redis
import yaml

from bench import common
from bench.common import ROOT, Accounting, RssSampler, Scratch, Servers, scratch
from ratebox import producer, stream

PY = sys.executable
SYSTEMS = ("ratebox", "ceiling", "ceiling_copy", "naive", "celery", "producer")
#: Targets of the issue, RateBox with 2 workers against each loop with 2 processes.
TARGETS = {"ceiling": 0.8, "naive": 25.0, "celery": 10.0}
TMP = Path(tempfile.gettempdir()) / "ratebox-bench"


# -- one measured run ----------------------------------------------------------------------------


def preload(srv: Servers, s: Scratch, n: int) -> float:
    """Create the group, publish n producer messages; returns the publish rate (msg/s)."""
    client = redis.Redis.from_url(srv.redis_url)
    stream.ensure_group(client, s.stream, s.group)
    started = time.perf_counter()
    producer.produce(client, s.stream, n)
    rate = n / (time.perf_counter() - started)
    client.close()
    return rate


def spawn(cmd: list[str], name: str, **env: str) -> subprocess.Popen[bytes]:
    """Start a process from the project root, its output in $TMPDIR/ratebox-bench/NAME.log."""
    TMP.mkdir(exist_ok=True)
    with open(TMP / f"{name}.log", "wb") as log:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=common.clean_env(**env), stdout=log, stderr=subprocess.STDOUT
        )


def measure(
    srv: Servers,
    system: str,
    label: str,
    workers: int,
    backlog: int,
    start: Callable[[Scratch], list[subprocess.Popen[bytes]]],
    done: str = "group",
    prepare: Callable[[Scratch], None] | None = None,
    publish: Callable[[Scratch, int], float] | None = None,
    after: Callable[[Scratch], dict[str, Any]] | None = None,
    rss_every_s: float = 0.25,
) -> dict[str, Any]:
    """Preload, start the consumers, wait until every row is committed and acknowledged, stop.

    wall = from spawning the consumers until drained (start-up included); steady = rows over
    the span of their processed_at. CPU per message is taken from the first delivery on.
    """
    extra: dict[str, Any] = {}
    with scratch(srv, system) as s:
        if prepare:
            prepare(s)
        publish_rate = (publish or (lambda s, n: preload(srv, s, n)))(s, backlog)
        client = redis.Redis.from_url(srv.redis_url)
        sampler = RssSampler(rss_every_s)
        sampler.start()
        acct = Accounting(srv)
        before = acct.snapshot([])
        roots: list[int] = []
        snaps: dict[str, dict[str, float]] = {}
        procs: list[subprocess.Popen[bytes]] = []
        try:
            procs = start(s)
            roots += [p.pid for p in procs]
            sampler.watch(roots)

            def first() -> None:
                snaps["first"] = acct.snapshot(roots)

            if done == "group":
                t_first, drained = common.wait_drained(client, s.stream, s.group, procs, first)
            else:
                t_first, drained = wait_rows(s.dsn, s.stream, backlog, procs, first)
            at_done = acct.snapshot(roots)
        finally:
            common.stop(procs)
            client.close()
        rss = sampler.finish()
        rows, span = common.row_span(s.dsn, s.stream)
        if after:
            extra = after(s)
    wall = drained - before["wall"]
    result = {
        "system": system,
        "label": label,
        "workers": workers,
        "backlog": backlog,
        "rows": rows,
        "exactly_once": rows == backlog,
        "wall_s": round(wall, 3),
        "startup_s": round(t_first - before["wall"], 3),
        "msgs_per_s": round(backlog / wall, 1),
        "steady_msgs_per_s": round((rows - 1) / span, 1) if span > 0 else None,
        "publish_msgs_per_s": round(publish_rate, 1),
        "cpu_s_total": acct.delta(before, at_done),
        "cpu_s_steady": acct.delta(snaps["first"], at_done),
        "peak_rss_mb": rss,
        **extra,
    }
    steady = result["cpu_s_steady"]
    result["cpu_us_per_msg"] = {
        k: round(steady[k] * 1e6 / backlog, 2) for k in ("redis", "postgres", "python", "driver")
    }
    # Work that was not ours, as a share of the machine over the same window: the noise gauge.
    cores = psutil.cpu_count() or 1
    result["other_cpu_pct"] = round(100 * steady["other"] / max(steady["wall"] * cores, 1e-9), 1)
    result["_series"] = sampler.series_by_label()
    return result


def wait_rows(
    dsn: str,
    stream_name: str,
    n: int,
    procs: list[subprocess.Popen[bytes]],
    on_first: Callable[[], None],
) -> tuple[float, float]:
    """For Celery (no stream group): poll until n rows exist."""
    first: float | None = None
    with closing(psycopg2.connect(dsn)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            while True:
                cur.execute("SELECT count(*) FROM raw_items WHERE stream_name = %s", (stream_name,))
                count = cur.fetchone()[0]
                now = time.monotonic()
                if first is None and count:
                    first = now
                    on_first()
                if count >= n:
                    return first or now, now
                if any(p.poll() is not None for p in procs):
                    raise common.ConsumersFailed(f"celery exited early (see {TMP}/celery-*.log)")
                time.sleep(0.1)


# -- the four systems ------------------------------------------------------------------------


def ratebox_yaml(srv: Servers, s: Scratch, workers: int) -> Path:
    """Default settings except the servers, our names, the worker count; no monitor."""
    TMP.mkdir(exist_ok=True)
    data = {
        "redis": {"url": srv.redis_url},
        "postgres": {"dsn": s.dsn},
        "stream": {"name": s.stream, "group": s.group, "dead_letter": s.dead_letter},
        "workers": {"count": workers},
        "monitor": {"enabled": False, "metrics_listen": None},
        "embedded": {"dir": str(TMP / s.suffix)},
    }
    path = TMP / f"{s.suffix}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def start_ratebox(srv: Servers, s: Scratch, workers: int, supervisor: bool) -> list[Any]:
    """bin/ratebox-supervisor, or W bin/ratebox-worker processes named worker_001 ..."""
    path = str(ratebox_yaml(srv, s, workers))
    if supervisor:
        cmd = [PY, "bin/ratebox-supervisor", "-c", path, "--log-level", "WARNING"]
        return [spawn(cmd, f"supervisor-{s.suffix}")]
    cmd = [PY, "bin/ratebox-worker", "-c", path, "--log-level", "WARNING"]
    return [
        spawn(cmd, f"worker-{s.suffix}-{i}", CONSUMER_NAME=f"worker_{i:03d}")
        for i in range(1, workers + 1)
    ]


def ratebox_label(supervisor: bool) -> str:
    return "RateBox supervisor" if supervisor else "RateBox W x ratebox-worker (NO supervisor)"


def run_ratebox(
    srv: Servers, workers: int, backlog: int, supervisor: bool, **kw: Any
) -> dict[str, Any]:
    def start(s: Scratch) -> list[subprocess.Popen[bytes]]:
        return start_ratebox(srv, s, workers, supervisor)

    return measure(srv, "ratebox", ratebox_label(supervisor), workers, backlog, start, **kw)


LOOPS = {
    "ceiling": ("ceiling", [], "bare ceiling (COUNT 500, execute_values)"),
    "ceiling_copy": ("ceiling", ["--copy"], "bare ceiling (COUNT 500, COPY)"),
    "naive": ("naive", [], "naive loop (COUNT 10, per-msg)"),
}


def run_loop(srv: Servers, system: str, workers: int, backlog: int) -> dict[str, Any]:
    """bench/ceiling.py (with or without --copy) or bench/naive.py, W processes."""
    script, flags, label = LOOPS[system]

    def start(s: Scratch) -> list[subprocess.Popen[bytes]]:
        args = ["--redis", srv.redis_url, "--dsn", s.dsn, "--stream", s.stream, "--group", s.group]
        return [
            spawn(
                [PY, f"bench/{script}.py", *args, *flags, "--consumer", f"c{i}"],
                f"{system}-{s.suffix}-{i}",
            )
            for i in range(1, workers + 1)
        ]

    return measure(srv, system, label, workers, backlog, start)


def run_celery(srv: Servers, workers: int, backlog: int) -> dict[str, Any]:
    from bench import celery_app

    broker = common.celery_broker_url(srv.redis_url)

    def publish(s: Scratch, n: int) -> float:
        app = celery_app.make_app(broker, s.suffix)
        entries = producer.generate(n)
        started = time.perf_counter()
        with app.producer_or_acquire() as pub:
            for i, fields in enumerate(entries):
                app.send_task(
                    "bench.validate", args=(f"{i + 1}-0", fields), queue=s.suffix, producer=pub
                )
        rate = n / (time.perf_counter() - started)
        app.close()
        return rate

    def start(s: Scratch) -> list[subprocess.Popen[bytes]]:
        cmd = [PY, "-m", "celery", "-A", "bench.celery_app", "worker", "--pool", "prefork"]
        cmd += ["--concurrency", str(workers), "-Q", s.suffix, "--loglevel", "WARNING"]
        cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        env = {"BENCH_BROKER": broker, "BENCH_DSN": s.dsn, "BENCH_QUEUE": s.suffix}
        return [spawn(cmd, f"celery-{s.suffix}", BENCH_STREAM=s.stream, **env)]

    label = "Celery 5 prefork, acks_late"
    return measure(srv, "celery", label, workers, backlog, start, done="rows", publish=publish)


def run_producer_cli(srv: Servers, n: int) -> dict[str, Any]:
    """bin/ratebox-producer produce N: wall time of the whole command (start-up included)."""
    with scratch(srv, "producer") as s:
        path = str(ratebox_yaml(srv, s, 1))
        started = time.perf_counter()
        proc = spawn(
            [PY, "bin/ratebox-producer", "-c", path, "produce", str(n)], f"producer-{s.suffix}"
        )
        code = proc.wait()
        wall = time.perf_counter() - started
        client = redis.Redis.from_url(srv.redis_url)
        length = client.xlen(s.stream)
        client.close()
        rate = preload(srv, s, n)  # the same stream again: produce() in-process, for comparison
    if code != 0 or length != n:
        raise RuntimeError(f"ratebox-producer failed (exit {code}, {length} entries)")
    return {
        "system": "producer",
        "messages": n,
        "cli_wall_s": round(wall, 3),
        "cli_msgs_per_s": round(n / wall, 1),
        "produce_msgs_per_s": round(rate, 1),
    }


# -- modes ---------------------------------------------------------------------------------------


def ratebox_runner(args: argparse.Namespace, srv: Servers) -> Callable[..., dict[str, Any]]:
    """The supervisor when it works; else W ratebox-worker processes, labelled so."""
    state = {"supervisor": args.ratebox != "workers"}

    def run(workers: int, backlog: int, **kw: Any) -> dict[str, Any]:
        if state["supervisor"]:
            try:
                return run_ratebox(srv, workers, backlog, True, **kw)
            except common.ConsumersFailed as exc:
                if args.ratebox == "supervisor":
                    raise
                print(f"  supervisor run failed ({exc}); measuring ratebox-worker processes")
                state["supervisor"] = False
        result = run_ratebox(srv, workers, backlog, False, **kw)
        return result

    return run


def throughput(args: argparse.Namespace, srv: Servers) -> dict[str, Any]:
    only = set(args.only)
    ratebox = ratebox_runner(args, srv)
    runs: list[dict[str, Any]] = []
    for w in args.workers:
        plan: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("ceiling", lambda w=w: run_loop(srv, "ceiling", w, args.backlog)),
            ("ceiling_copy", lambda w=w: run_loop(srv, "ceiling_copy", w, args.backlog)),
            ("naive", lambda w=w: run_loop(srv, "naive", w, args.small_backlog)),
            ("celery", lambda w=w: run_celery(srv, w, args.small_backlog)),
            ("ratebox", lambda w=w: ratebox(w, args.backlog)),
        ]
        for i in range(args.repeat):
            for system, go in plan:
                if system in only:
                    print(f"-- {system}, W={w}, round {i + 1}/{args.repeat} ...", flush=True)
                    runs.append(go())
                    print("   " + brief(runs[-1]), flush=True)
    doc: dict[str, Any] = {"runs": runs, "medians": medians(runs)}
    if "producer" in only:
        print(f"-- bin/ratebox-producer produce {args.backlog} ...", flush=True)
        doc["producer"] = run_producer_cli(srv, args.backlog)
    doc["ratios"] = ratios(doc["medians"])
    print_table(doc)
    return doc


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (system, W): the run with the median msg/s, and the spread of all rounds."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["system"], r["workers"]), []).append(r)
    out = []
    for same in groups.values():
        ordered = sorted(same, key=lambda r: r["msgs_per_s"])
        mid = ordered[(len(ordered) - 1) // 2]
        steady = [r["steady_msgs_per_s"] or 0.0 for r in same]
        out.append(
            {
                **mid,
                "rounds": len(same),
                "msgs_per_s": statistics.median(r["msgs_per_s"] for r in same),
                "steady_msgs_per_s": statistics.median(steady),
                "msgs_per_s_all": [r["msgs_per_s"] for r in same],
            }
        )
    return out


def latency(args: argparse.Namespace, srv: Servers) -> dict[str, Any]:
    """A steady RATE msg/s for DURATION s; publish -> committed row, per message.

    Each item carries its publish time (data.sent_at, epoch seconds). The commit time of each
    transaction comes from a statement trigger on raw_items that NOTIFYs its transaction id:
    notifications are delivered at commit, so their arrival is when the rows became visible.
    processed_at (the transaction's start, now()) is reported too.
    """
    w = args.workers[-1]
    clock: list[CommitClock] = []

    def no_preload(s: Scratch, n: int) -> float:
        stream.ensure_group(redis.Redis.from_url(srv.redis_url), s.stream, s.group)
        with closing(psycopg2.connect(s.dsn)) as conn, conn, conn.cursor() as cur:
            cur.execute(COMMIT_TRIGGER, {"channel": s.suffix})
        clock.append(CommitClock(s.dsn, s.suffix))
        clock[0].start()
        return 0.0  # start() publishes while the workers run

    def start(s: Scratch) -> list[subprocess.Popen[bytes]]:
        procs = run_start(srv, s, w, args)
        client = redis.Redis.from_url(srv.redis_url)
        wait_consumers(client, s, w, procs)
        publish_paced(client, s.stream, args.rate, args.duration)
        return procs

    def figures(s: Scratch) -> dict[str, Any]:
        clock[0].finish()
        return latency_figures(s.dsn, clock[0].at)

    n = int(args.rate * args.duration)
    run = measure(srv, "latency", label_of(args), w, n, start, publish=no_preload, after=figures)
    print_latency(run, args)
    return {"latency": run}


COMMIT_TRIGGER = """
CREATE FUNCTION bench_notify_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(%(channel)s, (txid_current() %% 4294967296)::text);
    RETURN NULL;
END $$;
CREATE TRIGGER bench_notify_commit AFTER INSERT ON raw_items
    FOR EACH STATEMENT EXECUTE FUNCTION bench_notify_commit();
"""


class CommitClock(threading.Thread):
    """LISTENs on a channel; remembers when each transaction id was first announced."""

    def __init__(self, dsn: str, channel: str) -> None:
        super().__init__(daemon=True)
        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute(f'LISTEN "{channel}"')
        self.at: dict[int, float] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            if select.select([self.conn], [], [], 0.1)[0]:
                now = time.time()
                self.conn.poll()
                while self.conn.notifies:
                    self.at.setdefault(int(self.conn.notifies.pop(0).payload), now)

    def finish(self) -> None:
        self._done.set()
        self.join()
        self.conn.close()


def run_start(
    srv: Servers, s: Scratch, workers: int, args: argparse.Namespace
) -> list[subprocess.Popen[bytes]]:
    return start_ratebox(srv, s, workers, args.ratebox != "workers")


def label_of(args: argparse.Namespace) -> str:
    return ratebox_label(args.ratebox != "workers")


def wait_consumers(
    client: redis.Redis, s: Scratch, w: int, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Until W consumers have read from the group once (so the first messages wait for nobody)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if len(client.xinfo_consumers(s.stream, s.group)) >= w:
                time.sleep(0.5)
                return
        except redis.ResponseError:
            pass
        if any(p.poll() is not None for p in procs):
            raise common.ConsumersFailed(f"ratebox exited early (see {TMP})")
        time.sleep(0.1)
    raise RuntimeError("workers did not start within 60 s")


def publish_paced(client: redis.Redis, name: str, rate: float, duration: float) -> int:
    """RATE msg/s by the clock, each item carrying its publish time as data.sent_at (epoch s)."""
    rng = random.Random(7)
    started = time.monotonic()
    sent, total = 0, int(rate * duration)
    while sent < total:
        due = min(int((time.monotonic() - started) * rate), total) - sent
        if due <= 0:
            time.sleep(0.002)
            continue
        batch = []
        for _ in range(due):
            item = producer.fake_item(rng)
            item["sent_at"] = time.time()
            batch.append(producer.entry(item, "latency"))
        stream.publish(client, name, batch)
        sent += due
    return sent


def latency_figures(dsn: str, committed_at: dict[int, float]) -> dict[str, Any]:
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT xmin::text::bigint, (data->>'sent_at')::float8,"
            " extract(epoch FROM processed_at)::float8 FROM raw_items"
        )
        rows = cur.fetchall()
    to_commit = sorted((committed_at[x] - sent) * 1000 for x, sent, _ in rows if x in committed_at)
    to_start = sorted((at - sent) * 1000 for _, sent, at in rows)

    def pct(values: list[float], q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))], 2) if values else 0.0

    return {
        "latency_rows": len(rows),
        "rows_without_commit_time": len(rows) - len(to_commit),
        "p50_ms": pct(to_commit, 0.50),
        "p95_ms": pct(to_commit, 0.95),
        "p99_ms": pct(to_commit, 0.99),
        "max_ms": pct(to_commit, 1.0),
        "to_processed_at_ms": {
            "p50": pct(to_start, 0.5),
            "p99": pct(to_start, 0.99),
            "max": pct(to_start, 1.0),
        },
    }


def soak(args: argparse.Namespace, srv: Servers) -> dict[str, Any]:
    w = args.workers[-1]
    run = ratebox_runner(args, srv)(w, args.backlog, rss_every_s=args.sample_s)
    workers = {k: v for k, v in run["_series"].items() if "worker" in k}
    run["worker_rss_mb"] = {
        k: {
            "first": v[0][1],
            "last": v[-1][1],
            "max": max(r for _, r in v),
            "samples": len(v),
        }
        for k, v in workers.items()
    }
    print(
        f"\nsoak: {run['label']}, W={w}, {args.backlog:,} messages, {run['msgs_per_s']:,.0f} msg/s"
    )
    print(f"{'process':34} {'first MB':>9} {'last MB':>9} {'max MB':>9} {'samples':>8}")
    for k, v in run["worker_rss_mb"].items():
        print(f"{k:34} {v['first']:9.1f} {v['last']:9.1f} {v['max']:9.1f} {v['samples']:8}")
    return {"soak": run}


def growth(args: argparse.Namespace, srv: Servers) -> dict[str, Any]:
    w = args.workers[-1]
    ratebox = ratebox_runner(args, srv)
    runs = []
    backlogs = [*sorted(set(args.growth_backlogs) - {args.backlog}), args.backlog]
    for n in backlogs:  # the last one on an empty table right before the prefilled one
        print(f"-- backlog {n:,}, empty raw_items ...", flush=True)
        runs.append({**ratebox(w, n, after=quarters), "prefilled_rows": 0})
        print("   " + brief(runs[-1]), flush=True)

    def prefill(s: Scratch) -> None:
        fill_history(s.dsn, args.prefill_rows)

    print(f"-- backlog {args.backlog:,}, raw_items prefilled with {args.prefill_rows:,} rows ...")
    run = ratebox(w, args.backlog, prepare=prefill, after=quarters)
    runs.append({**run, "prefilled_rows": args.prefill_rows})
    print("   " + brief(runs[-1]), flush=True)
    print(f"\ngrowth: {runs[0]['label']}, W={w}")
    print(
        f"{'backlog':>10} {'raw_items before':>17} {'msg/s e2e':>10} {'msg/s steady':>13}"
        f"   msg/s by quarter of the run"
    )
    for r in runs:
        by_quarter = " ".join(f"{q:>7,.0f}" for q in r["quarters_msgs_per_s"])
        print(
            f"{r['backlog']:>10,} {r['prefilled_rows']:>17,} {r['msgs_per_s']:>10,.0f}"
            f" {r['steady_msgs_per_s'] or 0:>13,.0f}   {by_quarter}"
        )
    return {"growth": runs}


def quarters(s: Scratch) -> dict[str, Any]:
    """msg/s in each quarter of the span of processed_at: does the rate sag as the run goes?"""
    with closing(psycopg2.connect(s.dsn)) as conn, conn.cursor() as cur:
        # In two steps: one statement would be planned with the statistics of before the run
        # (the stream had no rows), and a nested loop over 200,000 rows never ends.
        where = "FROM raw_items WHERE stream_name = %s"
        cur.execute(
            f"SELECT extract(epoch FROM min(processed_at)), extract(epoch FROM max(processed_at)) {where}",
            (s.stream,),
        )
        lo, hi = (float(x or 0) for x in cur.fetchone())
        span = hi - lo
        if span <= 0:
            return {"quarters_msgs_per_s": []}
        cur.execute(
            "SELECT least(floor(4 * (extract(epoch FROM processed_at) - %s) / %s), 3) AS q,"
            f" count(*) {where} GROUP BY q ORDER BY q",
            (lo, span, s.stream),
        )
        rates = [round(n / (span / 4), 1) for _, n in cur.fetchall()]
    return {"quarters_msgs_per_s": rates}


HISTORY_SQL = """
INSERT INTO raw_items (data, source, status, error_code, error_message, errors, created_at,
                       processed_at, stream_name, stream_id, consumer_name, delivery_count,
                       batch_id, producer, produced_at, processing_ms)
SELECT jsonb_build_object('phone', '09' || lpad((i %% 100000000)::text, 8, '0'),
                          'bank_account', lpad(i::text, 12, '0'),
                          'email', 'user' || i || '@example.com',
                          'name', 'Nguyen Van ' || i, 'source', 'web_crawler'),
       'web_crawler',
       CASE WHEN i %% 10 < 3 THEN 'error' ELSE 'done' END,
       CASE WHEN i %% 10 < 3 THEN 101 END,
       CASE WHEN i %% 10 < 3 THEN 'Phone number too short: 9 chars, minimum 10' END,
       CASE WHEN i %% 10 < 3 THEN '[{"code": 101, "field": "phone",
            "message": "Phone number too short: 9 chars, minimum 10"}]'::jsonb
            ELSE '[]'::jsonb END,
       t, t, 'raw_items_history', (1700000000000 + i)::text || '-0', 'worker_001', 1,
       'batch_history', 'ratebox_producer', t, 0.01
FROM generate_series(%(lo)s, %(hi)s) AS i,
     LATERAL (SELECT now() - interval '2 days' + i * interval '20 ms') AS x(t)
"""


def fill_history(dsn: str, rows: int, chunk: int = 1_000_000) -> None:
    """rows old rows of another stream (generate_series, in-server), VACUUM ANALYZE, CHECKPOINT."""
    started = time.perf_counter()
    with closing(psycopg2.connect(dsn)) as conn:
        for lo in range(1, rows + 1, chunk):
            with conn.cursor() as cur:
                cur.execute(HISTORY_SQL, {"lo": lo, "hi": min(lo + chunk - 1, rows)})
            conn.commit()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("VACUUM (ANALYZE) raw_items")
            # Else the checkpoint the bulk load owes lands in the measured run (full-page
            # writes, checkpointer I/O) and is blamed on the table's size.
            cur.execute("CHECKPOINT")
    print(f"   prefilled {rows:,} rows in {time.perf_counter() - started:.0f} s", flush=True)


PROFILES = {
    # Every sample, waiting included: where the worker's time goes.
    "wall": (["--idle"], "all samples (--idle): where the time goes, waits included"),
    # Only samples holding the GIL: Python work. psycopg2 and socket waits release the GIL;
    # py-spy's default "active" test still counts them as busy, so it is not used.
    "gil": (["--gil"], "samples holding the GIL: the worker's own CPU"),
}


def profile(args: argparse.Namespace, srv: Servers) -> dict[str, Any]:
    """py-spy of worker_001 while a RateBox run drains a large backlog: wall, then GIL."""
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    w = args.workers[-1]
    out: dict[str, Any] = {}

    def start(s: Scratch) -> list[subprocess.Popen[bytes]]:
        procs = run_start(srv, s, w, args)
        client = redis.Redis.from_url(srv.redis_url)
        wait_consumers(client, s, w, procs)
        pid = worker_pid(procs, "worker_001")
        for kind, (flags, _) in PROFILES.items():
            raw = TMP / f"pyspy-{kind}-{s.suffix}.txt"
            cmd = [spy, "record", "-p", str(pid), "-d", str(args.profile_s), "-r", "200"]
            subprocess.run(
                [*cmd, "-f", "raw", "-o", str(raw), *flags], check=True, capture_output=True
            )
            out[kind] = {**summarize_profile(raw), "file": str(raw)}
        group = next(g for g in client.xinfo_groups(s.stream) if g["name"] == s.group.encode())
        if group.get("lag") == 0:
            print("WARNING: the backlog ran out before profiling ended: raise --backlog")
        return procs

    run = measure(srv, "profile", label_of(args), w, args.backlog, start)
    run["profile"] = out
    for kind, (_, what) in PROFILES.items():
        p = out[kind]
        print(f"\npy-spy of worker_001, {args.profile_s} s, {p['samples']} samples: {what}")
        print(f"  {'self %':>7} {'incl %':>7}  function")
        for f in p["top"]:
            print(f"  {f['self']:7.1f} {f['incl']:7.1f}  {f['function']}")
    return {"profile": run}


def worker_pid(procs: list[subprocess.Popen[bytes]], name: str) -> int:
    for p in procs:
        for q in [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]:
            if name in " ".join(q.cmdline()):
                return q.pid
    return procs[0].pid


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive shares per function from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f.replace(str(ROOT) + "/", "")) for f in stack.split(";")]
        frames = [re.sub(r"\(.*/site-packages/", "(", f) for f in frames]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    names = sorted(incl, key=lambda f: (-own[f], -incl[f]))[:top]
    by_incl = sorted(incl, key=lambda f: -incl[f])[:top]
    pct = (lambda c: round(100 * c / total, 1)) if total else (lambda c: 0.0)
    return {
        "samples": total,
        "top": [{"function": f, "self": pct(own[f]), "incl": pct(incl[f])} for f in names],
        "top_inclusive": [
            {"function": f, "self": pct(own[f]), "incl": pct(incl[f])} for f in by_incl
        ],
    }


# -- output --------------------------------------------------------------------------------------


def brief(r: dict[str, Any]) -> str:
    steady = r.get("steady_msgs_per_s") or 0
    return (
        f"{r['label']}: {r['backlog']:,} msgs in {r['wall_s']:.1f} s = {r['msgs_per_s']:,.0f} msg/s"
        f" (steady {steady:,.0f}; exactly-once {r['exactly_once']})"
    )


def ratios(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    by = {(r["system"], r["workers"]): r for r in runs}
    for (system, w), r in sorted(by.items()):
        if system != "ratebox":
            continue
        for other in ("ceiling", "ceiling_copy", "naive", "celery"):
            o = by.get((other, w))
            if not o:
                continue
            key = f"W{w} ratebox/{other}"
            e2e = r["msgs_per_s"] / o["msgs_per_s"]
            steady = (r["steady_msgs_per_s"] or 0) / (o["steady_msgs_per_s"] or 1)
            entry = {"e2e": round(e2e, 2), "steady": round(steady, 2)}
            if w == 2 and other in TARGETS:
                entry["target"] = TARGETS[other]
                entry["met"] = e2e >= TARGETS[other]
            out[key] = entry
    return out


def print_table(doc: dict[str, Any]) -> None:
    runs = doc["medians"]
    print()
    if any(r["rounds"] > 1 for r in runs):
        print("median of the rounds; CPU, RSS and other-CPU from the median round")
    head = (
        f"{'system':44} {'W':>2} {'backlog':>8} {'wall s':>7} {'start s':>7} {'msg/s':>8}"
        f" {'steady':>8} | {'CPU µs/msg (steady)':^30} | {'other':>5} | peak RSS MB"
    )
    print(head)
    print(f"{'':90} | {'redis':>6} {'pg':>6} {'python':>7} {'driver':>6} | {'CPU%':>5} |")
    print("-" * len(head))
    for r in runs:
        us = r["cpu_us_per_msg"]
        rss = ", ".join(f"{_short(k)} {v:.0f}" for k, v in r["peak_rss_mb"].items())
        print(
            f"{r['label']:44} {r['workers']:>2} {r['backlog']:>8,} {r['wall_s']:>7.1f}"
            f" {r['startup_s']:>7.2f} {r['msgs_per_s']:>8,.0f} {r['steady_msgs_per_s'] or 0:>8,.0f}"
            f" | {us['redis']:6.1f} {us['postgres']:6.1f} {us['python']:7.1f} {us['driver']:6.1f}"
            f" | {r['other_cpu_pct']:5.0f} | {rss}"
        )
    if doc.get("ratios"):
        print(
            f"\n{'ratio (same W, same run)':28} {'end-to-end':>11} {'steady':>8} {'target at W=2':>14}"
        )
        for k, v in doc["ratios"].items():
            target = (
                f">= {v['target']:g}: {'met' if v['met'] else 'NOT met'}" if "target" in v else ""
            )
            print(f"{k:28} {v['e2e']:>10.2f}x {v['steady']:>7.2f}x {target:>14}")
    p = doc.get("producer")
    if p:
        pub = [r["publish_msgs_per_s"] for r in runs if r["system"] != "celery"]
        print(
            f"\nproducer: bin/ratebox-producer produce {p['messages']:,}: {p['cli_wall_s']:.2f} s wall"
            f" = {p['cli_msgs_per_s']:,.0f} msg/s (target >= 100,000); produce() in-process"
            f" {p['produce_msgs_per_s']:,.0f} msg/s"
            + (f", preloads median {statistics.median(pub):,.0f} msg/s" if pub else "")
        )
    celery_pub = [r["publish_msgs_per_s"] for r in runs if r["system"] == "celery"]
    if celery_pub:
        print(f"celery: apply_async publish rate median {statistics.median(celery_pub):,.0f} msg/s")


def _short(label: str) -> str:
    return label.replace("ratebox: ", "").replace(".py", "")


def print_latency(run: dict[str, Any], args: argparse.Namespace) -> None:
    t = run["to_processed_at_ms"]
    print(
        f"\nlatency: {run['label']}, W={run['workers']}, {args.rate:g} msg/s for {args.duration:g} s"
        f" ({run['latency_rows']:,} rows)\n"
        f"  publish -> row committed: p50 {run['p50_ms']} ms, p95 {run['p95_ms']} ms,"
        f" p99 {run['p99_ms']} ms (target <= 50), max {run['max_ms']} ms\n"
        f"  publish -> processed_at (transaction start): p50 {t['p50']} ms, p99 {t['p99']} ms,"
        f" max {t['max']} ms"
    )


# -- command line --------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "mode",
        nargs="?",
        default="throughput",
        choices=["throughput", "latency", "soak", "growth", "profile"],
    )
    p.add_argument(
        "--backlog",
        type=int,
        help="messages preloaded (default 200,000; soak 1,000,000; profile 2,000,000)",
    )
    p.add_argument("--small-backlog", type=int, default=20_000, help="backlog of naive and celery")
    p.add_argument("--workers", type=_ints, help="W values (default 1,2,4; modes: 2)")
    p.add_argument("--only", type=_names, default=list(SYSTEMS), help=",".join(SYSTEMS))
    p.add_argument("--servers", choices=["machine", "embedded"], help="default: machine if up")
    p.add_argument(
        "--ratebox",
        choices=["auto", "supervisor", "workers"],
        default="auto",
        help="auto: the supervisor, falling back to W ratebox-worker processes if it fails",
    )
    p.add_argument("--repeat", type=int, default=1, help="rounds per W (medians are reported)")
    p.add_argument("--rate", type=float, default=1000.0, help="latency: messages/s")
    p.add_argument("--duration", type=float, default=30.0, help="latency: seconds")
    p.add_argument("--sample-s", type=float, default=5.0, help="soak: RSS sampling interval")
    p.add_argument("--growth-backlogs", type=_ints, default=[10_000, 100_000, 1_000_000])
    p.add_argument("--prefill-rows", type=int, default=5_000_000, help="growth: rows already there")
    p.add_argument("--profile-s", type=int, default=10, help="profile: seconds per py-spy record")
    p.add_argument(
        "--json", type=Path, help="default bench/results.json (modes: results-MODE.json)"
    )
    args = p.parse_args()
    big = {"soak": 1_000_000, "profile": 2_000_000}
    args.backlog = args.backlog or big.get(args.mode, 200_000)
    args.workers = args.workers or ([1, 2, 4] if args.mode == "throughput" else [2])
    kind = args.servers or ("machine" if common.machine_up() else "embedded")
    srv = common.servers(kind)
    print(
        f"servers: {kind} (redis pid {srv.redis_pid}, postgres pid {srv.pg_pid}); "
        f"{psutil.cpu_count()} cores; load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    modes = {
        "throughput": throughput,
        "latency": latency,
        "soak": soak,
        "growth": growth,
        "profile": profile,
    }
    code_before = code_state()
    try:
        load_before = os.getloadavg()
        doc = modes[args.mode](args, srv)
    finally:
        srv.stop()
    doc["meta"] = {
        "mode": args.mode,
        "servers": kind,
        "redis_url": srv.redis_url,
        "cores": psutil.cpu_count(),
        "python": platform.python_version(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "argv": sys.argv[1:],
        "code": code_state(),
        "code_changed_during_run": code_state()["sha256"] != code_before["sha256"],
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": "other work may share the machine: compare ratios within one run",
    }
    _strip(doc)
    name = "results.json" if args.mode == "throughput" else f"results-{args.mode}.json"
    path = args.json or Path(__file__).resolve().parent / name
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
    if doc["meta"]["code_changed_during_run"]:
        print("\nNOTE: ratebox/ or schema/ changed while the bench ran: figures mix two versions")
    print(
        f"\nload average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after; wrote {path}"
    )
    return 0


def code_state() -> dict[str, Any]:
    """What was measured: HEAD, the files changed since, and a hash of the code as run."""

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    digest = hashlib.sha256()
    for f in sorted([*(ROOT / "ratebox").glob("*.py"), *(ROOT / "schema").glob("*.sql")]):
        digest.update(f.name.encode() + f.read_bytes())
    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "changed": git("status", "--porcelain", "ratebox", "schema").splitlines(),
        "sha256": digest.hexdigest()[:16],  # of ratebox/*.py and schema/*.sql as run
    }


def _strip(doc: Any) -> None:
    """Drop the raw RSS series (kept only as soak's summary)."""
    if isinstance(doc, dict):
        doc.pop("_series", None)
        for v in doc.values():
            _strip(v)
    elif isinstance(doc, list):
        for v in doc:
            _strip(v)


def _ints(text: str) -> list[int]:
    return [int(x.replace("_", "")) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    for n in names:
        if n not in SYSTEMS:
            raise argparse.ArgumentTypeError(f"unknown system {n!r} (one of {', '.join(SYSTEMS)})")
    return names


if __name__ == "__main__":
    sys.exit(main())
