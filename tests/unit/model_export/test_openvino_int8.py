"""The calibrated OpenVINO int8 model: calibration files, the export steps, the manifest entry,
the parity gate and `cappy verify`."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from cappy import export_format as fmt
from cappy.cli import main
from model_export import manifest as mf
from model_export import openvino_int8
from model_export.errors import ExportError
from model_export.pipeline import ExportOptions, export, verify

pytest.importorskip("nncf")
pytest.importorskip("openvino")

_WORDS = (
    "the model answers a question about rivers mountains history code music physics recipes "
    "travel languages because therefore however summary explain translate compare poem story"
).split()

# The tiny random checkpoint's wide weights make int8 far from fp32 (|diff| ~1): a threshold the
# happy path passes, so that it tests the plumbing and not the quality of a random model.
_LENIENT = 1e3


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high)))


def _rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n candidate sets in turn in the three shapes: candidates, targets, response."""
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for i in range(n):
        instruction = _words(rng, 2, 30) + "?"
        candidates = [_words(rng, 0, 25) for _ in range(rng.randint(2, 6))]
        shape = i % 3
        if shape == 0:
            rows.append({"instruction": instruction, "candidates": candidates, "id": i})
        elif shape == 1:
            rows.append({"instruction": instruction, "targets": candidates, "task": "t"})
        else:
            rows.append({"instruction": instruction, "response": candidates[0]})
    return rows


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def int8_export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("ov-int8")
    calibration = _write(base / "calibration.jsonl", _rows(48))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(openvino_int8, "OPENVINO_INT8_MAX_ABS_DIFF", _LENIENT)
        export(
            ExportOptions(
                model=str(tiny_checkpoint),
                out=base / "out",
                fp16=False,
                int8_calibration=calibration,
                progress=False,
            )
        )
    return base / "out"


def test_reads_the_three_line_shapes(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Pick one.", "candidates": ["a", "b", "c"]},
        {"instruction": "Q: 2+2?", "targets": ["4"], "task": "arithmetic"},
        {"instruction": "Say hi.", "response": "hi"},
    ] * 4
    rows.append({"instruction": "Too many.", "candidates": [str(i) for i in range(40)]})
    rows.append({"no": "instruction"})  # a JSON object without a usable set: skipped
    rows.append({"instruction": "Empty.", "candidates": []})  # skipped
    path = _write(tmp_path / "c.jsonl", rows)
    with path.open("a") as handle:
        handle.write("\n   \n")  # blank lines are fine
    cal = openvino_int8.read_calibration(path)
    sets = cal.calibration + cal.heldout
    assert cal.usable_lines == 13 and cal.skipped_lines == 2
    assert len(cal.heldout) == openvino_int8.MIN_HELDOUT_SETS
    assert len(sets) == 13
    assert {s.candidates for s in sets} >= {("a", "b", "c"), ("4",), ("hi",)}
    assert max(len(s.candidates) for s in sets) == openvino_int8.MAX_CANDIDATES
    # Shuffled with a fixed seed: the same split every time.
    again = openvino_int8.read_calibration(path)
    assert again.heldout == cal.heldout and again.calibration == cal.calibration
    record = cal.record()
    assert record["file"] == "c.jsonl" and len(record["sha256"]) == 64
    assert (record["sets"], record["heldout_sets"]) == (9, 4)


@pytest.mark.parametrize(
    ("total", "held"), [(8, 4), (40, 4), (41, 5), (300, 30), (640, 64), (9028, 64)]
)
def test_heldout_count(total: int, held: int) -> None:
    assert openvino_int8.heldout_count(total) == held


def test_calibration_sets_are_capped(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "c.jsonl", [{"instruction": str(i), "response": "r"} for i in range(500)]
    )
    cal = openvino_int8.read_calibration(path)
    assert len(cal.heldout) == 50
    assert len(cal.calibration) == openvino_int8.MAX_CALIBRATION_SETS


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("", "0 usable candidate sets, at least 8 needed"),
        ("not json\n", "line 1 is not JSON"),
        ("[1, 2]\n", "line 1 is not a JSON object"),
        (
            "".join(json.dumps(r) + "\n" for r in _rows(5)),
            "5 usable candidate sets, at least 8 needed",
        ),
        (
            "".join(json.dumps(r) + "\n" for r in _rows(7)) + '{"prompt": "x"}\n',
            "7 usable candidate sets, at least 8 needed",
        ),
    ],
)
def test_a_bad_calibration_file_fails_before_any_work(
    content: str | None, message: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    path = tmp_path / "calibration.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=message) as info:
        export(ExportOptions(model=str(tiny_checkpoint), out=out, int8_calibration=path))
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"--int8-calibration {path}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["calibration.jsonl"] if content is not None else []
    )


def test_without_the_extra(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(openvino_int8, "missing_dependency", lambda: "nncf")
    path = _write(tmp_path / "c.jsonl", _rows(20))
    with pytest.raises(ExportError) as info:
        export(
            ExportOptions(model=str(tiny_checkpoint), out=tmp_path / "out", int8_calibration=path)
        )
    assert str(info.value) == (
        "--int8-calibration needs the int8 extra: pip install 'cappy-serve[int8]'"
    )
    assert not (tmp_path / "out").exists()


def test_export_writes_the_int8_model_and_its_record(int8_export: Path) -> None:
    manifest = json.loads((int8_export / fmt.MANIFEST).read_text())
    assert (int8_export / "model.int8.xml").is_file() and (int8_export / "model.int8.bin").is_file()
    assert {"model.int8.xml", "model.int8.bin"} <= set(manifest["files"])
    entry = manifest["models"]["openvino-int8"]
    assert entry["file"] == fmt.VARIANT_FILES["openvino-int8"] == "model.int8.xml"
    assert entry["weights"] == "model.int8.bin"
    assert (entry["dtype"], entry["engine"], entry["io_dtype"]) == (
        "int8-static",
        "openvino",
        "float32",
    )
    # 48 sets: 5 held out, 43 to calibrate on.
    assert entry["calibration"] == {
        "file": "calibration.jsonl",
        "sha256": fmt.sha256_file(int8_export.parent / "calibration.jsonl"),
        "sets": 43,
        "heldout_sets": 5,
    }
    record = manifest["parity"]["openvino-int8"]
    assert record["status"] == "passed"
    assert record["heldout_sets"] == 5
    assert record["candidate_sets"] == manifest["parity"]["candidate_sets"] + 5
    assert record["pairs"] > manifest["parity"]["pairs"]
    assert math.isfinite(record["max_abs_diff"]) and record["max_abs_diff"] > 0
    assert 0 <= record["argmax_agreement"] <= 1
    assert record["inference_precision"] in {"bf16", "f32"}
    assert record["provider"] == f"openvino-cpu-{record['inference_precision']}"
    assert record["threshold_max_abs_diff"] == _LENIENT
    assert set(record) >= {"status", "provider", "pairs", "candidate_sets", "reason"}
    assert "fp16" not in manifest["models"]


def test_openvino_int8_runner_scores_a_batch(int8_export: Path) -> None:
    from transformers import AutoTokenizer

    from model_export import parity

    tokenizer = AutoTokenizer.from_pretrained(str(int8_export))
    feeds = parity.encode_set(
        tokenizer, parity.CandidateSet("Name a river.", ("the Nile", "", "rivers " * 50)), 512
    )
    run = openvino_int8.runner(int8_export / "model.int8.xml", "f32")
    scores = run(feeds)
    assert scores.shape == (3,)
    assert all(math.isfinite(float(s)) for s in scores)


def test_verify_remeasures_on_the_probe_sets(
    int8_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(openvino_int8, "OPENVINO_INT8_MAX_ABS_DIFF", _LENIENT)
    report = verify(int8_export)
    assert report.ok, report.problems
    (line,) = [x for x in report.lines if x.startswith("re-measured parity openvino-int8:")]
    assert ": passed" in line and "openvino-cpu-" in line
    assert "probe sets only" in line


def test_verify_fails_when_remeasured_over_the_threshold(
    int8_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(openvino_int8, "OPENVINO_INT8_MAX_ABS_DIFF", 0.0)
    report = verify(int8_export)
    assert any(
        p.startswith("parity openvino-int8 re-measured: max |diff|") for p in report.problems
    )


def test_verify_without_openvino_says_not_measured(
    int8_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def missing() -> str:
        raise ModuleNotFoundError("No module named 'openvino'")

    monkeypatch.setattr(openvino_int8, "inference_precision", missing)
    report = verify(int8_export)
    assert report.ok, report.problems
    (line,) = [x for x in report.lines if x.startswith("re-measured parity openvino-int8:")]
    assert "not measured" in line and "openvino is not installed" in line


def test_verify_flags_weights_outside_the_hash_list(int8_export: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(int8_export, copy)
    manifest = json.loads((copy / fmt.MANIFEST).read_text())
    del manifest["files"]["model.int8.bin"]
    mf.write(copy, manifest)
    # The contract (cappy.export_format) refuses it, for cappy verify as for the service.
    with pytest.raises(ExportError, match="model openvino-int8 weights 'model.int8.bin' has no"):
        verify(copy, remeasure=False)


def test_a_failing_gate_ships_nothing_but_keeps_the_record(
    tiny_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Through the CLI with its progress display on: stdout is still one JSON line."""
    monkeypatch.setattr(openvino_int8, "OPENVINO_INT8_MAX_ABS_DIFF", 0.0)
    out = tmp_path / "out"
    calibration = _write(tmp_path / "c.jsonl", _rows(12, seed=1))
    args = ["export", "--model", str(tiny_checkpoint), "--out", str(out), "--no-fp16"]
    code = main([*args, "--int8-calibration", str(calibration)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (line,) = captured.out.splitlines()
    summary = json.loads(line)
    assert summary["models"] == ["fp32"]
    assert summary["parity"]["openvino-int8"]["status"] == "failed"
    assert "quantise int8 (OpenVINO)" in captured.err
    manifest = json.loads((out / fmt.MANIFEST).read_text())
    assert "openvino-int8" not in manifest["models"]
    record = manifest["parity"]["openvino-int8"]
    assert record["status"] == "failed" and record["reason"].startswith("max |diff|")
    assert record["heldout_sets"] == 4
    assert not (out / "model.int8.xml").exists() and not (out / "model.int8.bin").exists()
    assert not any(name.startswith("model.int8") for name in manifest["files"])
    assert verify(out, remeasure=False).ok


def test_cli_bad_calibration_file(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["export", "--model", str(tiny_checkpoint), "--out", str(out), "--quiet"]
    code = main([*args, "--int8-calibration", str(tmp_path / "missing.jsonl")])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    (error,) = [x for x in captured.err.splitlines() if x.startswith("error: ")]
    assert error.endswith("missing.jsonl: no such file")
    assert not out.exists()
