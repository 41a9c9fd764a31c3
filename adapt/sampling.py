"""Collecting the LLM's samples for examples, through the proxy's own code: the recipe
(`service.upstream.recipe`: which decodings, their sampling parameters, the top_k rule) and the
client (`service.upstream.client.UpstreamClient`: timeouts, retries with back-off, the cap on
calls in flight). Every answer goes to the sample cache (adapt.cache) as it arrives.

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

import asyncio
import logging
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from tqdm import tqdm

from adapt.cache import Key, SampleCache, SampleRecord
from adapt.errors import AdaptError
from adapt.examples import Example
from service.upstream.client import UpstreamClient, UpstreamConfig
from service.upstream.errors import RecipeError, UpstreamError
from service.upstream.recipe import Decoding, Recipe
from service.upstream.render import render_chat_instruction, sample_text

logger = logging.getLogger(__name__)

Endpoint = Literal["chat", "completions"]
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
    seed: int = 0
    recipe: Recipe = field(default_factory=Recipe.default)
    samples_per_example: int = 17

    def header(self) -> dict[str, Any]:
        """The cache header's configuration."""
        return {
            "model": self.model,
            "endpoint": self.endpoint,
            "max_tokens": self.max_tokens,
            "logprobs": self.logprobs,
            "send_top_k": self.send_top_k,
            "seed": self.seed,
            "recipe": self.recipe.to_list(),
        }

    @classmethod
    def from_header(cls, config: dict[str, Any]) -> SamplingConfig:
        """The configuration a cache was made with, planning the whole recipe per example (for
        evaluating from a cache alone)."""
        try:
            recipe = Recipe.from_spec(config["recipe"], max_samples=10_000, where="recipe")
            return cls(
                model=str(config["model"]),
                endpoint=config["endpoint"],
                max_tokens=int(config["max_tokens"]),
                logprobs=bool(config["logprobs"]),
                send_top_k=bool(config["send_top_k"]),
                seed=int(config["seed"]),
                recipe=recipe,
                samples_per_example=recipe.total,
            )
        except (KeyError, TypeError, ValueError, RecipeError) as exc:
            raise AdaptError(f"sample cache header is incomplete or invalid ({exc})") from None


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
    body.update(sample.decoding.sampling_params(send_top_k=config.send_top_k))
    body["seed"] = sample.seed
    if config.logprobs:
        if config.endpoint == "chat":
            # llama-cpp-python returns chat logprobs only when top_logprobs is set as well.
            body.update(logprobs=True, top_logprobs=1)
        else:
            body["logprobs"] = 1
    return body


def _logprobs(choice: dict[str, Any], endpoint: Endpoint) -> tuple[float, ...] | None:
    raw = choice.get("logprobs")
    if not isinstance(raw, dict):
        return None
    if endpoint == "chat":
        tokens = raw.get("content")
        if not isinstance(tokens, list):
            return None
        values: list[Any] = [t.get("logprob") for t in tokens if isinstance(t, dict)]
    else:
        listed = raw.get("token_logprobs")
        if not isinstance(listed, list):
            return None
        values = listed
    # None: a token without a log-probability (some servers' first prompt token); -inf/NaN:
    # not a number a mean can use.
    return tuple(
        float(v)
        for v in values
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    )


def parse_answer(
    sample: PlannedSample, payload: dict[str, Any], endpoint: Endpoint
) -> SampleRecord:
    """The cache record of one upstream answer (the client validated its shape)."""
    choice = payload["choices"][0]
    text = sample_text("chat" if endpoint == "chat" else "text", choice)
    usage = payload.get("usage") or {}
    tokens = usage.get("completion_tokens")
    return SampleRecord(
        example_id=sample.example.id,
        decoding=sample.decoding.name,
        index=sample.index,
        seed=sample.seed,
        text=text,
        finish_reason=choice.get("finish_reason"),
        logprobs=_logprobs(choice, endpoint),
        completion_tokens=tokens if isinstance(tokens, int) else None,
    )


def make_client(
    base_url: str,
    *,
    api_key: str | None = None,
    concurrency: int = 1,
    timeout_s: float = 120.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> UpstreamClient:
    """The proxy's upstream client, with `concurrency` calls in flight at most."""
    if concurrency < 1:
        raise AdaptError(f"--concurrency must be >= 1, got {concurrency}")
    if timeout_s <= 0:
        raise AdaptError(f"--timeout must be > 0, got {timeout_s}")
    config = UpstreamConfig(
        base_url=base_url,
        api_key=api_key,
        timeout_s=timeout_s,
        max_in_flight=concurrency,
        max_connections=max(concurrency, 1),
        max_keepalive_connections=max(concurrency, 1),
    )
    return UpstreamClient(config, transport=transport)


async def resolve_model(client: UpstreamClient, model: str | None) -> str:
    """`model`, or the upstream's first listed model when None."""
    if model:
        return model
    try:
        listed = await client.list_models()
    except UpstreamError as exc:
        raise AdaptError(
            f"cannot list the upstream's models ({exc.describe()}); pass --model"
        ) from None
    ids = [
        m["id"]
        for m in listed["data"]
        if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]
    ]
    if not ids:
        raise AdaptError("the upstream lists no model; pass --model")
    return str(ids[0])


@dataclass
class CollectStats:
    """What `collect` did: samples found in the cache, asked for, and failed."""

    planned: int = 0
    cached: int = 0
    fetched: int = 0
    failed: list[tuple[Key, str]] = field(default_factory=list)


async def collect(
    planned: Sequence[PlannedSample],
    client: UpstreamClient,
    cache: SampleCache,
    config: SamplingConfig,
    *,
    concurrency: int = 1,
    max_failures: int = 50,
    progress: bool = True,
    on_answer: Callable[[SampleRecord], None] | None = None,
) -> CollectStats:
    """Asks the upstream for every planned sample the cache lacks, appending each answer to the
    cache as it arrives.

    A failed call (after the client's retries) is logged and left out of the cache, so the next
    run asks again; more than `max_failures` failures abort the run (the upstream is down or
    refuses the requests: no point in asking thousands more times).

    Raises:
        AdaptError: too many failed calls.
        Exception: whatever else interrupts the run (KeyboardInterrupt, a crash): every answer
            received before it is in the cache already.
    """
    stats = CollectStats(planned=len(planned))
    todo = [s for s in planned if s.key not in cache]
    stats.cached = len(planned) - len(todo)
    bar = tqdm(
        total=len(planned),
        initial=stats.cached,
        unit="sample",
        desc="LLM samples",
        disable=not progress,
        smoothing=0.05,
        dynamic_ncols=True,
    )
    queue: asyncio.Queue[PlannedSample] = asyncio.Queue()
    for sample in todo:
        queue.put_nowait(sample)

    async def worker() -> None:
        while True:
            try:
                sample = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = build_body(sample, config)
            try:
                if config.endpoint == "chat":
                    payload = await client.chat_completions(body)
                else:
                    payload = await client.completions(body)
            except UpstreamError as exc:
                stats.failed.append((sample.key, exc.describe()))
                logger.warning("sample %s failed: %s", "/".join(map(str, sample.key)), exc.message)
                if len(stats.failed) > max_failures:
                    raise AdaptError(
                        f"{len(stats.failed)} upstream calls failed (last: {exc.message}); "
                        "stopping. Every answer so far is cached: fix the upstream and re-run"
                    ) from None
                continue
            record = parse_answer(sample, payload, config.endpoint)
            cache.append(record)
            stats.fetched += 1
            bar.update(1)
            if on_answer is not None:
                on_answer(record)

    workers = [asyncio.create_task(worker()) for _ in range(max(1, concurrency))]
    try:
        await asyncio.gather(*workers)
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        bar.close()
    if stats.failed:
        logger.warning(
            "%d of %d samples failed; re-run to ask for them again", len(stats.failed), len(todo)
        )
    return stats


def samples_by_example(
    planned: Sequence[PlannedSample], cache: SampleCache | dict[Key, SampleRecord]
) -> dict[str, list[SampleRecord]]:
    """Each example's cached samples, in plan order (missing ones left out)."""
    records = cache.records if isinstance(cache, SampleCache) else cache
    grouped: dict[str, list[SampleRecord]] = {}
    for sample in planned:
        grouped.setdefault(sample.example.id, [])
        record = records.get(sample.key)
        if record is not None:
            grouped[sample.example.id].append(record)
    return grouped


@dataclass(kw_only=True)
class SamplingOptions:
    """The options `cappy adapt data` and `cappy eval` share: which examples, which upstream,
    how to sample it (see adapt.cli for each flag). Keyword-only, so that each command's own
    options, some of them required, can follow these defaulted ones."""

    upstream: str | None = None
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    split: str | None = None
    tasks: list[str] | None = None
    examples_per_task: int | None = None
    max_tokens: int = 64
    endpoint: Endpoint = "chat"
    send_top_k: bool = True
    seed: int = 0
    concurrency: int = 1
    timeout_s: float = 120.0
    max_failures: int = 50
    progress: bool = True


async def gather(
    options: SamplingOptions,
    examples: list[Example],
    cache_path: Path,
    transport: httpx.AsyncBaseTransport | None,
    *,
    logprobs: bool,
    samples_per_example: int,
    recipe: Recipe | None = None,
) -> tuple[SamplingConfig, dict[str, list[SampleRecord]], CollectStats]:
    """Every example's samples from the upstream, through the cache (resumes where it stopped):
    the one sampling path of `cappy adapt data` and `cappy eval`."""
    assert options.upstream is not None
    async with make_client(
        options.upstream,
        api_key=options.api_key,
        concurrency=options.concurrency,
        timeout_s=options.timeout_s,
        transport=transport,
    ) as client:
        config = SamplingConfig(
            model=await resolve_model(client, options.model),
            endpoint=options.endpoint,
            max_tokens=options.max_tokens,
            logprobs=logprobs,
            send_top_k=options.send_top_k,
            seed=options.seed,
            recipe=recipe or Recipe.default(),
            samples_per_example=samples_per_example,
        )
        planned = plan(examples, config)
        with SampleCache(cache_path, config.header()) as cache:
            stats = await collect(
                planned,
                client,
                cache,
                config,
                concurrency=options.concurrency,
                max_failures=options.max_failures,
                progress=options.progress,
            )
            return config, samples_by_example(planned, cache), stats
