"""`cappy serve` as an operator runs it: a real process on a loopback port, a checkpoint
exported once into the cache and reused, SIGTERM draining accepted work before a zero exit, and
what the graceful shutdown could not finish answered 503."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.support.servers import serving

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(
    model: str, cache: Path, port: int, log: Path, **env_extra: str
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CAPPY_ENGINE": "onnxruntime", **env_extra}
    command = [
        sys.executable,
        "-m",
        "cappy",
        "serve",
        "--model",
        model,
        "--port",
        str(port),
        "--cache-dir",
        str(cache),
        "--log-level",
        "warning",
    ]
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)


def _wait_ready(process: subprocess.Popen[bytes], base: str, log: Path) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"serve exited {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"never ready: {log.read_text()[-2000:]}")


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout=10)


def test_checkpoint_exported_once_and_sigterm_drains(tiny_checkpoint: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    process = _start(str(tiny_checkpoint), cache, port, tmp_path / "first.log")
    try:
        _wait_ready(process, base, tmp_path / "first.log")
        exports = list(cache.glob("[!.]*"))  # the export; its lock file is hidden
        assert len(exports) == 1 and (exports[0] / "cappy_export.json").is_file()
        # A large request in flight when SIGTERM arrives is still answered.
        result: dict[str, httpx.Response] = {}
        payload = {
            "instruction": "q " * 50,
            "candidates": [f"answer {i} " * 40 for i in range(800)],
        }
        answered_at: list[float] = []

        def call() -> None:
            result["r"] = httpx.post(f"{base}/select", json=payload, timeout=120)
            answered_at.append(time.monotonic())

        caller = threading.Thread(target=call)
        caller.start()
        _until(lambda: _queued_pairs(base) > 0, "the request is queued")
        process.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        caller.join(timeout=120)
        assert result["r"].status_code == 200, result["r"].text
        assert len(result["r"].json()["ranking"]) == 800
        assert answered_at[0] > signalled_at, "the request must have been in flight at SIGTERM"
        assert process.wait(timeout=60) == 0  # drained cleanly: a zero exit
    finally:
        _stop(process)
    # The second start reuses the cached export (same directory, nothing new written).
    mtime = (exports[0] / "cappy_export.json").stat().st_mtime_ns
    second = _start(str(tiny_checkpoint), cache, port, tmp_path / "second.log")
    try:
        _wait_ready(second, base, tmp_path / "second.log")
        assert list(cache.glob("[!.]*")) == exports
        assert (exports[0] / "cappy_export.json").stat().st_mtime_ns == mtime
        info = httpx.get(f"{base}/info", timeout=10).json()
        assert info["model"] == tiny_checkpoint.name
        # Real HTTP, as curl sends it: a lone surrogate is a 400 naming the field, not a 500.
        bad = httpx.post(
            f"{base}/select",
            content=rb'{"instruction": "x\ud800y", "candidates": ["a"]}',
            headers={"content-type": "application/json"},
            timeout=10,
        )
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["param"] == "instruction"
    finally:
        assert _stop(second) == 0


def test_unusable_model_is_a_clear_error(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cappy",
            "serve",
            "--model",
            str(tmp_path / "missing"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 1
    assert "no such directory" in done.stderr
    assert "Traceback" not in done.stderr


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Polls `condition` until it holds (a test waits for an event, never a fixed time)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def _queued_pairs(base: str) -> float:
    """The server's `cappy_queue_pairs` gauge."""
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("cappy_queue_pairs "):
            return float(line.split()[1])
    return 0.0


class _SlowUpstream(BaseHTTPRequestHandler):
    """An OpenAI-compatible upstream that takes `delay_s` to answer anything; `seen` holds the
    last message of every call that reached it."""

    delay_s = 20.0
    seen: set[str] = set()

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        request = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        messages = request.get("messages") or [{"content": request.get("prompt")}]
        _SlowUpstream.seen.add(str(messages[-1]["content"]))
        time.sleep(self.delay_s)
        body = json.dumps(
            {"choices": [{"index": 0, "message": {"role": "assistant", "content": "late"}}]}
        ).encode()
        try:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the proxy gave up on us

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def slow_upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowUpstream)
    server.daemon_threads = True
    with serving(server) as root:
        yield f"{root}/v1"


def test_requests_past_the_graceful_shutdown_get_503(
    tiny_export: Path, slow_upstream: str, tmp_path: Path
) -> None:
    """Requests still running when CAPPY_GRACEFUL_SHUTDOWN_S ends (here: waiting on a slow
    upstream) are answered 503 in the error envelope, not uvicorn's plain-text 500, and the
    process still exits 0."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    process = _start(
        str(tiny_export),
        tmp_path / "cache",
        port,
        log,
        CAPPY_GRACEFUL_SHUTDOWN_S="1",
        CAPPY_UPSTREAM_BASE_URL=slow_upstream,
        CAPPY_UPSTREAM_MAX_ATTEMPTS="1",
    )
    try:
        _wait_ready(process, base, log)
        answers: dict[str, httpx.Response] = {}

        def chat(text: str, **extra: object) -> dict[str, object]:
            return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}

        def call(name: str, body: dict[str, object]) -> None:
            answers[name] = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)

        _SlowUpstream.seen.clear()
        callers = [
            threading.Thread(target=call, args=("plain", chat("plain"))),
            threading.Thread(target=call, args=("stream", chat("stream", stream=True))),
        ]
        for caller in callers:
            caller.start()
        _until(lambda: {"plain", "stream"} <= _SlowUpstream.seen, "both reach the upstream")
        process.send_signal(signal.SIGTERM)
        for caller in callers:
            caller.join(timeout=60)
        assert process.wait(timeout=60) == 0
    finally:
        _stop(process)
    for name in ("plain", "stream"):
        response = answers[name]
        assert response.status_code == 503, (name, response.text)
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "shutting_down"
        assert int(response.headers["retry-after"]) > 0
    output = log.read_text()
    assert "Traceback" not in output and "Exception in ASGI application" not in output
