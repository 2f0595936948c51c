"""Applies the numbered SQL files of schema/ in order, once each, and refuses changed ones."""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from ratebox import store, store_adopt
from ratebox.store import Migration, MigrationError

__all__ = ["SCHEMA_DIR", "MigrationError", "load", "pending", "run", "schema_dir"]

#: schema/ beside the package in a source checkout (SPEC §1).
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"

_FILENAME = re.compile(r"^(\d+)_[A-Za-z0-9_.-]+\.sql$")


def schema_dir() -> Path:
    """schema/ of the checkout, else the copy an installed wheel ships as ratebox/schema."""
    installed = Path(__file__).resolve().parent / "schema"
    return SCHEMA_DIR if SCHEMA_DIR.is_dir() or not installed.is_dir() else installed


def load(directory: Path) -> list[Migration]:
    """Read the *.sql files of directory as (version, filename, sha256, sql), by version."""
    files: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILENAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path}: a migration file is named NNN_description.sql")
        raw = path.read_bytes()
        try:
            sql = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MigrationError(f"{path}: not UTF-8 text") from None
        if not sql.strip():
            raise MigrationError(f"{path}: empty migration file")
        files.append((match.group(1), path.name, hashlib.sha256(raw).hexdigest(), sql))
    files.sort(key=lambda f: int(f[0]))
    for before, after in itertools.pairwise(files):
        if int(before[0]) == int(after[0]):
            raise MigrationError(f"{before[1]} and {after[1]} have the same version number")
    return files


def pending(files: Sequence[Migration], applied: Mapping[str, str]) -> list[Migration]:
    """The files still to apply, in order, given applied checksums by version.

    Refuses a file whose content changed after it was applied, and a new file numbered
    below one already applied (it would run after it, against a schema it never saw).
    """
    by_number = {int(v): checksum for v, checksum in applied.items() if v.isdigit()}
    newest_applied = max(by_number, default=-1)
    todo: list[Migration] = []
    for version, filename, checksum, sql in files:
        recorded = by_number.get(int(version))
        if recorded is None and int(version) < newest_applied:
            raise MigrationError(
                f"{filename} is new but numbered below an applied migration; renumber it "
                f"above {newest_applied:03d}"
            )
        if recorded is None:
            todo.append((version, filename, checksum, sql))
        elif recorded != checksum:
            raise MigrationError(
                f"{filename} was changed after it was applied (checksum {recorded[:12]} "
                f"recorded, {checksum[:12]} now); put the change in a new migration file"
            )
    return todo


def run(dsn: str, directory: Path | None = None) -> list[str]:
    """Apply the pending migrations to the database at dsn; returns the files applied."""
    files = load(directory or schema_dir())
    conn = store.connect(dsn, application_name="ratebox-migrate")
    try:
        with store_adopt.migration_lock(conn):
            done: list[str] = []
            # A raw_items that no migration of ours created belongs to the polling system
            # RateBox replaces: adopted in place, never recreated.
            if store_adopt.legacy_table(conn):
                adopted = [f for f in files if int(f[0]) <= store_adopt.ADOPTS_THROUGH]
                done += store_adopt.adopt(conn, adopted)
            return done + store.apply_migrations(conn, files, pending)
    finally:
        conn.close()
