"""The served phases: `cappy serve` on a free loopback port (serve-start), then the closed loop
of loadtests.closed_loop at each --concurrency level (serve-cN) against it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtests.closed_loop import benchmark
from loadtests.local_server import running_server

if TYPE_CHECKING:
    from loadtests.gpu_bench.runner import GpuBench


def int_list(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]."""
    return [int(part) for part in text.split(",") if part.strip()]


def serve_phases(bench: GpuBench, export: Path | None) -> None:
    levels = int_list(bench.args.concurrency)
    limits = int_list(bench.args.limits)
    if len(limits) != len(levels):
        raise SystemExit("error: --limits needs one value per --concurrency level")
    serve_args = [f"device={bench.args.device}", *bench.args.serve_arg]
    if bench.ungated():
        serve_args.insert(1, "allow_ungated=true")
    with contextlib.ExitStack() as stack:

        def start(_bench: GpuBench, budget: float, record: dict[str, Any]) -> str:
            url = stack.enter_context(
                running_server(export, serve_args, ready_timeout_s=budget)  # type: ignore[arg-type]
            )
            record.update(url=url, serve_args=serve_args)
            return url

        url = bench.phase("serve-start", "serve", start, needs=("the export", export))
        for level, limit in zip(levels, limits, strict=True):
            bench.phase(
                f"serve-c{level}",
                "serve",
                lambda bench, budget, record, c=level, n=limit: run_serve(
                    bench, url, c, n, budget, record
                ),
                budget_key="serve",
                needs=("a ready server", url),
            )
        bench.log("stopping the server")


def run_serve(
    bench: GpuBench, url: str, concurrency: int, limit: int, budget: float, record: dict[str, Any]
) -> None:
    count = min(limit, len(bench.workload)) if limit > 0 else len(bench.workload)
    duration = max(1.0, min(bench.args.phase_seconds, budget - 5.0))
    figures = asyncio.run(
        benchmark(
            url,
            bench.workload,
            concurrency=concurrency,
            limit=count,
            duration_s=duration,
            warmup=bench.args.warmup,
            reference=bench.decisive,
        )
    )
    ended = time.time()
    server = figures.get("server") or {}
    bench.figures(
        record,
        requests=figures["requests"],
        pairs=figures["pairs"],
        seconds=figures["seconds"],
        tokens=server.get("tokens_scored"),
        window=(ended - figures["seconds"], ended),
        latency_ms=figures["latency_ms"],
    )
    argmax = figures.get("argmax")
    if argmax is not None:
        record["argmax"] = {
            "agreement": argmax.get("agreement"),
            "compared": argmax.get("compared"),
        }
    record.update(
        concurrency=concurrency, limit=count, duration_cap_s=duration, errors=figures["errors"]
    )
    record["detail"] = figures
