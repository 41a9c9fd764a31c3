"""The FLOP accounting of a phase: encoder FLOPs per real (unpadded) token, achieved TFLOP/s and
its fraction of the --peak-tflops limit."""

from __future__ import annotations

import math
from typing import Any


def encoder_parameters(layers: int, hidden: int, intermediate: int) -> int:
    """Parameters of the encoder layers (Q, K, V and output projections, the feed-forward pair,
    two LayerNorms), i.e. the non-embedding parameters that every token goes through. The
    pooler/classifier head runs once per pair, not per token, and is left out."""
    attention = 4 * (hidden * hidden + hidden) + 2 * hidden
    feed_forward = 2 * hidden * intermediate + intermediate + hidden + 2 * hidden
    return layers * (attention + feed_forward)


def flops_per_token(layers: int, hidden: int, intermediate: int, mean_length: float) -> float:
    """2 x non-embedding parameters, plus attention's QK^T and AV: 4 x layers x hidden x the
    mean sequence length."""
    return 2 * encoder_parameters(layers, hidden, intermediate) + 4 * layers * hidden * mean_length


def flop_figures(
    model: dict[str, Any] | None, tokens: float | None, pairs: int, seconds: float, peak: float
) -> dict[str, float | None]:
    """Achieved TFLOP/s on the phase's real (unpadded) tokens and its fraction of `peak`."""
    if not model or not tokens or not pairs or seconds <= 0:
        return {"tflops": None, "flop_fraction": None}
    per_token = flops_per_token(
        model["layers"], model["hidden"], model["intermediate"], tokens / pairs
    )
    tflops = per_token * tokens / seconds / 1e12
    return {"tflops": significant(tflops), "flop_fraction": significant(tflops / peak)}


def significant(value: float, digits: int = 4) -> float:
    """`value` rounded to `digits` significant digits (a toy model's fraction is ~1e-7)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))
