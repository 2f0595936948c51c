"""A refused privilege as one line naming what to grant (PostgreSQL) or allow (Redis ACL)."""

from __future__ import annotations

import re

import psycopg2.errors
import redis.exceptions

from ratebox.errors import RateboxError

#: What the worker role needs on each object (the grants of deploy/postgres-grants.sql).
NEEDED = {
    "raw_items": "SELECT, INSERT, UPDATE",
    "raw_items_id_seq": "USAGE",
    "stream_consumer_stats": "SELECT, INSERT, UPDATE",
    "stream_processing_metrics": "SELECT, INSERT, UPDATE",
    "stream_error_metrics": "SELECT, INSERT, UPDATE",
    "bridge_progress": "SELECT, INSERT, UPDATE",
    "v_stream_status": "SELECT",
    "v_recent_activity": "SELECT",
    "v_top_errors": "SELECT",
}
_DENIED = re.compile(r"permission denied for (table|sequence|view|schema) \"?([\w.]+)\"?")
_TEMP = re.compile(r"permission denied to create temporary tables in database \"?([^\"]+)\"?")


class PermissionMissing(RateboxError):
    """A server refused a privilege the role needs: waiting will not grant it."""


def postgres_line(message: str) -> str:
    """PostgreSQL's first line and the GRANT that would cure it."""
    first = (message.strip().splitlines() or ["permission denied"])[0].strip()
    if found := _TEMP.search(first):
        cure = f"GRANT TEMPORARY ON DATABASE {found.group(1)}"
    elif found := _DENIED.search(first):
        kind, name = found.groups()
        table = name.rpartition(".")[2]
        if kind == "schema":
            cure = f"GRANT USAGE ON SCHEMA {name}"
        else:
            privilege = NEEDED.get(table, "SELECT")
            cure = f"GRANT {privilege} ON {'SEQUENCE ' if kind == 'sequence' else ''}{name}"
    else:
        cure = "grant the privilege named"
    return f"{first}: {cure} TO the worker role (deploy/postgres-grants.sql)"


def redis_line(message: str) -> str:
    """Redis's NOPERM reply (it names the command or the key) and where to allow it."""
    first = (message.strip().splitlines() or ["NOPERM"])[0].strip()
    if not first.startswith("NOPERM"):
        first = f"NOPERM {first}"
    return f"Redis refused: {first}: allow it for the ACL user (deploy/redis.acl)"


def refused(exc: BaseException) -> PermissionMissing | None:
    """The one-line error for a refused privilege, or None when exc is something else."""
    if isinstance(exc, PermissionMissing):
        return exc
    if isinstance(exc, psycopg2.errors.InsufficientPrivilege):
        return PermissionMissing(postgres_line(exc.pgerror or str(exc)))
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return PermissionMissing(redis_line(str(exc)))
    return None
