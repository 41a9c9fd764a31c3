"""`cappy adapt data` and `cappy eval` sampling through the transformers upstream: adapt's own
client reads its answers (the sampler extras accepted, log-probabilities one per token)."""

from __future__ import annotations

import json
from pathlib import Path

from adapt.cache import read_cache
from cappy.cli import main as cappy
from tests.unit.loadtests.transformers_upstream.conftest import Served

EXAMPLES = [
    {
        "task": "capitals",
        "split": "train",
        "id": "c-0",
        "instruction": "Capital of France?",
        "targets": ["Paris"],
    },
    {
        "task": "capitals",
        "split": "train",
        "id": "c-1",
        "instruction": "Capital of Italy?",
        "targets": ["Rome"],
    },
]


def _data(path: Path) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES), encoding="utf-8")
    return path


def test_adapt_data_builds_pairs_from_its_samples(upstream: Served, tmp_path: Path) -> None:
    out = tmp_path / "data"
    code = cappy(
        [
            "adapt",
            "data",
            "--train",
            str(_data(tmp_path / "ex.jsonl")),
            "--out",
            str(out),
            "--samples-per-example",
            "5",
            "--max-tokens",
            "6",
            "--upstream",
            upstream.url,
            "--concurrency",
            "8",
            "--quiet",
        ]
    )
    assert code == 0
    config, records = read_cache(out / "samples.jsonl")
    assert config["model"] == "tiny" and config["send_top_k"] and config["send_extras"]
    assert len(records) == 10
    assert all(
        r.completion_tokens is not None and r.completion_tokens <= 6 for r in records.values()
    )
    manifest = json.loads((out / "data.json").read_text())
    assert manifest["samples"]["failed"] == 0 and manifest["pairs_by_source"]["ground_truth"] == 2


def test_eval_sampling_gets_one_logprob_per_token(upstream: Served, tmp_path: Path) -> None:
    cache = tmp_path / "test-samples.jsonl"
    code = cappy(
        [
            "eval",
            "--data",
            str(_data(tmp_path / "ex.jsonl")),
            "--examples-per-task",
            "1",
            "--max-tokens",
            "5",
            "--upstream",
            upstream.url,
            "--concurrency",
            "17",
            "--samples",
            str(cache),
            "--out",
            str(tmp_path / "eval"),
            "--quiet",
        ]
    )
    assert code == 0
    config, records = read_cache(cache)
    assert config["logprobs"] is True and len(records) == 17
    for record in records.values():
        assert record.logprobs is not None
        assert len(record.logprobs) == record.completion_tokens
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["samples_without_logprobs"] == 0
