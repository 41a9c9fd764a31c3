"""The run's subprocesses: commands with a time cap whose stdout and stderr go to files (a phase's
log), and the upstream servers (loadtests.transformers_upstream) started, waited for, watched
through their /stats, and stopped."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
INTERRUPT_GRACE_S = 15.0


class PhaseError(RuntimeError):
    """A phase's work failed; the message says how, for the report."""


def tail(path: Path, lines: int = 12) -> str:
    """The last `lines` lines of a log, joined with ' | ' (empty when there is none)."""
    with contextlib.suppress(OSError):
        text = path.read_text(encoding="utf-8", errors="replace")
        kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
        return " | ".join(kept)
    return ""


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Finished:
    """A command's end: exit status (None: killed at its cap), seconds, and its output files."""

    name: str
    returncode: int | None
    seconds: float
    stdout: Path
    log: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def stdout_text(self) -> str:
        return self.stdout.read_text(encoding="utf-8", errors="replace")

    def json_line(self) -> dict[str, Any] | None:
        """The last stdout line that parses as a JSON object (the cappy commands' summary)."""
        for line in reversed(self.stdout_text().splitlines()):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
        return None

    def describe(self) -> str:
        if self.returncode is None:
            return (
                f"{self.name}: stopped at its time cap after {self.seconds:.0f} s: {tail(self.log)}"
            )
        return f"{self.name}: exit {self.returncode}: {tail(self.log)}"


class Command:
    """One command started in the repository root, in its own process group, its stdout to
    LOG_DIR/NAME.out and its stderr to LOG_DIR/NAME.log."""

    def __init__(
        self, name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path = log_dir / f"{name}.out"
        self.log_path = log_dir / f"{name}.log"
        self.started = time.monotonic()
        with self.stdout_path.open("wb") as out, self.log_path.open("wb") as err:
            self.process = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=env or child_env(),
                stdout=out,
                stderr=err,
                start_new_session=True,
            )

    def finish(self, timeout_s: float) -> Finished:
        """Waits up to `timeout_s` (counted from the start); past it, SIGINT (the cappy commands
        keep every answer they received and exit), then SIGKILL after a grace period."""
        left = max(0.0, timeout_s - (time.monotonic() - self.started))
        try:
            code: int | None = self.process.wait(left)
        except subprocess.TimeoutExpired:
            self.stop()
            code = None
        return Finished(
            self.name, code, time.monotonic() - self.started, self.stdout_path, self.log_path
        )

    def stop(self, sig: int = signal.SIGINT) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(INTERRUPT_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def run(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    timeout_s: float,
    env: dict[str, str] | None = None,
) -> Finished:
    """`Command(...).finish(timeout_s)`."""
    return Command(name, argv, log_dir, env).finish(timeout_s)


def get_json(url: str, timeout_s: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (loopback)
        value = json.loads(response.read())
    if not isinstance(value, dict):
        raise ValueError(f"{url}: not a JSON object")
    return value


@dataclass
class Upstream:
    """One `python -m loadtests.transformers_upstream` process."""

    index: int
    port: int
    command: Command

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
            return get_json(self.url.removesuffix("/v1") + "/stats")
        return None


def upstream_command(
    python: str, source: Sequence[str], port: int, extra: Sequence[str]
) -> list[str]:
    return [
        python,
        "-m",
        "loadtests.transformers_upstream",
        *source,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]


def wait_ready(upstreams: Sequence[Upstream], timeout_s: float) -> float:
    """Seconds until every upstream answers `GET /v1/models`.

    Raises:
        PhaseError: one exited, or not all were ready within `timeout_s`.
    """
    started = time.monotonic()
    waiting = list(upstreams)
    while waiting:
        for upstream in list(waiting):
            code = upstream.command.process.poll()
            if code is not None:
                log = tail(upstream.command.log_path)
                raise PhaseError(f"upstream {upstream.index} exited with {code}: {log}")
            with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
                get_json(upstream.url + "/models", timeout_s=2.0)
                waiting.remove(upstream)
        if waiting and time.monotonic() - started > timeout_s:
            raise PhaseError(
                f"upstream(s) {[u.index for u in waiting]} not ready after {timeout_s:.0f} s: "
                + tail(waiting[0].command.log_path)
            )
        if waiting:
            time.sleep(0.5)
    return time.monotonic() - started


def stop_upstreams(upstreams: Sequence[Upstream]) -> None:
    for upstream in upstreams:
        if upstream.command.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(upstream.command.process.pid, signal.SIGTERM)
    for upstream in upstreams:
        try:
            upstream.command.process.wait(20)
        except subprocess.TimeoutExpired:
            upstream.command.stop(signal.SIGKILL)


@dataclass
class Monitor:
    """Polls the upstreams' /stats every `interval_s` while sampling runs: a progress line on
    stderr and the (seconds, rows answered) series the report keeps."""

    upstreams: Sequence[Upstream]
    interval_s: float = 15.0
    label: str = ""
    series: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def rows(self) -> int | None:
        counts = [s["batcher"]["rows"] for u in self.upstreams if (s := u.stats()) is not None]
        return sum(counts) if counts else None

    def __enter__(self) -> Monitor:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _loop(self) -> None:
        first = self.rows() or 0
        last_t, last_rows = 0.0, first
        while not self._stop.wait(self.interval_s):
            rows = self.rows()
            if rows is None:
                continue
            t = time.monotonic() - self._started
            self.series.append((round(t, 1), rows - first))
            rate = (rows - last_rows) / (t - last_t) if t > last_t else 0.0
            print(
                f"[adapt_gpu] {self.label}: {rows - first} samples in {t:.0f} s "
                f"({rate:.0f}/s lately)",
                file=sys.stderr,
                flush=True,
            )
            last_t, last_rows = t, rows
