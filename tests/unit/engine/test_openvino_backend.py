"""The OpenVINO backend declines OpenVINO's usage telemetry for the process: importing openvino
through it writes nothing to the home directory (a read-only root would log a warning)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openvino")


@pytest.mark.parametrize(("through_the_backend", "written"), [(False, True), (True, False)])
def test_openvino_telemetry_writes_nothing(
    through_the_backend: bool, written: bool, tmp_path: Path
) -> None:
    imports = (
        "import service.engine.openvino_backend, openvino"
        if through_the_backend
        else ("import openvino")
    )
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("CI", None)  # the library declines by itself in CI
    done = subprocess.run(
        [sys.executable, "-c", imports],
        cwd=Path(__file__).resolve().parents[3],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # The plain import is the control: it writes its telemetry folder, so the check has teeth.
    assert (tmp_path / "intel").exists() is written
    if through_the_backend:
        assert "telemetry" not in done.stderr
