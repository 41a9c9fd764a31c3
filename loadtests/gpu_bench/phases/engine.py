"""The engine phase: loadtests.engine_bench in its own process on the same export (ONNX Runtime,
fp16 on CUDA), with the service's batch limits."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

from loadtests.gpu_bench.processes import run_json, worker_env
from service.defaults import DEVICE_BATCH_LIMITS

if TYPE_CHECKING:
    from loadtests.gpu_bench.runner import GpuBench


def run_engine(bench: GpuBench, budget: float, record: dict[str, Any]) -> None:
    export = bench.report["export"]["directory"]
    scores_path = bench.work / "engine_scores.json"
    cuda = bench.args.device == "cuda"
    command = [
        sys.executable,
        "-m",
        "loadtests.engine_bench",
        *(["--allow-ungated"] if bench.ungated() else []),
        "--export",
        export,
        "--requests",
        str(bench.requests_path),
        "--engine",
        "onnxruntime",
        "--device",
        bench.args.device,
        "--precision",
        "fp16" if cuda else "fp32",
        "--max-batch-tokens",
        str(bench.args.engine_batch_tokens or DEVICE_BATCH_LIMITS["cuda" if cuda else "cpu"][0]),
        "--max-batch-size",
        str(256 if cuda else 64),
        "--seq-multiple",
        "8",
        "--no-verify",
        "--write-scores",
        str(scores_path),
    ]
    if bench.args.engine_limit:
        command += ["--limit", str(bench.args.engine_limit)]
    figures, arrived = run_json(command, budget, worker_env(0))
    scores = json.loads(scores_path.read_text(encoding="utf-8"))
    # engine_bench prints right after its timed loop: that loop is the window before the line.
    bench.figures(
        record,
        requests=figures["requests"],
        pairs=figures["pairs"],
        seconds=figures["seconds"],
        tokens=figures["tokens_per_pair"] * figures["pairs"],
        window=(arrived - figures["seconds"] - 0.2, arrived),
        scores=scores,
    )
    record["detail"] = figures
