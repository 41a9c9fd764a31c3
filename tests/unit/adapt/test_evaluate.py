"""`cappy eval` on a scripted upstream with log-probabilities and a tiny export: the report files,
what each method picks, the oracle's ceiling, the bootstrap and per-task comparisons, and
re-evaluating from the cache alone, or from a cache made by hand."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from adapt.cache import SampleCache, SampleRecord
from adapt.errors import AdaptError
from adapt.evaluate import EvalOptions, markdown, run
from adapt.planning import SamplingConfig, plan
from adapt.selection import COMPARISONS, METHODS, OVERALL
from tests.unit.adapt.fakes import BASE, MODEL, WORDS, FakeUpstream, toy_examples, write_examples


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
    assert "| Self-scoring (sum) |" in markdown
    # What was sent: the fake accepts llama.cpp's sampler extras, so they go with every decoding.
    assert "## Decodings" in markdown and "| decoding | count | parameters sent |" in markdown
    sent = "temperature=1.0, top_p=1.0, top_k=40, min_p=0.0, repeat_penalty=1.0"
    assert f"| top_k_40 | 4 | {sent} |" in markdown
    assert "## Cappy against the other methods: paired bootstrap" in markdown
    assert "10,000 paired resamples stratified by task" in markdown
    assert "| Cappy - Self-scoring | all 17 |" in markdown
    assert "| Cappy - Self-scoring (sum) | 4 |" in markdown
    assert "## Cappy against the other methods, per task" in markdown
    assert "### Cappy vs Greedy by task (by difference)" in markdown
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
        assert row["sum_logprob"][chosen["self_scoring_sum"]] == max(row["sum_logprob"])
        assert row["cappy"][chosen["cappy"]] == max(row["cappy"])
        assert chosen["cappy"] == row["cappy"].index(max(row["cappy"]))  # ties: the first
        assert decodings[chosen["greedy"]] == "greedy"
        assert chosen["nucleus"] == decodings.index("top_p_0.95")
        nucleus = [i for i, d in enumerate(decodings) if d == "top_p_0.95"]
        four = max(nucleus, key=lambda i: (row["cappy"][i], -i))
        assert chosen["cappy@4"] == four and chosen["cappy@1"] == nucleus[0]
        for method, index in chosen.items():
            assert row["picked_rouge"][method] == rouge[index]


def test_bootstrap_intervals(first_run) -> None:
    report = first_run[2].report
    boot, methods = report["bootstrap"], report["methods"]
    assert {k: boot[k] for k in ("paired", "stratified_by", "resamples", "seed", "level")} == {
        "paired": True,
        "stratified_by": "task",
        "resamples": 10_000,
        "seed": 0,
        "level": 0.95,
    }
    assert set(boot["comparisons"]) == {
        "cappy - self_scoring",
        "cappy - greedy",
        "cappy - self_scoring_sum",
    }
    for a, b in COMPARISONS:
        interval = boot["comparisons"][f"{a} - {b}"]
        observed = methods[a][OVERALL] - methods[b][OVERALL]
        assert interval["difference"] == pytest.approx(observed)
        assert interval["low"] <= interval["difference"] <= interval["high"]
        assert 0 <= interval["share_above_zero"] <= 1
        assert (interval["examples"], interval["tasks"]) == (6, 2)
    assert set(boot["by_samples"]) == {"cappy - self_scoring", "cappy - self_scoring_sum"}
    for name, by in boot["by_samples"].items():
        # 1 sample: both pick the first nucleus sample; 17: the comparison on all samples.
        assert (by["1"]["difference"], by["1"]["low"], by["1"]["high"]) == (0, 0, 0)
        assert by["17"] == boot["comparisons"][name]


def test_per_task_wins(first_run) -> None:
    result = first_run[2]
    report = result.report
    wins, methods = report["per_task_wins"], report["methods"]
    assert wins["tie_within"] == 0.005
    for a, b in COMPARISONS:
        outcome = wins["comparisons"][f"{a} - {b}"]
        assert outcome["wins"] + outcome["losses"] + outcome["ties"] == 2
        for task, difference in outcome["differences"].items():
            expected = methods[a]["per_task"][task] - methods[b]["per_task"][task]
            assert difference == pytest.approx(expected)
    # The per-task tables run from Cappy's best difference to its worst.
    section = result.markdown.read_text().split("### Cappy vs Greedy by task")[1].split("###")[0]
    rows = [line for line in section.splitlines() if line.startswith("| task")][1:]
    shown = [float(line.rstrip(" |").rsplit("|", 1)[1]) for line in rows]
    assert len(shown) == 2 and shown == sorted(shown, reverse=True)


def test_decodings_as_sent_when_the_header_records_them(first_run) -> None:
    report = copy.deepcopy(first_run[2].report)
    report["sampling"]["sent"] = {
        "sampling": {"temperature": 1.0, "top_p": 1.0},
        "top_k_40": {"temperature": 1.0, "top_p": 1.0},  # an upstream without top_k
        "greedy": {"temperature": 0},
        "extra": {"n": 1},
    }
    text = markdown(report)
    assert "| decoding | count | parameters sent |" in text
    assert "| top_k_40 | 4 | temperature=1.0, top_p=1.0 |" in text
    assert "| greedy | 1 | temperature=0 |" in text
    assert "| temperature_0.9 | 4 | n/a |" in text  # not recorded as sent
    assert "| extra |  | n=1 |" in text


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
    # The cache as committed (gzip): the same report.
    packed = tmp_path / "samples.jsonl.gz"
    packed.write_bytes(gzip.compress((options.out / "samples.jsonl").read_bytes()))
    from_packed = run(
        EvalOptions(
            data=options.data,
            out=tmp_path / "packed",
            samples=packed,
            scorer=scorer,
            split="test",
            progress=False,
        )
    )
    assert from_packed.report["methods"] == first.report["methods"]
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


def test_a_hand_made_cache(scorer: Path, tmp_path: Path) -> None:
    """Samples whose picks are known: per example, one long sample that is the reference (the best
    mean log-probability), a one-word greedy sample (the best sum), the rest filler."""
    rows = toy_examples(tasks=2, per_task=2, split="test")[1:]  # task0: 1 example, task1: 2
    for row in rows:
        row["targets"] = [" ".join(WORDS)]
    data = write_examples(tmp_path / "test.jsonl", rows)
    options = EvalOptions(
        data=data,
        out=tmp_path / "out",
        samples=tmp_path / "samples.jsonl",
        scorer=scorer,
        split="test",
        progress=False,
    )
    config = SamplingConfig(model=MODEL, logprobs=True)
    with SampleCache(options.samples, config.header()) as cache:
        for s in plan(options.select_examples(data), config):
            text, logprobs = "zeta zeta", (-2.0, -2.0)
            if (s.decoding.name, s.index) == ("top_k_40", 0):
                text, logprobs = " ".join(WORDS), (-0.1,) * 5  # mean -0.1, sum -0.5
            elif s.decoding.name == "greedy":
                text, logprobs = WORDS[0], (-0.3,)  # mean -0.3, sum -0.3
            cache.append(
                SampleRecord(
                    s.example.id, s.decoding.name, s.index, s.seed, text, logprobs=logprobs
                )
            )
    result = run(options)
    report, methods = result.report, result.report["methods"]
    one_word = 100 * 2 * 0.2 / 1.2  # Rouge-L F of one word of five: precision 1, recall 0.2
    assert methods["self_scoring"][OVERALL] == pytest.approx(100)
    assert methods["self_scoring_sum"][OVERALL] == pytest.approx(one_word)
    assert methods["greedy"][OVERALL] == pytest.approx(one_word)
    assert methods["nucleus"][OVERALL] == 0 and methods["oracle"][OVERALL] == pytest.approx(100)
    assert report["by_samples"]["self_scoring_sum"]["4"][OVERALL] == 0  # four nucleus fillers
    for line in result.per_example.read_text().splitlines():
        row = json.loads(line)
        assert row["decodings"][row["picks"]["self_scoring_sum"]] == "greedy"
        assert row["decodings"][row["picks"]["self_scoring"]] == "top_k_40"
        assert row["sum_logprob"][row["picks"]["self_scoring_sum"]] == pytest.approx(-0.3)
    # Against the known self-scorings: the bootstrap's observed differences and the wins.
    cappy = methods["cappy"]
    boot = report["bootstrap"]["comparisons"]
    assert boot["cappy - self_scoring"]["difference"] == pytest.approx(cappy[OVERALL] - 100)
    assert boot["cappy - self_scoring"]["share_above_zero"] == 0  # nothing beats the reference
    assert boot["cappy - self_scoring_sum"]["difference"] == pytest.approx(
        cappy[OVERALL] - one_word
    )
    wins = report["per_task_wins"]["comparisons"]["cappy - self_scoring"]
    assert wins["wins"] == 0 and wins["losses"] + wins["ties"] == 2
    text = result.markdown.read_text()
    assert f"| **overall** | 3 | 0.00 | {one_word:.2f} | 100.00 | {one_word:.2f} |" in text
