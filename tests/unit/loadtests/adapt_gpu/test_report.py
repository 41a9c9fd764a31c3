"""The summary's headline of `cappy eval`'s report and its Markdown."""

from __future__ import annotations

from pathlib import Path

from adapt.selection import METHODS, OVERALL, SUBSET_METHODS, SUBSET_SIZES
from loadtests.adapt_gpu import report


def _evaluation() -> dict:
    interval = {"difference": 1.5, "low": -0.5, "high": 3.25, "share_above_zero": 0.9}
    return {
        "examples": 40,
        "tasks": ["a", "b"],
        "incomplete_examples": ["a-3"],
        "samples": {"planned": 680},
        "scorer": "/x/scorer",
        "methods": {m: {OVERALL: 10.0 + i, "per_task": {}} for i, m in enumerate(METHODS)},
        "by_samples": {
            m: {str(k): {OVERALL: float(k)} for k in SUBSET_SIZES} for m in SUBSET_METHODS
        },
        "bootstrap": {"comparisons": {"cappy - self_scoring": interval, "cappy - greedy": None}},
    }


def test_headline_and_markdown(tmp_path: Path) -> None:
    headline = report.headline(_evaluation())
    assert headline["overall"]["nucleus"] == 10.0 and headline["overall"]["cappy"] == 16.0
    assert headline["by_samples"]["cappy"] == {"1": 1.0, "4": 4.0, "17": 17.0}
    assert headline["incomplete_examples"] == 1 and headline["tasks"] == 2
    run = {
        "started_at": "2026-12-06T00:00:00+00:00",
        "wall_s": 12.0,
        "dry_run": False,
        "config": {"deadline": 600, "samples_per_example": 17},
        "environment": {"gpu": None, "cpu": "x", "cores": 2, "python": "3.12", "versions": {}},
        "inputs": {"data": "d.jsonl", "llm": ["--gguf", "m.gguf"], "train_flags": ["--bf16"]},
        "upstream": {"processes": 4},
        "phases": [
            {
                "name": "data",
                "status": "ok",
                "seconds": 200.0,
                "budget_s": 330.0,
                "upstream": {"samples_per_s": 635.2, "mean_rows_per_generate": 251.0},
                "pairs": 10,
                "pairs_by_source": {"sample": 9, "ground_truth": 1},
                "gpu": {"util_mean": 71.0},
            },
            {"name": "eval", "status": "error", "error": "eval: exit 1: a | b"},
        ],
        "eval": {**headline, "report": "/x/report.md"},
    }
    report.write(tmp_path, run)
    text = (tmp_path / "adapt_gpu.md").read_text()
    assert "| data | ok | 200.0 | 330.0 | 635.2 | 251.0 | 71.0 |" in text
    assert "| eval | error |" in text and "exit 1: a / b" in text
    assert "| 10.00 | 11.00 | 12.00 | 13.00 | 14.00 | 15.00 | 16.00 |" in text
    assert "- cappy - self_scoring: 1.50 (95% bootstrap -0.50 to 3.25)" in text
    assert (tmp_path / "adapt_gpu.json").is_file()
