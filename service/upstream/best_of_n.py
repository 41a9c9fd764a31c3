"""Best-of-N selection: prepare → fan out to the upstream → rank with Cappy → select.

`BestOfN` runs one OpenAI chat/completions or completions request in two steps:

1. `prepare(request)` refuses what the proxy cannot serve and renders the instruction Cappy
   scores (`service.upstream.render`), once, before any upstream call or status line.
2. `select(prepared, options)` fans out the recipe (`service.upstream.fanout`: every decoding's
   samples, all calls concurrently under the client's global cap, each with its own seed),
   gathers candidates until every call ended or the request deadline (`ProxyConfig.timeout_s`)
   passed, ranks them with the runtime's ranking function and selects the argmax (ties: the
   first in recipe order). Failed calls are tolerated when at least `min_candidates` samples
   arrived; otherwise `NotEnoughCandidates` (→ 502, or 504 when all failures were timeouts)
   names what failed.

The answer is built from the `Selection` by `service.upstream.answer`, or streamed by
`service.upstream.sse`. Cancelling the task running `select` (the client went away) cancels
every upstream call still in flight before the cancellation propagates.
"""

from __future__ import annotations

import logging
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from service import defaults, metrics
from service.schemas.openai import ChatCompletionRequest, CompletionRequest, CompletionUsage
from service.upstream.client import UpstreamClient
from service.upstream.errors import InvalidProxyRequest, NotEnoughCandidates, SampleFailure
from service.upstream.fanout import (
    SEED_SPACE,
    Candidate,
    CapabilityCache,
    Fanout,
    Support,
    UpstreamCapabilities,
)
from service.upstream.recipe import PAPER_DECODING_NAMES, ProxyOptions, Recipe
from service.upstream.render import render_chat_instruction, render_completion_prompt
from service.upstream.samplers import SAMPLER_EXTRAS, sent_by_decoding

logger = logging.getLogger(__name__)


class Scored(Protocol):
    """One ranked candidate (the engine's `ScoredPair`): its raw Cappy score."""

    @property
    def score(self) -> float: ...


RankFn = Callable[[str, Sequence[str]], Awaitable[Sequence[Scored]]]
"""`await rank(instruction, texts)`: one result per text, in order (the runtime's `rank`)."""

ProxyRequest = ChatCompletionRequest | CompletionRequest

# Fields the proxy owns (see the precedence rules in service.upstream.recipe); never forwarded.
_OWNED_FIELDS = frozenset(
    {
        "cappy",
        "stream",
        "stream_options",
        "n",
        "best_of",
        "seed",
        "temperature",
        "top_p",
        *SAMPLER_EXTRAS,  # top_k, min_p, repeat_penalty
    }
)


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Proxy policy (the app maps `CAPPY_UPSTREAM_*` / `CAPPY_PROXY_*` settings onto it).

    Attributes:
        n_support: does the upstream honour `n > 1`: "auto" (detect), "yes", "no".
        top_k_support: does the upstream accept `top_k`: "auto" (detect), "yes", "no"; "no"
            also sends none of llama.cpp's sampler extras, which are otherwise detected
            (`service.upstream.samplers`).
        timeout_s: deadline for gathering one request's samples; calls still running then are
            cancelled and count as timed out.
        instruction_max_chars: budget of a rendered chat instruction; older turns are dropped
            first (see `render_chat_instruction`). None: no budget. The setting
            CAPPY_PROXY_INSTRUCTION_MAX_CHARS.
    """

    n_support: Support = "auto"
    top_k_support: Support = "auto"
    timeout_s: float = defaults.PROXY_TIMEOUT_S
    instruction_max_chars: int | None = defaults.PROXY_INSTRUCTION_MAX_CHARS


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request the proxy can serve, with what it sends upstream and what Cappy reads.

    Attributes:
        kind: chat completions or completions.
        model: the upstream model asked for.
        instruction: the text every sample is scored against.
        body: the client's fields forwarded to every upstream call (those the proxy owns left
            out).
        seed: the client's base seed, or None for a random one.
    """

    kind: Literal["chat", "text"]
    model: str
    instruction: str
    body: dict[str, Any]
    seed: int | None


@dataclass(slots=True)
class Selection:
    """The outcome of one proxy request: every candidate, its score, and the winner."""

    kind: Literal["chat", "text"]
    id: str
    created: int
    model: str
    instruction: str
    options: ProxyOptions
    candidates: list[Candidate]
    scores: list[float]
    winner: int
    usage: CompletionUsage
    planned: int
    failures: list[SampleFailure] = field(default_factory=list)
    substituted: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    gather_s: float = 0.0  # fan-out wall time: first call sent to last sample in
    slowest_call_s: float = 0.0  # the longest single upstream call
    scoring_s: float = 0.0  # ranking every candidate with Cappy (through the batcher)

    @property
    def best(self) -> Candidate:
        return self.candidates[self.winner]


class BestOfN:
    """Runs best-of-N requests against one upstream; one instance per app (holds what it learnt
    about the upstream's support for `n`, `top_k` and the sampler extras, per model)."""

    def __init__(
        self,
        client: UpstreamClient,
        rank: RankFn,
        config: ProxyConfig | None = None,
        *,
        rng: random.Random | None = None,
    ):
        """Args:
        client: the shared upstream client.
        rank: `await rank(instruction, texts)`, one result with a `score` per text: the
            scoring runtime's `rank` in production.
        config: proxy policy.
        rng: source of base seeds when a request has none (tests pass a seeded one).
        """
        self.client = client
        self.rank = rank
        self.config = config or ProxyConfig()
        self._rng = rng or random.Random()
        self._capabilities = CapabilityCache(self.config.n_support, self.config.top_k_support)

    def capabilities(self, model: str) -> UpstreamCapabilities:
        """What is known about `model` on the upstream (settings "yes"/"no" are fixed)."""
        return self._capabilities.get(model)

    def describe(self, recipe: Recipe) -> dict[str, Any]:
        """What the proxy sends upstream, for /info: the settings, the sampling parameters each
        decoding of `recipe` sends to a model not called yet, and, for every model called since
        (the last 256), what it was found to accept and what each decoding now sends."""
        initial = self._capabilities.initial()
        return {
            "n_support": self.config.n_support,
            "top_k_support": self.config.top_k_support,
            "recipe": recipe.to_list(),
            "sends": sent_by_decoding(recipe.decodings, initial.sends()),
            "models": {
                model: {
                    "n": caps.n,
                    "top_k": caps.top_k,
                    "sampler_extras": caps.extras,
                    "sends": sent_by_decoding(recipe.decodings, caps.sends()),
                }
                for model, caps in self._capabilities.items()
            },
        }

    def prepare(self, request: ProxyRequest) -> PreparedRequest:
        """Refuses what the proxy cannot serve and renders the instruction (call before any
        upstream call, and before streaming starts).

        Raises:
            InvalidProxyRequest: n > 1, best_of > 1, echo, or an unusable prompt.
        """
        if request.n is not None and request.n != 1:
            raise InvalidProxyRequest(
                "n must be 1: the proxy returns the best of its samples; ask for "
                "cappy.return_candidates to see all of them",
                param="n",
            )
        kind: Literal["chat", "text"]
        if isinstance(request, ChatCompletionRequest):
            kind = "chat"
            instruction = render_chat_instruction(
                request.messages, self.config.instruction_max_chars
            )
        else:
            kind = "text"
            if request.best_of is not None and request.best_of != 1:
                raise InvalidProxyRequest(
                    "best_of is not supported: the proxy's cappy.recipe decides the samples",
                    param="best_of",
                )
            if request.echo:
                raise InvalidProxyRequest("echo is not supported by the proxy", param="echo")
            instruction = render_completion_prompt(request.prompt)
        body = {
            key: value
            for key, value in request.model_dump(mode="json", exclude_none=True).items()
            if key not in _OWNED_FIELDS
        }
        return PreparedRequest(kind, request.model, instruction, body, request.seed)

    async def select(
        self, request: PreparedRequest, options: ProxyOptions, *, api_key: str | None = None
    ) -> Selection:
        """Gathers the recipe's samples, ranks them, and returns the selection.

        Args:
            request: the client's request, prepared (`prepare`).
            options: recipe, `min_candidates`, `return_candidates` (see `resolve_options`).
            api_key: the caller's key to forward upstream (None: the configured key).

        Raises:
            NotEnoughCandidates: fewer than `options.min_candidates` samples arrived.
            Exception: whatever `rank` raises (e.g. the batcher's overload error).
        """
        started = time.perf_counter()
        fanout = Fanout(
            self.client,
            self.capabilities(request.model),
            kind=request.kind,
            body=request.body,
            seed=request.seed if request.seed is not None else self._rng.randrange(SEED_SPACE),
            api_key=api_key,
        )
        planned = fanout.plan(options.recipe.decodings)
        await fanout.run(self.config.timeout_s)
        gather_s = time.perf_counter() - started

        candidates = fanout.candidates
        failures = fanout.missing
        if len(candidates) < options.min_candidates:
            metrics.PROXY_DURATION.observe(time.perf_counter() - started)
            error = NotEnoughCandidates(
                arrived=len(candidates),
                planned=planned,
                min_candidates=options.min_candidates,
                failures=failures,
            )
            logger.warning("proxy request failed: %s", error.message)
            raise error
        if failures:
            logger.warning(
                "proxy request: %d of %d samples failed (%s); selecting among %d",
                len(failures),
                planned,
                ", ".join(sorted({f.error.describe() for f in failures})),
                len(candidates),
            )

        scoring_started = time.perf_counter()
        ranked = await self.rank(request.instruction, [c.text for c in candidates])
        scores = [float(r.score) for r in ranked]
        scoring_s = time.perf_counter() - scoring_started
        if len(scores) != len(candidates):
            raise RuntimeError(
                f"rank returned {len(scores)} scores for {len(candidates)} candidates"
            )
        winner = argmax_first(scores)
        best = candidates[winner]
        duration = time.perf_counter() - started
        metrics.PROXY_CANDIDATES.observe(len(candidates))
        metrics.PROXY_WINNER.labels(decoding=_winner_label(best)).inc()
        metrics.PROXY_DURATION.observe(duration)
        logger.info(
            "proxy request: %d/%d candidates, winner %s (score %.4f) in %.2fs",
            len(candidates),
            planned,
            best.decoding,
            scores[winner],
            duration,
        )
        prefix = "chatcmpl" if request.kind == "chat" else "cmpl"
        return Selection(
            kind=request.kind,
            id=f"{prefix}-cappy-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=best.model or request.model,
            instruction=request.instruction,
            options=options,
            candidates=candidates,
            scores=scores,
            winner=winner,
            usage=CompletionUsage(
                prompt_tokens=fanout.prompt_tokens,
                completion_tokens=fanout.completion_tokens,
                total_tokens=fanout.prompt_tokens + fanout.completion_tokens,
            ),
            planned=planned,
            failures=failures,
            substituted=[d.name for d in options.recipe.decodings if d.name in fanout.substituted],
            duration_s=duration,
            gather_s=gather_s,
            slowest_call_s=fanout.slowest_call_s,
            scoring_s=scoring_s,
        )


def argmax_first(scores: Sequence[float]) -> int:
    """Index of the highest score; ties go to the lowest index; NaN counts as lowest."""
    best, best_score = 0, -math.inf
    for i, score in enumerate(scores):
        value = score if not math.isnan(score) else -math.inf
        if i == 0 or value > best_score:
            best, best_score = i, value
    return best


def _winner_label(candidate: Candidate) -> str:
    """Bounded metric label: default-recipe names, else `custom` (clients pick names)."""
    if candidate.substituted:
        return "substituted"
    return candidate.decoding if candidate.decoding in PAPER_DECODING_NAMES else "custom"
