"""The run: its state (workload, model, fp32 reference, report), the phase bookkeeping (budgets,
--deadline, --skip, an error recorded and the next phase run) and the figures every phase
reports; `GpuBench.run` is the order of the phases, whose work is in loadtests.gpu_bench.phases."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtests.gpu_bench import report
from loadtests.gpu_bench.agreement import score_agreement
from loadtests.gpu_bench.environment import environment
from loadtests.gpu_bench.flops import flop_figures
from loadtests.gpu_bench.nvidia_smi import GpuSampler
from loadtests.gpu_bench.phases import cuda_tests, engine, peers, serve, setup
from loadtests.workload import load_workload

MIN_PHASE_S = 10.0
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


def log(message: str, started: float | None = None) -> None:
    """One progress line on stderr: wall-clock time, seconds since the start, the message."""
    since = f" +{time.monotonic() - started:.0f}s" if started is not None else ""
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}{since}] {message}", file=sys.stderr, flush=True)


def parse_budget(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or name not in BUDGETS:
        raise SystemExit(f"error: --budget {text!r}: expected PHASE=SECONDS, PHASE in {BUDGETS}")
    return name, float(value)


class GpuBench:
    """The phases, their budgets, and the report they fill."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.work = Path(args.work).resolve()
        self.out = Path(args.out).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.sampler = GpuSampler(args.gpu_index)
        self.budgets = {**BUDGETS, **dict(parse_budget(b) for b in args.budget)}
        self.requests_path = Path(args.requests).resolve()
        self.workload = load_workload(self.requests_path)
        self.model: dict[str, Any] | None = None
        self.reference: dict[str, list[float]] | None = None
        self.decisive: dict[str, int] | None = None
        self.report: dict[str, Any] = {
            "tool": "loadtests.gpu_bench",
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "dry_run": bool(args.dry_run),
            "config": dict(vars(args)),
            "workload": {
                "path": str(self.requests_path),
                "requests": len(self.workload),
                "pairs": sum(len(r["candidates"]) for r in self.workload),
            },
            "environment": environment(args.gpu_index),
            "model": None,
            "export": None,
            "reference": None,
            "phases": [],
        }

    # -- bookkeeping

    def log(self, message: str) -> None:
        log(message, self.started)

    def remaining(self) -> float:
        return self.args.deadline - (time.monotonic() - self.started)

    def write(self) -> None:
        self.report["wall_s"] = round(time.monotonic() - self.started, 1)
        report.write(self.out, self.report)

    def phase(
        self,
        name: str,
        kind: str,
        fn: Phase,
        *,
        budget_key: str | None = None,
        needs: tuple[str, Any] | None = None,
    ) -> Any:
        """Runs `fn(self, budget_s, record)` as phase `name`; an exception becomes the record's
        error."""
        record: dict[str, Any] = {"name": name, "kind": kind, "status": None}
        self.report["phases"].append(record)
        if name in self.args.skip or kind in self.args.skip:
            return self._skip(record, "skipped by --skip")
        if needs is not None and needs[1] is None:
            return self._skip(record, f"needs {needs[0]}, which is not there")
        remaining = self.remaining()
        if remaining < MIN_PHASE_S:
            return self._skip(record, f"out of time ({remaining:.0f} s left of --deadline)")
        budget = min(self.budgets[budget_key or name], remaining)
        record["budget_s"] = round(budget, 1)
        self.log(f"{name}: start (budget {budget:.0f} s)")
        t0, wall0 = time.monotonic(), time.time()
        result = None
        try:
            result = fn(self, budget, record)
            record["status"] = record.get("status") or "ok"
        except (Exception, SystemExit) as exc:  # SystemExit: local_server's readiness wait
            record["status"] = "error"
            record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        record["seconds_total"] = round(time.monotonic() - t0, 2)
        window = record.pop("_window", None) or (wall0, time.time())
        record["gpu"] = self.sampler.summary(*window)
        self.write()
        self.log(f"{name}: {record['status']} {report.summary_line(record)}")
        return result

    def _skip(self, record: dict[str, Any], reason: str) -> None:
        record.update(status="skipped", error=reason)
        self.write()
        self.log(f"{record['name']}: skipped ({reason})")
        return None

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
            self.sampler.stop()
            self.report["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            self.write()
        failed = [p["name"] for p in self.report["phases"] if p["status"] == "error"]
        self.log(
            f"done in {time.monotonic() - self.started:.0f} s; "
            f"{self.out / 'gpu_bench.json'}; failed: {', '.join(failed) or 'none'}"
        )
        return 1 if failed else 0
