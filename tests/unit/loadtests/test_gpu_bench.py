"""loadtests/gpu_bench.py: the FLOP arithmetic, the near-tie filter and agreement, nvidia-smi
parsing, and the whole dry run end to end (tiny model on the CPU: checkpoint, export, fp32
reference, `cappy serve` at five concurrencies, engine_bench, the three peers) on a small
workload written here, checked through its JSON and Markdown."""

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

from loadtests import gpu_bench

ROOT = Path(__file__).resolve().parents[3]


def test_encoder_parameters_and_flops_of_bert_large() -> None:
    per_layer = 4 * (1024 * 1024 + 1024) + 2 * 1024 + 2 * 1024 * 4096 + 4096 + 1024 + 2 * 1024
    assert gpu_bench.encoder_parameters(24, 1024, 4096) == 24 * per_layer == 302_309_376
    per_token = gpu_bench.flops_per_token(24, 1024, 4096, 160.0)
    assert per_token == 2 * 302_309_376 + 4 * 24 * 1024 * 160
    model = {"layers": 24, "hidden": 1024, "intermediate": 4096}
    # 5,000 pairs/s of 160 tokens: ~0.63 of an H200's 790 TFLOP/s
    figures = gpu_bench.flop_figures(model, 160 * 5000, 5000, 1.0, 790.0)
    assert figures["tflops"] == pytest.approx(per_token * 800_000 / 1e12, rel=1e-3)
    assert figures["flop_fraction"] == pytest.approx(per_token * 800_000 / 1e12 / 790, rel=1e-3)
    assert 0.6 < figures["flop_fraction"] < 0.65
    toy = {"layers": 2, "hidden": 32, "intermediate": 64}
    tiny = gpu_bench.flop_figures(toy, 160, 1, 1.0, 790.0)["flop_fraction"]
    assert tiny is not None and 0 < tiny < 1e-6  # significant digits, not rounded to 0
    assert gpu_bench.flop_figures(model, None, 5000, 1.0, 790.0)["flop_fraction"] is None
    assert gpu_bench.flop_figures(None, 1000, 10, 1.0, 790.0)["tflops"] is None


def test_near_ties_and_single_candidates_are_left_out_of_agreement() -> None:
    reference = {
        "a": [0.0, 1.0, 0.5],  # decisive: index 1
        "b": [2.0, 2.0001],  # near tie
        "c": [3.0],  # single candidate
        "d": [-1.0, -2.0],  # decisive: index 0
    }
    decisive, summary = gpu_bench.decisive_reference(reference, near_tie=0.01)
    assert decisive == {"a": 1, "d": 0}
    assert summary["single_candidate"] == 1 and summary["near_ties"] == 1
    assert summary["decisive"] == 2 and summary["near_tie_threshold"] > 1e-4

    ours = {"a": [0.0, 0.9, 0.95], "b": [0.0, 1.0], "d": [-1.0, -2.0]}
    figures = gpu_bench.score_agreement(ours, decisive, reference)
    assert figures["agreement"] == 0.5 and figures["compared"] == 2
    assert figures["max_abs_diff"] == pytest.approx(2.0)  # near ties count for the difference
    assert gpu_bench.score_agreement({}, decisive)["agreement"] is None


def test_gpu_samples_are_parsed_and_windowed() -> None:
    sample = gpu_bench.parse_gpu_sample("2026/11/29 20:27:01.250, 87, 40213\n")
    assert sample is not None and sample[1:] == (87.0, 40213.0)
    assert gpu_bench.parse_gpu_sample("[N/A], 3, 4") is None
    assert gpu_bench.parse_gpu_sample("garbage") is None
    sampler = gpu_bench.GpuSampler(0)
    assert sampler.summary(0, 1)["util_mean"] is None  # never started: no figures
    sampler.samples = [(10.0, 50.0, 100.0), (10.2, 100.0, 300.0), (11.0, 0.0, 50.0)]
    assert sampler.summary(9.9, 10.5) == {"util_mean": 75.0, "mem_max_mib": 300.0, "samples": 2}


def test_dry_run_defaults_fill_unset_flags_only(tmp_path: Path) -> None:
    args = gpu_bench.resolve(
        gpu_bench.build_parser().parse_args(
            ["--dry-run", "--work", str(tmp_path), "--per-request-limit", "3"]
        )
    )
    assert args.device == "cpu" and args.model_size == "tiny"
    assert args.per_request_limit == 3 and "pytest" in args.skip
    assert Path(args.requests).is_file() and args.out == str(tmp_path / "report")
    full = gpu_bench.resolve(gpu_bench.build_parser().parse_args(["--work", str(tmp_path)]))
    assert full.device == "cuda" and full.model_size == "large"
    assert gpu_bench.int_list(full.concurrency) == [1, 8, 32, 64, 128]
    assert len(gpu_bench.int_list(full.limits)) == 5


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
    path.write_text("".join(json.dumps(r) + "\n" for r in requests), encoding="utf-8")
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
