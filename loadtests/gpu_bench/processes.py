"""The subprocesses of the run: each phase's command runs in its own process group, killed at its
budget, and answers one JSON line on stdout; torch work runs as `python -m loadtests.gpu_bench
worker KIND` so that it frees the GPU when it ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


class PhaseError(RuntimeError):
    """A phase's subprocess failed or ran out of time."""


def run_json(
    command: Sequence[str], timeout_s: float, env: dict[str, str] | None = None
) -> tuple[dict[str, Any], float]:
    """Runs `command` in the repo root, its stderr passed through; returns its last stdout line
    that parses as a JSON object and the unix time that line arrived. Killed (its whole process
    group) at `timeout_s`."""
    process = subprocess.Popen(
        list(command),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[tuple[float, str]] = []
    tail: list[str] = []

    def read_stdout() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append((time.time(), line))

    def pass_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip())
            del tail[:-15]

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stdout, pass_stderr)]
    for reader in readers:
        reader.start()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise PhaseError(f"timed out after {timeout_s:.0f} s") from None
    finally:
        for reader in readers:
            reader.join(5)
    if process.returncode != 0:
        raise PhaseError(f"exit {process.returncode}: " + " | ".join(tail[-6:]))
    for arrived, line in reversed(lines):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value, arrived
    raise PhaseError("no JSON line on stdout: " + " | ".join(tail[-6:]))


def worker_env(threads: int) -> dict[str, str]:
    """The environment of a peer: its CPU thread pools sized to `threads` (0: untouched)."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if threads > 0:
        for name in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(threads)
        env["TOKENIZERS_PARALLELISM"] = "true"
    return env


def worker_command(kind: str) -> list[str]:
    return [sys.executable, "-m", "loadtests.gpu_bench", "worker", kind]
