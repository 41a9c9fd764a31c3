"""Running a command-line tool from a test: its text output captured, and the test failed with
that output unless the tool exits 0."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from typing import Any


def run_ok(
    args: Sequence[str], *, timeout: float, **options: Any
) -> subprocess.CompletedProcess[str]:
    """Runs `args` (with subprocess.run's `options`, e.g. cwd, env) and returns the finished
    process; fails the test, showing stdout and stderr, when it exits non-zero."""
    done = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, check=False, **options
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done
