"""`cappy eval` on a scripted upstream with log-probabilities and a tiny export: the report files,
what each method picks, the oracle's ceiling, and re-evaluating from the cache alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapt.errors import AdaptError
from adapt.evaluate import EvalOptions, run
from adapt.selection import METHODS, OVERALL
from tests.unit.adapt.fakes import BASE, FakeUpstream, toy_examples, write_examples


@pytest.fixture(scope="module")
def scorer(tiny_export: Path) -> Path:
    return tiny_export


@pytest.fixture(scope="module")
def test_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = toy_examples(tasks=2, per_task=3, split="test") + toy_examples(tasks=1, split="train")
    return write_examples(tmp_path_factory.mktemp("eval-data") / "test.jsonl", rows)


@pytest.fixture(scope="module")
def first_run(scorer: Path, test_file: Path, tmp_path_factory: pytest.TempPathFactory):
    fake = FakeUpstream()
    out = tmp_path_factory.mktemp("eval") / "report"
    options = EvalOptions(
        data=test_file, out=out, scorer=scorer, upstream=BASE, split="test", progress=False
    )
    return fake, options, run(options, transport=fake.transport())


def test_report_files(first_run) -> None:
    fake, options, result = first_run
    assert len(fake.bodies) == 6 * 17 and all(b["logprobs"] is True for b in fake.bodies)
    assert result.chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = result.markdown.read_text()
    assert "| **overall** | 6 |" in markdown and "| task0 | 3 |" in markdown
    assert "| Cappy |" in markdown and "| Self-scoring |" in markdown
    report = json.loads(result.json.read_text())
    assert report == json.loads(json.dumps(result.report))
    assert report["examples"] == 6 and report["tasks"] == ["task0", "task1"]
    assert report["samples_per_example"] == 17 and report["samples_without_logprobs"] == 0
    assert report["samples"] == {"planned": 102, "from_cache": 0, "fetched": 102, "failed": 0}
    assert len(result.per_example.read_text().splitlines()) == 6
    assert (options.out / "samples.jsonl").is_file()


def test_the_oracle_bounds_every_method(first_run) -> None:
    methods = first_run[2].report["methods"]
    for method in METHODS:
        assert methods[method][OVERALL] is not None
        assert methods["oracle"][OVERALL] >= methods[method][OVERALL]
        for task, value in methods[method]["per_task"].items():
            assert methods["oracle"]["per_task"][task] >= value
    # The fake's samples differ in Rouge-L: picking matters here.
    assert methods["oracle"][OVERALL] > methods["random"][OVERALL]


def test_by_number_of_samples(first_run) -> None:
    report = first_run[2].report
    methods, by = report["methods"], report["by_samples"]
    nucleus = methods["nucleus"][OVERALL]
    assert by["cappy"]["1"][OVERALL] == by["self_scoring"]["1"][OVERALL] == nucleus
    assert by["cappy"]["17"][OVERALL] == methods["cappy"][OVERALL]
    assert by["self_scoring"]["17"][OVERALL] == methods["self_scoring"][OVERALL]


def test_each_pick_is_what_its_method_says(first_run) -> None:
    for line in first_run[2].per_example.read_text().splitlines():
        row = json.loads(line)
        chosen, rouge, decodings = row["picks"], row["rouge"], row["decodings"]
        assert rouge[chosen["oracle"]] == max(rouge)
        assert row["mean_logprob"][chosen["self_scoring"]] == max(row["mean_logprob"])
        assert row["cappy"][chosen["cappy"]] == max(row["cappy"])
        assert chosen["cappy"] == row["cappy"].index(max(row["cappy"]))  # ties: the first
        assert decodings[chosen["greedy"]] == "greedy"
        assert chosen["nucleus"] == decodings.index("top_p_0.95")
        nucleus = [i for i, d in enumerate(decodings) if d == "top_p_0.95"]
        four = max(nucleus, key=lambda i: (row["cappy"][i], -i))
        assert chosen["cappy@4"] == four and chosen["cappy@1"] == nucleus[0]
        for method, index in chosen.items():
            assert row["picked_rouge"][method] == rouge[index]


def _from_cache(options: EvalOptions, out: Path, **overrides: Any) -> EvalOptions:
    """Options that evaluate the first run's sample cache alone (no upstream)."""
    values = {"split": "test", "progress": False, **overrides}
    return EvalOptions(data=options.data, out=out, samples=options.out / "samples.jsonl", **values)


def test_a_new_scorer_on_the_cache_alone(first_run, scorer: Path, tmp_path: Path) -> None:
    _, options, first = first_run
    again = run(
        _from_cache(options, tmp_path / "again", scorer=scorer),
        transport=None,  # no upstream: nothing may be called
    )
    assert again.report["methods"] == first.report["methods"]
    assert again.report["samples"]["fetched"] == 0
    # Without a scorer: the LLM-only methods, Cappy left out.
    bare = run(_from_cache(options, tmp_path / "bare"))
    assert bare.report["methods"]["cappy"][OVERALL] is None
    assert bare.report["methods"]["oracle"] == first.report["methods"]["oracle"]
    assert "n/a" in bare.markdown.read_text()
    # Examples the cache holds no samples for: refused, the LLM is not called.
    with pytest.raises(AdaptError, match="not in the cache"):
        run(_from_cache(options, tmp_path / "other", split="train"))


def test_a_bad_scorer_fails_before_any_llm_call(test_file: Path, tmp_path: Path) -> None:
    fake = FakeUpstream()
    with pytest.raises(AdaptError, match="--scorer"):
        run(
            EvalOptions(data=test_file, out=tmp_path, scorer=tmp_path, upstream=BASE),
            transport=fake.transport(),
        )
    assert fake.bodies == []
