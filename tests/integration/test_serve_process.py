"""`cappy serve` as an operator runs it: a real process on a loopback port, a checkpoint
exported once into the cache and reused, and SIGTERM draining accepted work before exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(model: str, cache: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CAPPY_ENGINE": "onnxruntime"}
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


# uvicorn shuts down gracefully, then re-raises the signal it caught: -SIGTERM is a clean exit.
CLEAN_EXIT = {0, -signal.SIGTERM}


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
        exports = list(cache.iterdir())
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
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        caller.join(timeout=120)
        assert result["r"].status_code == 200, result["r"].text
        assert len(result["r"].json()["ranking"]) == 800
        assert answered_at[0] > signalled_at, "the request must have been in flight at SIGTERM"
        assert process.wait(timeout=60) in CLEAN_EXIT
    finally:
        _stop(process)
    # The second start reuses the cached export (same directory, nothing new written).
    mtime = (exports[0] / "cappy_export.json").stat().st_mtime_ns
    second = _start(str(tiny_checkpoint), cache, port, tmp_path / "second.log")
    try:
        _wait_ready(second, base, tmp_path / "second.log")
        assert list(cache.iterdir()) == exports
        assert (exports[0] / "cappy_export.json").stat().st_mtime_ns == mtime
        info = httpx.get(f"{base}/info", timeout=10).json()
        assert info["model"] == tiny_checkpoint.name
    finally:
        assert _stop(second) in CLEAN_EXIT


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
