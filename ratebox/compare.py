"""ratebox-compare: re-judges the rows the legacy system judged, and reports agreement.

Read-only: rows come page by page from a server-side cursor in a read-only transaction.
A verdict is compared as its first code, or ``done``; a legacy error without a code is
``error``. Latency is created_at -> processed_at, for each system's rows of the table.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from ratebox import mask, store_bridge
from ratebox.message import MALFORMED
from ratebox.rules import Engine

#: Masked samples kept per (legacy, RateBox) pair that disagree.
SAMPLES = 3
#: Characters of a masked sample shown.
SAMPLE_CHARS = 200


def legacy_verdict(status: str, code: Any) -> str:
    """The legacy row's verdict as compared: ``done``, its code, or ``error`` without one."""
    if status == "done":
        return "done"
    return "error" if code is None else str(code).strip()


def ratebox_verdict(data: str, engine: Engine) -> tuple[str, Any]:
    """What RateBox says of the data (first code, or ``done``), and the item when it is one."""
    try:
        item = orjson.loads(data)
    except orjson.JSONDecodeError:
        return str(MALFORMED), None
    if type(item) is not dict:
        return str(MALFORMED), None
    failures = engine.check(item)
    return (str(failures[0].code) if failures else "done"), item


def sample(row_id: int, item: Any) -> str:
    """One masked sample line: the row id and the masked item, cut short."""
    shown = (
        orjson.dumps(mask.mask_item(item)).decode() if isinstance(item, dict) else "(not an object)"
    )
    if len(shown) > SAMPLE_CHARS:
        shown = shown[: SAMPLE_CHARS - 3] + "..."
    return f"id {row_id}: {shown}"


def percentile(ordered: list[float], q: float) -> float | None:
    """The q-quantile of sorted values (nearest rank), None when there are none."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Report:
    """Everything compare counts, and how it is shown."""

    compared: int = 0
    agreed: int = 0
    confusion: Counter[tuple[str, str]] = field(default_factory=Counter)
    samples: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    minutes: Counter[int] = field(default_factory=Counter)
    ratebox: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def add_page(self, page: list[tuple[Any, ...]], engine: Engine) -> None:
        """Judge one page of (id, data, status, code, latency s, minute) rows."""
        check = ratebox_verdict
        for row_id, data, status, code, latency, minute in page:
            theirs = "done" if status == "done" else legacy_verdict(status, code)
            ours, item = check(data, engine)
            self.confusion[(theirs, ours)] += 1
            if theirs == ours:
                self.agreed += 1
            else:
                kept = self.samples.setdefault((theirs, ours), [])
                if len(kept) < SAMPLES:
                    kept.append(sample(row_id, item))
            if latency is not None:
                self.latencies.append(latency)
            if minute is not None:
                self.minutes[minute] += 1
        self.compared += len(page)

    def legacy_figures(self) -> dict[str, Any]:
        """The legacy side: latency p50/p99 and peak rows per minute."""
        ordered = sorted(self.latencies)
        return {
            "rows": self.compared,
            "p50_s": percentile(ordered, 0.5),
            "p99_s": percentile(ordered, 0.99),
            "peak_per_minute": max(self.minutes.values(), default=0),
        }

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "compared": self.compared,
            "agreed": self.agreed,
            "disagreed": self.compared - self.agreed,
            "agreement": self.agreed / self.compared if self.compared else None,
            "confusion": [
                {"legacy": theirs, "ratebox": ours, "count": n}
                for (theirs, ours), n in sorted(self.confusion.items())
            ],
            "samples": [
                {"legacy": theirs, "ratebox": ours, "rows": rows}
                for (theirs, ours), rows in sorted(self.samples.items())
            ],
            "legacy": self.legacy_figures(),
            "ratebox": self.ratebox,
            "seconds": self.seconds,
            "rows_per_s": self.compared / self.seconds if self.seconds else None,
        }

    def lines(self) -> list[str]:
        """The report as text for a terminal or a log."""
        d = self.as_dict()
        rate = f"{d['agreement']:.2%}" if d["agreement"] is not None else "n/a"
        out = [
            f"compared {d['compared']} rows judged by the legacy system: {d['agreed']} agree, "
            f"{d['disagreed']} disagree (agreement {rate}) in {self.seconds:.2f} s "
            f"({d['rows_per_s'] or 0:,.0f} rows/s)",
            "legacy -> ratebox: count",
        ]
        out += [f"  {c['legacy']:>8} -> {c['ratebox']:<8} {c['count']}" for c in d["confusion"]]
        for s in d["samples"]:
            out.append(f"disagreement {s['legacy']} -> {s['ratebox']}, samples:")
            out += [f"  {line}" for line in s["rows"]]
        out.append(f"{'':18}{'legacy':>14}{'ratebox':>14}")
        for key, label in (
            ("rows", "rows"),
            ("p50_s", "latency p50 s"),
            ("p99_s", "latency p99 s"),
            ("peak_per_minute", "peak rows/min"),
        ):
            out.append(
                f"{label:18}{_shown(d['legacy'].get(key)):>14}{_shown(d['ratebox'].get(key)):>14}"
            )
        # Codes and samples come from the table: never a control character on a terminal.
        return [_printable(line) for line in out]


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:,.3f}" if isinstance(value, float) else f"{value:,}"


def compare(
    dsn: str,
    engine: Engine,
    since: Any = None,
    until: Any = None,
    limit: int | None = None,
    advance: Callable[[int], None] | None = None,
) -> Report:
    """Re-judge the legacy system's verdicts (in the window) and measure both systems."""
    started = time.monotonic()
    report = Report()
    for page in _ahead(store_bridge.legacy_verdicts(dsn, since, until, limit)):
        report.add_page(page, engine)
        if advance is not None:
            advance(len(page))
    report.ratebox = store_bridge.ratebox_figures(dsn, since, until)
    report.seconds = time.monotonic() - started
    return report


def _ahead(pages: Iterator[list[Any]]) -> Iterator[list[Any]]:
    """The same pages, the next one fetched by a thread while this one is judged: PostgreSQL
    prepares a page (jsonb to text) while Python judges the last, instead of in turn."""
    ready: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def fetch() -> None:
        try:
            for page in pages:
                while not stop.is_set():
                    try:
                        ready.put(("page", page), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put(("end", None))
        except BaseException as exc:  # handed to the reader, raised there
            ready.put(("error", exc))

    thread = threading.Thread(target=fetch, name="compare-fetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join(timeout=5)
