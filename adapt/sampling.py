"""Collecting the LLM's samples for examples, through the proxy's own code: the recipe
(`service.upstream.recipe`: which decodings), the sampling parameters and what the upstream
accepts of them (`service.upstream.samplers`: `top_k` and llama.cpp's sampler extras, detected
as the proxy detects them), and the client (`service.upstream.client.UpstreamClient`: timeouts,
retries with back-off, the cap on calls in flight). What each call asks for is planned in
adapt.planning; every answer goes to the sample cache (adapt.cache) as it arrives.

The cache header records what every call of a decoding sends, so it is settled before the
cache is written: a cache that exists says it (its calls sent `top_k` and the extras, or not);
a new one is preceded by `detect`, whose calls are the run's first samples.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from adapt.cache import Key, SampleCache, SampleRecord, read_header
from adapt.errors import AdaptError
from adapt.examples import Example
from adapt.options import SamplingOptions
from adapt.planning import Endpoint, PlannedSample, SamplingConfig, build_body, plan
from service.upstream.client import UpstreamClient, UpstreamConfig
from service.upstream.errors import UpstreamError
from service.upstream.recipe import Recipe
from service.upstream.render import sample_text
from service.upstream.samplers import Part, UpstreamCapabilities, sampling_params, to_drop

logger = logging.getLogger(__name__)


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


def _call(client: UpstreamClient, endpoint: Endpoint, body: dict[str, Any]) -> Awaitable[Any]:
    if endpoint == "chat":
        return client.chat_completions(body)
    return client.completions(body)


async def detect(
    planned: Sequence[PlannedSample],
    client: UpstreamClient,
    config: SamplingConfig,
    *,
    max_failures: int = 50,
) -> tuple[SamplingConfig, list[SampleRecord]]:
    """`config` sending `top_k` and the sampler extras only if the upstream accepts them,
    learnt from the run's first calls as the proxy learns it (`UpstreamCapabilities`,
    `samplers.to_drop`): a refused call is asked again without the extras, then without `top_k`.

    The first planned sample tells about the extras; then, while `top_k` is unknown, the first
    sample of a decoding with a `top_k` of its own tells about it. These calls are samples of
    the run: their answers are returned for the cache, except any sent otherwise than the final
    configuration sends (asked again by `collect`). A call that fails for another reason is
    logged and left to `collect`. With `config.send_top_k` False nothing is asked: neither is
    sent.

    Raises:
        AdaptError: more than `max_failures` calls failed.
    """
    caps = UpstreamCapabilities.configured("no", "auto" if config.send_top_k else "no")
    own_top_k = any(s.decoding.top_k is not None for s in planned)
    answers: list[tuple[SampleRecord, dict[str, float | int]]] = []
    failures = 0
    for sample in planned:
        if caps.extras is not None and (caps.top_k is not None or not own_top_k):
            break
        if caps.extras is not None and sample.decoding.top_k is None:
            continue  # only a decoding with its own top_k tells more
        sends = caps.sends()
        dropped: set[Part] = set()
        while True:
            asked = replace(config, send_top_k=sends.top_k, send_extras=sends.extras)
            try:
                payload = await _call(client, config.endpoint, build_body(sample, asked))
            except UpstreamError as exc:
                part = to_drop(exc, sample.decoding, sends, alone=True, may_drop=caps.may_drop)
                if part is not None:
                    logger.info(
                        "the upstream refused %s (%s); asking again without %s",
                        sample.decoding.name,
                        exc.describe(),
                        "top_k" if part == "top_k" else "the sampler extras",
                    )
                    sends = sends.without(part)
                    dropped.add(part)
                    continue
                failures += 1
                logger.warning("sample %s failed: %s", "/".join(map(str, sample.key)), exc.message)
                if failures > max_failures:
                    raise AdaptError(
                        f"{failures} upstream calls failed (last: {exc.message}); stopping"
                    ) from None
                break
            caps.learn(sample.decoding, sends, dropped)
            record = parse_answer(sample, payload, config.endpoint)
            answers.append((record, sampling_params(sample.decoding, sends)))
            break
    settled = replace(
        config,
        send_top_k=config.send_top_k and caps.top_k is not False,
        send_extras=config.send_top_k and caps.extras is not False,
    )
    if not settled.send_extras and config.send_top_k:
        logger.info("the upstream refuses llama.cpp's sampler extras: sending none")
    if not settled.send_top_k and config.send_top_k:
        logger.info("the upstream refuses top_k: top-k decodings sample without it")
    by_key = {s.key: s for s in planned}
    kept = [
        record
        for record, params in answers
        if params == sampling_params(by_key[record.key].decoding, settled.sends)
    ]
    return settled, kept


def as_recorded(config: SamplingConfig, recorded: dict[str, Any]) -> SamplingConfig:
    """`config` sending `top_k` and the sampler extras as the calls of an existing cache did
    (what the upstream accepted then; a cache from before the extras sent none), unless
    `config` sends neither (`--no-top-k`: the cache then refuses a header that says otherwise)."""
    if not config.send_top_k:
        return config
    if "send_extras" not in recorded:
        logger.warning(
            "the sample cache was made before llama.cpp's sampler extras were sent (its samples "
            "were shaped by the upstream's own top_k, min_p, repeat_penalty): resuming it as it "
            "was made; use a new cache for the paper's decodings"
        )
    return replace(
        config,
        send_top_k=bool(recorded.get("send_top_k", True)),
        send_extras=bool(recorded.get("send_extras", False)),
    )


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
                payload = await _call(client, config.endpoint, body)
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


async def gather(
    options: SamplingOptions,
    examples: list[Example],
    cache_path: Path,
    transport: httpx.AsyncBaseTransport | None,
    *,
    logprobs: bool,
    samples_per_example: int | None = None,
) -> tuple[SamplingConfig, dict[str, list[SampleRecord]], CollectStats]:
    """Every example's samples from the upstream, through the cache (resumes where it stopped):
    the one sampling path of `cappy adapt data` and `cappy eval`. The paper's recipe, all of it
    per example unless `samples_per_example` says fewer, with the sampling parameters the proxy
    sends (`top_k` and llama.cpp's sampler extras where the upstream accepts them: as the
    existing cache's calls did, else `detect`ed)."""
    assert options.upstream is not None
    recipe = Recipe.default()
    if samples_per_example is None:
        samples_per_example = recipe.total
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
            send_extras=options.send_top_k,
            seed=options.seed,
            recipe=recipe,
            samples_per_example=samples_per_example,
        )
        planned = plan(examples, config)
        recorded = read_header(cache_path)
        first: list[SampleRecord] = []
        if recorded is not None:
            config = as_recorded(config, recorded)
        else:
            config, first = await detect(planned, client, config, max_failures=options.max_failures)
        with SampleCache(
            cache_path, config.header(), complete=SamplingConfig.complete_header
        ) as cache:
            for record in first:
                cache.append(record)
            stats = await collect(
                planned,
                client,
                cache,
                config,
                concurrency=options.concurrency,
                max_failures=options.max_failures,
                progress=options.progress,
            )
            # detect's answers were fetched by this run, not found in the cache.
            stats.cached -= len(first)
            stats.fetched += len(first)
            return config, samples_by_example(planned, cache), stats
