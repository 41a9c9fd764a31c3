"""Reading examples: the JSONL format, the split/task filters, per-task subsampling, and errors
that name the line at fault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapt.errors import AdaptError
from adapt.examples import NO_TASK, by_task, load_examples

BIGBENCH = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "bigbench_dev.jsonl"


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_fields_defaults_and_order(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "ex.jsonl",
        [
            {"instruction": "q1", "targets": ["a"]},
            "",
            {"instruction": "q2", "targets": "b", "task": "t", "id": 7, "split": "test"},
        ],
    )
    first, second = load_examples(path)
    assert (first.id, first.task, first.targets, first.split) == ("line-1", NO_TASK, ("a",), None)
    assert (second.id, second.task, second.targets, second.split) == ("7", "t", ("b",), "test")


def test_split_task_and_first_n_per_task(tmp_path: Path) -> None:
    rows = [
        {"instruction": f"{t}{i}", "targets": ["x"], "task": t, "id": f"{t}{i}", "split": s}
        for t in ("a", "b")
        for i, s in enumerate(["train", "test", "train", "train"])
    ]
    path = _write(tmp_path / "ex.jsonl", rows)
    kept = load_examples(path, split="train", examples_per_task=2)
    assert [e.id for e in kept] == ["a0", "a2", "b0", "b2"]
    assert [e.id for e in load_examples(path, tasks=["b"], split="test")] == ["b1"]
    assert list(by_task(kept)) == ["a", "b"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "ex.jsonl:2: not JSON"),
        (json.dumps({"targets": ["x"]}), "ex.jsonl:2: `instruction` must be a non-empty string"),
        (json.dumps({"instruction": "q", "targets": []}), "ex.jsonl:2: `targets` must be"),
        (json.dumps({"instruction": "q", "targets": [1]}), "ex.jsonl:2: `targets` must be"),
        (json.dumps({"instruction": "q", "targets": ["x"], "id": "a"}), "duplicate id 'a'"),
    ],
)
def test_bad_lines_are_named(tmp_path: Path, line: str, message: str) -> None:
    path = _write(tmp_path / "ex.jsonl", [{"instruction": "q", "targets": ["x"], "id": "a"}, line])
    with pytest.raises(AdaptError, match=message):
        load_examples(path)


def test_nothing_selected_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "ex.jsonl", [{"instruction": "q", "targets": ["x"], "task": "a"}])
    with pytest.raises(AdaptError, match="no examples with split 'train'"):
        load_examples(path, split="train")
    with pytest.raises(AdaptError, match="no examples for task"):
        load_examples(path, tasks=["a", "zzz"])
    with pytest.raises(AdaptError, match="cannot read"):
        load_examples(tmp_path / "missing.jsonl")


def test_the_bigbench_file_subsamples_as_the_measurement_states() -> None:
    if not BIGBENCH.is_file():
        pytest.skip(f"{BIGBENCH} not present")
    train = load_examples(BIGBENCH, split="train", examples_per_task=10)
    counts = {task: len(examples) for task, examples in by_task(train).items()}
    # 4 of the 32 tasks have no train split and physics_questions has 3 train examples.
    assert len(counts) == 28
    assert counts["physics_questions"] == 3
    assert sum(counts.values()) == 27 * 10 + 3
    test = load_examples(BIGBENCH, split="test", examples_per_task=10)
    assert len(test) == 320 and all(e.split == "test" for e in test)
