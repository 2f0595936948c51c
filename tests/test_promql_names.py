"""The PromQL name extractor the dashboard and alert tests rely on."""

from __future__ import annotations

import pytest
from promql_names import metric_names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('up{job="ratebox"} == 0', {"up"}),
        ("deriv(ratebox_group_lag[10m]) > 0 and ratebox_group_lag > 100", {"ratebox_group_lag"}),
        (
            "histogram_quantile(0.99, sum by (le) (rate(ratebox_processing_seconds_bucket[5m])))",
            {"ratebox_processing_seconds_bucket"},
        ),
        (
            "sum(rate(a_total[$__rate_interval])) / sum(rate(b_total[${rng}])) > 0.05",
            {"a_total", "b_total"},
        ),
        ('sum by (stream, group) (x{stream=~"raw.*", group!="by"}) offset 1h', {"x"}),
        (
            "count by (role) (ratebox_child_up) - on (role) group_left () y",
            {"ratebox_child_up", "y"},
        ),
        ("1e3 * z", {"z"}),
    ],
)
def test_names_are_found_and_nothing_else(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
