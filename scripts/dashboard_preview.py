"""Render the provisioned Grafana dashboard's panels from a live Prometheus, as one HTML page.

    dashboard_preview.py --prometheus http://127.0.0.1:9090 --minutes 10 --out preview.html

Grafana itself cannot be installed on the machines this project is built on (no registry
image, no Debian or PyPI package), so scripts/compose_e2e screenshots this page instead:
the same panels, layout, queries and legends as deploy/grafana/dashboards/nereid.json,
each query run through Prometheus' query_range API and drawn as SVG. It is a faithful
picture of the data the dashboard shows, not of Grafana's look.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
import time
from typing import Any

from compose_e2e import grafana_to_promql, legend, prometheus_get

COLORS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#fade2a",
          "#37872d", "#c4162a", "#1f60c4", "#8f3bb8"]
NO_DATA = '<div class="nodata">No data</div>'
CELL_W, CELL_H = 62, 34  # pixels per grid column / grid row (Grafana: 24 columns, 30 px rows)


def fmt_value(v: float, unit: str) -> str:
    if math.isnan(v):
        return "NaN"
    if unit == "percentunit":
        return f"{v * 100:.2f} %"
    if unit == "bytes":
        for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(v) < 1024:
                return f"{v:.1f} {suffix}"
            v /= 1024
    suffix = {"ms": " ms", "reqps": " req/s"}.get(unit, "")
    return f"{v:.3g}{suffix}"


def series_for(prometheus: str, panel: dict[str, Any], start: float, end: float, step: int) -> list[tuple[str, list]]:
    out = []
    for target in panel.get("targets", []):
        data = prometheus_get(prometheus, "/api/v1/query_range", {
            "query": grafana_to_promql(target["expr"]), "start": f"{start:.0f}", "end": f"{end:.0f}",
            "step": str(step)})
        for s in data["result"]:
            points = [(float(t), float(v)) for t, v in s["values"]]
            out.append((legend(target.get("legendFormat", ""), s["metric"]), points))
    # Like a Grafana legend set to hide empty and all-zero series: the idle models drop out.
    return [(name, pts) for name, pts in out if any(math.isfinite(v) and v != 0 for _, v in pts)]


def svg_lines(series: list[tuple[str, list]], w: int, h: int, start: float, end: float, unit: str) -> str:
    finite = [v for _, pts in series for _, v in pts if math.isfinite(v)]
    top = max(finite, default=1.0) or 1.0
    top *= 1.1
    left, bottom = 64, 18

    def xy(t: float, v: float) -> str:
        x = left + (t - start) / (end - start) * (w - left - 8)
        y = (h - bottom) - v / top * (h - bottom - 6)
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg width="{w}" height="{h}">']
    for i in range(5):
        v = top * i / 4
        y = (h - bottom) - v / top * (h - bottom - 6)
        parts.append(f'<line x1="{left}" x2="{w - 8}" y1="{y:.1f}" y2="{y:.1f}" stroke="#2c3235"/>'
                     f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{html.escape(fmt_value(v, unit))}</text>')
    for i in range(5):
        t = start + (end - start) * i / 4
        x = left + (t - start) / (end - start) * (w - left - 8)
        clock = time.strftime("%H:%M:%S", time.localtime(t))
        anchor = "end" if i == 4 else "middle"
        parts.append(f'<text x="{x:.1f}" y="{h - 4}" text-anchor="{anchor}">{clock}</text>')
    for n, (_, pts) in enumerate(series):
        runs: list[list[str]] = [[]]
        for t, v in pts:
            if math.isfinite(v):
                runs[-1].append(xy(t, v))
            elif runs[-1]:
                runs.append([])
        for run in runs:
            if len(run) > 1:
                parts.append(f'<polyline fill="none" stroke="{COLORS[n % len(COLORS)]}" stroke-width="1.5" '
                             f'points="{" ".join(run)}"/>')
    parts.append("</svg>")
    return "".join(parts)


def render(prometheus: str, dashboard: dict[str, Any], minutes: float) -> str:
    end = time.time()
    start = end - minutes * 60
    step = max(5, int(minutes * 60 / 240))
    cells = []
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        w, h = g["w"] * CELL_W - 8, g["h"] * CELL_H - 8
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        series = series_for(prometheus, panel, start, end, step)
        if panel["type"] == "stat":
            last = [(name, next((v for _, v in reversed(pts) if math.isfinite(v)), float("nan")))
                    for name, pts in series]
            body = "".join(f'<div class="stat"><span>{html.escape(fmt_value(v, unit))}</span>'
                           f'<small>{html.escape(name)}</small></div>' for name, v in last) or NO_DATA
        else:
            legend_rows = "".join(
                f'<span><i style="background:{COLORS[n % len(COLORS)]}"></i>{html.escape(name)}</span>'
                for n, (name, _) in enumerate(series))
            chart = svg_lines(series, w - 12, h - 64, start, end, unit) if series else NO_DATA
            body = chart + f'<div class="legend">{legend_rows}</div>'
        cells.append(f'<div class="panel" style="left:{g["x"] * CELL_W}px;top:{g["y"] * CELL_H + 48}px;'
                     f'width:{w}px;height:{h}px"><h3>{html.escape(panel["title"])}</h3>{body}</div>')
    height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"]) * CELL_H + 56
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(end))
    return f"""<!doctype html><html><head><meta charset="utf-8"><style>
body {{ margin: 0; background: #111217; color: #ccccdc; font: 12px DejaVu Sans, sans-serif; }}
header {{ height: 40px; line-height: 40px; padding: 0 12px; font-size: 16px; border-bottom: 1px solid #2c3235; }}
header small {{ color: #8e8e8e; font-size: 11px; margin-left: 12px; }}
.panel {{ position: absolute; background: #181b1f; border: 1px solid #2c3235; border-radius: 3px; padding: 6px;
         overflow: hidden; box-sizing: border-box; }}
h3 {{ margin: 0 0 4px; font-size: 13px; font-weight: 500; color: #d8d9da; }}
svg text {{ fill: #8e8e8e; font-size: 10px; }}
.legend {{ font-size: 10.5px; line-height: 15px; max-height: 46px; overflow: hidden; }}
.legend span {{ margin-right: 10px; white-space: nowrap; }}
.legend i {{ display: inline-block; width: 12px; height: 3px; margin: 0 4px 3px 0; }}
.stat {{ display: inline-block; margin: 6px 14px 0 0; }}
.stat span {{ display: block; font-size: 30px; color: #73bf69; }}
.stat small {{ color: #8e8e8e; }}
.nodata {{ color: #8e8e8e; padding: 30px; text-align: center; }}
</style></head><body style="height:{height}px">
<header>{html.escape(dashboard["title"])} dashboard<small>deploy/grafana/dashboards/nereid.json, every query run
against the compose stack's Prometheus; last {minutes:g} min to {stamp}; model = All, version = All</small></header>
{"".join(cells)}
</body></html>"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--dashboard", default="deploy/grafana/dashboards/nereid.json")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    dashboard = json.load(open(args.dashboard))
    with open(args.out, "w") as f:
        f.write(render(args.prometheus, dashboard, args.minutes))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
