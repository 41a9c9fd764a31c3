"""The in-process engine benchmark: its knobs do what they say, or are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtests import engine_bench
from tests.unit.loadtests.workloads import write_workload


@pytest.fixture
def workload(tmp_path: Path) -> Path:
    return write_workload(
        tmp_path / "requests.jsonl",
        [
            {"id": "a", "instruction": "Name a colour.", "candidates": ["red", "blue", "seven"]},
            {"id": "b", "instruction": "Add 2 and 2.", "candidates": ["4", "four", "5", "22"]},
            {"id": "c", "instruction": "Say hello.", "candidates": ["hello"]},
        ],
    )


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--margin", "0.01"], "--margin"),
        (["--engine", "onnxruntime", "--bf16-margin", "0.01"], "--bf16-margin"),
        (["--ov-config", "PERF_COUNT=YES", "--refine-via-bf16"], "--refine-via-bf16, --ov-config"),
    ],
)
def test_an_openvino_knob_on_another_engine_is_refused_not_ignored(
    tiny_export: Path,
    workload: Path,
    flags: list[str],
    named: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        engine_bench.main(["--export", str(tiny_export), "--requests", str(workload), *flags])

    assert exit_info.value.code == 2
    assert f"{named}: only with --engine openvino" in capsys.readouterr().err


def test_a_given_margin_is_the_one_the_cascade_uses(
    tiny_export: Path, workload: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--export", str(tiny_export), "--requests", str(workload), "--engine", "openvino"]

    assert engine_bench.main([*common, "--refine", "--margin", "0.5", "--check-argmax"]) == 0
    figures = json.loads(capsys.readouterr().out.splitlines()[-1])

    assert figures["margin"] == 0.5
    # A random tiny model's scores of a set lie within 0.5 of each other: every candidate of the
    # two multi-candidate sets is re-scored in fp32, and the winners are fp32's.
    assert figures["argmax_agreement"] == 1.0
    assert figures["compared"] == 3
