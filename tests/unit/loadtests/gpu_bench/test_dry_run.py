"""`python -m loadtests.gpu_bench --dry-run` end to end (tiny model on the CPU: checkpoint,
export, fp32 reference, `cappy serve` at five concurrencies, engine_bench, the three peers) on a
small workload written here, checked through its JSON and Markdown."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.unit.loadtests.workloads import write_workload

ROOT = Path(__file__).resolve().parents[4]


def _workload(path: Path) -> list[dict]:
    topics = ["rivers", "mountains", "history", "code", "music", "physics", "recipes", "poems"]
    requests = []
    for n, count in enumerate([1, 4, 17, 4, 1, 17, 4, 17, 4, 1, 4, 17, 4, 4]):
        topic = topics[n % len(topics)]
        instruction = f"Question {n}: explain something about {topic} " + "in detail " * (n % 5)
        candidates = [
            f"Answer {c} on {topic}: " + " ".join(topics[(n + c + k) % 8] for k in range(c % 9 + 1))
            for c in range(count)
        ]
        requests.append({"id": n, "instruction": instruction, "candidates": candidates})
    write_workload(path, requests)
    return requests


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path: Path) -> None:
    requests = _workload(tmp_path / "requests.jsonl")
    total_pairs = sum(len(r["candidates"]) for r in requests)
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "loadtests.gpu_bench", "--dry-run", "--tokenizer", "bpe"]
    command += ["--requests", str(tmp_path / "requests.jsonl"), "--work", str(tmp_path / "work")]
    command += ["--out", str(out)]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-4000:]
    assert "gpu_bench" in done.stderr and "serve-c128" in done.stderr  # progress lines

    report = json.loads((out / "gpu_bench.json").read_text(encoding="utf-8"))
    phases = {p["name"]: p for p in report["phases"]}
    serve = [f"serve-c{c}" for c in (1, 8, 32, 64, 128)]
    peers = ["peer-transformers", "peer-crossencoder", "peer-crossencoder-per-request"]
    expected = ["checkpoint", "export", "reference", "serve-start", *serve, "engine", *peers]
    assert list(phases) == [*expected, "pytest"], list(phases)
    assert phases["pytest"]["status"] == "skipped"  # no CUDA tests in the dry run
    for name in expected:
        assert phases[name]["status"] == "ok", (name, phases[name].get("error"))

    assert report["dry_run"] is True and report["config"]["device"] == "cpu"
    assert report["workload"] == {
        "path": str(tmp_path / "requests.jsonl"),
        "requests": len(requests),
        "pairs": total_pairs,
    }
    model = report["model"]
    assert model["family"] == "roberta" and model["layers"] == 2 and model["hidden"] == 32
    assert "BPE" in model["tokenizer"]
    assert set(report["export"]["models"]) >= {"fp32"}
    # A random stand-in is exported with --parity record and served with allow_ungated.
    assert report["export"]["parity_mode"] == "record"
    assert "allow_ungated=true" in phases["serve-start"]["serve_args"]
    ref = report["reference"]
    assert ref["requests"] == len(requests) and ref["single_candidate"] == 3
    assert ref["decisive"] + ref["near_ties"] == len(requests) - 3 and ref["decisive"] >= 5

    no_gpu = shutil.which("nvidia-smi") is None
    for name in [*serve, "engine", *peers]:
        phase = phases[name]
        assert phase["pairs_per_s"] > 0, name
        assert 0 < phase["flop_fraction"] < 1 and phase["tflops"] > 0, name
        assert phase["mean_tokens_per_pair"] > 3, name
        argmax = phase["argmax"]
        least = 3 if name.endswith("per-request") else 8  # of 4 and 11 multi-candidate sets
        assert 0 <= argmax["agreement"] <= 1 and argmax["compared"] >= least, (name, argmax)
        if no_gpu:
            assert phase["gpu"]["util_mean"] is None
    for name in serve:  # every request once, answered
        phase = phases[name]
        assert phase["requests"] == len(requests) and phase["pairs"] == total_pairs, name
        assert phase["errors"] == {} and phase["detail"]["server"]["pairs_scored"] == total_pairs
        assert (
            phase["latency_ms"]["p50"] > 0
            and phase["latency_ms"]["p99"] >= phase["latency_ms"]["p50"]
        )
        assert phase["argmax"]["agreement"] >= 0.8  # fp32/bf16 on CPU against PyTorch fp32
    assert phases["serve-c1"]["concurrency"] == 1 and phases["serve-c128"]["concurrency"] == 128
    assert phases["engine"]["pairs"] == total_pairs
    assert phases["engine"]["argmax"]["agreement"] == 1.0  # ONNX Runtime fp32 vs PyTorch fp32
    assert phases["engine"]["argmax"]["max_abs_diff"] < 1e-3
    assert phases["peer-transformers"]["pairs"] == total_pairs
    assert phases["peer-transformers"]["argmax"]["agreement"] == 1.0  # fp32 on CPU too
    assert phases["peer-crossencoder"]["pairs"] == total_pairs
    assert phases["peer-crossencoder"]["argmax"]["agreement"] == 1.0  # raw logits, no sigmoid
    per_request = phases["peer-crossencoder-per-request"]
    assert per_request["requests"] == 6 and per_request["latency_ms"]["p50"] > 0
    for name in peers:
        assert phases[name]["detail"]["cpu_cores"] is not None  # confined to --peer-threads
    assert not math.isnan(report["wall_s"]) and report["wall_s"] < wall + 1

    table = (out / "gpu_bench.md").read_text(encoding="utf-8")
    assert "| phase | status |" in table and "FLOP-limit fraction" in table
    for name in [*expected, "pytest"]:
        assert f"| {name} | " in table
