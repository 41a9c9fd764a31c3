"""The probe sets: what the export's parity and the service's margin calibration read."""

from __future__ import annotations

from cappy.probe_sets import probe_sets


def test_probe_sets_are_fixed_and_varied() -> None:
    sets = probe_sets()
    assert sets == probe_sets()  # deterministic
    assert (len(sets), sum(len(s.candidates) for s in sets)) == (16, 76)
    texts = [text for s in sets for text in s.candidates]
    assert "" in texts and any(not text.isascii() for text in texts)
    assert max(len(text.split()) for text in texts) > 512  # truncated at any max_length
    assert sum(s.cut for s in sets) == 3 and all(
        max(len(f"{s.instruction} {text}".split()) for text in s.candidates) > 512
        for s in sets
        if s.cut
    )
