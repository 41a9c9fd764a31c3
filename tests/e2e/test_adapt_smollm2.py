"""The whole adaptation loop against the real upstream: llama-cpp-python's server running
SmolLM2-135M-Instruct (the e2e suite's fixture), on a handful of BIG-bench examples, with the tiny
RoBERTa as the base: `adapt data` -> `adapt train` -> `eval`, then `eval` again from the cache
alone. Skipped where llama_cpp is not installed, like the other e2e tests; the server is the
session fixture of tests/e2e/conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapt.data import DataOptions
from adapt.data import run as adapt_data
from adapt.evaluate import METHODS, OVERALL, EvalOptions
from adapt.evaluate import run as evaluate
from adapt.train import TrainOptions, train

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIGBENCH = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bigbench_dev.jsonl"
TASK = "qa_wikidata"  # the shortest prompts of the set: quick calls
MAX_TOKENS = 8


def test_adapt_then_evaluate_with_smollm2(
    llama_server: str,
    tiny_checkpoint: Path,
    tmp_path: Path,
) -> None:
    if not BIGBENCH.is_file():
        pytest.skip(f"{BIGBENCH} not present")
    data = adapt_data(
        DataOptions(
            train=BIGBENCH,
            out=tmp_path / "data",
            upstream=llama_server,
            split="train",
            tasks=[TASK],
            examples_per_task=2,
            samples_per_example=2,
            max_tokens=MAX_TOKENS,
            progress=False,
        )
    )
    assert data.manifest["samples"]["fetched"] == 4
    assert {p.source for p in data.pairs} == {"ground_truth", "mismatch", "sample"}

    trained = train(
        TrainOptions(
            data=tmp_path / "data",
            base=str(tiny_checkpoint),
            out=tmp_path / "scorer",
            steps=3,
            effective_batch=8,
            micro_batch=8,
            logging_steps=1,
            fp16=False,
            progress=False,
        )
    )
    assert trained.out == tmp_path / "scorer"

    options = EvalOptions(
        data=BIGBENCH,
        out=tmp_path / "eval",
        scorer=tmp_path / "scorer",
        upstream=llama_server,
        split="test",
        tasks=[TASK],
        examples_per_task=1,
        max_tokens=MAX_TOKENS,
        progress=False,
    )
    result = evaluate(options)
    report = result.report
    assert report["samples"]["fetched"] == 17
    assert report["samples_without_logprobs"] == 0  # llama.cpp returned token logprobs
    methods = report["methods"]
    for method in METHODS:
        assert methods["oracle"][OVERALL] >= methods[method][OVERALL]
    row = json.loads(result.per_example.read_text())
    # Distinct seeds per call: the sampled decodings give different texts (llama.cpp would
    # otherwise answer one prompt with one sample).
    sampled = [t for t, d in zip(row["rouge"], row["decodings"], strict=True) if d != "greedy"]
    assert len(sampled) == 16
    texts = [
        json.loads(line)["text"]
        for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()[1:]
    ]
    assert len(set(texts)) >= 4
    assert result.chart.is_file() and result.markdown.is_file()

    again = evaluate(
        EvalOptions(
            data=BIGBENCH,
            out=tmp_path / "again",
            scorer=tmp_path / "scorer",
            samples=tmp_path / "eval" / "samples.jsonl",
            split="test",
            tasks=[TASK],
            examples_per_task=1,
            progress=False,
        )
    )
    assert again.report["methods"] == methods and again.report["samples"]["fetched"] == 0
