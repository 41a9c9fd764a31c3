"""`cappy export` / `cappy verify` as a user runs them: one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from cappy.cli import main
from tests.support.commands import run_ok


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("./does-not-exist", "no such directory"),
        ("btan2/cappy-large", "not in the local Hugging Face cache"),
    ],
)
def test_bad_model_exits_non_zero_and_writes_nothing(
    model: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, err = _run(["export", "--model", model, "--out", str(out), "--quiet"], capsys)
    assert code == 1
    assert message in _error_line(err)
    assert stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_not_a_scorer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.checkpoints import minilm_dir

    out = tmp_path / "out"
    code, _, err = _run(
        ["export", "--model", str(minilm_dir()), "--out", str(out), "--quiet"], capsys
    )
    assert code == 1
    assert "not a sequence-classification model" in _error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_existing_out_needs_force(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(
        ["export", "--model", str(tiny_checkpoint), "--out", str(out), "--quiet"], capsys
    )
    assert code == 1
    assert "already exists (pass --force" in _error_line(err)
    assert (out / "keep.txt").read_text() == "mine"


def test_verify_cli(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["verify", str(tiny_export)], capsys)
    assert code == 0 and out.strip().endswith("verify: ok")
    code, _, err = _run(["verify", str(tmp_path)], capsys)
    assert code == 1 and "no cappy_export.json" in _error_line(err)


def test_console_script_end_to_end(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The installed `cappy` entry point: progress on stderr, a JSON summary on stdout."""
    out = tmp_path / "export"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cappy = [sys.executable, "-m", "cappy"]
    args = ["export", "--model", str(tiny_checkpoint), "--out", str(out), "--no-fp16"]
    done = run_ok([*cappy, *args], env=env, timeout=300)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["parity"]["fp32"]["status"] == "passed"
    assert "parity fp32" in done.stderr  # the progress display named the steps
    run_ok([*cappy, "verify", str(out)], env=env, timeout=300)


def test_parity_record_exports_what_the_gate_refuses(
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stand-in whose fp32 graph misses the gate: refused by default; with --parity record,
    shipped, and both the summary and `cappy verify` say it was not gated."""
    from model_export import parity

    impossible = {"max_rel_diff": 1e-12, "min_argmax_agreement": 1.0, "tie_tolerance": 1e-12}
    monkeypatch.setitem(parity.GATES, "fp32", impossible)
    out = tmp_path / "out"
    args = ["export", "--model", str(tiny_checkpoint), "--out", str(out), "--no-fp16", "--quiet"]
    code, stdout, err = _run(args, capsys)
    assert code == 1 and stdout == ""
    assert _error_line(err).startswith("error: fp32 parity failed against PyTorch (max |diff|")
    assert list(tmp_path.iterdir()) == []

    code, stdout, err = _run([*args, "--parity", "record"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["parity_mode"] == "record"
    assert summary["models"] == ["fp32"]
    assert summary["parity"]["fp32"]["status"] == "failed"
    assert summary["parity"]["fp32"]["gated"] is False
    assert "warning: parity recorded, not gated (--parity record)" in err

    code, stdout, _ = _run(["verify", str(out)], capsys)
    assert code == 0, stdout
    lines = stdout.strip().splitlines()
    assert "parity: not gated (exported with --parity record)" in stdout
    assert any(line.startswith("re-measured parity fp32: failed") for line in lines)
    assert lines[-1] == "verify: ok (not gated: --parity record)"
