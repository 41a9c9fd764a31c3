"""The run's shards and merges: tasks split evenly, the shards' pairs and sample caches merged
through adapt's own formats, the held-out flags read from `cappy adapt train --help`."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest

from adapt.cache import SampleCache, SampleRecord, read_cache
from adapt.data import MANIFEST_FILE, PAIRS_FILE, Pair, read_pairs, write_jsonl_atomic
from loadtests.adapt_gpu import commands
from loadtests.adapt_gpu.processes import PhaseError


def test_shards_hold_whole_tasks_of_about_equal_size() -> None:
    counts = Counter({f"t{i}": n for i, n in enumerate([300, 300, 250, 120, 100, 80, 40, 3])})
    shards = commands.shard_tasks(counts, 3)
    assert sorted(t for shard in shards for t in shard) == sorted(counts)
    loads = [sum(counts[t] for t in shard) for shard in shards]
    assert max(loads) - min(loads) <= 120
    assert commands.shard_tasks(Counter({"a": 1}), 4) == [["a"]]  # no empty shards
    assert commands.task_flags(["a", "b"]) == ["--task", "a", "--task", "b"]


def test_task_counts_read_the_split(tmp_path: Path) -> None:
    lines = [
        {"task": "a", "split": "train", "id": "a0", "instruction": "x", "targets": ["y"]},
        {"task": "a", "split": "test", "id": "a1", "instruction": "x", "targets": ["y"]},
        {"task": "b", "split": "train", "id": "b0", "instruction": "x", "targets": ["y"]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert commands.task_counts(path, "train") == Counter({"a": 1, "b": 1})
    assert commands.task_counts(path, "test") == Counter({"a": 1})


def _shard(directory: Path, task: str, n: int) -> Path:
    directory.mkdir(parents=True)
    pairs = [
        Pair(f"q{task}{i}", f"r{i}", 1.0, "ground_truth", f"{task}{i}", task) for i in range(n)
    ]
    write_jsonl_atomic(directory / PAIRS_FILE, (asdict(p) for p in pairs))
    manifest = {
        "examples": n,
        "tasks": [task],
        "samples_per_example": 17,
        "sampling": {"model": "m"},
        "samples": {"planned": 17 * n, "fetched": 17 * n, "failed": 0, "from_cache": 0},
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    return directory


def test_merged_pairs_are_every_shards_shuffled(tmp_path: Path) -> None:
    shards = [_shard(tmp_path / "s0", "a", 5), _shard(tmp_path / "s1", "b", 7)]
    manifest = commands.merge_pairs(shards, tmp_path / "data", seed=3)
    merged = read_pairs(tmp_path / "data")
    assert sorted(map(asdict, merged), key=str) == sorted(
        [asdict(p) for s in shards for p in read_pairs(s)], key=str
    )
    assert [p.task for p in merged] != sorted(p.task for p in merged)  # shuffled
    assert manifest["pairs"] == 12 and manifest["examples"] == 12
    assert manifest["samples"]["planned"] == 17 * 12 and manifest["tasks"] == ["a", "b"]
    with pytest.raises(PhaseError):
        commands.merge_pairs([], tmp_path / "none", seed=0)


def _cache(path: Path, config: dict, ids: list[str]) -> None:
    with SampleCache(path, config) as cache:
        for i, example in enumerate(ids):
            cache.append(
                SampleRecord(example, "greedy", 0, i, f"text {example}", "stop", (-1.0,), 1)
            )


def test_merged_caches_hold_every_shards_records(tmp_path: Path) -> None:
    config = {"model": "m", "max_tokens": 8}
    _cache(tmp_path / "c0.jsonl", config, ["a", "b"])
    _cache(tmp_path / "c1.jsonl", config, ["c"])
    paths = [tmp_path / "c0.jsonl", tmp_path / "c1.jsonl", tmp_path / "missing.jsonl"]
    out = tmp_path / "merged.jsonl"
    assert commands.merge_caches(paths, out) == 3
    assert commands.merge_caches(paths, out) == 3  # again: resumed, nothing doubled
    header, records = read_cache(out)
    assert header == config and sorted(k[0] for k in records) == ["a", "b", "c"]
    _cache(tmp_path / "other.jsonl", {"model": "m", "max_tokens": 9}, ["d"])
    with pytest.raises(PhaseError, match="other settings"):
        commands.merge_caches([paths[0], tmp_path / "other.jsonl"], tmp_path / "x.jsonl")


def test_held_out_flags_are_those_cappy_adapt_train_lists() -> None:
    used, missing = commands.held_out_flags(sys.executable)
    listed = commands.supported_flags(sys.executable, "adapt", "train")
    assert "--data" in listed and "--bf16" in listed
    for flag, *values in commands.HELD_OUT_FLAGS:
        assert (flag in missing) == (flag not in listed)
        assert (flag in used) == (flag in listed and bool(values))
