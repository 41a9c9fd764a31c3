"""What the report says about the machine: GPU, CPU, python and package versions."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path
from typing import Any

from loadtests.gpu_bench.nvidia_smi import describe_gpu

VERSIONED = (
    "torch",
    "transformers",
    "tokenizers",
    "sentence-transformers",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "numpy",
    "httpx",
    "fastapi",
    "uvicorn",
    "pydantic",
)


def environment(gpu_index: int) -> dict[str, Any]:
    """Device, CPU and package versions, without importing the packages."""
    versions: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    spec = importlib.util.find_spec("onnxruntime")
    gpu = describe_gpu(gpu_index)
    cpu = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "gpu": gpu,
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime_module": spec.origin if spec is not None else None,
        "versions": versions,
    }
