"""loadtests/device_run.py: the run defaults, --budget, and the phases' bookkeeping."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from loadtests.device_run import PhasedRun, RunDefaults, parse_budget

BUDGETS = {"first": 60.0, "second": 30.0}


class _Run(PhasedRun):
    def __init__(self, tmp_path: Path, **flags: Any) -> None:
        args = argparse.Namespace(
            work=str(tmp_path / "work"),
            out=str(tmp_path / "out"),
            dry_run=True,
            deadline=100.0,
            budget=[],
            skip=[],
        )
        vars(args).update(flags)
        super().__init__(args, tool="test_run", budgets=BUDGETS, gpu_index=0)
        self.report = self.new_report(extra=1)
        self.writes = 0

    def write_report(self) -> None:
        self.writes += 1

    def record_seconds(self, record: dict[str, Any], seconds: float) -> None:
        record["seconds"] = seconds

    def summary(self, record: dict[str, Any]) -> str:
        return str(record.get("error", ""))


def _fail(_budget: float, _record: dict[str, Any]) -> None:
    raise ValueError("broken")


def test_run_defaults_fill_only_unset_flags() -> None:
    defaults = RunDefaults({"size": "large", "deadline": 600.0}, {"size": "tiny", "deadline": 60.0})
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--work", default="w")
    parser.add_argument("--out", default=None)
    defaults.add(parser, "--size", "the model")
    defaults.add(parser, "--deadline", type=float)
    assert "the model (default large; dry run tiny)" in parser.format_help()
    args = parser.parse_args(["--dry-run", "--deadline", "5"])
    defaults.fill(args)
    assert (args.size, args.deadline, args.out) == ("tiny", 5.0, str(Path("w") / "report"))


def test_budget_overrides_are_checked() -> None:
    assert parse_budget("second=5", BUDGETS) == ("second", 5.0)
    for text in ("second", "third=5"):
        with pytest.raises(SystemExit, match="--budget"):
            parse_budget(text, BUDGETS)


def test_a_failed_phase_is_recorded_and_the_next_runs(tmp_path: Path) -> None:
    run = _Run(tmp_path, budget=["second=5"])
    assert run.run_phase("first", _fail) is None
    assert run.run_phase("second", lambda budget, _record: budget) == 5.0
    first, second = run.report["phases"]
    assert first["status"] == "error" and first["error"] == "ValueError: broken"
    assert second["status"] == "ok" and second["budget_s"] == 5.0 and "gpu" in second
    assert run.report["tool"] == "loadtests.test_run" and run.report["extra"] == 1
    assert run.writes == 2


def test_skipped_phases_say_why(tmp_path: Path) -> None:
    run = _Run(tmp_path, skip=["first", "peer"])
    run.run_phase("first", _fail)
    run.run_phase("second", _fail, kind="peer")
    run.run_phase("second", _fail, needs=("the first's output", None))
    reasons = [(p["status"], p["error"]) for p in run.report["phases"]]
    assert reasons == [
        ("skipped", "skipped by --skip"),
        ("skipped", "skipped by --skip"),
        ("skipped", "needs the first's output, which is not there"),
    ]
    assert run.report["phases"][1]["kind"] == "peer" and "kind" not in run.report["phases"][0]


def test_out_of_time_skips_all_but_work_started_earlier(tmp_path: Path) -> None:
    run = _Run(tmp_path, deadline=5.0)
    run.run_phase("first", _fail)
    assert run.report["phases"][0]["status"] == "skipped"
    assert "left of --deadline" in run.report["phases"][0]["error"]
    assert run.run_phase("second", lambda _b, _r: "done", started_earlier=True) == "done"
