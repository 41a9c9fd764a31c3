"""The project's images, built with its Dockerfile and run as containers: the cpu image (the
default target, which can export at first start), the serve-only target (no torch) and the gpu
image on a host without a GPU. The MiniLM export is mounted read-only; the root filesystem is
read-only with a tmpfs /tmp, as in Kubernetes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtests.local_server import running_server
from tests.deploy.conftest import FIGURES
from tests.deploy.containers import Container, running
from tests.deploy.engine import Docker

KEY = "deploy-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXPORT = "/models/minilm"
READY_WITHIN_S = 60.0
STOP_TIMEOUT_S = 40  # docker's grace before SIGKILL: above CAPPY_GRACEFUL_SHUTDOWN_S (30)

LONG = "The quick brown fox jumps over the lazy dog. " * 120  # past 512 tokens: truncated
PAIRS = [
    {"instruction": 'Is this review positive or negative? "Loved it."', "response": "positive"},
    {"instruction": 'Is this review positive or negative? "Loved it."', "response": "negative"},
    {"instruction": "Translate to French: good morning", "response": "bonjour"},
    {"instruction": "Résumez : «Le chat dort.»", "response": "Un chat dort. 猫が寝ている。"},
    {"instruction": LONG, "response": "a fox and a dog"},
    {"instruction": "Say nothing.", "response": ""},
]
SELECT = {
    "instruction": "What is the capital of France?",
    "candidates": ["Paris", "Lyon", "The capital of France is Paris.", "Berlin", "paris"],
}
RERANK = {
    "query": "How do I boil an egg?",
    "documents": ["Put it in boiling water for 9 minutes.", {"text": "Eggs are laid by hens."}],
    "return_documents": True,
}


def _serving_export(
    docker: Docker, tag: str, name: str, exports: Path, *options: str
) -> contextlib.AbstractContextManager[Container]:
    """`tag` serving the MiniLM export, mounted read-only, with the API key from the
    environment, on a read-only root with a tmpfs /tmp (plus `options`)."""
    return running(
        docker,
        tag,
        name,
        env={"CAPPY_MODEL": EXPORT, "CAPPY_API_KEYS": KEY},
        mounts=[f"{exports / 'minilm'}:{EXPORT}:ro"],
        options=["--read-only", "--tmpfs", "/tmp", *options],
    )


@pytest.fixture(scope="module")
def served(docker: Docker, image: Any, deploy_exports: Path) -> Iterator[tuple[Container, float]]:
    """The cpu image serving the MiniLM export with API keys from the environment; and the
    seconds it took from `docker run` to /ready."""
    with _serving_export(
        docker, image("cpu"), "cappy-deploy-test-cpu", deploy_exports
    ) as container:
        ready_s = container.wait_ready(READY_WITHIN_S)
        FIGURES.append(f"cpu container ready {ready_s:.1f} s after docker run (MiniLM export)")
        yield container, ready_s


def _post(url: str, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(
        f"{url}{path}", json=body, headers=AUTH if headers is None else headers, timeout=60
    )


def _scores(url: str) -> dict[str, list[float]]:
    score = _post(url, "/score", {"pairs": PAIRS})
    select = _post(url, "/select", SELECT)
    rerank = _post(url, "/v1/rerank", RERANK)
    for response in (score, select, rerank):
        assert response.status_code == 200, response.text
    return {
        "score": [item["score"] for item in score.json()["data"]],
        "truncated": [item["truncated"] for item in score.json()["data"]],
        "select": [item["score"] for item in sorted(select.json()["ranking"], key=_index)],
        "best": [select.json()["index"]],
        "rerank": [r["relevance_score"] for r in sorted(rerank.json()["results"], key=_index)],
    }


def _index(item: dict) -> int:
    return int(item["index"])


def test_serve_target_has_no_torch_and_is_at_most_half_the_cpu_image(
    docker: Docker, image: Any
) -> None:
    full, serve = image("cpu"), image("cpu-serve")
    sizes = {
        tag: int(docker.run("image", "inspect", "--format", "{{.Size}}", tag).stdout)
        for tag in (full, serve)
    }
    assert sizes[serve] <= sizes[full] / 2, sizes
    probe = "import importlib.util as u; print(u.find_spec('torch') is None)"
    for tag, no_torch in ((serve, "True"), (full, "False")):
        done = docker.run("run", "--rm", "--entrypoint", "python", tag, "-c", probe)
        assert done.stdout.strip() == no_torch, tag


def test_runs_as_uid_10001_on_a_read_only_root(served: tuple[Container, float]) -> None:
    container, _ = served
    assert container.docker.inspect(container.name)["Config"]["User"] == "10001:10001"
    code, out = container.exec("id", "-u")
    assert code == 0 and out.strip() == "10001"
    code, out = container.exec("touch", "/home/cappy/x")
    assert code != 0 and "Read-only file system" in out
    code, _ = container.exec("touch", "/tmp/x")
    assert code == 0


def _mount_at_once(docker: Docker, tag: str, volume: str, containers: int) -> list[str]:
    """Starts `containers` containers of `tag` at once, each mounting `volume` at the cache
    folder and creating the service's folders there; returns the stderr of those that failed."""

    def one(_: int) -> subprocess.CompletedProcess[str]:
        return docker.run(
            "run",
            "--rm",
            "--read-only",
            "-v",
            f"{volume}:/var/cache/cappy",
            "--entrypoint",
            "sh",
            tag,
            "-c",
            "mkdir -p /var/cache/cappy/exports /var/cache/cappy/huggingface",
            check=False,
        )

    with ThreadPoolExecutor(max_workers=containers) as pool:
        return [run.stderr for run in pool.map(one, range(containers)) if run.returncode != 0]


def test_replicas_first_mounting_a_fresh_cache_volume_at_once_all_start(
    docker: Docker, image: Any
) -> None:
    """Each container that first mounts an empty named volume copies the image's content at the
    mount point into it, and Docker's copy fails on a subfolder another copy made first
    (moby/moby#43068: a `compose up` of two replicas fails so). The image's cache folder holds
    nothing to copy but its owner, the service's user, who can then write there."""
    tag = image("cpu")
    listing = docker.run(
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        tag,
        "-c",
        "ls -A /var/cache/cappy; stat -c %u /var/cache/cappy",
    )
    assert listing.stdout.split() == ["10001"]  # nothing in it; its owner
    for attempt in range(3):
        volume = f"cappy-deploy-test-fresh-{attempt}"
        docker.run("volume", "rm", "--force", volume, check=False)
        try:
            assert _mount_at_once(docker, tag, volume, containers=4) == []
        finally:
            docker.run("volume", "rm", "--force", volume, check=False)


def test_ready_within_a_minute_with_no_warnings(served: tuple[Container, float]) -> None:
    container, ready_s = served
    assert ready_s < READY_WITHIN_S
    logs = container.logs()
    assert "loaded and warm" in logs
    noisy = [
        line
        for line in logs.splitlines()
        if re.search(r"\b(WARNING|WARN|ERROR|CRITICAL)\b|\[W:|\[E:|Traceback", line)
    ]
    assert not noisy, "\n".join(noisy)


def test_scores_equal_the_hosts_cappy_serve(
    served: tuple[Container, float], deploy_exports: Path
) -> None:
    container, _ = served
    assert container.url is not None
    in_container = _scores(container.url)
    with running_server(deploy_exports / "minilm", [f"API_KEYS={KEY}"], api_key=KEY) as url:
        on_host = _scores(url)
    assert in_container["truncated"] == on_host["truncated"] == [False] * 4 + [True, False]
    assert in_container["best"] == on_host["best"]
    for key in ("score", "select", "rerank"):
        assert in_container[key] == pytest.approx(on_host[key], abs=1e-6, rel=0), key


def test_metrics_and_api_keys(served: tuple[Container, float]) -> None:
    container, _ = served
    url = container.url
    assert url is not None
    metrics = httpx.get(f"{url}/metrics", timeout=10)  # public, as /health and /ready
    assert metrics.status_code == 200
    assert 'cappy_request_duration_seconds_count{route="/score",status="200"}' in metrics.text
    assert "cappy_queue_expected_wait_seconds" in metrics.text
    refused = _post(url, "/score", {"pairs": PAIRS[:1]}, headers={})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"]
    wrong = _post(url, "/score", {"pairs": PAIRS[:1]}, headers={"Authorization": "Bearer no"})
    assert wrong.status_code == 401
    assert _post(url, "/score", {"pairs": PAIRS[:1]}).status_code == 200
    assert KEY not in container.logs()


def test_healthcheck_reaches_healthy(served: tuple[Container, float]) -> None:
    """The image's HEALTHCHECK (/health every 15 s) marks the container healthy."""
    container, _ = served
    deadline = time.monotonic() + 90
    while (status := container.state()["Health"]["Status"]) != "healthy":
        assert status == "starting" and time.monotonic() < deadline, status
        time.sleep(1)


async def _flood(url: str, count: int, started: threading.Event) -> list[Any]:
    candidates = [
        f"Candidate {i}: " + "a long answer about eggs and water " * 12 for i in range(64)
    ]
    body = {"instruction": "How do I boil an egg?", "candidates": candidates}
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120, limits=limits) as client:
        tasks = [asyncio.create_task(client.post("/select", json=body)) for _ in range(count)]
        await asyncio.sleep(1.0)  # all sent and queued: the model takes seconds for them
        started.set()
        return await asyncio.gather(*tasks, return_exceptions=True)


def test_docker_stop_answers_every_request_in_flight(
    docker: Docker, image: Any, deploy_exports: Path
) -> None:
    """SIGTERM from `docker stop` with 16 requests in flight: each is answered (200, or a 429/503
    envelope), none is reset, and the container exits 0 before docker's grace runs out."""
    with _serving_export(
        docker,
        image("cpu"),
        "cappy-deploy-test-stop",
        deploy_exports,
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
    ) as container:
        container.wait_ready(READY_WITHIN_S)
        assert container.url is not None
        started = threading.Event()
        results: list[Any] = []
        flood = threading.Thread(
            target=lambda: results.extend(asyncio.run(_flood(container.url or "", 16, started)))
        )
        flood.start()
        assert started.wait(60)
        began = time.monotonic()
        docker.run("stop", container.name, timeout=STOP_TIMEOUT_S + 30)
        stopped_s = time.monotonic() - began
        flood.join(120)
        state = container.state()
    assert len(results) == 16
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures
    statuses = sorted(r.status_code for r in results)
    for response in results:
        assert response.status_code in (200, 429, 503), response.text
        if response.status_code != 200:
            assert response.json()["error"]["message"] and response.headers["Retry-After"]
    assert state["ExitCode"] == 0 and not state["OOMKilled"]
    assert stopped_s < STOP_TIMEOUT_S
    FIGURES.append(
        f"docker stop with 16 requests in flight: statuses {statuses}, exit 0 after "
        f"{stopped_s:.1f} s"
    )


def test_docker_stop_while_exporting_interrupts_the_export_and_leaves_the_cache_clean(
    docker: Docker, image: Any, deploy_checkpoints: Path
) -> None:
    """`docker stop` while the container exports its checkpoint at first start: the export is
    interrupted (not finished first), nothing of it stays in the cache volume (no export, no
    scratch folder), and the container exits 0 on the SIGTERM rather than being killed."""
    tag, volume, name = image("cpu"), "cappy-deploy-test-exporting", "cappy-deploy-test-exporting"
    docker.run("volume", "rm", "--force", volume, check=False)
    try:
        with running(
            docker,
            tag,
            name,
            env={"CAPPY_MODEL": "/models/checkpoint"},
            mounts=[
                f"{deploy_checkpoints / 'minilm'}:/models/checkpoint:ro",
                f"{volume}:/var/cache/cappy",
            ],
            options=["--read-only", "--tmpfs", "/tmp", "--stop-timeout", str(STOP_TIMEOUT_S)],
        ) as container:
            assert container.url is not None
            deadline = time.monotonic() + READY_WITHIN_S
            status = None
            while status != "exporting" and time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError, json.JSONDecodeError):
                    status = httpx.get(f"{container.url}/ready", timeout=2).json()["status"]
                time.sleep(0.2)
            assert status == "exporting", container.logs()
            began = time.monotonic()
            docker.run("stop", name, timeout=STOP_TIMEOUT_S + 30)
            stopped_s = time.monotonic() - began
            state, logs = container.state(), container.logs()
        listing = docker.run(
            "run",
            "--rm",
            "--volume",
            f"{volume}:/var/cache/cappy",
            "--entrypoint",
            "sh",
            tag,
            "-c",
            "ls -A /var/cache/cappy/exports",
        ).stdout.split()
    finally:
        docker.run("volume", "rm", "--force", volume, check=False)
    assert state["ExitCode"] == 0 and not state["OOMKilled"], logs
    assert "start-up stopped before the scorer was ready" in logs
    assert [entry for entry in listing if not entry.endswith(".lock")] == [], listing
    FIGURES.append(
        f"docker stop while exporting at first start: exit 0 after {stopped_s:.1f} s, "
        f"cache volume holds {listing}"
    )


def test_unfetchable_hub_id_logs_one_line_and_stays_up_unhealthy(
    docker: Docker, image: Any
) -> None:
    """No network: the first-start export fails. One clear log line, /health 503, and the
    container keeps running without restarting (no crash loop)."""
    with running(
        docker,
        image("cpu"),
        "cappy-deploy-test-hub",
        env={"CAPPY_MODEL": "btan2/cappy-large"},
        options=["--read-only", "--tmpfs", "/tmp", "--network", "none", "--restart", "always"],
        publish=False,
    ) as container:
        logs = container.wait_for_log("could not export btan2/cappy-large", 180)
        time.sleep(5)  # time to restart, were it going to
        inspected = container.docker.inspect(container.name)
        health = _health_inside(container)
        logs = container.logs()
    state = inspected["State"]
    errors = [line for line in logs.splitlines() if "ERROR" in line or "Traceback" in line]
    assert len(errors) == 1, logs
    assert "not in the local Hugging Face cache" in errors[0]
    assert "WARNING" not in logs, logs  # the hub client's retries stay at debug level
    assert state["Running"] and state["Restarting"] is False
    assert inspected["RestartCount"] == 0
    assert health == (503, "failed")


def _health_inside(container: Container) -> tuple[int, str]:
    probe = (
        "import json, urllib.request, urllib.error\n"
        "try:\n"
        "    r = urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=5)\n"
        "    print(r.status, json.load(r)['status'])\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code, json.load(e)['status'])\n"
    )
    code, out = container.exec("python", "-c", probe)
    assert code == 0, out
    status, phase = out.split()
    return int(status), phase


def test_serve_only_image_serves_an_export_and_refuses_a_hub_id_clearly(
    docker: Docker, image: Any, deploy_exports: Path, served: tuple[Container, float]
) -> None:
    tag = image("cpu-serve")
    with _serving_export(docker, tag, "cappy-deploy-test-serve", deploy_exports) as container:
        container.wait_ready(READY_WITHIN_S)
        assert container.url is not None and served[0].url is not None
        assert _scores(container.url) == _scores(served[0].url)
    with running(
        docker, tag, "cappy-deploy-test-serve-hub", env={"CAPPY_MODEL": "btan2/cappy-large"}
    ) as container:
        logs = container.wait_for_log("cannot export it", 60)
        assert container.url is not None
        health = httpx.get(f"{container.url}/health", timeout=5)
    assert health.status_code == 503
    (error,) = [line for line in logs.splitlines() if "ERROR" in line]
    assert "torch" in error and "mount an export directory" in error


def test_gpu_image_serves_on_the_cpu_without_a_gpu(
    docker: Docker, image: Any, deploy_exports: Path
) -> None:
    """The gpu image (onnxruntime-gpu, CUDA libraries from PyPI) on a host with no GPU serves
    with ONNX Runtime's CPU provider, and says so once at start."""
    with _serving_export(
        docker, image("gpu"), "cappy-deploy-test-gpu", deploy_exports
    ) as container:
        ready_s = container.wait_ready(READY_WITHIN_S)
        assert container.url is not None
        info = httpx.get(f"{container.url}/info", headers=AUTH, timeout=10).json()
        scores = _scores(container.url)
        logs = container.logs()
    FIGURES.append(f"gpu container (no GPU) ready {ready_s:.1f} s after docker run")
    runtime = json.dumps(info)
    assert '"device": "cpu"' in runtime and "CPUExecutionProvider" in runtime
    assert "CUDAExecutionProvider" not in runtime
    assert logs.count("ONNX Runtime has the CUDA provider but sees no GPU: serving on the CPU") == 1
    # The same engine on the host: ONNX Runtime fp32 on the CPU.
    serve_args = [f"API_KEYS={KEY}", "ENGINE=onnxruntime", "PRECISION=fp32"]
    with running_server(deploy_exports / "minilm", serve_args, api_key=KEY) as url:
        on_host = _scores(url)
    for key in ("score", "select", "rerank"):
        assert scores[key] == pytest.approx(on_host[key], abs=1e-5, rel=0), key
