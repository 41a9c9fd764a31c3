"""RowSampler on made-up logits: each row's own processing and draws, the raw log-probabilities of
its choices, and the seeded uniforms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loadtests.transformers_upstream.sampling import RowSampler, SamplingParams, uniforms

VOCAB = 12
CPU = torch.device("cpu")


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=generator) * 2


def _choose(
    params: list[SamplingParams],
    logits: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    pads: list[int] | None = None,
    steps: int = 1,
) -> tuple[list[list[int]], RowSampler]:
    """The tokens the sampler chooses over `steps` calls with the same logits."""
    sampler = RowSampler(
        params,
        prompt_pad=pads or [0] * len(params),
        max_new_tokens=steps,
        top_logprobs=3,
        device=CPU,
    )
    ids = input_ids if input_ids is not None else torch.zeros((len(params), 1), dtype=torch.long)
    chosen = []
    for _ in range(steps):
        out = sampler(ids, logits.clone())
        # One +inf per row: generate's argmax is the sampler's choice.
        assert torch.equal((out == math.inf).sum(dim=1), torch.ones(len(params), dtype=torch.long))
        chosen.append(out.argmax(dim=1).tolist())
    return [list(step) for step in zip(*chosen, strict=True)], sampler


def test_uniforms_are_seeded_per_row_and_in_the_open_interval() -> None:
    u = uniforms([1, 2, 1, 2**70 + 5], 50)
    assert u.shape == (4, 50) and u.dtype == np.float32
    assert (u > 0).all() and (u < 1).all()
    assert np.array_equal(u[0], u[2]) and not np.array_equal(u[0], u[1])
    assert np.array_equal(uniforms([2], 50)[0], u[1])  # the other rows do not matter
    many = uniforms(list(range(2000)), 4).ravel()
    assert abs(float(many.mean()) - 0.5) < 0.02 and abs(float(many.var()) - 1 / 12) < 0.01


def test_greedy_rows_take_the_argmax_and_every_choice_logs_its_raw_logprob() -> None:
    logits = _logits(3)
    params = [SamplingParams(seed=s, temperature=0.0) for s in range(3)]
    chosen, sampler = _choose(params, logits)
    assert [c[0] for c in chosen] == logits.argmax(dim=1).tolist()
    expected = torch.log_softmax(logits, dim=1).gather(1, logits.argmax(1, keepdim=True))
    assert torch.allclose(sampler.chosen_logprobs(), expected)
    top = sampler.top()
    assert top is not None and top[0].shape == (3, 1, 3)
    assert torch.equal(top[1][:, 0, 0], logits.argmax(dim=1))  # the best is the greedy choice


def test_a_row_samples_the_same_whatever_shares_its_batch() -> None:
    logits = _logits(1, seed=3).repeat(4, 1)
    alone, _ = _choose([SamplingParams(seed=42)], logits[:1], steps=6)
    mixed, _ = _choose(
        [
            SamplingParams(seed=7, temperature=0.0),
            SamplingParams(seed=42),
            SamplingParams(seed=9, top_k=2),
            SamplingParams(seed=11, top_p=0.5, min_p=0.1),
        ],
        logits,
        steps=6,
    )
    assert mixed[1] == alone[0]


def test_plain_sampling_follows_the_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (VOCAB - 4)])
    rows = 4000
    chosen, _ = _choose([SamplingParams(seed=s) for s in range(rows)], logits.repeat(rows, 1))
    counts = np.bincount([c[0] for c in chosen], minlength=VOCAB) / rows
    expected = torch.softmax(logits, dim=1)[0].numpy()
    assert np.abs(counts - expected).max() < 0.03


def test_temperature_sharpens() -> None:
    logits = torch.tensor([[1.0, 0.0] + [-30.0] * (VOCAB - 2)])
    rows = 3000
    cold, _ = _choose(
        [SamplingParams(seed=s, temperature=0.25) for s in range(rows)], logits.repeat(rows, 1)
    )
    share = sum(c[0] == 0 for c in cold) / rows
    assert abs(share - 1 / (1 + math.exp(-4))) < 0.03  # softmax([4, 0])


@pytest.mark.parametrize("k", [1, 3])
def test_top_k_keeps_the_k_most_likely(k: int) -> None:
    logits = _logits(1, seed=5)
    allowed = set(logits[0].topk(k).indices.tolist())
    rows = 300
    chosen, _ = _choose(
        [SamplingParams(seed=s, top_k=k) for s in range(rows)], logits.repeat(rows, 1)
    )
    seen = {c[0] for c in chosen}
    assert seen <= allowed and (k == 1 or len(seen) == k)


def test_top_p_keeps_the_smallest_head_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [1e-9] * (VOCAB - 4))
    logits = probs.log()[None, :]
    rows = 600
    chosen, _ = _choose(
        [SamplingParams(seed=s, top_p=0.7) for s in range(rows)], logits.repeat(rows, 1)
    )
    counts = np.bincount([c[0] for c in chosen], minlength=VOCAB) / rows
    assert set(np.flatnonzero(counts)) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert abs(counts[0] - 0.5 / 0.8) < 0.06


def test_min_p_drops_the_unlikely() -> None:
    probs = torch.tensor([0.6, 0.3, 0.08, 0.02] + [1e-9] * (VOCAB - 4))
    logits = probs.log()[None, :]
    rows = 300
    chosen, _ = _choose(
        [SamplingParams(seed=s, min_p=0.1) for s in range(rows)], logits.repeat(rows, 1)
    )
    assert {c[0] for c in chosen} == {0, 1, 2}  # 0.02 < 0.1 x 0.6


def test_repetition_penalty_discourages_tokens_already_in_the_row_but_not_the_padding() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0] + [-30.0] * (VOCAB - 3)]).repeat(2, 1)
    # Row 0 holds token 0 in its text; row 1 holds it only in its left padding.
    input_ids = torch.tensor([[5, 0], [0, 5]])
    chosen, sampler = _choose(
        [
            SamplingParams(seed=0, temperature=0.0, repetition_penalty=2.0),
            SamplingParams(seed=0, temperature=0.0, repetition_penalty=2.0),
        ],
        logits,
        input_ids=input_ids,
        pads=[0, 1],
    )
    assert chosen == [[1], [0]]
    # The log-probabilities stay the raw model's.
    raw = torch.log_softmax(logits, dim=1)
    assert torch.allclose(sampler.chosen_logprobs()[:, 0], raw[[0, 1], [1, 0]])


def test_draws_follow_the_step() -> None:
    logits = torch.zeros((1, VOCAB))
    chosen, _ = _choose([SamplingParams(seed=3)], logits, steps=20)
    assert len(set(chosen[0])) > 5  # a new uniform each step
    again, _ = _choose([SamplingParams(seed=3)], logits, steps=20)
    assert again == chosen
