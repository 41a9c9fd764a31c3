"""loadtests/gpu_bench/flops.py: encoder parameters, FLOPs per token and the FLOP-limit fraction."""

from __future__ import annotations

import pytest

from loadtests.gpu_bench.flops import encoder_parameters, flop_figures, flops_per_token


def test_encoder_parameters_and_flops_of_bert_large() -> None:
    per_layer = 4 * (1024 * 1024 + 1024) + 2 * 1024 + 2 * 1024 * 4096 + 4096 + 1024 + 2 * 1024
    assert encoder_parameters(24, 1024, 4096) == 24 * per_layer == 302_309_376
    per_token = flops_per_token(24, 1024, 4096, 160.0)
    assert per_token == 2 * 302_309_376 + 4 * 24 * 1024 * 160
    model = {"layers": 24, "hidden": 1024, "intermediate": 4096}
    # 5,000 pairs/s of 160 tokens: ~0.63 of an H200's 790 TFLOP/s
    figures = flop_figures(model, 160 * 5000, 5000, 1.0, 790.0)
    assert figures["tflops"] == pytest.approx(per_token * 800_000 / 1e12, rel=1e-3)
    assert figures["flop_fraction"] == pytest.approx(per_token * 800_000 / 1e12 / 790, rel=1e-3)
    assert 0.6 < figures["flop_fraction"] < 0.65
    toy = {"layers": 2, "hidden": 32, "intermediate": 64}
    tiny = flop_figures(toy, 160, 1, 1.0, 790.0)["flop_fraction"]
    assert tiny is not None and 0 < tiny < 1e-6  # significant digits, not rounded to 0
    assert flop_figures(model, None, 5000, 1.0, 790.0)["flop_fraction"] is None
    assert flop_figures(None, 1000, 10, 1.0, 790.0)["tflops"] is None
