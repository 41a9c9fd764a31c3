"""The cappy commands the adaptation run starts, argument for argument."""

from __future__ import annotations

from pathlib import Path

from loadtests.adapt_gpu.cli import build_parser, resolve
from loadtests.adapt_gpu.commands import SAMPLING_FLAGS
from loadtests.adapt_gpu.runner import AdaptGpuRun


def _run(tmp_path: Path, *argv: str) -> AdaptGpuRun:
    args = resolve(build_parser().parse_args(["--dry-run", "--work", str(tmp_path), *argv]))
    run = AdaptGpuRun(args)
    run.inputs = {"data": "d.jsonl"}
    return run


def test_sampling_shards_and_eval_commands(tmp_path: Path) -> None:
    run = _run(tmp_path, "--train-examples-per-task", "3", "--python", "py")
    cache, work = tmp_path / "cache", tmp_path
    sampling = ["--model", "tiny-llama", "--concurrency", "4", "--max-tokens", "8"]
    assert run.data_command(1, ["a", "b"], "http://u/v1") == [
        *["py", "-m", "cappy.cli", "adapt", "data", "--train", "d.jsonl", "--split", "train"],
        *["--task", "a", "--task", "b", "--examples-per-task", "3"],
        *["--samples-per-example", "2", "--seed", "0", "--upstream", "http://u/v1"],
        *["--cache", str(cache / "train-1.jsonl"), "--out", str(work / "data-shards" / "1")],
        *sampling,
        *SAMPLING_FLAGS,
    ]
    assert run.test_samples_command(0, ["c"], "http://u/v1") == [
        *["py", "-m", "cappy.cli", "eval", "--data", "d.jsonl", "--split", "test", "--task", "c"],
        *["--seed", "0", "--upstream", "http://u/v1", "--samples", str(cache / "test-0.jsonl")],
        *["--out", str(work / "test-shards" / "0")],
        *sampling,
        *SAMPLING_FLAGS,
    ]
    assert run.eval_command([], "--quiet") == [
        *["py", "-m", "cappy.cli", "eval", "--data", "d.jsonl", "--split", "test"],
        *["--seed", "0", "--quiet"],
    ]
