"""Configuration: one declaration per key, every problem named by its path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from ratebox import config
from ratebox.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> config.Settings:
    path = tmp_path / "ratebox.yaml"
    path.write_text(text, encoding="utf-8")
    return config.load(str(path), environ or {})


def test_the_shipped_file_loads_and_uses_the_embedded_servers() -> None:
    settings = config.load(str(ROOT / "ratebox.yaml"), {})
    assert settings.redis.url == "embedded"
    assert settings.postgres.dsn == "embedded"
    assert settings.stream.retention == 600
    assert settings.consumer_name(3) == "worker_003"


def test_the_default_retention_costs_what_the_readme_says_an_operator_can_afford() -> None:
    """Retained entries cost ~245 MB of Redis per million: the default keeps 10 minutes."""
    default = next(s for s in config.SETTINGS if s.path == "stream.retention").default
    assert config.duration(default) == 600
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "MB of Redis memory per million retained entries" in readme


def test_every_key_has_a_default_that_validates() -> None:
    settings = config.defaults()
    assert set(settings.values) == {s.path for s in config.SETTINGS}
    assert settings.workers.count == 4
    assert settings.monitor.metrics_listen == "127.0.0.1:9187"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "workers:\n  count: four\n",
            'workers.count: must be an integer from 1 to 256, got "four"',
        ),
        ("workers:\n  count: 0\n", "workers.count: must be an integer from 1 to 256, got 0"),
        ("workers:\n  count: true\n", "workers.count: must be an integer from 1 to 256, got True"),
        ("workers:\n  cuont: 2\n", "workers.cuont: unknown key"),
        ("wrokers:\n  count: 2\n", "wrokers: unknown section"),
        ("stream:\n  retention: soon\n", "stream.retention: must be a duration"),
        ("monitor:\n  metrics_listen: 9187\n", "monitor.metrics_listen: must be host:port or null"),
        ("redis:\n  url: http://x\n", "redis.url: must be"),
        ("workers: 3\n", "workers: must be a mapping of keys"),
        ("- a\n- b\n", "configuration: must be a mapping of keys"),
        (
            "workers:\n  block_ms: 40000\n  timeout_s: 60\n",
            "workers.block_ms: must be at most half of workers.timeout_s",
        ),
        (
            "rules:\n  - {field: phone, check: nope, code: 150, message: x}\n",
            "rules[0].check: unknown check 'nope'",
        ),
    ],
)
def test_a_bad_value_is_refused_with_its_key_path(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"invalid YAML at line 3"):
        load(tmp_path, "workers:\n  count: [1,\n")


def test_a_missing_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        config.load(str(tmp_path / "nope.yaml"), {})


def test_the_environment_overrides_the_file_with_the_operators_names(tmp_path: Path) -> None:
    env = {
        "REDIS_URL": "redis://10.0.0.1:6379/1",
        "REDIS_STREAM": "items",
        "CONSUMER_GROUP": "g",
        "BATCH_SIZE": "100",
        "BLOCK_TIME": "250",
        "MAX_RETRIES": "5",
        "POSTGRES_DSN": "postgresql://u@db/validator",
    }
    settings = load(tmp_path, "workers:\n  batch_size: 20\n", env)
    assert settings.redis.url == "redis://10.0.0.1:6379/1"
    assert settings.stream.name == "items"
    assert settings.stream.group == "g"
    assert settings.workers.batch_size == 100
    assert settings.workers.block_ms == 250
    assert settings.workers.max_retries == 5
    assert settings.postgres.dsn == "postgresql://u@db/validator"


def test_a_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r'BATCH_SIZE \(workers.batch_size\): must be an integer from 1 to 10000, got "lots"',
    ):
        load(tmp_path, "", {"BATCH_SIZE": "lots"})


def test_settings_are_immutable() -> None:
    settings = config.defaults()
    with pytest.raises(TypeError):
        settings.values["workers.count"] = 9  # type: ignore[index]
    with pytest.raises(AttributeError):
        settings.workers.count = 9


def test_diff_names_the_changed_keys(tmp_path: Path) -> None:
    a = load(tmp_path, "workers:\n  count: 2\n")
    b = load(tmp_path, "workers:\n  count: 3\nrules:\n  - {code: 400, enabled: false}\n")
    assert a.diff(b) == {"workers.count", "rules"}


def test_help_and_readme_table_come_from_the_declarations() -> None:
    text = config.help_text()
    table = config.markdown_table()
    for setting in config.SETTINGS:
        assert setting.path in text
        assert f"`{setting.path}`" in table


def test_the_readme_shows_the_current_table() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert config.markdown_table() in readme, "run: python -m ratebox.config > table and paste it"


@given(
    st.dictionaries(
        st.sampled_from([s.path for s in config.SETTINGS]),
        st.none() | st.integers() | st.text() | st.booleans(),
    )
)
def test_loading_any_values_either_validates_or_names_a_key(values: dict[str, object]) -> None:
    data: dict[str, object] = {}
    for path, value in values.items():
        *sections, key = path.split(".")
        into = data
        for section in sections:
            into = into.setdefault(section, {})  # type: ignore[assignment]
        into[key] = value  # type: ignore[index]
    try:
        config.from_mapping(yaml.safe_load(yaml.safe_dump(data)), {})
    except ConfigError as exc:
        # A key of its own, or a check of several keys that names one of them.
        together = ("workers.block_ms", "workers.count", "workers.autoscale.min")
        assert str(exc).split(":")[0] in values or str(exc).startswith(together)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"# caf\xe9\nworkers: {count: 2}\n", "not UTF-8 text (byte 5)"),
        (b"workers: {count: " + b"[" * 3000 + b"]" * 3000 + b"}\n", "nested too deeply"),
        ((BOMB + "workers: {count: *i}\n").encode(), "aliases (*name) are not accepted"),
        (b"workers: {count: '" + b"9" * 5000 + b"'}\n", "workers.count: must be an integer"),
        (b"workers: {count: " + b"9" * 5000 + b"}\n", "unreadable value"),
        (b"workers: {count: " + b"9" * 40 + b"}\n", "got an integer of 133 bits"),
        (b"stream: {retention: .inf}\n", "stream.retention: must be a duration"),
        ("stream: {retention: １２m}\n".encode(), "stream.retention: must be a duration"),
        (b'workers: {name_prefix: "w\\n"}\n', "workers.name_prefix: must be a name"),
    ],
    ids=[
        "latin-1",
        "nesting",
        "alias bomb",
        "huge value",
        "huge int",
        "big int",
        "inf",
        "full-width",
        "newline",
    ],
)
def test_hostile_files_are_refused_in_one_short_line(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "ratebox.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as refused:
        config.load(str(path), {})
    message = str(refused.value)
    assert expected in message
    assert "\n" not in message and len(message) < 300, message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0?x=1", "unknown option 'x'"),
        ("redis://h:6379/0?ssl_ca_certs=/ca.pem", "unknown option 'ssl_ca_certs'"),
        ("redis://:Secr3t@h:99999/0", "not a valid Redis URL (Port out of range"),
    ],
)
def test_a_redis_url_redis_py_would_refuse_at_connect_is_refused_at_load(
    url: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        config.from_mapping({}, {"REDIS_URL": url})
    assert expected in str(refused.value) and "Secr3t" not in str(refused.value)
