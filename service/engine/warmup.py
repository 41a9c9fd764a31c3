"""Warm-up batches: the shapes every backend runs once before the service turns ready, so that
the first requests do not pay for kernel selection or primitive creation."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from cappy.probe_sets import probe_sets
from service.engine.types import Encoder, Scorer, pad_batch

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


def text_batches(
    encode: Encoder, input_names: Sequence[str], pad_token_id: int
) -> list[dict[str, np.ndarray]]:
    """The probe sets (cappy/probe_sets.py) but the 3 built to be cut at max_length (the
    synthetic shapes run rows of 256 and 512 already, and those 3 would double the calibration's
    time: +5.3 s against +2.8 s of a MiniLM's start on 2 cores), tokenized as requests are
    (`encode`), one padded batch a set: real words, on which a refining scorer measures its
    fast/exact difference (`Scorer.calibrate`). The synthetic batches above use a few ids that
    any vocabulary has and understate that difference on text: 1.1e-3 against 3.0e-3 on these
    sets and 3.9e-3 on the benchmark's for a mean-pooled MiniLM (loadtests/README.md)."""
    batches = []
    for candidate_set in probe_sets():
        if candidate_set.cut:
            continue
        encoded = encode([(candidate_set.instruction, text) for text in candidate_set.candidates])
        width = max(pair.length for pair in encoded)
        batches.append(pad_batch(encoded, pad_token_id, input_names, width))
    return batches


def warm_up(scorer: Scorer, encode: Encoder, stop: threading.Event | None = None) -> None:
    """Readies a loaded scorer as the service does before it turns ready: its warm-up batches,
    then its re-scoring margin measured on the probe sets' text too (`text_batches`). Once
    `stop` is set, raises `EngineStopped` instead of finishing (`Scorer.warm`)."""
    scorer.warmup(stop)
    scorer.calibrate(text_batches(encode, scorer.input_names, scorer.pad_token_id), stop)
