"""What the bin/ launchers run: the running Python if it has the dependencies, else the clone's
virtualenv, else one line saying how to install them.

Standard library only: it runs before any dependency is known to be importable.
"""

from __future__ import annotations

import importlib
import os
import sys

#: Where the README's setup command puts the virtualenv, relative to the clone.
VENV = ".venv"
SETUP = "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt"


def _venv_python(root: str) -> str | None:
    """The clone's virtualenv interpreter, unless it is already the one running."""
    python = os.path.join(root, VENV, "bin", "python")
    if not os.access(python, os.X_OK):
        return None
    if os.path.realpath(sys.prefix) == os.path.realpath(os.path.join(root, VENV)):
        return None
    return python


def run(root: str, entry: str) -> int:
    """Run ``ratebox.cli.<entry>``; without its dependencies, re-run under ``root/.venv``."""
    try:
        cli = importlib.import_module("ratebox.cli")
    except ModuleNotFoundError as exc:
        python = _venv_python(root)
        if python is not None:
            os.execv(python, [python, *sys.argv])
        name = exc.name or "a dependency"
        print(
            f"{os.path.basename(sys.argv[0])}: missing Python package {name!r}; "
            f"install the dependencies with: cd {root} && {SETUP}",
            file=sys.stderr,
        )
        return 1
    return int(getattr(cli, entry)() or 0)
