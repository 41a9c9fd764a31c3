"""loadtests.truth_check on a tiny base: every setting trained with the held-out stop, the
per-task table from the kept export, and a second run that only reads what is there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests.truth_check import TARGET, main


@pytest.mark.slow
def test_two_settings_report_ground_truth_above_mismatch(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "dev.jsonl"
    rows = [
        {
            "id": f"t{t}-{i}",
            "task": f"task{t}",
            "split": "train",
            "instruction": f"Task {t}: repeat the word number {i}",
            "targets": [f"word {i} of task {t}"],
        }
        for t in range(2)
        for i in range(10)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    work = tmp_path / "work"
    argv = [
        "--data", str(data), "--base", str(tiny_checkpoint), "--work", str(work),
        "--setting", "plain=", "--setting", "head=--head-lr 1e-2",
        "--", "--steps", "2", "--effective-batch", "8", "--micro-batch", "8",
        "--eval-steps", "1", "--no-fp16",
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((work / "report.json").read_text())
    assert report["target"] == TARGET and set(report["settings"]) == {"plain", "head"}
    for found in report["settings"].values():
        held = found["held_out"]
        assert held["examples"] == 2 and set(held["tasks"]) == {"task0", "task1"}
        assert 0.0 <= held["overall"] <= 1.0
        assert found["best"]["gt_accuracy"] == pytest.approx(held["overall"], abs=1e-4)
    assert report["settings"]["head"]["flags"][-2:] == ["--head-lr", "1e-2"]
    markdown = (work / "report.md").read_text()
    assert "| plain |" in markdown and "| task1 |" in markdown
    assert "| plain |" in capsys.readouterr().out
    commands = (work / "commands.log").read_text()
    assert main(argv) == 0  # everything is there: nothing runs again
    assert (work / "commands.log").read_text() == commands
