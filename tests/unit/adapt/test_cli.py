"""`cappy adapt data|train` and `cappy eval` as a user runs them: summaries, one-line errors, and a
real `kill -9` in the middle of sampling followed by a re-run that resumes from the cache. The
kill comes at an event, not at a time: the upstream answers a set number of calls and holds the
rest, and the child is killed once its cache holds those answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

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


class HoldingUpstream(FakeUpstream):
    """Answers the first `answer_first` completion calls, then holds every later one until
    `stop_holding()`: a run against it cannot finish, however fast or slow the host. A held call
    is never recorded, and is answered 503 once released (its caller is gone by then)."""

    def __init__(self, answer_first: int) -> None:
        super().__init__()
        self.answer_first: int | None = answer_first
        self._released = threading.Event()
        self._seen = 0

    def respond(self, path: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        if body is not None and self.answer_first is not None:
            with self.lock:
                self._seen += 1
                held = self._seen > self.answer_first
            if held:
                assert self._released.wait(300), "the test never released the held calls"
                return 503, {"error": {"message": "held, then dropped", "type": "server_error"}}
        return super().respond(path, body)

    def stop_holding(self) -> None:
        self.answer_first = None
        self._released.set()


def test_killed_mid_run_then_resumed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = write_examples(tmp_path / "train.jsonl", toy_examples(tasks=2, per_task=3))
    out = tmp_path / "data"
    cache = out / "samples.jsonl"
    answered = 12  # of the 36 calls planned
    fake = HoldingUpstream(answer_first=answered)
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
        # The event: the header and one line per answer, each flushed before the next call is
        # taken as done. The bound is only for a child that never gets there.
        deadline = time.monotonic() + 300
        while not (cache.is_file() and len(cache.read_bytes().splitlines()) >= 1 + answered):
            assert child.poll() is None, child.stderr.read() if child.stderr else ""
            assert time.monotonic() < deadline, "the child never wrote its answers"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        assert len(fake.bodies) == answered  # mid-run: the rest were held, never answered
        fake.stop_holding()
        assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"]["planned"] == 36
    assert summary["samples"]["from_cache"] == answered
    calls = fake.calls
    assert len(calls) == 36 and summary["pairs"] > 0
    assert sum(n - 1 for n in calls.values()) == 0  # no answered call was asked twice
    assert len(cache.read_text().splitlines()) == 37
