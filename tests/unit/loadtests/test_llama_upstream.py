import numpy as np
import pytest

from loadtests.llama_upstream import patch, top_pairs


@pytest.mark.parametrize("k", [0, 1, 5, 999, None])
def test_top_pairs_is_the_head_of_the_full_sort(k) -> None:
    row = np.random.default_rng(7).standard_normal(999).astype(np.float32)
    expected = sorted(zip(row, range(len(row)), strict=True), reverse=True)
    assert top_pairs(row, k) == (expected if k is None else expected[:k])


def test_patch_applies_to_the_installed_llama_cpp_and_keeps_the_method_name() -> None:
    llama = pytest.importorskip("llama_cpp.llama")
    before = llama.Llama._create_completion
    try:
        patch()
        after = llama.Llama._create_completion
        assert after is not before
        assert after.__name__ == "_create_completion"
        assert "_cappy_top_pairs" in after.__code__.co_names
    finally:
        llama.Llama._create_completion = before
