"""docker-compose.yml up for real: the cpu profile with two cappy replicas behind haproxy, the
llm profile (SmolLM2 behind llama-cpp-python's server) as the proxy's upstream, and Prometheus
with the shipped configuration and alert rules. Traffic goes through haproxy, as a user's does.

What the test changes, in an override file beside the shipped one: the images (stand-ins where no
registry answers, and this run's builds), free host ports, the export folder, and
CAPPY_MAX_QUEUE_WAIT_S=1 so that an overload comes within seconds. Prometheus loads the shipped
prometheus.yml and alerts.yml unchanged, plus a copy of alerts.yml whose rules wait `for` 10 s
instead of minutes (group "cappy-serve-fast", evaluated every 5 s): the same expressions, so that
an alert firing is seen within the test.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loadtests import dashboard
from tests.deploy.conftest import FIGURES
from tests.deploy.engine import Docker, compose_args
from tests.deploy.standins import BaseImages
from tests.support import k8s_adapter

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS_DIR = ROOT / "deploy/prometheus"
PROJECT = "cappy-deploy-test"
REPLICAS = 2
FAST_FOR = "10s"
# Where a run may leave the dashboard picture (the README's comes from here).
PNG_ENV = "CAPPY_DASHBOARD_PNG"

LONG = "The quick brown fox jumps over the lazy dog. " * 120  # past 512 tokens: truncated


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    docker: Docker
    args: list[str]
    env: dict[str, str]
    api: str
    prometheus: str
    stats: str
    log: list[str] = field(default_factory=list)

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        done = self.docker.run(*self.args, *args, env=self.env, timeout=timeout, check=check)
        return done.stdout + done.stderr

    def container(self, service: str, index: int) -> str:
        return f"{PROJECT}-{service}-{index}"

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        answer = httpx.get(f"{self.prometheus}/api/v1/query", params=params, timeout=30).json()
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def api_get(self, path: str) -> Any:
        answer = httpx.get(f"{self.prometheus}/api/v1/{path}", timeout=30).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def server_states(self) -> list[str]:
        """haproxy's status of each replica it knows (UP, DOWN, and the transitions "UP 1/2",
        "DOWN 1/2"), sorted; the template's unused slots (MAINT) left out."""
        csv = httpx.get(f"{self.stats}/stats;csv", timeout=10).text
        rows = [line.split(",") for line in csv.splitlines() if line.startswith("cappy,")]
        return sorted(row[17] for row in rows if row[1] != "BACKEND" and "MAINT" not in row[17])


def _faster(rule: dict[str, Any]) -> dict[str, Any]:
    return {**rule, "for": FAST_FOR} if "for" in rule else rule


def _fast_rules() -> dict[str, Any]:
    shipped = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text(encoding="utf-8"))
    groups = []
    for group in shipped["groups"]:
        rules = [
            dict(rule, **({"for": FAST_FOR} if "for" in rule else {})) for rule in group["rules"]
        ]
        groups.append({"name": f"{group['name']}-fast", "interval": "5s", "rules": rules})
    return {"groups": groups}


def _override(work: Path) -> Path:
    """Prometheus's folder: the shipped files plus the fast copy of the rules."""
    prometheus = work / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, prometheus)
    config = yaml.safe_load((prometheus / "prometheus.yml").read_text(encoding="utf-8"))
    config["rule_files"] = [*config["rule_files"], "alerts-fast.yml"]
    (prometheus / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (prometheus / "alerts-fast.yml").write_text(yaml.safe_dump(_fast_rules()), encoding="utf-8")
    for path in [prometheus, *prometheus.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    override = {
        "services": {
            "cappy": {"environment": ["CAPPY_MAX_QUEUE_WAIT_S=1"]},
            "prometheus": {"volumes": [f"{prometheus}:/etc/prometheus:ro"]},
        }
    }
    path = work / "override.yml"
    path.write_text(yaml.safe_dump(override), encoding="utf-8")
    return path


def _wait(what: str, check: Any, timeout_s: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, AssertionError, KeyError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"{what} within {timeout_s:.0f} s; last: {last!r}")


@pytest.fixture(scope="module")
def stack(
    docker: Docker,
    image: Any,
    bases: BaseImages,
    deploy_exports: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("compose")
    ports = {name: _free_port() for name in ("http", "prometheus", "stats")}
    env = {
        "CAPPY_IMAGE": image("cpu"),
        "CAPPY_LLM_IMAGE": image("llm"),
        "CAPPY_PYTHON_IMAGE": bases.python,
        "CAPPY_PROMETHEUS_IMAGE": bases.prometheus,
        "CAPPY_HAPROXY_IMAGE": bases.haproxy,
        "CAPPY_EXPORTS": str(deploy_exports),
        "CAPPY_MODEL": "/exports/minilm",
        "CAPPY_REPLICAS": str(REPLICAS),
        "CAPPY_UPSTREAM_BASE_URL": "http://llm:8080/v1",
        "CAPPY_HTTP_PORT": str(ports["http"]),
        "CAPPY_PROMETHEUS_PORT": str(ports["prometheus"]),
        "CAPPY_HAPROXY_STATS_PORT": str(ports["stats"]),
    }
    args = compose_args(PROJECT, [COMPOSE, _override(work)], ["cpu", "llm"])
    found = Stack(
        docker,
        args,
        env,
        api=f"http://127.0.0.1:{ports['http']}",
        prometheus=f"http://127.0.0.1:{ports['prometheus']}",
        stats=f"http://127.0.0.1:{ports['stats']}",
    )
    found.compose("down", "--volumes", "--remove-orphans", "--timeout", "5", check=False)
    started = time.monotonic()
    try:
        found.compose(
            "up",
            "--detach",
            "--no-build",
            "--pull",
            "never",
            "cappy",
            "llm",
            "balancer",
            "prometheus",
        )
        _wait(
            f"{REPLICAS} replicas up in haproxy",
            lambda: found.server_states() == ["UP"] * REPLICAS,
            180,
        )
        FIGURES.append(
            f"compose: {REPLICAS} replicas ready behind haproxy {time.monotonic() - started:.0f} s "
            "after `up`"
        )
        yield found
    finally:
        if os.environ.get("CAPPY_DEPLOY_KEEP") != "1":
            found.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", check=False)


def test_profiles_render_with_compose_v2(docker: Docker) -> None:
    """Each profile of the shipped file, as `docker compose config` (v2) normalises it."""
    for profiles, services in (
        (["cpu"], {"cappy", "balancer", "prometheus", "grafana"}),
        (["gpu"], {"cappy-gpu", "balancer", "prometheus", "grafana"}),
        (["cpu", "llm"], {"cappy", "llm", "balancer", "prometheus", "grafana"}),
    ):
        args = compose_args("cappy-config-check", [COMPOSE], profiles)
        rendered = yaml.safe_load(docker.run(*args, "config").stdout)
        assert set(rendered["services"]) == services, profiles
    gpu = yaml.safe_load(docker.run(*compose_args("c", [COMPOSE], ["gpu"]), "config").stdout)[
        "services"
    ]["cappy-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_prometheus_scrapes_every_replica_and_loads_the_rules(stack: Stack) -> None:
    def targets_up() -> bool:
        active = stack.api_get("targets")["activeTargets"]
        cappy = [t for t in active if t["labels"]["job"] == "cappy"]
        balancer = [t for t in active if t["labels"]["job"] == "balancer"]
        return (
            len(cappy) == REPLICAS
            and all(t["health"] == "up" for t in cappy + balancer)
            and len(balancer) == 1
        )

    _wait("every cappy replica and haproxy scraped and up", targets_up, 60)
    shipped = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text(encoding="utf-8"))
    names = {rule["alert"] for group in shipped["groups"] for rule in group["rules"]}

    def rules_evaluated() -> dict[str, str]:
        groups = {group["name"]: group for group in stack.api_get("rules")["groups"]}
        health = {}
        for group in shipped["groups"]:
            loaded = groups[group["name"]]
            assert loaded["file"] == "/etc/prometheus/alerts.yml"
            assert {rule["name"] for rule in loaded["rules"]} == names
            for rule in loaded["rules"]:
                health[rule["name"]] = f"{rule['health']} {rule.get('lastError', '')}".strip()
        assert set(health.values()) == {"ok"}, health
        return health

    # Health is "unknown" until a rule's first evaluation (every 15 s), then "ok" or the error.
    _wait("every shipped alert rule loaded and evaluated without error", rules_evaluated, 60)


# --- traffic ------------------------------------------------------------------------------------


@dataclass
class Traffic:
    start: float
    end: float
    statuses: dict[str, list[int]]


def _select(candidates: int, words: int = 12) -> dict[str, Any]:
    answer = "an answer about boiling eggs in water " * (words // 6 + 1)
    return {
        "instruction": "How do I boil an egg?",
        "candidates": [f"{i}: {answer}" for i in range(candidates)],
    }


async def _scoring(client: httpx.AsyncClient, seconds: float, record: list[int]) -> None:
    bodies = [
        ("/score", {"pairs": [{"instruction": LONG, "response": "a fox"}] * 2}),
        ("/select", _select(8)),
        ("/v1/rerank", {"query": "egg", "documents": ["boil it", "fry it", "eat it"]}),
    ]
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        path, body = bodies[i % len(bodies)]
        record.append((await client.post(path, json=body)).status_code)
        i += 1


async def _proxy(client: httpx.AsyncClient, record: list[int]) -> None:
    """Two best-of-17 answers from SmolLM2, then one prompt past its context window (the
    upstream refuses it: an upstream error)."""
    for question in ("Name a fruit.", "What colour is the sky?"):
        body = {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 12,
        }
        answer = await client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-cappy-candidates"] == "17"
        record.append(answer.status_code)
    huge = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "Summarise: " + "word " * 6000}],
        "max_tokens": 8,
    }
    refused = await client.post("/v1/chat/completions", json=huge)
    assert refused.status_code >= 400 and refused.json()["error"]["message"]
    record.append(refused.status_code)


async def _cancelled(client: httpx.AsyncClient) -> None:
    """A client that gives up on a large request: its queued pairs are dropped."""
    task = asyncio.create_task(client.post("/select", json=_select(1024, 60)))
    await asyncio.sleep(1.0)
    task.cancel()
    with_cancel = await asyncio.gather(task, return_exceptions=True)
    assert isinstance(with_cancel[0], asyncio.CancelledError)


async def _overload(client: httpx.AsyncClient, seconds: float, record: list[int]) -> None:
    """Large requests keep both queues past the 1 s wait limit while small ones keep coming:
    those are refused with 429 and Retry-After."""
    heavy = _select(128, 40)
    light = _select(4)
    deadline = time.monotonic() + seconds

    async def keep_heavy() -> None:
        while time.monotonic() < deadline:
            answer = await client.post("/select", json=heavy)
            record.append(answer.status_code)
            if answer.status_code == 429:
                await asyncio.sleep(0.2)

    async def keep_light() -> None:
        while time.monotonic() < deadline:
            answer = await client.post("/select", json=light)
            if answer.status_code == 429:
                assert float(answer.headers["Retry-After"]) > 0
                assert answer.json()["error"]["code"] == "overloaded"
            record.append(answer.status_code)
            await asyncio.sleep(0.05)

    await asyncio.gather(*[keep_heavy() for _ in range(6)], *[keep_light() for _ in range(12)])


async def _all_traffic(api: str) -> dict[str, list[int]]:
    statuses: dict[str, list[int]] = {"scoring": [], "proxy": [], "overload": []}
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=api, timeout=150, limits=limits) as client:
        await asyncio.gather(
            _scoring(client, 30, statuses["scoring"]),
            _scoring(client, 30, statuses["scoring"]),
            _proxy(client, statuses["proxy"]),
        )
        # After the steady phase: a 1024-candidate request alone fills a queue past the 1 s
        # wait limit, and the requests beside it would rightly be refused.
        await _cancelled(client)
        await _overload(client, 20, statuses["overload"])
    return statuses


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> Traffic:
    start = time.time()
    statuses = asyncio.run(_all_traffic(stack.api))
    time.sleep(12)  # two scrapes after the last request
    return Traffic(start, time.time(), statuses)


def test_traffic_through_haproxy_is_answered(traffic: Traffic) -> None:
    assert traffic.statuses["scoring"] and set(traffic.statuses["scoring"]) == {200}
    overload = traffic.statuses["overload"]
    assert set(overload) <= {200, 429}, set(overload)
    assert overload.count(429) >= 2 * 31, "too few refusals for the overload alert"
    FIGURES.append(
        f"compose traffic: {len(traffic.statuses['scoring'])} scoring requests all 200; overload "
        f"phase {overload.count(200)} x 200, {overload.count(429)} x 429"
    )


def test_every_dashboard_query_returns_data(stack: Stack, traffic: Traffic) -> None:
    """Each PromQL expression of the shipped Grafana dashboard, its variables filled in as
    Grafana fills them for "All", has a finite value over the traffic window."""
    window = traffic.end - traffic.start
    queries = dashboard.dashboard_queries({}, "1m", f"{math.ceil(window)}s", interval="5s")
    empty = []
    with httpx.Client(base_url=stack.prometheus + "/", timeout=30) as client:
        for title, expr in queries:
            series = dashboard.query_range(client, expr, traffic.start, traffic.end, 5)
            if not any(math.isfinite(v) for _, _, values in series for v in values):
                empty.append(f"{title}: {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    FIGURES.append(f"dashboard: all {len(queries)} queries returned data:")
    FIGURES.extend(f"  {title}: {expr}" for title, expr in queries)


def test_the_dashboard_picture(stack: Stack, traffic: Traffic, tmp_path: Path) -> None:
    out = tmp_path / "dashboard.png"
    results = dashboard.render(stack.prometheus, out, traffic.start, traffic.end, 5)
    assert all(result.has_data for result in results), [r.summary() for r in results]
    assert out.stat().st_size > 50_000
    if os.environ.get(PNG_ENV):
        shutil.copyfile(out, os.environ[PNG_ENV])


def _rule_state(stack: Stack, group: str, alert: str) -> str:
    for found in stack.api_get("rules")["groups"]:
        if found["name"] == group:
            (rule,) = [r for r in found["rules"] if r["name"] == alert]
            return str(rule["state"])
    raise KeyError(group)


def test_the_overload_alert_fires(stack: Stack, traffic: Traffic) -> None:
    assert traffic.statuses["overload"].count(429)
    _wait(
        "CappyOverloaded firing",
        lambda: _rule_state(stack, "cappy-serve-fast", "CappyOverloaded") == "firing",
        60,
    )


def test_the_adapter_query_gives_each_replica_its_queue_wait(stack: Stack) -> None:
    """prometheus-adapter's metricsQuery for the HPA's metric (deploy/k8s/prometheus-adapter),
    run against this Prometheus with the compose labels standing for Kubernetes' (`job` for the
    namespace's matchers, `instance` for `pod`), during a load: one value per replica, each the
    replica's own series, as the HPA would read them."""
    (rule,) = [
        r
        for r in k8s_adapter.load_rules()
        if k8s_adapter.metric_name(r) == "cappy_queue_expected_wait_seconds"
    ]
    query = k8s_adapter.render_metrics_query(rule, 'job="cappy"', "instance")
    stop = threading.Event()

    async def load() -> None:
        async with httpx.AsyncClient(base_url=stack.api, timeout=150) as client:

            async def one() -> None:
                while not stop.is_set():
                    await client.post("/select", json=_select(64, 30))

            await asyncio.gather(*[one() for _ in range(8)])

    loader = threading.Thread(target=lambda: asyncio.run(load()))
    loader.start()
    try:

        def busy_sample() -> list[dict[str, Any]] | None:
            now = time.time()
            per_pod = stack.query(query, at=now)
            if len(per_pod) == REPLICAS and any(float(r["value"][1]) > 0 for r in per_pod):
                return per_pod
            return None

        per_pod = _wait("a queue wait above 0 in the adapter's query", busy_sample, 60, 2)
    finally:
        stop.set()
        loader.join(180)
    at = float(per_pod[0]["value"][0])
    raw = stack.query('cappy_queue_expected_wait_seconds{job="cappy"}', at=at)
    assert {r["metric"]["instance"]: r["value"][1] for r in per_pod} == {
        r["metric"]["instance"]: r["value"][1] for r in raw
    }
    values = [float(r["value"][1]) for r in per_pod]
    FIGURES.append(
        "adapter metricsQuery under load: per-replica expected wait "
        + ", ".join(f"{v:.2f} s" for v in values)
        + f" (HPA average {statistics.fmean(values):.2f} s)"
    )


def test_a_hung_replica_leaves_haproxy_and_the_down_alert_fires(stack: Stack) -> None:
    """`docker pause` freezes replica 2 as a hung process would be: haproxy's /ready check takes
    it out, requests keep being answered by replica 1, and CappyDown fires for it."""
    name = stack.container("cappy", 2)
    stack.docker.run("pause", name)
    try:
        _wait(
            "haproxy taking the hung replica out",
            lambda: stack.server_states() == ["DOWN", "UP"],
            30,
        )
        for _ in range(5):
            answer = httpx.post(f"{stack.api}/select", json=_select(4), timeout=30)
            assert answer.status_code == 200
        _wait(
            "CappyDown firing",
            lambda: _rule_state(stack, "cappy-serve-fast", "CappyDown") == "firing",
            90,
        )
    finally:
        stack.docker.run("unpause", name, check=False)
    _wait("the replica back in haproxy", lambda: stack.server_states() == ["UP"] * REPLICAS, 60)


async def _steady(api: str, seconds: float, record: list[tuple[float, float, int, str]]) -> None:
    """Four clients, each sending its next request when the last one was answered."""
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=api, timeout=60) as client:

        async def one() -> None:
            while time.monotonic() < deadline:
                sent = time.time()
                try:
                    answer = await client.post("/select", json=_select(8))
                except httpx.TransportError as exc:
                    record.append((sent, time.time() - sent, 0, type(exc).__name__))
                    continue
                code = answer.status_code
                detail = "" if code == 200 else answer.text[:200]
                if code in (429, 503) and "Retry-After" not in answer.headers:
                    detail = "no Retry-After: " + detail
                record.append((sent, time.time() - sent, code, detail))

        await asyncio.gather(*[one() for _ in range(4)])


def test_failover_when_a_replica_stops_under_steady_load(stack: Stack) -> None:
    """`docker stop` of replica 2 while four clients keep sending through haproxy: every request
    is answered (200, or a 429/503 envelope with Retry-After that a client may retry); none is
    lost; the stopped replica drains and exits 0."""
    record: list[tuple[float, float, int, str]] = []
    loader = threading.Thread(target=lambda: asyncio.run(_steady(stack.api, 25, record)))
    loader.start()
    time.sleep(8)
    stopped_at = time.time()
    stack.docker.run("stop", stack.container("cappy", 2), timeout=90)
    stop_s = time.time() - stopped_at
    loader.join(120)
    state = stack.docker.inspect(stack.container("cappy", 2))["State"]
    codes = [code for _, _, code, _ in record]
    lost = [(code, detail) for _, _, code, detail in record if code not in (200, 429, 503)]
    assert not lost, lost
    assert all(not detail.startswith("no Retry-After") for *_, detail in record)
    assert state["ExitCode"] == 0
    switch = sorted(
        latency for sent, latency, _, _ in record if stopped_at - 1 <= sent <= stopped_at + 10
    )
    p99 = switch[min(len(switch) - 1, math.ceil(0.99 * len(switch)) - 1)]
    before = sorted(latency for sent, latency, _, _ in record if sent < stopped_at - 1)
    p99_before = before[min(len(before) - 1, math.ceil(0.99 * len(before)) - 1)]
    FIGURES.append(
        f"failover: {len(codes)} requests, {codes.count(200)} x 200, {codes.count(429)} x 429, "
        f"{codes.count(503)} x 503, 0 lost; p99 {p99 * 1000:.0f} ms in the 11 s around the stop "
        f"(before it: {p99_before * 1000:.0f} ms); replica stopped in {stop_s:.1f} s, exit 0"
    )
    assert codes.count(200) >= 0.9 * len(codes)
