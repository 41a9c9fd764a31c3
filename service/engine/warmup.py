"""Warm-up batches: the shapes every backend runs once before the service turns ready, so that
the first requests do not pay for kernel selection or primitive creation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# (rows, tokens): short and long rows, small and full batches.
WARMUP_SHAPES = ((1, 16), (4, 64), (16, 128), (32, 256), (8, 512))


def synthetic_feeds(
    rows: int, tokens: int, input_names: Sequence[str], pad_token_id: int
) -> dict[str, np.ndarray]:
    """A batch of the given shape with varied lengths (the last rows padded). Ids stay below 100,
    inside any real vocabulary (the tiny test models have a few hundred tokens)."""
    rng = np.random.default_rng(rows * 1000 + tokens)
    input_ids = rng.integers(5, 100, size=(rows, tokens), dtype=np.int64)
    attention_mask = np.ones((rows, tokens), dtype=np.int64)
    token_type_ids = np.zeros((rows, tokens), dtype=np.int64)
    for row in range(rows):
        length = max(2, tokens - row * max(1, tokens // (2 * rows)))
        input_ids[row, length:] = pad_token_id
        attention_mask[row, length:] = 0
        token_type_ids[row, length // 2 : length] = 1
    feeds = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
    }
    return {name: feeds[name] for name in input_names}
