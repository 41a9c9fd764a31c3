"""ScoringRuntime's choices that depend on the loaded scorer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from service.engine.runtime import CPU_PADDING_TOLERANCE, RuntimeConfig, ScoringRuntime


@pytest.mark.parametrize(
    ("configured", "device", "expected"),
    [
        (None, "cpu", CPU_PADDING_TOLERANCE),
        (None, "cuda", math.inf),
        (0.5, "cpu", 0.5),
        (0.0, "cuda", 0.0),
    ],
)
def test_padding_tolerance_follows_the_device_unless_set(
    tmp_path, configured: float | None, device: str, expected: float
) -> None:
    runtime = ScoringRuntime(RuntimeConfig(export_dir=tmp_path, padding_tolerance=configured))
    assert runtime._padding_tolerance(SimpleNamespace(device=device)) == expected
