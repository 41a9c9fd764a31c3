"""`python -m loadtests.adapt_gpu --dry-run` end to end on the CPU (a tiny random LLM served by
loadtests.transformers_upstream, two tasks of tiny data, a few training steps of a tiny RoBERTa),
checked through its JSON, its Markdown and its logs' archive."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from adapt.selection import METHODS

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "loadtests.adapt_gpu", "--dry-run"]
    command += ["--work", str(tmp_path / "work"), "--out", str(out), "--monitor-interval", "1"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "[adapt_gpu" in done.stderr and "done in" in done.stderr

    report = json.loads((out / "adapt_gpu.json").read_text(encoding="utf-8"))
    phases = {p["name"]: p for p in report["phases"]}
    names = ["setup", "upstream-start", "data", "train", "test-samples", "eval"]
    assert list(phases) == names
    for name in names:
        assert phases[name]["status"] == "ok", (name, phases[name].get("error"))
    assert report["dry_run"] is True and report["config"]["device"] == "cpu"

    inputs = report["inputs"]
    assert inputs["train_examples"] == 6 and inputs["test_examples"] == 4
    assert len(inputs["train_shards"]) == 2 and inputs["held_out_flags_missing"] == []
    data = phases["data"]
    assert data["samples"]["planned"] == 12 and data["samples"]["failed"] == 0
    assert data["upstream"]["samples"] >= 12 and data["upstream"]["samples_per_s"] > 0
    assert data["pairs_by_source"]["ground_truth"] == 6 and data["pairs"] >= 18
    assert [s["status"] for s in data["shards"]] == ["ok", "ok"]
    assert phases["train"]["summary"]["verify"] == "ok"
    assert phases["train"]["held_out"]["evaluations"] >= 1
    test = phases["test-samples"]
    assert test["samples_cached"] == test["samples_planned"] == 4 * 17
    assert test["ran_beside"] == "train"

    evaluation = report["eval"]
    assert evaluation["examples"] == 4 and evaluation["incomplete_examples"] == 0
    assert set(evaluation["overall"]) == set(METHODS)
    assert all(v is not None for v in evaluation["overall"].values())
    assert evaluation["scorer"].endswith("scorer")
    final = report["upstream"]["final_stats"][0]
    assert final["batcher"]["failed_batches"] == 0 and final["engine"]["max_rows"] > 1

    table = (out / "adapt_gpu.md").read_text(encoding="utf-8")
    assert "| phase | status |" in table and "## Selection quality" in table
    for name in names:
        assert f"| {name} | ok |" in table
    with tarfile.open(out / "adapt_gpu_logs.tar.gz") as archive:
        members = set(archive.getnames())
    assert {"logs/upstream-0.log", "logs/train.log", "eval/report.md"} <= members
