"""The bin/ launchers on a Python without the dependencies: one line, or the clone's .venv."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _clone(tmp_path: Path) -> Path:
    """bin/ and ratebox/ copied to a directory with no virtualenv."""
    clone = tmp_path / "clone"
    shutil.copytree(ROOT / "bin", clone / "bin")
    shutil.copytree(
        ROOT / "ratebox", clone / "ratebox", ignore=shutil.ignore_patterns("__pycache__")
    )
    return clone


def _bare(launcher: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # -S: no site-packages, so none of the dependencies can be imported.
    return subprocess.run(
        [sys.executable, "-S", str(launcher), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": ""},
    )


def test_a_missing_dependency_is_one_line_saying_how_to_install(tmp_path: Path) -> None:
    clone = _clone(tmp_path)
    for launcher in sorted((clone / "bin").iterdir()):
        done = _bare(launcher, "--help")
        assert done.returncode == 1, launcher.name
        assert "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "missing Python package" in lines[0]
        assert ".venv/bin/pip install -r requirements.txt" in lines[0]


def test_the_clones_virtualenv_is_used_when_the_running_python_lacks_the_dependencies(
    tmp_path: Path,
) -> None:
    clone = _clone(tmp_path)
    # A stand-in .venv whose python is the test's interpreter (which has every dependency).
    (clone / ".venv" / "bin").mkdir(parents=True)
    (clone / ".venv" / "bin" / "python").symlink_to(sys.executable)
    done = _bare(clone / "bin" / "ratebox-worker", "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: ratebox-worker" in done.stdout
