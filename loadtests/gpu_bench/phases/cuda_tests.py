"""The pytest phase: the CUDA tests, `pytest -m gpu tests/unit/engine` (with --device cuda only)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from typing import TYPE_CHECKING, Any

from loadtests.gpu_bench.processes import ROOT, PhaseError, worker_env

if TYPE_CHECKING:
    from loadtests.gpu_bench.runner import GpuBench


def run_pytest(bench: GpuBench, budget: float, record: dict[str, Any]) -> None:
    if bench.args.device != "cuda":
        record.update(status="skipped", error="the CUDA tests run with --device cuda only")
        return
    if importlib.util.find_spec("pytest") is None:
        record.update(status="skipped", error="pytest is not installed for this python")
        return
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/unit/engine", "-q"]
    command += ["-p", "no:cacheprovider"]
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=worker_env(0),
            capture_output=True,
            text=True,
            timeout=budget,
        )
    except subprocess.TimeoutExpired as exc:
        raise PhaseError(f"timed out after {budget:.0f} s") from exc
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    record.update(command=" ".join(command[1:]), returncode=done.returncode)
    record["summary"] = lines[-1] if lines else done.stderr.strip()[-300:]
    record["output_tail"] = lines[-15:]
    if done.returncode != 0:
        raise PhaseError(f"pytest exit {done.returncode}: {record['summary']}")
