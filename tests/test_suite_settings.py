"""The suite itself must be deterministic on a busy machine (see the profile in conftest)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def test_property_tests_have_no_wall_clock_limits() -> None:
    active = settings.default
    assert active.deadline is None
    assert HealthCheck.too_slow in active.suppress_health_check


def test_property_tests_draw_the_same_examples_every_run() -> None:
    assert settings.default.derandomize
