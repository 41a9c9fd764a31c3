"""`adapt data`: the pairs each example gives, their labels, de-duplication and seeded shuffle,
and the whole run against a scripted upstream (output files, resuming from the cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapt.cache import SampleRecord
from adapt.data import DataOptions, Pair, build_pairs, dedupe, read_pairs, run
from adapt.errors import AdaptError
from adapt.examples import Example
from adapt.labels import RougeL
from tests.unit.adapt.fakes import BASE, FakeUpstream, toy_examples, write_examples

EXAMPLES = [
    Example("a0", "Capital of France?", ("Paris",), "capitals"),
    Example("a1", "Capital of Italy?", ("Rome",), "capitals"),
    Example("b0", "2 + 2?", ("4", "four"), "sums"),
]


def _sample(example_id: str, text: str, decoding: str = "sampling", seed: int = 1) -> SampleRecord:
    return SampleRecord(example_id, decoding, 0, seed, text)


def test_pairs_and_labels() -> None:
    samples = {
        "a0": [_sample("a0", "It is Paris, France"), _sample("a0", "Paris", "greedy", 2)],
        "b0": [_sample("b0", "the answer is four")],
    }
    pairs = build_pairs(EXAMPLES, samples, seed=0)
    got = {(p.id, p.response): (p.label, p.source, p.decoding) for p in pairs}
    rouge = RougeL()
    assert got[("a0", "Paris")] == (1.0, "ground_truth", None)  # the greedy repeat is deduped
    assert got[("a0", "It is Paris, France")] == (
        rouge("It is Paris, France", ["Paris"]),
        "sample",
        "sampling",
    )
    assert got[("b0", "the answer is four")][0] == pytest.approx(
        rouge("the answer is four", ["4", "four"])
    )
    assert got[("b0", "4")][0] == got[("b0", "four")][0] == 1.0
    # Mismatches: the other example of the same task; none for the task with one example.
    assert got[("a0", "Rome")] == (0.0, "mismatch", None)
    assert got[("a1", "Paris")] == (0.0, "mismatch", None)
    assert not [p for p in pairs if p.id == "b0" and p.source == "mismatch"]
    assert len(pairs) == 8
    for p in pairs:
        own = next(e for e in EXAMPLES if e.id == p.id)
        assert p.instruction == own.instruction and p.task == own.task
        if p.source == "mismatch":
            assert p.response not in own.targets


def test_shuffle_is_seeded_and_mismatch_optional() -> None:
    examples = [Example(f"e{i}", f"q{i}", (f"a{i}",), "t") for i in range(30)]
    first = build_pairs(examples, {}, seed=3)
    assert build_pairs(examples, {}, seed=3) == first
    assert build_pairs(examples, {}, seed=4) != first
    plain = build_pairs(examples, {}, seed=3, mismatch=False)
    assert {p.source for p in plain} == {"ground_truth"}
    # Another seed: the same pairs in another order.
    other = build_pairs(examples, {}, seed=4, mismatch=False)
    assert other != plain and sorted(map(repr, other)) == sorted(map(repr, plain))


def test_dedupe_keeps_the_first_of_each_pair() -> None:
    a = Pair("i", "r", 1.0, "ground_truth", "x", "t")
    b = Pair("i", "r", 0.2, "sample", "x", "t", "sampling")
    c = Pair("i", "s", 0.2, "sample", "x", "t", "sampling")
    assert dedupe([a, b, c, b]) == [a, c]


def test_run_writes_pairs_and_resumes_from_the_cache(tmp_path: Path) -> None:
    train = write_examples(
        tmp_path / "train.jsonl", toy_examples(tasks=2, per_task=3, split="train")
    )
    out = tmp_path / "data"
    options = DataOptions(
        train=train, out=out, upstream=BASE, samples_per_example=4, progress=False
    )
    fake = FakeUpstream()
    result = run(options, transport=fake.transport())
    assert len(fake.bodies) == 6 * 4
    manifest = json.loads((out / "data.json").read_text())
    assert manifest["examples"] == 6
    assert manifest["samples"] == {"planned": 24, "from_cache": 0, "fetched": 24, "failed": 0}
    assert manifest["sampling"]["model"] == "fake-llm"
    pairs = read_pairs(out)
    assert pairs == result.pairs and len(pairs) == manifest["pairs"]
    sources = manifest["pairs_by_source"]
    assert sources["mismatch"] == 6 and sources["ground_truth"] == 12
    assert 0 < sources["sample"] <= 24
    assert all(0.0 <= p.label <= 1.0 for p in pairs)
    assert {p.label for p in pairs if p.source == "sample"} - {0.0, 1.0}  # graded labels too
    # Again, with more samples per example: the cache is extended, nothing asked twice.
    again = FakeUpstream()
    run(DataOptions(**{**options.__dict__, "samples_per_example": 6}), transport=again.transport())
    assert len(again.bodies) == 6 * 2
    assert not set(again.calls) & set(fake.calls)


def test_a_sampling_budget_samples_some_examples_and_pairs_all(tmp_path: Path) -> None:
    """Ground truths and mismatches cost no call: every example gives them, while LLM samples
    (the whole recipe by default) come from the first N examples of each task."""
    train = write_examples(tmp_path / "train.jsonl", toy_examples(tasks=2, per_task=3))
    options = DataOptions(
        train=train, out=tmp_path / "out", upstream=BASE, sampled_examples_per_task=1,
        progress=False,
    )  # fmt: skip
    assert options.samples_per_example == 17
    fake = FakeUpstream()
    result = run(options, transport=fake.transport())
    assert len(fake.bodies) == 2 * 17
    sampled = {p.id for p in result.pairs if p.source == "sample"}
    assert sampled == {"task0-0", "task1-0"}
    assert {p.id for p in result.pairs} == {f"task{t}-{i}" for t in range(2) for i in range(3)}
    assert result.manifest["sampled_examples"] == 2
    assert sum(p.source == "mismatch" for p in result.pairs) == 6


def test_no_llm_needed_for_zero_samples(tmp_path: Path) -> None:
    train = write_examples(tmp_path / "train.jsonl", toy_examples(tasks=1, per_task=2))
    result = run(
        DataOptions(train=train, out=tmp_path / "out", samples_per_example=0, progress=False)
    )
    assert {p.source for p in result.pairs} == {"ground_truth", "mismatch"}
    assert not (tmp_path / "out" / "samples.jsonl").exists()
    with pytest.raises(AdaptError, match="--upstream is required"):
        run(DataOptions(train=train, out=tmp_path / "out2", progress=False))


def test_read_pairs_names_a_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"instruction": "i", "response": "r", "label": 1}\n{"instruction": "i"}\n')
    with pytest.raises(AdaptError, match="pairs.jsonl:2"):
        read_pairs(path)
    with pytest.raises(AdaptError, match="make it with `cappy adapt data`"):
        read_pairs(tmp_path / "nothing")
