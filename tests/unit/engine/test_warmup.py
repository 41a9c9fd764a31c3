"""Warm-up batches: the synthetic shapes, and the probe sets' text for calibrating a margin."""

from __future__ import annotations

import numpy as np

from cappy.probe_sets import probe_sets
from service.engine.tokenize import PairTokenizer
from service.engine.warmup import text_batches


def test_text_batches_are_the_probe_sets_tokenized_as_requests_are(
    tokenizer: PairTokenizer,
) -> None:
    batches = text_batches(tokenizer.encode, ("input_ids", "attention_mask"), 1)
    expected = []
    for candidate_set in probe_sets():
        pairs = [(candidate_set.instruction, text) for text in candidate_set.candidates]
        encoded = tokenizer.encode(pairs)
        if not candidate_set.cut:  # the sets built to be truncated are left out
            expected.append(encoded)
    assert len(batches) == len(expected) == 13
    for encoded, feeds in zip(expected, batches, strict=True):
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        assert sorted(feeds) == ["attention_mask", "input_ids"]
        assert ids.shape == (len(encoded), max(pair.length for pair in encoded))
        for row, pair in enumerate(encoded):
            assert list(ids[row, : pair.length]) == list(pair.input_ids)
            assert mask[row].sum() == pair.length
            assert np.all(ids[row, pair.length :] == 1)  # the pad id
