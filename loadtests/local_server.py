"""`cappy serve` as a subprocess on a free loopback port, for as long as a benchmark needs it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

READY_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_env(serve_args: Sequence[str], base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for `cappy serve`: `KEY=VALUE` -> `CAPPY_KEY=VALUE` (any Settings field)."""
    env = dict(os.environ if base is None else base)
    for arg in serve_args:
        key, sep, value = arg.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: --serve-arg {arg!r}: expected KEY=VALUE")
        env["CAPPY_" + key.strip().upper().replace("-", "_")] = value
    return env


@contextlib.contextmanager
def running_server(
    export: str | Path,
    serve_args: Sequence[str],
    *,
    ready_timeout_s: float = READY_TIMEOUT_S,
    api_key: str | None = None,
    server: Sequence[str] | None = None,
) -> Iterator[str]:
    """Starts `cappy serve` on a free loopback port, yields its URL once /ready answers 200, and
    stops it with SIGTERM (SIGKILL if it has not exited after STOP_TIMEOUT_S).

    `server` replaces the `python -m cappy.cli serve` prefix of the command (tests use a fake).
    """
    port = free_port()
    env = serve_env(serve_args)
    env.setdefault("CAPPY_LOG_LEVEL", "warning")
    prefix = list(server) if server else [sys.executable, "-m", "cappy.cli", "serve"]
    command = [*prefix, "--model", str(export), "--host", "127.0.0.1", "--port", str(port)]
    log = tempfile.NamedTemporaryFile("w+", prefix="cappy-serve-", suffix=".log", delete=False)
    process = subprocess.Popen(
        command,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[1],
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log.name, ready_timeout_s, api_key)
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()
        # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully: -SIGTERM
        # after our SIGTERM is a clean exit too.
        if process.returncode in (0, -signal.SIGTERM):
            Path(log.name).unlink(missing_ok=True)
        else:
            print(f"cappy serve exited with {process.returncode}; log: {log.name}", file=sys.stderr)


def _wait_ready(
    url: str, process: subprocess.Popen[Any], log: str, timeout_s: float, api_key: str | None
) -> None:
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, timeout=5.0, headers=headers) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = Path(log).read_text(encoding="utf-8", errors="replace")[-3000:]
                raise SystemExit(f"error: cappy serve exited with {process.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                response = client.get("/ready")
                if response.status_code == 200:
                    return
                if response.status_code == 503 and client.get("/health").status_code == 503:
                    tail = Path(log).read_text(encoding="utf-8", errors="replace")[-3000:]
                    raise SystemExit(f"error: the model failed to load:\n{tail}")
            time.sleep(0.25)
    raise SystemExit(f"error: cappy serve not ready after {timeout_s:.0f} s (log: {log})")
