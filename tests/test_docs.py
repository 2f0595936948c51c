"""The project's own files stand alone: they cite no document outside the repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = ("PERFORMANCE.md", "SPEC.md", "STYLE.md", "../shared")


def _tracked() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return [ROOT / name for name in out.splitlines() if (ROOT / name).is_file()]


def test_no_tracked_file_cites_a_document_outside_the_repository() -> None:
    this = Path(__file__).resolve()
    cited = [
        f"{path.relative_to(ROOT)}: {word}"
        for path in _tracked()
        if path.resolve() != this
        for word in OUTSIDE
        if word in path.read_text(encoding="utf-8", errors="replace")
    ]
    assert cited == []


def test_the_unit_file_says_how_its_dependencies_get_installed() -> None:
    unit = (ROOT / "deploy" / "ratebox.service").read_text(encoding="utf-8")
    assert "python3 -m venv /opt/ratebox/.venv" in unit
    assert "pip install -r /opt/ratebox/requirements.txt" in unit
    assert "/etc/ratebox/ratebox.yaml" in unit
