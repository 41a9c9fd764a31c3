"""loadtests/workload.py: reading the workload, the send schedule, batching by length."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.workload import MAX_CYCLES, batches_by_length, load_workload, schedule
from tests.unit.loadtests.workloads import write_workload


def test_load_workload_and_limit(tmp_path: Path) -> None:
    items = [{"id": i, "instruction": "q", "candidates": ["a"] * (i + 1)} for i in range(5)]
    path = write_workload(tmp_path / "w.jsonl", items)
    assert [r["id"] for r in load_workload(path)] == [0, 1, 2, 3, 4]
    assert len(load_workload(path, limit=2)) == 2
    (tmp_path / "bad.jsonl").write_text('{"instruction": "q"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="candidates"):
        load_workload(tmp_path / "bad.jsonl")


def test_schedule_is_bounded() -> None:
    workload = [{"id": i} for i in range(3)]
    assert [r["id"] for r in schedule(workload, None, cycle=False)] == [0, 1, 2]
    assert [r["id"] for r in schedule(workload, 2, cycle=False)] == [0, 1]
    assert [r["id"] for r in schedule(workload, 7, cycle=True)] == [0, 1, 2, 0, 1, 2, 0]
    assert sum(1 for _ in schedule(workload, None, cycle=True)) == 3 * MAX_CYCLES


def test_batches_by_length_respects_the_token_budget() -> None:
    lengths = [10, 300, 20, 5, 300, 40]
    batches = batches_by_length(lengths, max_tokens=600)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 600
