"""Fixtures on real servers: REDIS_URL / POSTGRES_DSN when set, else embedded ones per session.

Every test gets its own names (stream, group, dead letter, PostgreSQL schema), so tests share
the servers without sharing data and without flushing anything.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import redis
import yaml
from hypothesis import HealthCheck, settings
from psycopg2 import sql
from psycopg2.extensions import make_dsn, parse_dsn

from ratebox import config, embedded, migrate

# CI and newcomers run the suite on busy 2-core machines: property tests must judge the code,
# not the scheduler. No per-example deadline, no "generation too slow" health check, and a
# fixed seed derived from each test so that a run is repeatable; HYPOTHESIS_PROFILE=explore
# draws fresh examples (and more of them) when hunting for bugs on purpose.
settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
    print_blob=True,
)
settings.register_profile(
    "explore", parent=settings.get_profile("ci"), derandomize=False, max_examples=1000
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@dataclass(frozen=True)
class Names:
    """Names unique to one test; suffix is t_<8 hex> and doubles as its schema name."""

    suffix: str

    @property
    def stream(self) -> str:
        return f"raw_items_{self.suffix}"

    @property
    def group(self) -> str:
        return f"validator_workers_{self.suffix}"

    @property
    def dead_letter(self) -> str:
        return f"raw_items_{self.suffix}:dead"

    @property
    def schema(self) -> str:
        return self.suffix


def _with_search_path(dsn: str, schema: str) -> str:
    """dsn (URL or key=value) with search_path set to schema, keeping its other options."""
    options = parse_dsn(dsn).get("options", "")
    return make_dsn(dsn, options=f"{options} -c search_path={schema}".strip())


def _embedded_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "embedded"


#: The servers named by the environment, taken out of it: they choose the session's servers,
#: but must not override the YAML of the commands that tests start as subprocesses.
_SERVER_ENV = {name: os.environ.pop(name, "") for name in ("REDIS_URL", "POSTGRES_DSN")}


def _from_env(name: str) -> str | None:
    value = _SERVER_ENV.get(name, "")
    return value if value and value != embedded.EMBEDDED else None


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """REDIS_URL, or the URL of an embedded Redis started for this session."""
    url = _from_env("REDIS_URL")
    if url is not None:
        yield url
        return
    var = _embedded_dir(tmp_path_factory)
    yield embedded.ensure_redis(var)
    embedded.stop_redis(var)


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """POSTGRES_DSN, or the DSN of an embedded PostgreSQL started for this session."""
    dsn = _from_env("POSTGRES_DSN")
    if dsn is not None:
        yield dsn
        return
    var = _embedded_dir(tmp_path_factory)
    yield embedded.ensure_postgres(var)
    embedded.stop_postgres(var)


@pytest.fixture
def names() -> Names:
    """Fresh names for this test."""
    return Names(f"t_{uuid.uuid4().hex[:8]}")


@pytest.fixture
def redis_client(redis_url: str, names: Names) -> Iterator[redis.Redis]:
    """A client (bytes replies) on redis_url; this test's keys are deleted afterwards."""
    client = redis.Redis.from_url(redis_url)
    yield client
    for key in client.scan_iter(match=f"*{names.suffix}*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
def empty_schema_dsn(postgres_dsn: str, names: Names) -> Iterator[str]:
    """A DSN whose search_path is a new, empty schema; the schema is dropped afterwards."""
    schema = sql.Identifier(names.schema)
    with closing(psycopg2.connect(postgres_dsn)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
    yield _with_search_path(postgres_dsn, names.schema)
    with closing(psycopg2.connect(postgres_dsn)) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            # A connection the test left open would make DROP wait forever: fail instead.
            cur.execute("SET lock_timeout = '10s'")
            cur.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema))


@pytest.fixture
def pg_schema_dsn(empty_schema_dsn: str) -> str:
    """A DSN whose search_path is a new schema with every migration applied."""
    migrate.run(empty_schema_dsn)
    return empty_schema_dsn


@pytest.fixture
def make_config(
    redis_url: str, pg_schema_dsn: str, names: Names, tmp_path: Path
) -> Callable[..., tuple[config.Settings, Path]]:
    """Writes a ratebox.yaml for this test's servers and names; returns (settings, path).

    Keyword arguments override sections, e.g. ``make_config(workers={"batch_size": 10})``.
    """

    def make(**sections: dict[str, Any]) -> tuple[config.Settings, Path]:
        data: dict[str, Any] = {
            "redis": {"url": redis_url},
            "postgres": {"dsn": pg_schema_dsn, "migrate_on_start": False},
            "stream": {
                "name": names.stream,
                "group": names.group,
                "dead_letter": names.dead_letter,
            },
            "workers": {"count": 1, "timeout_s": 10, "block_ms": 200},
            "monitor": {"enabled": False, "metrics_listen": None},
            "embedded": {"dir": str(tmp_path / "var")},
        }
        for section, values in sections.items():
            if section == "rules":
                data["rules"] = values
            else:
                data.setdefault(section, {}).update(values)
        path = tmp_path / "ratebox.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return config.load(str(path), {}), path

    return make


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Redis Cluster of three masters with a replica each, for this session (tests/cluster.py)."""
    from tests import cluster

    if cluster.find_server() is None:
        pytest.fail(
            "the cluster tests need a redis-server binary (Redis 7): install redis-server "
            "or set REDIS_SERVER_BIN",
            pytrace=False,
        )
    started = cluster.start_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield started
    finally:
        started.stop()
