"""`cappy adapt data|train` and `cappy eval` as a user runs them: summaries, one-line errors, and a
real `kill -9` in the middle of sampling followed by a re-run that resumes from the cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cappy.cli import main
from tests.unit.adapt.fakes import FakeUpstream, toy_examples, write_examples

REPO = Path(__file__).resolve().parents[3]


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_adapt_data_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = write_examples(tmp_path / "train.jsonl", toy_examples(tasks=2, per_task=2))
    code = main(
        ["adapt", "data", "--train", str(train), "--out", str(tmp_path / "d")]
        + ["--samples-per-example", "0", "--quiet"]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["examples"] == 4 and summary["pairs_by_source"]["ground_truth"] == 8
    assert (tmp_path / "d" / "pairs.jsonl").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["adapt", "data", "--train", "missing.jsonl", "--out", "o"], "missing.jsonl: cannot read"),
        (
            ["adapt", "data", "--train", "{train}", "--out", "o", "--samples-per-example", "99"],
            "samples per example must be between 0 and 17",
        ),
        (["eval", "--data", "{train}", "--out", "e"], "no such sample cache"),
        (["adapt", "train", "--data", "nowhere", "--base", "b", "--out", "x"], "nowhere"),
    ],
)
def test_one_line_errors(
    argv: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    train = write_examples(tmp_path / "train.jsonl", toy_examples())
    monkeypatch.chdir(tmp_path)
    code = main([a.replace("{train}", str(train)) for a in argv] + ["--quiet"])
    assert code == 1
    assert message in _error_line(capsys.readouterr().err)


def test_killed_mid_run_then_resumed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = write_examples(tmp_path / "train.jsonl", toy_examples(tasks=2, per_task=3))
    out = tmp_path / "data"
    cache = out / "samples.jsonl"
    fake = FakeUpstream(delay_s=0.05)
    with fake.serve() as url:
        argv = ["adapt", "data", "--train", str(train), "--out", str(out), "--upstream", url]
        argv += ["--samples-per-example", "6", "--quiet"]
        child = subprocess.Popen(
            [sys.executable, "-m", "cappy", *argv],
            cwd=REPO,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while not (cache.is_file() and len(cache.read_bytes().splitlines()) > 10):
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "the child wrote no samples"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        killed_after = len(fake.bodies)
        assert killed_after < 36, "the run finished before it was killed"
        assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"]["planned"] == 36
    assert summary["samples"]["from_cache"] >= 10
    calls = fake.calls
    assert len(calls) == 36 and summary["pairs"] > 0
    # Only the call in flight when the process died can have been asked twice.
    assert sum(n - 1 for n in calls.values()) <= 1
    assert len(cache.read_text().splitlines()) == 37
