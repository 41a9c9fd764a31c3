"""The shipped Grafana dashboard drawn without Grafana: the PromQL of its panels, read from
deploy/grafana/dashboards/cappy-serve.json with Grafana's variables filled in, run as Prometheus
range queries, and the latency, throughput, queue and batch panels drawn into ONE PNG.

    python -m loadtests.dashboard --prometheus http://127.0.0.1:9090 --out dash.png --minutes 15
    python -m loadtests.dashboard --prometheus http://127.0.0.1:9090 --out dash.png \\
        --start 1765000000 --end 1765000900 --step 15 --job 'cappy.*' --instance '10\\.0\\..*'

The queries are the dashboard's own (this module holds no PromQL): `$job`, `$instance`, `$route`
take the regexes given (default: the variable's `allValue`, Grafana's "All", else `.*`);
`$__interval` is the step, `$__rate_interval` max(4 x step, 1m) unless --rate-interval, `$__range`
the window. One subplot per panel, laid out as the dashboard's gridPos, titled with the panel
title, one line per series named by the target's legendFormat (`{{label}}`); a query without data
leaves "no data" in its panel. Times are UTC. One summary line per panel goes to stdout; a
Prometheus error (HTTP or `"status": "error"`) is one `error: ...` line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

REPO_ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = REPO_ROOT / "deploy/grafana/dashboards/cappy-serve.json"

# The panels drawn: the serving path (requests, batcher, queue). The upstream proxy's panels are
# left out; dashboard_queries() still returns their queries.
PANEL_TITLES = (
    "Latency p50 / p95 / p99 by route",
    "Requests/s by route and status",
    "Throughput: pairs/s and tokens/s scored",
    "Rejections and drops by reason",
    "Batch size (pairs)",
    "Batch tokens (rows x longest row)",
    "Padding fraction",
    "Queue depth",
    "Queue time p50 / p95 / p99",
    "Inference and tokenize time per batch",
)

DEFAULT_MINUTES = 15.0
# About as many points per line as a panel a few hundred pixels wide can show (Grafana derives
# its step from the panel width the same way).
TARGET_POINTS = 300
# Grafana's rule of thumb: a rate window of at least four samples, and never under a minute.
MIN_RATE_INTERVAL_S = 60.0
RATE_INTERVAL_STEPS = 4
TIMEOUT_S = 30.0
GRID_WIDTH = 24  # Grafana's dashboard grid
ROW_HEIGHT_IN = 3.6
FIGURE_WIDTH_IN = 18.0
DPI = 100

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)|\[\[(\w+)\]\]")
_LEGEND_LABEL = re.compile(r"\{\{\s*(.+?)\s*\}\}")


class DashboardError(Exception):
    """The dashboard JSON lacks what this tool needs (a panel title, a variable)."""


class PrometheusError(Exception):
    """Prometheus could not be reached or refused a query."""


@dataclass(frozen=True)
class Target:
    expr: str
    legend_format: str | None


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: tuple[Target, ...]
    x: int
    y: int
    w: int


@dataclass(frozen=True)
class Series:
    legend: str
    times: tuple[float, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class QueryResult:
    expr: str  # as sent, variables filled in
    series: tuple[Series, ...]

    @property
    def points(self) -> int:
        return sum(len(s.values) for s in self.series)


@dataclass(frozen=True)
class PanelResult:
    panel: Panel
    queries: tuple[QueryResult, ...]

    @property
    def title(self) -> str:
        return self.panel.title

    @property
    def series(self) -> int:
        return sum(len(q.series) for q in self.queries)

    @property
    def points(self) -> int:
        return sum(q.points for q in self.queries)

    @property
    def has_data(self) -> bool:
        """Any finite value: a histogram_quantile over no traffic returns only NaN."""
        return any(math.isfinite(v) for q in self.queries for s in q.series for v in s.values)

    def summary(self) -> str:
        data = "data" if self.has_data else "no data"
        return (
            f"{self.title}: {len(self.queries)} queries, {self.series} series, "
            f"{self.points} points, {data}"
        )


def parse_duration(text: str) -> float:
    """Seconds from `90`, `90s`, `1m30s`, `500ms` (Prometheus duration syntax)."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    if not re.fullmatch(r"(\d+(ms|[smhdwy]))+", text):
        raise ValueError(f"not a duration: {text!r}")
    return sum(int(n) * _DURATION_UNITS[u] for n, u in re.findall(r"(\d+)(ms|[smhdwy])", text))


def format_duration(seconds: float) -> str:
    """A Prometheus duration: 90 -> `1m30s`, 0.5 -> `500ms`."""
    ms = round(seconds * 1000)
    if ms <= 0:
        raise ValueError(f"duration must be positive: {seconds}")
    if ms % 1000:
        return f"{ms}ms"
    rest, parts = ms // 1000, []
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)


def default_step(window_s: float) -> float:
    return float(max(1, math.ceil(window_s / TARGET_POINTS)))


def default_rate_interval(step_s: float) -> float:
    return max(RATE_INTERVAL_STEPS * step_s, MIN_RATE_INTERVAL_S)


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def dashboard_panels(dashboard: Mapping[str, Any]) -> list[Panel]:
    """Every panel with queries, in dashboard order, including those inside collapsed rows."""
    found: list[Panel] = []

    def walk(panels: Sequence[Mapping[str, Any]]) -> None:
        for raw in panels:
            targets = tuple(
                Target(t["expr"], t.get("legendFormat") or None)
                for t in raw.get("targets", [])
                if t.get("expr")
            )
            if targets:
                grid = raw.get("gridPos", {})
                found.append(
                    Panel(
                        title=raw.get("title", ""),
                        unit=raw.get("fieldConfig", {}).get("defaults", {}).get("unit", ""),
                        targets=targets,
                        x=grid.get("x", 0),
                        y=grid.get("y", 0),
                        w=grid.get("w", GRID_WIDTH),
                    )
                )
            walk(raw.get("panels", []))

    walk(dashboard.get("panels", []))
    return found


def select_panels(
    dashboard: Mapping[str, Any], titles: Sequence[str] = PANEL_TITLES
) -> list[Panel]:
    by_title = {p.title: p for p in dashboard_panels(dashboard)}
    missing = [t for t in titles if t not in by_title]
    if missing:
        raise DashboardError(f"panels not in the dashboard (renamed?): {', '.join(missing)}")
    return [by_title[t] for t in titles]


def variable_values(
    dashboard: Mapping[str, Any], variables: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The templating variables' values: `variables` (regexes as typed) over the defaults (the
    variable's allValue, as Grafana's "All", else `.*`)."""
    templating = dashboard.get("templating", {}).get("list", [])
    values = {v["name"]: v.get("allValue") or ".*" for v in templating}
    for name, value in (variables or {}).items():
        if name not in values:
            known = ", ".join(values)
            raise DashboardError(f"no variable ${name} in the dashboard (has: {known})")
        # The dashboard uses them inside "..." matchers: escaped so the regex arrives as typed.
        # allValue is left as is, as Grafana does.
        values[name] = value.replace("\\", "\\\\").replace('"', '\\"')
    return values


def _builtins(step_s: float, rate_interval_s: float, range_s: float) -> dict[str, str]:
    return {
        "__interval": format_duration(step_s),
        "__interval_ms": str(round(step_s * 1000)),
        "__rate_interval": format_duration(rate_interval_s),
        "__range": format_duration(range_s),
        "__range_s": str(round(range_s)),
        "__range_ms": str(round(range_s * 1000)),
    }


def expand(expr: str, values: Mapping[str, str]) -> str:
    """`expr` with `$name`, `${name}` and `[[name]]` replaced from `values`."""

    def substitute(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise DashboardError(f"unknown variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(substitute, expr)


def dashboard_queries(
    variables: Mapping[str, str] | None,
    rate_interval: float | str,
    range_: float | str,
    *,
    interval: float | str | None = None,
    path: Path = DASHBOARD,
) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, variables filled in.

    Args:
        variables: regexes for the templating variables by name (`job`, `instance`, `route`);
            those missing take the dashboard's default.
        rate_interval: `$__rate_interval`, seconds or a duration such as `1m`.
        range_: `$__range`, seconds or a duration.
        interval: `$__interval` (the step); default: rate_interval.
        path: the dashboard JSON.
    """

    def seconds(value: float | str) -> float:
        return parse_duration(value) if isinstance(value, str) else float(value)

    dashboard = load_dashboard(path)
    rate_s = seconds(rate_interval)
    values = {
        **variable_values(dashboard, variables),
        **_builtins(rate_s if interval is None else seconds(interval), rate_s, seconds(range_)),
    }
    return [
        (panel.title, expand(target.expr, values))
        for panel in dashboard_panels(dashboard)
        for target in panel.targets
    ]


def legend(labels: Mapping[str, str], legend_format: str | None, expr: str) -> str:
    """Grafana's series name: legendFormat with `{{label}}` filled in (an absent label is
    empty), else the labels, else the expression."""
    if legend_format and legend_format != "__auto":
        return _LEGEND_LABEL.sub(lambda m: labels.get(m.group(1), ""), legend_format).strip()
    if labels:
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        return f"{labels.get('__name__', '')}{{{inner}}}"
    return expr


def query_range(
    client: httpx.Client, expr: str, start: float, end: float, step: float
) -> list[tuple[dict[str, str], list[float], list[float]]]:
    """(labels, times, values) of each series `expr` returns over [start, end]."""
    try:
        response = client.get(
            "api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step}
        )
    except httpx.HTTPError as exc:
        raise PrometheusError(_one_line(f"{client.base_url}: {type(exc).__name__}: {exc}")) from exc
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}
    if response.status_code != 200 or body.get("status") != "success":
        detail = body.get("error") or response.text[:200] or response.reason_phrase
        kind = body.get("errorType", f"HTTP {response.status_code}")
        raise PrometheusError(_one_line(f"{kind}: {detail} (query: {expr})"))
    data = body.get("data", {})
    if data.get("resultType") != "matrix":
        raise PrometheusError(f"expected a matrix, got {data.get('resultType')!r} for {expr}")
    return [
        (
            item.get("metric", {}),
            [float(t) for t, _ in item.get("values", [])],
            [float(v) for _, v in item.get("values", [])],
        )
        for item in data.get("result", [])
    ]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _unit(unit: str, largest: float) -> tuple[float, str]:
    """(factor, axis label) for a Grafana unit: seconds below 1 s are shown as ms."""
    if unit == "s":
        return (1000.0, "ms") if largest < 1 else (1.0, "s")
    return {
        "ms": (1.0, "ms"),
        "percentunit": (100.0, "%"),
        "percent": (1.0, "%"),
        "reqps": (1.0, "req/s"),
    }.get(unit, (1.0, ""))


def _rows(results: Sequence[PanelResult]) -> list[list[PanelResult]]:
    """The dashboard's rows of panels (same gridPos y, side by side) top to bottom, with its
    empty space and row headers squeezed out."""
    rows: list[list[PanelResult]] = []
    for result in sorted(results, key=lambda r: (r.panel.y, r.panel.x)):
        last = rows[-1][-1].panel if rows else None
        if last is None or result.panel.y != last.y or result.panel.x < last.x + last.w:
            rows.append([])
        rows[-1].append(result)
    return rows


def draw(results: Sequence[PanelResult], title: str, start: float, end: float) -> Figure:
    """One figure: a subplot per panel, in the dashboard's rows and relative widths, the time
    axis spanning [start, end]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _rows(results)
    figure = Figure(
        figsize=(FIGURE_WIDTH_IN, ROW_HEIGHT_IN * max(1, len(rows))), layout="constrained"
    )
    FigureCanvasAgg(figure)
    figure.suptitle(title)
    if not rows:
        return figure
    # A subfigure per row: each row keeps its own panel widths (12 + 12, 8 + 8 + 8, ...).
    for subfigure, row in zip(
        figure.subfigures(len(rows), 1, squeeze=False)[:, 0], rows, strict=True
    ):
        widths = [max(1, r.panel.w) for r in row]
        axes = subfigure.subplots(1, len(row), width_ratios=widths, squeeze=False)[0]
        for ax, result in zip(axes, row, strict=True):
            _draw_panel(ax, result, start, end)
    return figure


def _date(unix: float) -> float:
    """Matplotlib's date number of a unix time."""
    from matplotlib import dates

    return float(dates.date2num(datetime.fromtimestamp(unix, UTC)))


def _draw_panel(ax: Axes, result: PanelResult, start: float, end: float) -> None:
    from matplotlib import dates
    from matplotlib.ticker import EngFormatter

    finite = [v for q in result.queries for s in q.series for v in s.values if math.isfinite(v)]
    largest = max((abs(v) for v in finite), default=0.0)
    factor, label = _unit(result.panel.unit, largest)
    for query in result.queries:
        for series in query.series:
            ax.plot(
                [_date(t) for t in series.times],
                [v * factor if math.isfinite(v) else math.nan for v in series.values],
                label=series.legend,
                linewidth=1.2,
            )
    ax.set_title(result.title, fontsize=10)
    ax.set_xlim(_date(start), _date(end))
    locator = dates.AutoDateLocator(minticks=3, maxticks=7, tz=UTC)
    # 2-minute and 2-second steps too: else a 10-minute window gets only two ticks.
    for frequency in (dates.MINUTELY, dates.SECONDLY):
        locator.intervald[frequency] = [1, 2, 5, 10, 15, 30]
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(dates.DateFormatter("%H:%M:%S", tz=UTC))
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if not result.has_data:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
        ax.set_yticks([])
        return
    ax.set_ylabel(label)
    ax.legend(fontsize=7, loc="upper left")
    if largest * factor >= 1e4:
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))
    if min(finite) >= 0:
        ax.set_ylim(bottom=0)


def render(
    prometheus_url: str,
    out_path: Path | str,
    start: float,
    end: float,
    step: float,
    variables: Mapping[str, str] | None = None,
    *,
    rate_interval: float | None = None,
    titles: Sequence[str] = PANEL_TITLES,
    path: Path = DASHBOARD,
    timeout_s: float = TIMEOUT_S,
) -> list[PanelResult]:
    """Runs the queries of the panels `titles` over [start, end] (unix seconds) at `step` seconds
    and writes the PNG; every query runs before anything is drawn, so an error leaves no file.

    Args:
        variables: regexes for the templating variables by name (`job`, `instance`, `route`).
        rate_interval: `$__rate_interval` in seconds; default max(4 x step, 1m).

    Raises:
        DashboardError: a title or variable is not in the dashboard.
        PrometheusError: Prometheus could not be reached or refused a query.
    """
    if end <= start or step <= 0:
        raise ValueError(f"need start < end and step > 0 (start={start}, end={end}, step={step})")
    dashboard = load_dashboard(path)
    panels = select_panels(dashboard, titles)
    rate_s = default_rate_interval(step) if rate_interval is None else rate_interval
    values = {**variable_values(dashboard, variables), **_builtins(step, rate_s, end - start)}
    base_url = prometheus_url.rstrip("/") + "/"
    results = []
    with httpx.Client(base_url=base_url, timeout=timeout_s) as client:
        for panel in panels:
            queries = []
            for target in panel.targets:
                expr = expand(target.expr, values)
                series = tuple(
                    Series(legend(labels, target.legend_format, expr), tuple(ts), tuple(vs))
                    for labels, ts, vs in query_range(client, expr, start, end, step)
                )
                queries.append(QueryResult(expr, series))
            results.append(PanelResult(panel, tuple(queries)))

    def utc(t: float) -> str:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")

    title = (
        f"{dashboard.get('title', 'dashboard')}: {utc(start)} to {utc(end)} UTC "
        f"({format_duration(max(1, round(end - start)))}, step {format_duration(step)}, "
        f"rate interval {values['__rate_interval']}) from {prometheus_url}"
    )
    draw(results, title, start, end).savefig(out_path, dpi=DPI)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.dashboard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prometheus", required=True, metavar="URL", help="Prometheus root URL")
    parser.add_argument("--out", required=True, type=Path, metavar="FILE.png")
    window = parser.add_mutually_exclusive_group()
    window.add_argument(
        "--minutes",
        type=float,
        default=None,
        help=f"the last N minutes (default {DEFAULT_MINUTES:g})",
    )
    window.add_argument("--start", type=float, default=None, metavar="UNIX", help="with --end")
    parser.add_argument("--end", type=float, default=None, metavar="UNIX")
    parser.add_argument(
        "--step",
        type=parse_duration,
        default=None,
        help=f"seconds or a duration (default: the window / {TARGET_POINTS}, at least 1s)",
    )
    parser.add_argument(
        "--rate-interval", type=parse_duration, default=None, help="default max(4 x step, 1m)"
    )
    for name in ("job", "instance", "route"):
        parser.add_argument(f"--{name}", default=None, metavar="REGEX", help=f"${name}")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="per query (s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.start is None) != (args.end is None):
        parser.error("--start and --end go together")
    if args.start is None:
        end = time.time()
        start = end - 60 * (DEFAULT_MINUTES if args.minutes is None else args.minutes)
    else:
        start, end = args.start, args.end
    variables = {
        name: value
        for name in ("job", "instance", "route")
        if (value := getattr(args, name)) is not None
    }
    try:
        results = render(
            args.prometheus,
            args.out,
            start,
            end,
            default_step(end - start) if args.step is None else args.step,
            variables,
            rate_interval=args.rate_interval,
            timeout_s=args.timeout,
        )
    except (DashboardError, PrometheusError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for result in results:
        print(result.summary())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
