"""nvidia-smi: the GPU's description, and its utilisation and memory sampled in the background
for the whole run (each phase averages the samples of its own timed window)."""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import statistics
import subprocess
import threading
from typing import Any


def query(gpu_index: int, fields: str) -> list[str]:
    """The nvidia-smi command that prints `fields` of GPU `gpu_index` as bare CSV."""
    return [
        "nvidia-smi",
        f"--id={gpu_index}",
        f"--query-gpu={fields}",
        "--format=csv,noheader,nounits",
    ]


def describe_gpu(gpu_index: int) -> dict[str, Any] | None:
    """{name, driver, memory_mib} of the GPU; None without nvidia-smi or when it fails."""
    gpu = None
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            line = subprocess.run(
                query(gpu_index, "name,driver_version,memory.total"),
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
            name, driver, memory = (p.strip() for p in line.split(",")[:3])
            gpu = {"name": name, "driver": driver, "memory_mib": float(memory)}
    return gpu


def parse_gpu_sample(line: str) -> tuple[float, float, float] | None:
    """`2026/11/29 20:27:01.123, 87, 40213` -> (unix time, utilisation %, memory MiB)."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 3:
        return None
    try:
        stamp = dt.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        return stamp, float(parts[1]), float(parts[2])
    except ValueError:
        return None


class GpuSampler:
    """`nvidia-smi ... -lms 200` in the background for the whole run; each phase averages the
    samples of its own timed window. Without nvidia-smi every figure is None."""

    def __init__(self, gpu_index: int, interval_ms: int = 200) -> None:
        self.command = [
            *query(gpu_index, "timestamp,utilization.gpu,memory.used"),
            "-lms",
            str(interval_ms),
        ]
        self.samples: list[tuple[float, float, float]] = []
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> GpuSampler:
        executable = shutil.which("nvidia-smi")
        if executable is None:
            return self
        self._process = subprocess.Popen(
            [executable, *self.command[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            sample = parse_gpu_sample(line)
            if sample is not None:
                self.samples.append(sample)

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._reader is not None:
            self._reader.join(5)
        self._process = None

    def summary(self, start: float, end: float) -> dict[str, Any]:
        """Mean utilisation and peak memory over [start, end] (unix seconds)."""
        window = [s for s in list(self.samples) if start <= s[0] <= end]
        if self._process is None and not self.samples:
            return {"util_mean": None, "mem_max_mib": None, "samples": 0}
        return {
            "util_mean": round(statistics.fmean(s[1] for s in window), 1) if window else None,
            "mem_max_mib": max(s[2] for s in window) if window else None,
            "samples": len(window),
        }
