"""The dashboard: a snapshot of ratebox.monitor drawn with Rich, and as one log line.

Pure presentation of the plain data ``monitor.collect()`` returns: no I/O here. The live view
is compact on a small screen (80x24 shows every section) and spreads into panels on a large
one; a printed report uses the panels.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from rich import box as boxes
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ratebox import inert

#: Rows of "top errors (1 hour)" shown in the full view.
TOP_ERRORS = 10
#: Below this many columns or rows the live view uses its compact form (fits 80x24).
FULL_WIDTH, FULL_HEIGHT = 120, 40

Snapshot = dict[str, Any]


def snapshot_line(snap: Snapshot) -> str:
    """The snapshot as one compact log line.

    Every number has thousands separators: a comma breaks a run of digits, so the log's mask
    (which hides runs of 8 or more digits, however spaced) never takes a count for an account.
    """
    parts = []
    servers = snap["servers"]
    st = snap["stream"]
    if st is not None:
        parts.append(
            f"stream {st['name']} len={st['length']:,} mem={_bytes(st['memory_bytes'])}"
            f" dead={st['dead_letter']['length']:,}"
        )
        for g in snap["groups"]:
            parts.append(
                f"group {g['name']} consumers={g['consumers']:,} pending={g['pending']:,} lag={_lag(g)}"
            )
    else:
        parts.append(f"redis unavailable ({servers['redis']['error']})")
    db = snap["database"]
    if db is not None:
        t = db["totals"]
        parts.append(
            f"db done={t['done']:,} error={t['error']:,} pending={t['pending']:,}"
            f" dead={t['dead_lettered']:,}"
        )
        tp = snap["throughput"]
        now = tp.get("per_s_now")
        current = "" if now is None else f"{now:,.1f}/s (10s) "
        parts.append(f"rate={current}{tp['per_s_1m']:,.1f}/s (1-2m) {tp['per_s_5m']:,.1f}/s (5-6m)")
        if snap["top_errors"]:
            parts.append(
                "top " + " ".join(f"{e['code']}x{e['count']:,}" for e in snap["top_errors"][:3])
            )
    else:
        parts.append(f"postgres unavailable ({servers['postgres']['error']})")
    procs = snap["processes"]
    if procs is not None and procs["available"]:
        up = sum(1 for c in procs["children"] if c["alive"])
        restarts = sum(c["restarts"] for c in procs["children"])
        parts.append(f"procs {up}/{len(procs['children'])} up restarts={restarts:,}")
        parts.append(f"workers {workers_figure(procs)}")
    elif procs is not None:
        parts.append("procs unavailable")
    return " | ".join(parts)


# -- render -----------------------------------------------------------------------------------


def render(snap: Snapshot, screen: bool = False) -> RenderableType:
    """The dashboard; on a live ``screen`` it fits the terminal (compact below 120x40)."""
    return _Dashboard(snap, screen)


class _Dashboard:
    """Chooses its layout from the space Rich offers when it is drawn."""

    def __init__(self, snap: Snapshot, screen: bool) -> None:
        self.snap = snap
        self.screen = screen

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        wide = options.max_width >= FULL_WIDTH
        # A printed report may scroll; a live screen shows only what fits.
        if self.screen and not (wide and options.max_height >= FULL_HEIGHT):
            yield _compact(self.snap)
        else:
            yield _full(self.snap, wide)


def _header(snap: Snapshot) -> Text:
    text = Text.assemble(
        ("RateBox monitor", "bold"),
        f"  {snap['stream_name']} / {snap['group_name']}  {snap['taken_at'][11:19]} UTC  ",
    )
    for name, server in snap["servers"].items():
        ok = server["available"]
        # Words as well as colour: piped output and colour-blind readers see no colour.
        label = f" {name} up " if ok else f" {name} DOWN "
        text.append(label, style="black on green" if ok else "white on red")
        text.append(" ")
    return text


def _unavailable(snap: Snapshot, server: str) -> Text:
    error = snap["servers"].get(server, {}).get("error")
    return Text(f"unavailable: {inert.text(error)}", style="red")


class _InertTable(Table):
    """A table whose text cells are shown as they are: never parsed as markup, never obeyed.

    Cells hold names and samples from Redis and the database, which a producer can choose.
    """

    def add_row(self, *renderables: RenderableType | None, **options: Any) -> None:
        super().add_row(
            *(Text(inert.text(r)) if isinstance(r, str) else r for r in renderables), **options
        )


def _stream_table(snap: Snapshot) -> RenderableType:
    st = snap["stream"]
    if st is None:
        return _unavailable(snap, "redis")
    grid = _InertTable.grid(padding=(0, 1))
    grid.add_column(style="dim")
    grid.add_column()
    grid.add_row("length", _num(st["length"]) if st["exists"] else "(no stream yet)")
    grid.add_row("first / last", f"{st['first_id'] or '-'} / {st['last_id'] or '-'}")
    grid.add_row("memory", _bytes(st["memory_bytes"]))
    grid.add_row(
        "dead letter", f"{_num(st['dead_letter']['length'])} in {st['dead_letter']['name']}"
    )
    return grid


def _groups_table(snap: Snapshot, box: bool = True) -> RenderableType:
    if snap["stream"] is None:
        return _unavailable(snap, "redis")
    table = _table(box, "group", "consumers", "pending", "lag", "last delivered")
    for g in snap["groups"]:
        lag = _lag(g)
        style = "bold" if g["name"] == snap["group_name"] else ""
        table.add_row(
            g["name"],
            _num(g["consumers"]),
            _num(g["pending"]),
            lag,
            g["last_delivered"],
            style=style,
        )
    return table


def _consumers_table(snap: Snapshot, box: bool = True) -> RenderableType:
    if snap["stream"] is None:
        return _unavailable(snap, "redis")
    table = _table(box, "consumer", "pending", "idle")
    for c in _our_consumers(snap):
        idle = _duration(c["idle_s"])
        # Only a lower bound when Redis restarted since: "at least, unknown before".
        table.add_row(
            c["name"],
            _num(c["pending"]),
            f"≥{idle} restart" if c.get("idle_since_restart") else idle,
        )
    return table


def _our_consumers(snap: Snapshot) -> list[Snapshot]:
    for g in snap["groups"]:
        if g["name"] == snap["group_name"]:
            return list(g["consumer_list"])
    return []


def _database_table(snap: Snapshot, compact: bool = False) -> RenderableType:
    db = snap["database"]
    if db is None:
        return _unavailable(snap, "postgres")
    t = db["totals"]
    grid = _InertTable.grid(padding=(0, 1))
    grid.add_column(style="dim")
    grid.add_column(justify="right")
    grid.add_row("done", Text(_num(t["done"]), style="green"))
    grid.add_row("error", Text(_num(t["error"]), style="red"))
    grid.add_row("pending", _num(t["pending"]))
    grid.add_row("dead-lettered", _num(t["dead_lettered"]))
    if not compact:
        grid.add_row("processed", _num(db["processed"]))
    return grid


def _performance_table(snap: Snapshot, box: bool = True) -> RenderableType:
    if snap["database"] is None:
        return _unavailable(snap, "postgres")
    table = _table(
        box,
        "consumer",
        "processed",
        "errors",
        "err %",
        "avg ms",
        "max ms 1h",
        "last active",
        "host",
        "pid",
    )
    for c in snap["consumer_performance"]:
        table.add_row(
            c["name"],
            _num(c["processed"]),
            _num(c["errors"]),
            f"{c['error_rate'] * 100:.1f}",
            _ms(c["avg_ms"]),
            _ms(c["max_ms_1h"]),
            _ago(c["last_active_s"]),
            c["hostname"] or "-",
            str(c["pid"] or "-"),
        )
    return table


def _merged_consumers(snap: Snapshot) -> RenderableType:
    """Redis and database figures per consumer in one table, for the compact view."""
    table = _table(False, "consumer", "pending", "idle", "processed", "err %", "avg ms", "active")
    perf = {c["name"]: c for c in snap["consumer_performance"]}
    redis_side = {c["name"]: c for c in _our_consumers(snap)}
    for name in sorted(set(perf) | set(redis_side)):
        r, p = redis_side.get(name), perf.get(name)
        table.add_row(
            name,
            _num(r["pending"]) if r else "-",
            _duration(r["idle_s"]) if r else "-",
            _num(p["processed"]) if p else "-",
            f"{p['error_rate'] * 100:.1f}" if p else "-",
            _ms(p["avg_ms"]) if p else "-",
            _ago(p["last_active_s"]) if p else "-",
        )
    return table


def _recent_table(snap: Snapshot, box: bool = True) -> RenderableType:
    if snap["database"] is None:
        return _unavailable(snap, "postgres")
    table = _table(box, "status", "count", "avg ms")
    for r in snap["recent_activity"]:
        table.add_row(r["status"], _num(r["count"]), _ms(r["avg_ms"]))
    if not snap["recent_activity"]:
        table.add_row("(none)", "0", "-")
    return table


def _errors_table(
    snap: Snapshot, box: bool = True, rows: int = TOP_ERRORS, sample: bool = True
) -> RenderableType:
    if snap["database"] is None:
        return _unavailable(snap, "postgres")
    columns = ["code", "field", "count"] + (["sample"] if sample else [])
    table = _table(box, *columns)
    for e in snap["top_errors"][:rows]:
        cells = [str(e["code"]), e["field"] or "-", _num(e["count"])]
        table.add_row(*cells, *([e["sample"] or ""] if sample else []))
    if not snap["top_errors"]:
        table.add_row("-", "(no errors)", "0", *([""] if sample else []))
    return table


def _throughput_table(snap: Snapshot) -> RenderableType:
    tp = snap["throughput"]
    if tp is None:
        return _unavailable(snap, "postgres")
    grid = _InertTable.grid(padding=(0, 1))
    grid.add_column(style="dim")
    grid.add_column(justify="right")
    # The current rate needs two samples: the live view and the supervisor's monitor have it.
    now = tp.get("per_s_now")
    grid.add_row("last ~10 s", "- (live view)" if now is None else f"{now:,.1f} msg/s")
    # Per-minute buckets: the current minute so far plus one or five whole minutes before it.
    grid.add_row("last 1–2 min", f"{tp['per_s_1m']:,.1f} msg/s")
    grid.add_row("last 5–6 min", f"{tp['per_s_5m']:,.1f} msg/s")
    counts = [m["processed"] for m in tp["minutes"]]
    grid.add_row("per minute", _sparkline(counts) or "-")
    return grid


def workers_figure(procs: Snapshot) -> str:
    """Workers running out of desired: "3/4 running", "(autoscale)" when it decides."""
    w = procs.get("workers") or {}
    desired = w.get("desired")
    figure = f"{w.get('running', 0)}/{desired if desired is not None else '?'} running"
    return figure + (" (autoscale)" if w.get("autoscale") else "")


def _processes_title(snap: Snapshot) -> str:
    procs = snap["processes"]
    if procs is None or not procs["available"]:
        return "Processes"
    return f"Processes · workers {workers_figure(procs)}"


def _processes_table(
    snap: Snapshot, box: bool = True, compact: bool = False, reason: bool = False
) -> RenderableType:
    procs = snap["processes"]
    if procs is None:
        return Text("not under a supervisor (no status file)", style="dim")
    if not procs["available"]:
        return Text(f"unavailable: {inert.text(procs['error'])}", style="red")
    if compact:
        table = _table(box, "name", "pid", "state", "rst", "CPU%", "RSS")
    else:
        table = _table(box, "name", "pid", "state", "restarts", "CPU %", "RSS", "up", "last exit")
    rows = [
        {
            "name": "supervisor",
            "pid": procs["supervisor_pid"],
            "state": "running" if procs["supervisor_up"] else "gone",
            "alive": procs["supervisor_up"],
            "restarts": None,
            **{k: procs[k] for k in ("cpu_percent", "rss_bytes", "uptime_s")},
            "last_exit": None,
        },
        *procs["children"],
    ]
    for c in rows:
        state = c["state"] if c["alive"] or not c["pid"] else f"{c['state']} (gone)"
        cells = [
            c["name"],
            str(c["pid"] or "-"),
            Text(state, style="" if c["alive"] else "yellow"),
            _num(c["restarts"]) if c["restarts"] is not None else "",
            _pct(c["cpu_percent"]),
            _bytes(c["rss_bytes"]),
        ]
        if not compact:
            cells += [_duration(c["uptime_s"]), c["last_exit"] or ""]
        table.add_row(*cells)
    last = (procs.get("workers") or {}).get("reason")
    if reason and last:
        return Group(table, Text(f"last change of the worker count: {last}", style="dim"))
    return table


def _full(snap: Snapshot, wide: bool) -> RenderableType:
    def panel(title: str, body: RenderableType) -> Panel:
        return Panel(body, title=f"[bold]{title}", title_align="left", border_style="blue")

    stream_body: RenderableType = _stream_table(snap)
    if snap.get("partitions"):
        stream_body = Group(stream_body, _partitions_text(snap["partitions"]))
    stream_p = panel("Stream", stream_body)
    groups_p = panel("Consumer groups", _groups_table(snap))
    consumers_p = panel("Consumers", _consumers_table(snap))
    database_p = panel("Database", _database_table(snap))
    recent_p = panel("Recent activity (1 h)", _recent_table(snap))
    throughput_p = panel("Throughput", _throughput_table(snap))
    perf_p = panel("Consumer performance", _performance_table(snap))
    errors_p = panel("Top errors (1 h)", _errors_table(snap))
    procs_p = panel(_processes_title(snap), _processes_table(snap, reason=True))
    if not wide:
        return Group(
            _header(snap),
            stream_p,
            groups_p,
            consumers_p,
            database_p,
            perf_p,
            recent_p,
            errors_p,
            throughput_p,
            procs_p,
        )
    return Group(
        _header(snap),
        _side_by_side(stream_p, groups_p),
        _side_by_side(consumers_p, database_p, throughput_p),
        perf_p,
        _side_by_side(recent_p, errors_p, ratios=(1, 3)),
        procs_p,
    )


def _compact(snap: Snapshot) -> RenderableType:
    st = snap["stream"]
    lines: list[RenderableType] = [_header(snap)]
    if st is None:
        lines.append(Text.assemble(("Stream ", "bold"), _unavailable(snap, "redis")))
    else:
        # Entry IDs as their clock time: two IDs and the figures would not fit in 80 columns.
        lines.append(
            Text.assemble(
                ("Stream ", "bold"),
                f"{st['name']}  len {_num(st['length'])} · mem {_bytes(st['memory_bytes'])}"
                f" · dead {_num(st['dead_letter']['length'])}"
                f" · {_clock(st['first_id'])} … {_clock(st['last_id'])}",
            )
        )
        # One line per group: the table form costs two lines of title and header.
        for g in snap["groups"] or [None]:
            text = Text("Group ", style="bold")
            if g is None:
                text.append("(none yet)")
            else:
                lag = _lag(g)
                text.append(
                    f"{inert.text(g['name'])}  {g['consumers']} consumers · pending {_num(g['pending'])}"
                    f" · lag {lag} · last {_clock(g['last_delivered'])}"
                )
            lines.append(text)
    if snap.get("partitions"):
        lines.append(_partitions_text(snap["partitions"]))
    lines.append(_titled("Consumers", _merged_consumers(snap)))
    lines.append(
        _side_by_side(
            _titled("Database", _database_table(snap, compact=True)),
            _titled("Recent activity (1 h)", _recent_table(snap, box=False)),
            _titled("Throughput", _throughput_table(snap)),
            panels=False,
        )
    )
    lines.append(
        _side_by_side(
            _titled("Top errors (1 h)", _errors_table(snap, box=False, rows=5, sample=False)),
            _titled(_processes_title(snap), _processes_table(snap, box=False, compact=True)),
            ratios=(2, 3),
            panels=False,
        )
    )
    return Group(*lines)


def _titled(title: str, body: RenderableType) -> RenderableType:
    return Group(Text(title, style="bold underline"), body)


def _side_by_side(
    *parts: RenderableType, ratios: tuple[int, ...] | None = None, panels: bool = True
) -> Table:
    # Panels share the width; bare tables (compact view) take what their content needs.
    grid = _InertTable.grid(expand=panels, padding=(0, 0 if panels else 3))
    for i in range(len(parts)):
        grid.add_column(ratio=(ratios[i] if ratios else 1) if panels else None)
    grid.add_row(*parts)
    return grid


def _table(box: bool, *columns: str) -> Table:
    table = _InertTable(
        box=boxes.SIMPLE_HEAD if box else None,
        pad_edge=False,
        show_edge=False,
        header_style="bold dim",
    )
    for i, column in enumerate(columns):
        table.add_column(
            column,
            justify="left"
            if i == 0 or column in ("name", "field", "sample", "host", "last exit", "state")
            else "right",
            # The first column names the row (worker_001): on 80 columns the others give way.
            no_wrap=i == 0,
            min_width=max(len(column), 10) if i == 0 else None,
        )
    return table


# -- formatting -------------------------------------------------------------------------------


def _lag(group: Snapshot) -> str:
    """A group's lag; "unknown" when Redis neither reports it nor can count it in one sample."""
    return "unknown" if group["lag"] is None else f"{group['lag']:,}"


def _num(value: int | float | None) -> str:
    return "-" if value is None else f"{value:,}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"  # pragma: no cover - the loop always returns


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{seconds / 86400:.1f}d"


def _clock(entry_id: str | None) -> str:
    """The UTC time of day an entry ID was made (its first part is Unix milliseconds)."""
    ms = (entry_id or "").partition("-")[0]
    if not ms.isdigit() or ms == "0":
        return "-"
    return datetime.fromtimestamp(int(ms) / 1000, timezone.utc).strftime("%H:%M:%S")


def _ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{_duration(seconds)} ago"


_SPARKS = "▁▂▃▄▅▆▇█"


def _sparkline(values: list[int]) -> str:
    if not values:
        return ""
    top = max(values) or 1
    return "".join(
        _SPARKS[min(int(v / top * (len(_SPARKS) - 1)), len(_SPARKS) - 1)] for v in values
    )


#: Partitions shown one line each; beyond this many, the busiest ones and a summary of the rest.
PARTITION_ROWS = 8


def _partitions_text(rows: list[Snapshot]) -> RenderableType:
    """Partitions, a line each (the busiest first when there are many), lag and pending."""
    text = Text("Partitions ", style="bold")
    text.append(f"{len(rows)}")
    shown = sorted(rows, key=lambda r: -((r["lag"] or 0) + r["pending"]))[:PARTITION_ROWS]
    for r in sorted(shown, key=lambda r: r["partition"]):
        text.append(
            f"\n  {r['partition']:>4}  len {_num(r['length'])} · pending {_num(r['pending'])}"
            f" · lag {_num(r['lag'])} · dead {_num(r['dead_letter'])}"
        )
    if len(rows) > len(shown):
        text.append(f"\n  … {len(rows) - len(shown)} more, quieter")
    return text
