"""What `cappy adapt data` and `cappy eval` ask the upstream LLM for: every sample of a run
planned before any call (decoding, index, seed), and each sample's request body, from the
proxy's recipe (`service.upstream.recipe`) and sampling parameters
(`service.upstream.samplers.sampling_params`: the same parameters the proxy sends, llama.cpp's
sampler extras included where the upstream accepts them).

How the calls differ from the proxy's fan-out, and why:
- one call per sample (no `n`): each sample is cached, and resumed, on its own;
- each call's `seed` is derived from (seed base, example id, decoding, index), not drawn at
  random: distinct per call (llama.cpp answers the same prompt and settings with the same sample
  otherwise) and the same on a re-run, so the cache key of a sample is known before asking;
- the instruction goes out as one user message (chat) or as the prompt (completions): the
  proxy's rendering of a one-message conversation (`render_chat_instruction`) is that text
  verbatim, which is the instruction Cappy scores.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from adapt.cache import Key
from adapt.errors import AdaptError
from adapt.examples import Example
from adapt.options import Endpoint
from service.upstream.errors import RecipeError
from service.upstream.recipe import Decoding, Recipe
from service.upstream.render import render_chat_instruction
from service.upstream.samplers import Sends, sampling_params, sent_by_decoding

_SEED_SPACE = 2**31 - 1


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """What every upstream call of a run shares; recorded in the cache header.

    Attributes:
        model: the upstream model name (resolve it first with `resolve_model`).
        endpoint: `chat` (one user message) or `completions` (the prompt).
        max_tokens: new tokens per sample (the paper's reference: 64).
        logprobs: ask for the sampled tokens' log-probabilities (self-scoring needs them).
        send_top_k: send `top_k` (False for upstreams that refuse it, e.g. OpenAI: a top-k
            decoding then samples without it, as the proxy does).
        send_extras: send llama.cpp's sampler extras (top_k 0, min_p 0, repeat_penalty 1),
            which switch off the samplers it applies by default; False for upstreams that
            refuse them, and for caches made before they existed (their samples were drawn
            without them).
        seed: the base every call's seed is derived from.
        recipe: the decodings sampled, in order (each up to its count).
        samples_per_example: how many samples each example gets (see `plan_decodings`). Not
            part of the cache header: a sample's key does not depend on it, so a cache made
            with fewer samples per example is extended, not refused, by a run asking for more.
    """

    model: str
    endpoint: Endpoint = "chat"
    max_tokens: int = 64
    logprobs: bool = False
    send_top_k: bool = True
    send_extras: bool = True
    seed: int = 0
    recipe: Recipe = field(default_factory=Recipe.default)
    samples_per_example: int = 17

    @property
    def sends(self) -> Sends:
        """What every call carries beyond each decoding's temperature and top_p."""
        return Sends(top_k=self.send_top_k, extras=self.send_extras)

    def header(self) -> dict[str, Any]:
        """The cache header's configuration; `sent` is each decoding's sampling parameters, as
        every call of it sends them (what the eval report and the data manifest show)."""
        return {
            "model": self.model,
            "endpoint": self.endpoint,
            "max_tokens": self.max_tokens,
            "logprobs": self.logprobs,
            "send_top_k": self.send_top_k,
            "send_extras": self.send_extras,
            "seed": self.seed,
            "recipe": self.recipe.to_list(),
            "sent": sent_by_decoding(self.recipe.decodings, self.sends),
        }

    @classmethod
    def from_header(cls, config: dict[str, Any]) -> SamplingConfig:
        """The configuration a cache was made with, planning the whole recipe per example (for
        evaluating from a cache alone). A header written before the sampler extras existed
        (no `send_extras`) is a run that sent none.

        Raises:
            AdaptError: the header lacks a field or holds an invalid one.
        """
        try:
            recipe = Recipe.from_spec(config["recipe"], max_samples=10_000, where="recipe")
            return cls(
                model=str(config["model"]),
                endpoint=config["endpoint"],
                max_tokens=int(config["max_tokens"]),
                logprobs=bool(config["logprobs"]),
                send_top_k=bool(config["send_top_k"]),
                send_extras=bool(config.get("send_extras", False)),
                seed=int(config["seed"]),
                recipe=recipe,
                samples_per_example=recipe.total,
            )
        except (KeyError, TypeError, ValueError, RecipeError) as exc:
            raise AdaptError(f"sample cache header is incomplete or invalid ({exc})") from None

    @classmethod
    def complete_header(cls, config: dict[str, Any]) -> dict[str, Any]:
        """A recorded header with the fields an older version did not write filled in as that
        version sent them (`send_extras` false, `sent` without the extras), so that a cache made
        before them resumes under the same settings; a header that is not one is returned as is
        (the cache then names what differs)."""
        try:
            filled = cls.from_header(config).header()
        except AdaptError:
            return config
        return {**filled, **config}


@dataclass(frozen=True, slots=True)
class PlannedSample:
    """One upstream call to make (or to find in the cache)."""

    example: Example
    decoding: Decoding
    index: int
    seed: int

    @property
    def key(self) -> Key:
        return (self.example.id, self.decoding.name, self.seed)


def plan_decodings(recipe: Recipe, samples: int) -> list[tuple[Decoding, int]]:
    """The (decoding, index) pairs of `samples` samples per example, in recipe order.

    The whole recipe when `samples` is its total (the paper's 17). Fewer: taken round-robin over
    the decodings in recipe order, each up to its count, so that every decoding is represented
    (8 of the paper's recipe: 2 plain, 2 temperature 0.9, 2 top-k, 1 nucleus, 1 greedy).

    Raises:
        AdaptError: `samples` below 0 or above the recipe's total (a greedy decoding cannot give
            more distinct samples than its count).
    """
    if not 0 <= samples <= recipe.total:
        raise AdaptError(f"samples per example must be between 0 and {recipe.total}, got {samples}")
    counts = [0] * len(recipe.decodings)
    taken = 0
    while taken < samples:
        for i, decoding in enumerate(recipe.decodings):
            if taken < samples and counts[i] < decoding.count:
                counts[i] += 1
                taken += 1
    return [(d, k) for d, n in zip(recipe.decodings, counts, strict=True) for k in range(n)]


def sample_seed(base: int, example_id: str, decoding: str, index: int) -> int:
    """The call's seed: a stable hash of its identity (distinct per call, equal on re-runs)."""
    return zlib.crc32(f"{base}\x1f{example_id}\x1f{decoding}\x1f{index}".encode()) % _SEED_SPACE


def plan(examples: Sequence[Example], config: SamplingConfig) -> list[PlannedSample]:
    """Every call of a run, example by example, each example's in recipe order."""
    decodings = plan_decodings(config.recipe, config.samples_per_example)
    return [
        PlannedSample(e, d, k, sample_seed(config.seed, e.id, d.name, k))
        for e in examples
        for d, k in decodings
    ]


def instruction_for(example: Example, endpoint: Endpoint) -> str:
    """The instruction Cappy scores for this example's samples, as the proxy renders it."""
    if endpoint == "chat":
        return render_chat_instruction([{"role": "user", "content": example.instruction}])
    return example.instruction


def build_body(sample: PlannedSample, config: SamplingConfig) -> dict[str, Any]:
    """The upstream request body of one sample."""
    body: dict[str, Any] = {"model": config.model, "max_tokens": config.max_tokens}
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": sample.example.instruction}]
    else:
        body["prompt"] = sample.example.instruction
    body.update(sampling_params(sample.decoding, config.sends))
    body["seed"] = sample.seed
    if config.logprobs:
        if config.endpoint == "chat":
            # llama-cpp-python returns chat logprobs only when top_logprobs is set as well.
            body.update(logprobs=True, top_logprobs=1)
        else:
            body["logprobs"] = 1
    return body
