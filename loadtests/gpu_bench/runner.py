"""The run: its state (workload, model, fp32 reference, report) and the figures every phase
reports, on loadtests.device_run's phase bookkeeping (budgets, --deadline, --skip, an error
recorded and the next phase run); `GpuBench.run` is the order of the phases, whose work is in
loadtests.gpu_bench.phases."""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtests.device_run import PhasedRun
from loadtests.gpu_bench import report
from loadtests.gpu_bench.agreement import score_agreement
from loadtests.gpu_bench.flops import flop_figures
from loadtests.gpu_bench.phases import cuda_tests, engine, peers, serve, setup
from loadtests.workload import load_workload

# Upper bounds per phase (seconds); --deadline shrinks the later ones when time runs short.
BUDGETS = {
    "checkpoint": 180.0,
    "export": 300.0,
    "reference": 90.0,
    "serve-start": 120.0,
    "serve": 60.0,
    "engine": 120.0,
    "peer-transformers": 90.0,
    "peer-crossencoder": 90.0,
    "peer-crossencoder-per-request": 60.0,
    "pytest": 120.0,
}


# A phase's work: fn(the run, its budget in seconds, its record), returning what later phases need.
Phase = Callable[["GpuBench", float, dict[str, Any]], Any]


class GpuBench(PhasedRun):
    """The phases, their budgets, and the report they fill."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, tool="gpu_bench", budgets=BUDGETS, gpu_index=args.gpu_index)
        self.requests_path = Path(args.requests).resolve()
        self.workload = load_workload(self.requests_path)
        self.model: dict[str, Any] | None = None
        self.reference: dict[str, list[float]] | None = None
        self.decisive: dict[str, int] | None = None
        self.report = self.new_report(
            workload={
                "path": str(self.requests_path),
                "requests": len(self.workload),
                "pairs": sum(len(r["candidates"]) for r in self.workload),
            },
            model=None,
            export=None,
            reference=None,
        )

    # -- bookkeeping

    def write_report(self) -> None:
        report.write(self.out, self.report)

    def record_seconds(self, record: dict[str, Any], seconds: float) -> None:
        record["seconds_total"] = round(seconds, 2)  # "seconds": the timed window (`figures`)

    def summary(self, record: dict[str, Any]) -> str:
        return report.summary_line(record)

    def phase(
        self,
        name: str,
        kind: str,
        fn: Phase,
        *,
        budget_key: str | None = None,
        needs: tuple[str, Any] | None = None,
    ) -> Any:
        """Runs `fn(self, budget_s, record)` as phase `name` of `kind` (`PhasedRun.run_phase`)."""
        return self.run_phase(
            name,
            functools.partial(fn, self),
            kind=kind,
            budget_key=budget_key,
            needs=needs,
        )

    def figures(
        self,
        record: dict[str, Any],
        *,
        requests: int,
        pairs: int,
        seconds: float,
        tokens: float | None,
        window: tuple[float, float],
        latency_ms: dict[str, Any] | None = None,
        scores: dict[str, list[float]] | None = None,
    ) -> None:
        """The common per-phase figures."""
        record.update(
            requests=requests,
            pairs=pairs,
            seconds=round(seconds, 3),
            pairs_per_s=round(pairs / seconds, 1) if seconds > 0 else None,
            latency_ms={"p50": (latency_ms or {}).get("p50"), "p99": (latency_ms or {}).get("p99")},
            tokens=int(tokens) if tokens else None,
            mean_tokens_per_pair=round(tokens / pairs, 1) if tokens and pairs else None,
            **flop_figures(self.model, tokens, pairs, seconds, self.args.peak_tflops),
        )
        record["_window"] = window
        if scores is not None and self.decisive is not None:
            record["argmax"] = score_agreement(scores, self.decisive, self.reference)

    def ungated(self) -> bool:
        """Whether the export was made with --parity record (served only when allowed)."""
        return (self.report.get("export") or {}).get("parity_mode") == "record"

    def max_length(self) -> int:
        return int((self.report.get("export") or {}).get("max_length") or 512)

    # -- the phases, in order

    def run(self) -> int:
        self.sampler.start()
        try:
            self.log(
                f"{len(self.workload)} requests from {self.requests_path}; work {self.work}; "
                f"report {self.out}"
            )
            checkpoint = self.phase("checkpoint", "setup", setup.build_checkpoint)
            needs_checkpoint = ("the checkpoint", checkpoint)
            export = self.phase("export", "setup", setup.export, needs=needs_checkpoint)
            self.phase("reference", "setup", setup.run_reference, needs=needs_checkpoint)
            serve.serve_phases(self, export)
            self.phase("engine", "engine", engine.run_engine, needs=("the export", export))
            peers.peer_phases(self, checkpoint)
            self.phase("pytest", "test", cuda_tests.run_pytest)
        finally:
            self.finish()
        failed = [p["name"] for p in self.report["phases"] if p["status"] == "error"]
        self.log(
            f"done in {time.monotonic() - self.started:.0f} s; "
            f"{self.out / 'gpu_bench.json'}; failed: {', '.join(failed) or 'none'}"
        )
        return 1 if failed else 0
