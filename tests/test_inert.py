"""Text from outside is shown inert: no control character obeyed, no markup parsed."""

from __future__ import annotations

import logging
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console

from ratebox import dashboard, deadletter, inert, log, metrics

# What a terminal or a log viewer would obey, or what reorders what is read.
_OBEYED = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]"
)
_HOSTILE = [
    "a@\x1b]0;OWNED\x1b\\\x1b[5;41mFAKE",
    "[link=http://evil.example/]X[/link]",
    "a@[/]",
    "\x1b]8;;http://evil.example/\x1b\\click\x1b]8;;\x1b\\",
    "ok\r\n2026-12-01 00:00:00,000 ERROR   [worker] FORGED LINE",
    "\u202egnp.exe",
    "\x9b31m C1 CSI",
    "[bold red]x[/]\\",
]
_any_text = st.one_of(
    st.sampled_from(_HOSTILE), st.text(), st.text(st.sampled_from("[]/\\=@\x1b\n\r\x9bab "))
)


@given(_any_text)
def test_inert_text_holds_no_control_character_and_keeps_what_is_harmless(value):
    shown = inert.text(value)
    assert not _OBEYED.search(shown)
    if not _OBEYED.search(value):
        assert shown == value


@given(st.integers(0, 1000), st.text(min_size=1))
def test_limit_cuts_long_text(limit, value):
    shown = inert.text(value, limit)
    assert len(shown) <= max(limit, 1)


def _snapshot(sample: str, name: str) -> dict[str, Any]:
    return {
        "servers": {"postgres": {"available": False, "error": sample}},
        "database": {},
        "top_errors": [{"code": 300, "field": name, "count": 3, "sample": sample}],
    }


@given(st.sampled_from(_HOSTILE), st.sampled_from(_HOSTILE))
def test_the_dashboard_shows_samples_and_names_as_text_never_as_markup(sample, name):
    snap = _snapshot(sample, name)
    console = Console(width=400, record=True, force_terminal=True)
    console.print(dashboard._errors_table(snap))  # a MarkupError would raise here
    console.print(dashboard._unavailable({**snap, "database": None}, "postgres"))
    out = console.export_text(styles=False).replace("\n", "")
    assert not _OBEYED.search(out)
    squeezed = out.replace(" ", "")
    for text in (sample, name):
        assert inert.text(text).replace(" ", "")[:12] in squeezed  # shown, brackets and all
    styled = console.export_text(styles=True)
    assert "\x1b]8;" not in styled and "\x1b[5" not in styled  # no hyperlink, no blink


@given(st.sampled_from(_HOSTILE))
def test_metrics_labels_hold_no_control_character(name):
    family = metrics._counter("ratebox_x", "doc", [([name], 1.0)], ["consumer"])
    registry = CollectorRegistry()
    registry.register(_Fixed(family))
    text = generate_latest(registry).decode()
    assert not _OBEYED.search(text.replace("\n", ""))
    assert text.count("\n") == 3  # HELP, TYPE and one sample: nothing forged


class _Fixed:
    def __init__(self, family: Any) -> None:
        self.family = family

    def collect(self) -> Any:
        return [self.family]


def test_a_log_record_is_one_line_whatever_it_quotes(capsys):
    log.setup("worker test")
    logging.getLogger("t").warning("sample %s", _HOSTILE[4])
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "FORGED LINE" in err and not _OBEYED.search(err.rstrip("\n"))


def test_a_dead_letter_line_shows_its_fields_inert():
    entry = deadletter._entry(
        "1-1", {b"data": b'{"note": "\\r\\nFORGED \\u001b[5mX"}', b"reason": b"x\r\ny"}
    )
    line = entry.line()
    assert not _OBEYED.search(line)
    assert "FORGED" in line
