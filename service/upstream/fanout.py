"""The upstream calls of one proxy request: what the upstream supports (`n`, `top_k`, the sampler
extras), one job per call with its own seed, retries without what the upstream rejected, and the
samples gathered (or why they failed) by the request's deadline.

- `n`: with `n` known to work, a decoding of count k is one call with `n=k`; known not to
  work, k calls. Not yet known (setting "auto"), the proxy tries `n` and learns, per model: an
  upstream that rejects it (400/422) gets the samples as single calls; one that silently returns
  fewer choices than asked (llama.cpp) gets the missing ones topped up with single calls. Either
  way later requests for that model go straight to single calls.
- Sampling parameters: each call sends `service.upstream.samplers.sampling_params` for its
  decoding and what the model is known to accept: `top_k` unless known refused, llama.cpp's
  sampler extras (top_k 0, min_p 0, repeat_penalty 1) unless known refused. A 400/422 to a call
  that carried them is asked again without one of them (`samplers.to_drop`) and learnt when that
  succeeds. A decoding with top_k sent without it (top-k 40 at temperature 1 becomes plain
  sampling) is reported as substituted.
- Seeds: every sampled call gets its own (llama.cpp otherwise returns the same sample for the
  same prompt and settings): `seed + i` from the request's base seed.
- Cancellation: when the request's task is cancelled (the client went away) or its deadline
  passes, every call still in flight is cancelled and awaited, so no upstream work is left
  running for nobody.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from service.upstream.client import UpstreamClient
from service.upstream.errors import FailureKind, SampleFailure, UpstreamError
from service.upstream.recipe import Decoding
from service.upstream.render import sample_text
from service.upstream.samplers import Sends, Support, UpstreamCapabilities, sampling_params, to_drop

logger = logging.getLogger(__name__)

SEED_SPACE = 2**31 - 1
_MAX_REMEMBERED_MODELS = 256
Dropped = frozenset[Literal["n", "top_k", "extras"]]


class CapabilityCache:
    """The capabilities of each upstream model, for the last 256 models first seen."""

    def __init__(self, n_support: Support = "auto", top_k_support: Support = "auto"):
        self.n_support = n_support
        self.top_k_support = top_k_support
        self._models: OrderedDict[str, UpstreamCapabilities] = OrderedDict()

    def get(self, model: str) -> UpstreamCapabilities:
        """What is known about `model` (created from the settings on first use)."""
        caps = self._models.get(model)
        if caps is None:
            caps = self.initial()
            self._models[model] = caps
            while len(self._models) > _MAX_REMEMBERED_MODELS:
                self._models.popitem(last=False)
        return caps

    def initial(self) -> UpstreamCapabilities:
        """What is known about a model before its first call (from the settings alone)."""
        return UpstreamCapabilities.configured(self.n_support, self.top_k_support)

    def items(self) -> list[tuple[str, UpstreamCapabilities]]:
        """Every remembered model and what is known about it, oldest first (a snapshot)."""
        return list(self._models.items())


@dataclass(frozen=True, slots=True)
class Candidate:
    """One gathered sample.

    Attributes:
        index: position in recipe order (decoding by decoding, sample by sample).
        decoding: name of the decoding that produced it.
        text: the text Cappy scores.
        finish_reason: the upstream's finish reason.
        choice: the upstream's choice object as returned (message or text, logprobs).
        seed: the seed sent with its call.
        substituted: sampled without the decoding's top_k (upstream does not accept it).
        completion_tokens: its generated tokens, when its call returned only it.
        model: the model the upstream reported.
        system_fingerprint: the upstream's fingerprint for its call.
    """

    index: int
    decoding: str
    text: str
    finish_reason: str | None
    choice: dict[str, Any]
    seed: int | None
    substituted: bool = False
    completion_tokens: int | None = None
    model: str | None = None
    system_fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class _Job:
    """One upstream call: `len(slots)` samples of one decoding (n > 1 when more than one),
    carrying `sends`; `dropped`: what earlier calls of these samples carried and the upstream
    refused (learnt when this one succeeds)."""

    decoding: Decoding
    slots: tuple[int, ...]
    sends: Sends
    seed: int
    dropped: Dropped = frozenset()


@dataclass(slots=True)
class _Outcome:
    job: _Job
    payload: dict[str, Any] | None = None
    error: UpstreamError | None = None


class Fanout:
    """The calls of one request: spawns jobs, reacts to their outcomes, collects samples.

    `plan(decodings)` starts the calls, `await run(timeout_s)` waits for them (and for the
    calls they spawn), then `candidates` holds the samples in recipe order and `missing` why
    the others did not arrive.
    """

    def __init__(
        self,
        client: UpstreamClient,
        caps: UpstreamCapabilities,
        *,
        kind: Literal["chat", "text"],
        body: dict[str, Any],
        seed: int,
        api_key: str | None = None,
    ):
        """Args:
        client: the shared upstream client.
        caps: what is known about the request's model; updated as calls succeed or fail.
        kind: chat completions or completions.
        body: the fields every call sends (the recipe adds its sampling parameters, `n`, `seed`).
        seed: the base seed; calls get seed, seed+1, ... (modulo 2**31 - 1).
        api_key: the caller's key to forward (None: the configured key).
        """
        self.client = client
        self.caps = caps
        self.kind = kind
        self.base_body = body
        self.api_key = api_key
        self._seed_base = seed % SEED_SPACE
        self._seed_count = 0
        self.tasks: dict[asyncio.Task[_Outcome], _Job] = {}
        self.samples: dict[int, Candidate] = {}
        self.failures: dict[int, SampleFailure] = {}
        self.substituted: set[str] = set()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.slowest_call_s = 0.0  # the longest single upstream call (retries included)

    @property
    def candidates(self) -> list[Candidate]:
        """The samples that arrived, in recipe order."""
        return [self.samples[s] for s in sorted(self.samples)]

    @property
    def missing(self) -> list[SampleFailure]:
        """Why each planned sample that did not arrive failed, in recipe order."""
        return [self.failures[s] for s in sorted(self.failures) if s not in self.samples]

    def next_seed(self) -> int:
        seed = (self._seed_base + self._seed_count) % SEED_SPACE
        self._seed_count += 1
        return seed

    def plan(self, decodings: Sequence[Decoding]) -> int:
        """Starts the calls of `decodings`; returns the samples planned."""
        slot = 0
        use_n = self.caps.n is not False
        sends = self.caps.sends()
        for decoding in decodings:
            slots = tuple(range(slot, slot + decoding.count))
            slot += decoding.count
            if use_n and len(slots) > 1:
                self.spawn(decoding, slots, sends)
            else:
                self.spawn_singles(decoding, slots, sends)
        return slot

    def spawn(
        self,
        decoding: Decoding,
        slots: tuple[int, ...],
        sends: Sends,
        dropped: Dropped = frozenset(),
    ) -> None:
        job = _Job(decoding, slots, sends, self.next_seed(), dropped)
        task = asyncio.create_task(self._call(job), name=f"cappy-upstream-{decoding.name}")
        self.tasks[task] = job

    def spawn_singles(
        self,
        decoding: Decoding,
        slots: Sequence[int],
        sends: Sends,
        dropped: Dropped = frozenset(),
    ) -> None:
        for s in slots:
            self.spawn(decoding, (s,), sends, dropped)

    def body_for(self, job: _Job) -> dict[str, Any]:
        body = dict(self.base_body)
        body.update(sampling_params(job.decoding, job.sends))
        if len(job.slots) > 1:
            body["n"] = len(job.slots)
        body["seed"] = job.seed
        return body

    async def _call(self, job: _Job) -> _Outcome:
        body = self.body_for(job)
        started = time.perf_counter()
        try:
            if self.kind == "chat":
                payload = await self.client.chat_completions(body, api_key=self.api_key)
            else:
                payload = await self.client.completions(body, api_key=self.api_key)
        except UpstreamError as error:
            return _Outcome(job, error=error)
        finally:
            self.slowest_call_s = max(self.slowest_call_s, time.perf_counter() - started)
        return _Outcome(job, payload=payload)

    async def run(self, timeout_s: float) -> None:
        """Waits for every call (and the calls they spawn) until the deadline; cancels the rest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while self.tasks:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                done, _ = await asyncio.wait(
                    self.tasks, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    self.tasks.pop(task)
                    self.handle(task.result())
        finally:
            # Client gone (CancelledError) or deadline passed: stop every upstream call and wait
            # for them to unwind, so none keeps running (and holding a slot) for nobody.
            pending = list(self.tasks)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for job in self.tasks.values():
            error = UpstreamError(
                "upstream call did not finish within the proxy deadline", kind=FailureKind.TIMEOUT
            )
            for s in job.slots:
                self.failures[s] = SampleFailure(job.decoding.name, error)
        self.tasks.clear()

    def handle(self, outcome: _Outcome) -> None:
        job = outcome.job
        learn_n = self.caps.learn_n
        substituted = job.decoding.top_k is not None and not job.sends.top_k
        if outcome.error is not None:
            error = outcome.error
            part = to_drop(
                error,
                job.decoding,
                job.sends,
                alone=len(job.slots) == 1,
                may_drop=self.caps.may_drop,
            )
            if part is not None:
                logger.info(
                    "upstream refused the call of decoding %s (%s); asking again without %s",
                    job.decoding.name,
                    error.describe(),
                    "top_k" if part == "top_k" else "the sampler extras",
                )
                self.spawn(job.decoding, job.slots, job.sends.without(part), job.dropped | {part})
                return
            if learn_n and len(job.slots) > 1 and error.is_rejection:
                logger.info("upstream rejected n=%d; retrying as single calls", len(job.slots))
                self.spawn_singles(job.decoding, job.slots, job.sends, job.dropped | {"n"})
                return
            for s in job.slots:
                self.failures[s] = SampleFailure(job.decoding.name, error)
            return

        payload = outcome.payload or {}
        self.caps.learn(job.decoding, job.sends, job.dropped)
        if substituted:
            self.substituted.add(job.decoding.name)

        usage = payload.get("usage") or {}
        prompt_tokens = _int(usage.get("prompt_tokens"))
        completion_tokens = _int(usage.get("completion_tokens"))
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

        choices = sorted(payload["choices"], key=lambda c: _int(c.get("index")))
        single = len(job.slots) == 1 and len(choices) == 1
        for s, choice in zip(job.slots, choices, strict=False):
            self.samples[s] = Candidate(
                index=s,
                decoding=job.decoding.name,
                text=sample_text(self.kind, choice),
                finish_reason=choice.get("finish_reason"),
                choice=choice,
                seed=job.seed,
                substituted=substituted,
                completion_tokens=completion_tokens if single else None,
                model=payload.get("model") if isinstance(payload.get("model"), str) else None,
                system_fingerprint=payload.get("system_fingerprint")
                if isinstance(payload.get("system_fingerprint"), str)
                else None,
            )
        if len(job.slots) > 1:
            missing = job.slots[len(choices) :]
            if missing:
                # The upstream ignored n (llama.cpp does so silently): top up with single calls.
                if learn_n:
                    self.caps.n = False
                logger.info(
                    "upstream returned %d of %d choices for %s; topping up with single calls",
                    len(choices),
                    len(job.slots),
                    job.decoding.name,
                )
                self.spawn_singles(job.decoding, missing, job.sends)
            elif learn_n:
                self.caps.n = True


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
