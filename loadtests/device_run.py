"""What the one-command device runs (loadtests.gpu_bench, loadtests.adapt_gpu) share: the flags
whose default depends on --dry-run, --out, --deadline, --budget and --skip; `PhasedRun`, the
phases' bookkeeping (each phase under its time cap, `--deadline` over the whole, a failure
recorded and the next phase run, the GPU sampled, the report rewritten after every phase, one
progress line on stderr per phase event); and the report's files and Markdown table helpers.
Each run keeps its own phases, defaults and texts."""

from __future__ import annotations

import abc
import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.gpu_bench.environment import environment
from loadtests.gpu_bench.nvidia_smi import GpuSampler

# A phase with less time than this left of --deadline is skipped, not started.
MIN_PHASE_S = 10.0
ERROR_CHARS = 3000  # of an error message kept in the report

# -- the command line


def run_parser(prog: str, description: str | None, dry_run_help: str) -> argparse.ArgumentParser:
    """The parser a run starts from: its package's docstring as the description, and --dry-run."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help=dry_run_help)
    return parser


def add_out_flag(parser: argparse.ArgumentParser, contents: str) -> None:
    """--out, the report's directory (`RunDefaults.fill` makes it WORK/report)."""
    parser.add_argument("--out", default=None, help=f"where {contents} go (default: WORK/report)")


@dataclass(frozen=True)
class RunDefaults:
    """The flags whose default is the GPU run's (`full`) or the dry run's (`dry`)."""

    full: dict[str, Any]
    dry: dict[str, Any]

    def add(
        self, parser: argparse.ArgumentParser, flag: str, text: str = "", **options: Any
    ) -> None:
        """A flag that parses to None when not given, and `fill` fills in; its help names both
        defaults."""
        key = flag.removeprefix("--").replace("-", "_")
        defaults = f"(default {self.full[key]}; dry run {self.dry[key]})"
        parser.add_argument(
            flag, default=None, help=f"{text} {defaults}" if text else defaults, **options
        )

    def fill(self, args: argparse.Namespace) -> None:
        """Sets the unset flags from the GPU run's or the dry run's defaults, and --out to
        WORK/report."""
        for key, value in (self.dry if args.dry_run else self.full).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        if args.out is None:
            args.out = str(Path(args.work) / "report")


def add_phase_flags(
    parser: argparse.ArgumentParser,
    defaults: RunDefaults,
    budgets: dict[str, float],
    skip_help: str,
) -> None:
    """--deadline (a run default), --budget and --skip."""
    defaults.add(
        parser,
        "--deadline",
        "seconds for the whole run; later phases shrink or are skipped",
        type=float,
    )
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="PHASE=SECONDS",
        help=f"override a phase's time cap (repeatable); phases and defaults: {budgets}",
    )
    parser.add_argument("--skip", action="append", default=[], metavar="PHASE", help=skip_help)


def parse_budget(text: str, budgets: dict[str, float]) -> tuple[str, float]:
    """`PHASE=SECONDS` of --budget, PHASE one of `budgets`."""
    name, sep, value = text.partition("=")
    if not sep or name not in budgets:
        raise SystemExit(f"error: --budget {text!r}: expected PHASE=SECONDS, PHASE in {budgets}")
    return name, float(value)


# -- the run


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# A phase's work: fn(its budget in seconds, its record), returning what later phases need.
PhaseFn = Callable[[float, dict[str, Any]], Any]


class PhasedRun(abc.ABC):
    """The phases' bookkeeping: the budgets (`budgets` overridden by --budget, shrunk by
    --deadline), --skip, the GPU sampler, and the report (`new_report`) with one record a phase.
    A run says where its report goes (`write_report`), how a phase's time is recorded
    (`record_seconds`) and what its progress line says of a finished phase (`summary`)."""

    def __init__(
        self, args: argparse.Namespace, *, tool: str, budgets: dict[str, float], gpu_index: int
    ) -> None:
        self.args = args
        self.tool = tool
        self.started = time.monotonic()
        self.work = Path(args.work).resolve()
        self.out = Path(args.out).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.budgets = {**budgets, **dict(parse_budget(b, budgets) for b in args.budget)}
        self.gpu_index = gpu_index
        self.sampler = GpuSampler(gpu_index)
        self.report: dict[str, Any] = {}

    @abc.abstractmethod
    def write_report(self) -> None:
        """Writes `self.report` into `self.out`."""

    @abc.abstractmethod
    def record_seconds(self, record: dict[str, Any], seconds: float) -> None:
        """Puts a finished phase's `seconds` (its whole time) in its record."""

    @abc.abstractmethod
    def summary(self, record: dict[str, Any]) -> str:
        """What the progress line says of a finished phase after its status."""

    def new_report(self, **fields: Any) -> dict[str, Any]:
        """The report's head (tool, start, config, machine), `fields`, and the empty phases."""
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.args).items()}
        return {
            "tool": f"loadtests.{self.tool}",
            "started_at": utc_now(),
            "dry_run": bool(self.args.dry_run),
            "config": config,
            "environment": environment(self.gpu_index),
            **fields,
            "phases": [],
        }

    def log(self, message: str) -> None:
        """One progress line on stderr: wall-clock time, seconds since the start, the message."""
        print(
            f"[{self.tool} {time.strftime('%H:%M:%S')} +{time.monotonic() - self.started:.0f}s] "
            f"{message}",
            file=sys.stderr,
            flush=True,
        )

    def remaining(self) -> float:
        return self.args.deadline - (time.monotonic() - self.started)

    def budget(self, key: str) -> float:
        return min(self.budgets[key], self.remaining())

    def write(self) -> None:
        self.report["wall_s"] = round(time.monotonic() - self.started, 1)
        self.write_report()

    def run_phase(
        self,
        name: str,
        fn: PhaseFn,
        *,
        kind: str | None = None,
        budget_key: str | None = None,
        needs: tuple[str, Any] | None = None,
        started_earlier: bool = False,
    ) -> Any:
        """Runs `fn(budget_s, record)` as phase `name` (of `kind`, which --skip takes too; its cap
        BUDGETS[`budget_key` or `name`]); an exception becomes the record's error and the result
        None. `needs` (what, value): skipped when value is None. A phase whose work
        `started_earlier` (under its own cap) is finished even past the deadline. The phase's GPU
        figures cover record["_window"] (unix times) where fn sets it, else its whole time."""
        record: dict[str, Any] = {"name": name}
        if kind is not None:
            record["kind"] = kind
        record["status"] = None
        self.report["phases"].append(record)
        if name in self.args.skip or kind in self.args.skip:
            return self._skip(record, "skipped by --skip")
        if needs is not None and needs[1] is None:
            return self._skip(record, f"needs {needs[0]}, which is not there")
        remaining = self.remaining()
        if remaining < MIN_PHASE_S and not started_earlier:
            return self._skip(record, f"out of time ({remaining:.0f} s left of --deadline)")
        budget = self.budget(budget_key or name)
        record["budget_s"] = round(budget, 1)
        self.log(f"{name}: start (budget {budget:.0f} s)")
        t0, wall0 = time.monotonic(), time.time()
        result = None
        try:
            result = fn(budget, record)
            record["status"] = record.get("status") or "ok"
        except (Exception, SystemExit) as exc:  # SystemExit: local_server's readiness wait
            record["status"] = "error"
            record["error"] = f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]
        self.record_seconds(record, time.monotonic() - t0)
        window = record.pop("_window", None) or (wall0, time.time())
        record["gpu"] = self.sampler.summary(*window)
        self.write()
        self.log(f"{name}: {record['status']} {self.summary(record)}")
        return result

    def _skip(self, record: dict[str, Any], reason: str) -> None:
        record.update(status="skipped", error=reason)
        self.write()
        self.log(f"{record['name']}: skipped ({reason})")
        return None

    def finish(self) -> None:
        """The run's end: the sampler stopped, the report's last rewrite."""
        self.sampler.stop()
        self.report["finished_at"] = utc_now()
        self.write()


# -- the report


def save_report(out: Path, name: str, report: dict[str, Any], markdown: str) -> None:
    """`report` as out/NAME.json (replaced whole, never half-written) and `markdown` as
    out/NAME.md."""
    path = out / f"{name}.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    partial.replace(path)
    (out / f"{name}.md").write_text(markdown, encoding="utf-8")


def cell(value: Any, fmt: str = "{}") -> str:
    """A table cell: `value` formatted, empty for None."""
    return "" if value is None else fmt.format(value)


def table_row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def machine_lines(env: dict[str, Any], device: str) -> list[str]:
    """The report's lines on the machine (`environment`'s), `device` naming its GPU."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v is not None)
    return [
        f"- GPU: {device}; CPU {env.get('cpu')} x{env.get('cores')}; python {env.get('python')}",
        f"- versions: {versions}",
    ]
