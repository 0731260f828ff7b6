"""``make screenshot``: the chart's Grafana dashboard, drawn from the running demo's Prometheus under load.

    python -m devcluster.screenshot [--seconds 120] [--out docs/images/dashboard.png]

Needs ``make demo`` running. It sends chat completions to the demo's engine with a rising number of clients,
then queries Prometheus with every panel's own queries (Grafana's variables filled in as Grafana would) and
draws the panels, laid out by the dashboard's grid, into one HTML page that headless Chromium photographs.
No Grafana is involved: the page is this module's drawing of the dashboard's data.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from devcluster import monitoring
from devcluster.cluster import REPO_ROOT
from devcluster.demo import DEMO_DIR, SCRAPE_INTERVAL
from devcluster.monitoring import panels

Obj = dict[str, Any]
Series = tuple[str, list[tuple[float, float]]]  # legend, (time, value) points

OUT = REPO_ROOT / "docs" / "images" / "dashboard.png"
# Clients at once in each third of the load: the graphs show the engine's answer to a rising load.
CLIENTS = (2, 6, 16)
# Grafana's $__rate_interval: four scrape intervals at least.
RATE_INTERVAL = f"{4 * SCRAPE_INTERVAL}s"
WIDTH, ROW_HEIGHT = 1600, 34  # pixels of the page and of one grid unit of height
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")
COLOURS = ("#7eb26d", "#eab839", "#6ed0e0", "#ef843c", "#e24d42", "#1f78c1", "#ba43a9", "#705da0")


class ScreenshotError(RuntimeError):
    """What is missing, in one line."""


# -- the dashboard's queries, filled in as Grafana fills them ------------------------------------------


def fill(expr: str, variables: dict[str, str]) -> str:
    """``expr`` with ``$name``/``${name}`` replaced by the variable's value and ``$__rate_interval`` by ours."""
    values = {**variables, "__rate_interval": RATE_INTERVAL}
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m[1], m[0]), expr)


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt) or json.dumps(labels)


# -- drawing -------------------------------------------------------------------------------------------


def _number(value: float, unit: str) -> str:
    if unit == "percentunit":
        return f"{value * 100:.0f}%"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if 0 < abs(value) < 1 else f"{value:.2g} s"
    suffix = "/s" if unit in ("reqps", "ops", "wps") else ""
    for factor, prefix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{prefix}{suffix}"
    return f"{value:.3g}{suffix}"


def _chart(series: list[Series], unit: str, window: tuple[float, float],
           width: int, height: int, fixed_max: float | None) -> str:
    """An SVG line chart: one polyline per series, the y axis from 0 to the largest value."""
    top = fixed_max if fixed_max is not None else max([v for _, points in series for _, v in points] + [0.0])
    top = top or 1.0
    left, bottom = 64, 18
    plot_w, plot_h = width - left - 8, height - bottom - 6
    start, end = window

    def xy(t: float, v: float) -> str:
        return f"{left + (t - start) / (end - start) * plot_w:.1f},{6 + plot_h - min(v, top) / top * plot_h:.1f}"

    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    for fraction in (0, 0.5, 1):
        y = 6 + plot_h - fraction * plot_h
        parts.append(f'<line x1="{left}" x2="{width - 8}" y1="{y:.1f}" y2="{y:.1f}" stroke="#2c3235"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_number(top * fraction, unit)}</text>')
    for minute in range(int(start // 60) + 1, int(end // 60) + 1):
        if (minute * 60 - start) / (end - start) < 0.97:
            x = left + (minute * 60 - start) / (end - start) * plot_w
            parts.append(f'<text x="{x:.1f}" y="{height - 3}" text-anchor="middle">'
                         f'{time.strftime("%H:%M", time.localtime(minute * 60))}</text>')
    for index, (_, points) in enumerate(series):
        if points:
            path = " ".join(xy(t, v) for t, v in points)
            parts.append(f'<polyline fill="none" stroke-width="2" stroke="{COLOURS[index % len(COLOURS)]}" '
                         f'points="{path}"/>')
    parts.append("</svg>")
    return "".join(parts)


def _panel_body(panel: Obj, results: list[list[Series]],
                window: tuple[float, float], width: int, height: int) -> str:
    series = [s for per_target in results for s in per_target]
    if panel["type"] == "table":
        rows = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in name.split("\t")) + "</tr>"
                       for name, _ in series)
        return f"<table>{rows or '<tr><td>no data</td></tr>'}</table>"
    defaults = panel["fieldConfig"]["defaults"]
    chart = _chart(series, defaults.get("unit", "short"), window, width, height - 26 - 18 * ((len(series) + 2) // 3),
                   defaults.get("max"))
    keys = "".join(f'<span><i style="background:{COLOURS[i % len(COLOURS)]}"></i>{html.escape(name)}</span>'
                   for i, (name, _) in enumerate(series))
    return chart + f'<div class="legend">{keys or "no data"}</div>'


STYLE = """
body { margin: 0; background: #111217; color: #ccccdc; font: 13px Inter, Helvetica, Arial, sans-serif; }
header { padding: 10px 16px; font-size: 17px; color: #fff; }
header small { color: #8e8e8e; font-size: 12px; margin-left: 12px; }
.grid { position: relative; margin: 0 8px; }
.panel { position: absolute; box-sizing: border-box; background: #181b1f; border: 1px solid #2c3235;
         border-radius: 2px; padding: 6px 8px; overflow: hidden; }
.panel h3 { margin: 0 0 4px; font-size: 13px; font-weight: 500; color: #fff; }
.row { position: absolute; font-size: 15px; color: #fff; padding-top: 8px; }
svg text { fill: #8e8e8e; font-size: 10px; }
.legend span { display: inline-block; margin-right: 12px; font-size: 11px; white-space: nowrap; }
.legend i { display: inline-block; width: 12px; height: 3px; margin: 0 4px 3px 0; }
table { border-collapse: collapse; width: 100%; } td { border-bottom: 1px solid #2c3235; padding: 4px 6px; }
"""


def _grid_rows(dashboard: Obj) -> int:
    """Grid units from the top of the dashboard to the bottom of its lowest panel."""
    return max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels(dashboard))


def render_html(dashboard: Obj, data: dict[int, list[list[Series]]],
                window: tuple[float, float], subtitle: str) -> str:
    """The dashboard's panels at their grid places; ``data`` holds, per panel id, each target's series."""
    unit_w = (WIDTH - 16) / 24
    boxes = []
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        x, y, w, h = grid["x"] * unit_w, grid["y"] * ROW_HEIGHT, grid["w"] * unit_w, grid["h"] * ROW_HEIGHT
        style = f"left:{x:.0f}px;top:{y:.0f}px;width:{w - 6:.0f}px;height:{h - 6:.0f}px"
        if panel["type"] == "row":
            boxes.append(f'<div class="row" style="{style}">{html.escape(panel["title"])}</div>')
            continue
        body = _panel_body(panel, data.get(panel["id"], []), window, int(w - 24), int(h - 32))
        boxes.append(f'<div class="panel" style="{style}"><h3>{html.escape(panel["title"])}</h3>{body}</div>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><style>{STYLE}</style></head><body>"
            f"<header>{html.escape(dashboard['title'])}<small>{html.escape(subtitle)}</small></header>"
            f'<div class="grid" style="height:{_grid_rows(dashboard) * ROW_HEIGHT}px">{"".join(boxes)}</div>'
            "</body></html>")


# -- load, queries and the picture ---------------------------------------------------------------------


def _prometheus_url(state_dir: Path) -> str:
    try:
        url: str = json.loads((state_dir / "demo.json").read_text())["prometheus_url"]
    except (OSError, KeyError, ValueError):
        raise ScreenshotError(f"no running demo in {state_dir}; run `make demo` first") from None
    return url


def _engine(url: str) -> Obj:
    engines = monitoring.query(url, 'up{llmdeployment!=""} == 1')
    if not engines:
        raise ScreenshotError(f"Prometheus ({url}) scrapes no live engine; is the demo's LLMDeployment Ready?")
    return engines[0]["metric"]


def _load(base: str, model: str, seconds: float, out: Callable[[str], None]) -> tuple[int, int]:
    """Chat completions from a rising number of clients; returns (answered, failed)."""
    counts, lock = [0, 0], threading.Lock()

    def client(number: int, until: float) -> None:
        request = 0
        while time.monotonic() < until:
            request += 1
            body = json.dumps({"model": model, "max_tokens": 48 + 16 * ((number + request) % 6),
                               "messages": [{"role": "user", "content": f"Question {number}.{request}: "
                                             "how does the operator scale replicas?"}]}).encode()
            post = urllib.request.Request(f"{base}/v1/chat/completions", body,
                                          {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(post, timeout=120) as response:
                    response.read()
                ok = True
            except OSError:
                ok = False
            with lock:
                counts[0 if ok else 1] += 1

    with ThreadPoolExecutor(max(CLIENTS)) as pool:
        for clients in CLIENTS:
            out(f"  {clients} clients for {seconds / len(CLIENTS):.0f}s")
            until = time.monotonic() + seconds / len(CLIENTS)
            list(pool.map(client, range(clients), [until] * clients))
    return counts[0], counts[1]


def collect(url: str, dashboard: Obj, variables: dict[str, str], window: tuple[float, float]
            ) -> dict[int, list[list[Series]]]:
    """Per panel id, each target's series over ``window`` (tables: the labels at its end, tab-separated)."""
    data: dict[int, list[list[Series]]] = {}
    for panel in panels(dashboard):
        per_target = []
        for target in panel.get("targets", []):
            expr = fill(target["expr"], variables)
            if target.get("instant"):
                rows = monitoring.query(url, expr, at=window[1])
                per_target.append([("\t".join(v for k, v in sorted(r["metric"].items()) if k != "__name__"), [])
                                   for r in rows])
            else:
                found = monitoring.query_range(url, expr, *window, SCRAPE_INTERVAL)
                per_target.append([(legend(target.get("legendFormat", ""), r["metric"]),
                                    [(float(t), float(v)) for t, v in r["values"] if v not in ("NaN", "+Inf")])
                                   for r in found])
        if per_target:
            data[panel["id"]] = per_target
    return data


def photograph(page: Path, out: Path, height: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise ScreenshotError("chromium is not on PATH; install Debian's: apt-get install chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                 f"--window-size={WIDTH},{height}", f"--screenshot={out}", page.as_uri()],
                                capture_output=True, text=True, timeout=120)
    if result.returncode != 0 or not out.is_file():
        raise ScreenshotError(f"chromium failed ({result.returncode}): {result.stderr.strip()[-500:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster.screenshot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="how long to load the engine")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    try:
        url = _prometheus_url(DEMO_DIR)
        engine = _engine(url)
        name, namespace = engine["llmdeployment"], engine["namespace"]
        print(f"loading {namespace}/{name} at {engine['instance']} for {args.seconds:.0f}s", flush=True)
        started = time.time()
        answered, failed = _load(f"http://{engine['instance']}", name, args.seconds, print)
        print(f"  {answered} answered, {failed} failed; waiting for two scrapes", flush=True)
        time.sleep(2 * SCRAPE_INTERVAL + 1)
        window = (started - 60, time.time())
        dashboard = json.loads(monitoring.DASHBOARD.read_text())
        data = collect(url, dashboard, {"namespace": namespace, "llmdeployment": name}, window)
        subtitle = (f"namespace {namespace}, LLMDeployment {name}: the demo's real vLLM under "
                    f"{'/'.join(map(str, CLIENTS))} clients, drawn from its Prometheus by "
                    "hack/devcluster/screenshot.py")
        with tempfile.TemporaryDirectory(prefix="dashboard-") as folder:
            page = Path(folder) / "dashboard.html"
            page.write_text(render_html(dashboard, data, window, subtitle))
            photograph(page, args.out, _grid_rows(dashboard) * ROW_HEIGHT + 60)
    except (ScreenshotError, monitoring.MonitoringError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
