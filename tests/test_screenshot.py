"""``make screenshot``'s drawing of the dashboard: Grafana's variables filled in as Grafana does, every panel
at its grid place, one line per series with its legend."""

from __future__ import annotations

import json
import re

from devcluster import monitoring, screenshot
from devcluster.monitoring import panels

DASHBOARD = json.loads(monitoring.DASHBOARD.read_text())


def test_variables_are_filled_in_as_grafana_does() -> None:
    expr = 'sum(rate(x{namespace=~"$namespace", llmdeployment=~"${llmdeployment}"}[$__rate_interval]))'
    filled = screenshot.fill(expr, {"namespace": "default", "llmdeployment": "tiny"})
    assert filled == f'sum(rate(x{{namespace=~"default", llmdeployment=~"tiny"}}[{screenshot.RATE_INTERVAL}]))'
    assert screenshot.legend("{{pod}} p95", {"pod": "tiny-1", "namespace": "default"}) == "tiny-1 p95"


def test_every_panel_is_drawn_with_a_line_and_a_legend_per_series() -> None:
    window = (1_700_000_000.0, 1_700_000_300.0)
    points = [(window[0] + step * 5, float(step % 7)) for step in range(61)]
    data = {panel["id"]: [[(f"{panel['title']} {index}", points)] for index, _ in enumerate(panel["targets"])]
            for panel in panels(DASHBOARD) if panel.get("targets") and panel["type"] == "timeseries"}
    page = screenshot.render_html(DASHBOARD, data, window, "canned")
    drawn = [p for p in panels(DASHBOARD) if p["type"] != "row"]
    assert page.count('class="panel"') == len(drawn)
    assert page.count("<polyline") == sum(len(series) for series in data.values())
    for panel in drawn:
        assert f"<h3>{panel['title']}</h3>" in page
    assert "Requests running 0" in page and "no data" in page  # the table had no rows
    assert all(0 <= float(x) <= screenshot.WIDTH for x in re.findall(r'points="([\d.]+),', page))
