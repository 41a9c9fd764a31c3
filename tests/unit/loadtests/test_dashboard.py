"""loadtests/dashboard.py: the dashboard's queries with variables filled in, run against a fake
Prometheus, drawn into one PNG; "no data" panels; Prometheus errors as one line and exit code 1."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from loadtests.dashboard import (
    DASHBOARD,
    PANEL_TITLES,
    DashboardError,
    PanelResult,
    dashboard_queries,
    default_rate_interval,
    draw,
    format_duration,
    load_dashboard,
    main,
    parse_duration,
    render,
    select_panels,
)
from tests.support.servers import serving

START, END, STEP = 1_765_000_000.0, 1_765_000_600.0, 30.0  # 10 minutes: $__rate_interval is 2m
EMPTY_PANEL = "Queue depth"
EMPTY_METRICS = ("cappy_queue_pairs", "cappy_queue_tokens")  # its queries: answered with no series
SERIES_LABELS = ({"route": "/select", "status": "200"}, {"route": "/score", "status": "429"})

Answer = Callable[[dict[str, str]], tuple[int, dict[str, Any]]]


def _matrix(params: dict[str, str]) -> tuple[int, dict[str, Any]]:
    if any(metric in params["query"] for metric in EMPTY_METRICS):
        result: list[dict[str, Any]] = []
    else:
        start, end, step = (float(params[k]) for k in ("start", "end", "step"))
        times = [start + i * step for i in range(int((end - start) / step) + 1)]
        result = [
            {
                "metric": labels,
                "values": [[t, str(0.01 * (n + 1) + i * 1e-4)] for i, t in enumerate(times)],
            }
            for n, labels in enumerate(SERIES_LABELS)
        ]
    return 200, {"status": "success", "data": {"resultType": "matrix", "result": result}}


class FakePrometheus(ThreadingHTTPServer):
    """Answers /api/v1/query_range with `answer(params)` and keeps each request's parameters."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answer = answer
        self.requests: list[dict[str, str]] = []

    @property
    def queries(self) -> list[str]:
        return [r["query"] for r in self.requests]


class _Handler(BaseHTTPRequestHandler):
    server: FakePrometheus

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        params = dict(parse_qsl(url.query))
        self.server.requests.append(params)
        if url.path == "/api/v1/query_range":
            status, body = self.server.answer(params)
        else:
            status, body = 404, {"status": "error", "errorType": "not_found", "error": url.path}
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_: object) -> None:
        pass


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _expected(
    titles: tuple[str, ...] | None, job: str, instance: str, rate: str, range_: str = "10m"
) -> list[str]:
    """The dashboard's exprs, filled in here independently of the module's substitution."""
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    route = next(v["allValue"] for v in data["templating"]["list"] if v["name"] == "route")
    return [
        target["expr"]
        .replace("$__rate_interval", rate)
        .replace("$__range", range_)
        .replace("$job", job)
        .replace("$instance", instance)
        .replace("$route", route)
        for panel in _panels(data["panels"])
        if titles is None or panel.get("title") in titles
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


@dataclass
class Rendered:
    results: list[PanelResult]
    queries: list[str]
    requests: list[dict[str, str]]
    png: Path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    png = tmp_path_factory.mktemp("dashboard") / "dash.png"
    server = FakePrometheus(_matrix)
    with serving(server) as url:
        results = render(url, png, START, END, STEP)
    return Rendered(results, server.queries, server.requests, png)


@pytest.fixture
def prometheus(request: pytest.FixtureRequest) -> Iterator[tuple[str, FakePrometheus]]:
    server = FakePrometheus(getattr(request, "param", _matrix))
    with serving(server) as url:
        yield url, server


def test_the_queries_sent_are_the_selected_panels_exprs_filled_in(rendered: Rendered) -> None:
    assert [r.title for r in rendered.results] == list(PANEL_TITLES)
    sent = [q.expr for r in rendered.results for q in r.queries]
    assert sent == rendered.queries
    assert not [q for q in rendered.queries if "$" in q]
    assert sorted(rendered.queries) == sorted(_expected(PANEL_TITLES, ".*", ".*", "2m"))
    assert {(r["start"], r["end"], r["step"]) for r in rendered.requests} == {
        (str(START), str(END), str(STEP))
    }


def test_the_png_is_written_and_readable(rendered: Rendered) -> None:
    from matplotlib.image import imread

    image = imread(rendered.png)
    height, width = image.shape[:2]
    assert height >= 600 and width >= 1200
    assert 20_000 < rendered.png.stat().st_size < 5_000_000


def test_series_are_named_by_the_legend_format(rendered: Rendered) -> None:
    by_title = {r.title: r for r in rendered.results}
    requests = by_title["Requests/s by route and status"]
    assert [s.legend for q in requests.queries for s in q.series] == ["/select 200", "/score 429"]
    latency = by_title["Latency p50 / p95 / p99 by route"]
    assert [s.legend for s in latency.queries[0].series] == ["p50 /select", "p50 /score"]
    points = int((END - START) / STEP) + 1
    assert latency.series == 6 and latency.points == 6 * points and latency.has_data


def test_a_query_without_data_draws_no_data(rendered: Rendered) -> None:
    empty = [r for r in rendered.results if not r.has_data]
    assert [r.title for r in empty] == [EMPTY_PANEL]
    assert empty[0].series == 0 and empty[0].points == 0
    assert empty[0].summary().endswith("no data")
    figure = draw(rendered.results, "test", START, END)
    texts = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in figure.axes}
    assert texts[EMPTY_PANEL] == ["no data"]
    assert all(not t for title, t in texts.items() if title != EMPTY_PANEL)


def test_dashboard_queries_cover_every_target_of_every_panel() -> None:
    queries = dashboard_queries({"job": "cappy"}, "1m", 3600)
    assert [expr for _, expr in queries] == _expected(None, "cappy", ".*", "1m", "1h")
    assert not [expr for _, expr in queries if "$" in expr]
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    titles = {p["title"] for p in _panels(data["panels"]) if p.get("targets")}
    assert {title for title, _ in queries} == titles
    assert set(PANEL_TITLES) < titles


def test_range_reaches_the_range_variable() -> None:
    ranged = [e for _, e in dashboard_queries(None, 60, "90m") if "increase(" in e]
    assert ranged and all("[1h30m]" in e for e in ranged)


@pytest.mark.parametrize(
    "prometheus",
    [
        lambda _: (400, {"status": "error", "errorType": "bad_data", "error": "parse\nerror"}),
        lambda _: (200, {"status": "error", "errorType": "bad_data", "error": "parse error"}),
        lambda _: (503, {}),
    ],
    indirect=True,
    ids=["http-400", "status-error", "http-503"],
)
def test_a_prometheus_error_is_one_line_and_exit_code_1(
    prometheus: tuple[str, FakePrometheus], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, server = prometheus
    png = tmp_path / "dash.png"
    code = main(["--prometheus", url, "--out", str(png), "--start", "0", "--end", "600"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert ("bad_data" in err) != ("503" in err)
    assert len(server.requests) == 1 and not png.exists()


def test_the_job_and_instance_regexes_reach_every_query(
    prometheus: tuple[str, FakePrometheus], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, server = prometheus
    png = tmp_path / "dash.png"
    argv = ["--prometheus", url, "--out", str(png), "--start", str(START), "--end", str(END)]
    argv += ["--step", "15s", "--job", "cappy|canary", "--instance", r"10\.0\.0\.1:8000"]
    assert main(argv) == 0
    # The backslashes doubled: the regex lands in a "..." PromQL string.
    instance = r"10\\.0\\.0\\.1:8000"
    assert server.queries == [
        q for t in PANEL_TITLES for q in _expected((t,), "cappy|canary", instance, "1m")
    ]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(PANEL_TITLES) + 1
    assert all(line.startswith(f"{t}: ") for line, t in zip(lines, PANEL_TITLES, strict=False))
    assert lines[len(PANEL_TITLES) - 3].endswith(", no data")  # Queue depth
    assert lines[-1] == f"wrote {png}" and png.stat().st_size > 0


def test_a_renamed_panel_or_unknown_variable_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DashboardError, match="Gone panel"):
        select_panels(load_dashboard(), ["Gone panel", PANEL_TITLES[0]])
    with pytest.raises(DashboardError, match=r"\$namespace"):
        render("http://127.0.0.1:9", tmp_path / "x.png", START, END, STEP, {"namespace": "x"})


@pytest.mark.parametrize(
    ("text", "seconds", "formatted"),
    [
        ("15", 15.0, "15s"),
        ("90s", 90.0, "1m30s"),
        ("1h30m", 5400.0, "1h30m"),
        ("500ms", 0.5, "500ms"),
    ],
)
def test_durations(text: str, seconds: float, formatted: str) -> None:
    assert parse_duration(text) == seconds
    assert format_duration(seconds) == formatted


def test_rate_interval_is_four_steps_and_at_least_a_minute() -> None:
    assert default_rate_interval(5) == 60
    assert default_rate_interval(30) == 120
