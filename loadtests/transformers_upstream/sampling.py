"""Per-row sampling inside one batched `generate`: every row's own temperature, top-k, top-p,
min-p and repetition penalty, its own seeded draws, and the log-probability of each chosen token
under the model's raw distribution.

`RowSampler` is a logits processor that CHOOSES each row's next token and marks it with +inf in
the score row; `generate` runs greedy (`do_sample=False`), so its argmax is that choice. Why not
`generate`'s own sampling: its temperature, top-k and top-p are one value for the whole batch,
and its draws come from the global generator, so a sample would depend on which requests
happened to share its batch.

Order of the processing, as transformers applies it: repetition penalty (over the prompt and the
tokens generated so far, padding excluded), temperature, top-k, top-p (renormalized after top-k),
min-p. Greedy rows (temperature 0) take the argmax after the penalty. A sampled row draws by
inverse CDF: one uniform per step, `uniforms(seed, step)`, a SplitMix64 hash of (seed, step), so
the draw is the row's alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SEED_MASK = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one row samples. Neutral values switch a stage off.

    Attributes:
        seed: the row's draws (any integer; taken modulo 2**64).
        temperature: 0 is greedy.
        top_p: nucleus mass in (0, 1]; 1 is off.
        top_k: the k most likely tokens; 0 is off.
        min_p: drop tokens below min_p x the most likely one's probability; 0 is off.
        repetition_penalty: transformers' (divides positive logits of tokens already in the
            row, multiplies negative ones); 1 is off.
    """

    seed: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return np.asarray(z ^ (z >> np.uint64(31)))


def uniforms(seeds: Sequence[int], steps: int) -> np.ndarray:
    """`(len(seeds), steps)` float32 uniforms in (0, 1), each a hash of (seed, step): a row's
    draws do not depend on the other rows."""
    with np.errstate(over="ignore"):
        s = np.array([seed & _SEED_MASK for seed in seeds], dtype=np.uint64)[:, None]
        t = np.arange(steps, dtype=np.uint64)[None, :]
        h = _splitmix64(_splitmix64(s) ^ _splitmix64(t ^ np.uint64(0x5851F42D4C957F2D)))
    # 24 bits: exact in float32, and never 0 or 1.
    return (((h >> np.uint64(40)).astype(np.float64) + 0.5) / float(1 << 24)).astype(np.float32)


def _rows(values: Sequence[bool], device: torch.device) -> torch.Tensor | None:
    index = [i for i, v in enumerate(values) if v]
    return torch.tensor(index, dtype=torch.long, device=device) if index else None


class RowSampler(LogitsProcessor):
    """Chooses every row's next token under its own `SamplingParams`; see the module docstring.

    After `generate`, `chosen_logprobs()` holds each step's log-probability of the chosen token
    under the raw (unprocessed) distribution, and `top()` the `top_logprobs` best tokens of
    each step when asked for. Steps past the last one `generate` keeps (it may run one step more
    and undo it) are for the caller to cut.
    """

    def __init__(
        self,
        params: Sequence[SamplingParams],
        *,
        prompt_pad: Sequence[int],
        max_new_tokens: int,
        top_logprobs: int,
        device: torch.device,
    ) -> None:
        self.rows = len(params)
        self.steps_planned = max(1, max_new_tokens)
        self.device = device
        self.greedy = torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device)
        self.all_greedy = all(p.greedy for p in params)
        self.any_greedy = any(p.greedy for p in params)
        self.temperature = torch.tensor(
            [p.temperature if not p.greedy else 1.0 for p in params],
            dtype=torch.float32,
            device=device,
        )[:, None]
        # Rows with a nucleus are sorted (their top-k, if any, applied in the sorted order);
        # rows with a top-k alone need only the k-th largest logit.
        nucleus = [not p.greedy and p.top_p < 1.0 for p in params]
        self.nucleus_rows = _rows(nucleus, device)
        self.nucleus_top_k = torch.tensor(
            [p.top_k for p, n in zip(params, nucleus, strict=True) if n], dtype=torch.long
        ).to(device)
        self.nucleus_top_p = torch.tensor(
            [p.top_p for p, n in zip(params, nucleus, strict=True) if n], dtype=torch.float32
        ).to(device)
        top_k = [not p.greedy and p.top_k > 0 and p.top_p >= 1.0 for p in params]
        self.top_k_rows = _rows(top_k, device)
        self.top_k = torch.tensor(
            [p.top_k for p, k in zip(params, top_k, strict=True) if k], dtype=torch.long
        ).to(device)
        min_p = [not p.greedy and p.min_p > 0 for p in params]
        self.min_p_rows = _rows(min_p, device)
        self.min_p = torch.tensor(
            [p.min_p for p, m in zip(params, min_p, strict=True) if m], dtype=torch.float32
        ).to(device)
        penalised = [p.repetition_penalty != 1.0 for p in params]
        self.penalty_rows = _rows(penalised, device)
        self.penalty = torch.tensor(
            [p.repetition_penalty for p, m in zip(params, penalised, strict=True) if m],
            dtype=torch.float32,
        ).to(device)
        self.prompt_pad = torch.tensor(list(prompt_pad), dtype=torch.long, device=device)
        self.uniforms = torch.from_numpy(uniforms([p.seed for p in params], self.steps_planned)).to(
            device
        )
        self.top_logprobs = top_logprobs
        self.step = 0
        self._logprobs: list[torch.Tensor] = []
        self._top: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        raw = scores.float()  # generate's logits are float32 already: the same tensor
        logits = self._penalised(input_ids, raw)
        if self.all_greedy:
            choice = logits.argmax(dim=-1)
        else:
            sampled = self._sample(logits)
            choice = (
                torch.where(self.greedy, logits.argmax(dim=-1), sampled)
                if self.any_greedy
                else sampled
            )
        norm = torch.logsumexp(raw, dim=-1)
        self._logprobs.append(raw.gather(1, choice[:, None]).squeeze(1) - norm)
        if self.top_logprobs > 0:
            values, ids = raw.topk(self.top_logprobs, dim=-1)
            self._top.append((values - norm[:, None], ids))
        self.step += 1
        # The choice made the row's only +inf (logits are finite), in place: no new
        # (rows x vocabulary) tensor per step.
        scores.scatter_(1, choice[:, None], math.inf)
        return scores

    def _penalised(self, input_ids: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        if self.penalty_rows is None:
            return raw
        rows = self.penalty_rows
        ids = input_ids[rows]
        positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
        # Left padding is not the row's text: stand the row's last token in for it.
        ids = torch.where(positions >= self.prompt_pad[rows][:, None], ids, ids[:, -1:])
        sub = raw[rows]
        picked = sub.gather(1, ids)
        penalty = self.penalty[:, None]
        picked = torch.where(picked < 0, picked * penalty, picked / penalty)
        logits = raw.clone()
        logits[rows] = sub.scatter(1, ids, picked)
        return logits

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        scaled = logits / self.temperature
        vocab = scaled.shape[-1]
        if self.top_k_rows is not None:
            sub = scaled[self.top_k_rows]
            k = self.top_k.clamp(max=vocab)
            best = sub.topk(int(k.max()), dim=-1).values
            kth = best.gather(1, (k - 1)[:, None])
            scaled[self.top_k_rows] = sub.masked_fill(sub < kth, -math.inf)
        if self.nucleus_rows is not None:
            sub = scaled[self.nucleus_rows]
            values, order = sub.sort(dim=-1, descending=True)
            positions = torch.arange(vocab, device=sub.device)[None, :]
            k = torch.where(self.nucleus_top_k > 0, self.nucleus_top_k, vocab)[:, None]
            remove = positions >= k
            probs = values.masked_fill(remove, -math.inf).softmax(dim=-1)
            # Keep the smallest head whose mass reaches top_p: a token goes once the mass
            # before it does (the first never goes).
            remove |= (probs.cumsum(dim=-1) - probs) >= self.nucleus_top_p[:, None]
            remove[:, 0] = False
            in_vocab_order = torch.zeros_like(remove).scatter(1, order, remove)
            scaled[self.nucleus_rows] = sub.masked_fill(in_vocab_order, -math.inf)
        if self.min_p_rows is not None:
            sub = scaled[self.min_p_rows]
            probs = sub.softmax(dim=-1)
            floor = self.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            scaled[self.min_p_rows] = sub.masked_fill(probs < floor, -math.inf)
        cdf = scaled.softmax(dim=-1).cumsum(dim=-1)
        step = min(self.step, self.steps_planned - 1)
        u = self.uniforms[:, step] * cdf[:, -1]
        return torch.searchsorted(cdf, u[:, None].contiguous()).squeeze(1).clamp_(max=vocab - 1)

    def chosen_logprobs(self) -> torch.Tensor:
        """`(rows, steps)`: each step's raw log-probability of the chosen token."""
        if not self._logprobs:
            return torch.zeros((self.rows, 0), device=self.device)
        return torch.stack(self._logprobs, dim=1)

    def top(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(rows, steps, k)` values and token ids of each step's best raw log-probabilities,
        or None when not asked for."""
        if self.top_logprobs <= 0 or not self._top:
            return None
        return (
            torch.stack([v for v, _ in self._top], dim=1),
            torch.stack([i for _, i in self._top], dim=1),
        )
