"""Best-of-N selection: fan out to the upstream → score with Cappy → select → answer.

`BestOfN.select(request, options)` runs one OpenAI chat/completions or completions request:

1. Render the instruction Cappy scores (`render_chat_instruction`, `render_completion_prompt`).
2. Fan out the recipe (`service.upstream.recipe`): every decoding's samples, all calls
   concurrently under the client's global cap, each sampled call with its own `seed` (llama.cpp
   otherwise returns the same sample for the same prompt and settings).
   - `n`: with `n_support="yes"` a decoding of count k is one call with `n=k`; with `"no"`, k
     calls. With `"auto"` (default) the proxy tries `n` and learns, per model: an upstream that
     rejects it (400/422) gets the samples as single calls; one that silently returns fewer
     choices than asked (llama.cpp) gets the missing ones topped up with single calls. Either
     way later requests for that model go straight to single calls.
   - `top_k`: sent with `top_k_support="yes"`; with `"no"` a decoding with top_k is sent
     without it (top-k 40 at temperature 1 becomes plain sampling) and reported as substituted;
     `"auto"` tries it and falls back, and learns, on a 400/422.
3. Gather candidates (text, decoding, finish_reason, usage) until every call ended or the
   request deadline (`ProxyConfig.timeout_s`) passed. Failed calls are tolerated when at least
   `min_candidates` samples arrived; otherwise `NotEnoughCandidates` (→ 502, or 504 when all
   failures were timeouts) names what failed.
4. Score every (instruction, text) pair with the injected `score` callable and select the
   argmax (ties: the first in recipe order).
5. Build the OpenAI-shaped answer (`build_response`), or stream it (`stream_chunks`, `sse_stream`).

Cancellation: if the task running `select` is cancelled (the client went away), every
upstream call still in flight is cancelled and awaited before the cancellation propagates, so no
upstream work is left running for nobody.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from service import metrics
from service.schemas.openai import (
    CappyCandidate,
    CappyFailure,
    CappyResponse,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionDelta,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from service.upstream.client import UpstreamClient
from service.upstream.errors import (
    FailureKind,
    InvalidProxyRequest,
    NotEnoughCandidates,
    ProxyError,
    SampleFailure,
    UpstreamError,
)
from service.upstream.recipe import PAPER_DECODING_NAMES, Decoding, ProxyOptions

logger = logging.getLogger(__name__)

ScoreFn = Callable[[str, list[str]], Awaitable[list[float]]]
"""`await score(instruction, texts) -> scores`, one raw Cappy score per text, in order."""

Support = Literal["auto", "yes", "no"]
ProxyRequest = ChatCompletionRequest | CompletionRequest

# Fields the proxy owns (see the precedence rules in service.upstream.recipe); never forwarded.
_OWNED_FIELDS = frozenset(
    {"cappy", "stream", "stream_options", "n", "best_of", "seed", "temperature", "top_p", "top_k"}
)
_SEED_SPACE = 2**31 - 1
_MAX_REMEMBERED_MODELS = 256

KEEPALIVE = ": keep-alive\n\n"
SSE_DONE = "data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """Proxy policy (the lead maps `CAPPY_UPSTREAM_*` / `CAPPY_PROXY_*` settings onto it).

    Attributes:
        n_support: does the upstream honour `n > 1`: "auto" (detect), "yes", "no".
        top_k_support: does the upstream accept `top_k`: "auto" (detect), "yes", "no".
        timeout_s: deadline for gathering one request's samples; calls still running then are
            cancelled and count as timed out.
        instruction_max_chars: budget of a rendered chat instruction; older turns are dropped
            first (see `render_chat_instruction`). None: no budget.
        stream_chunk_chars: approximate size of one streamed content delta.
    """

    n_support: Support = "auto"
    top_k_support: Support = "auto"
    timeout_s: float = 120.0
    instruction_max_chars: int | None = 2000
    stream_chunk_chars: int = 24


@dataclass(slots=True)
class UpstreamCapabilities:
    """What the proxy knows about one upstream model: True/False, or None when not yet known."""

    n: bool | None = None
    top_k: bool | None = None


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
    usage: Usage
    planned: int
    failures: list[SampleFailure] = field(default_factory=list)
    substituted: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    gather_s: float = 0.0  # fan-out wall time: first call sent to last sample in
    slowest_call_s: float = 0.0  # the longest single upstream call
    scoring_s: float = 0.0  # scoring every candidate with Cappy (through the batcher)

    @property
    def best(self) -> Candidate:
        return self.candidates[self.winner]

    def headers(self) -> dict[str, str]:
        """Response headers: candidates gathered/planned, the winning decoding, substitutions."""
        headers = {
            "x-cappy-candidates": str(len(self.candidates)),
            "x-cappy-samples-planned": str(self.planned),
            "x-cappy-winning-decoding": self.best.decoding,
            "x-cappy-gather-ms": f"{self.gather_s * 1000:.1f}",
            "x-cappy-slowest-call-ms": f"{self.slowest_call_s * 1000:.1f}",
            "x-cappy-scoring-ms": f"{self.scoring_s * 1000:.1f}",
        }
        if self.substituted:
            headers["x-cappy-substituted"] = ",".join(self.substituted)
        return headers

    def cappy(self, *, with_candidates: bool = True) -> CappyResponse:
        """The response's `cappy` object."""
        grouped = Counter(
            (f.decoding, f.error.kind.value, f.error.upstream_status) for f in self.failures
        )
        return CappyResponse(
            winner=self.winner,
            winning_decoding=self.best.decoding,
            num_candidates=len(self.candidates),
            num_planned=self.planned,
            substituted=list(self.substituted),
            failures=[
                CappyFailure(decoding=d, kind=k, upstream_status=s, count=c)
                for (d, k, s), c in grouped.items()
            ],
            candidates=[
                CappyCandidate(
                    index=c.index,
                    decoding=c.decoding,
                    text=c.text,
                    score=s,
                    finish_reason=c.finish_reason,
                    substituted=c.substituted,
                    seed=c.seed,
                )
                for c, s in zip(self.candidates, self.scores, strict=True)
            ]
            if with_candidates
            else None,
        )


# --- instruction rendering ----------------------------------------------------------------------
_ROLE_LABELS = {
    "system": "System",
    "developer": "System",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
    "function": "Tool",
}


def _field(message: Any, name: str) -> Any:
    if isinstance(message, Mapping):
        return message.get(name)
    return getattr(message, name, None)


def message_text(content: Any) -> str:
    """The text of a message's content: a string, or content parts (non-text parts → `[type]`)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        pieces = []
        for part in content:
            if isinstance(part, Mapping):
                if isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                elif isinstance(part.get("refusal"), str):
                    pieces.append(part["refusal"])
                else:
                    pieces.append(f"[{part.get('type', 'content')}]")
            elif isinstance(part, str):
                pieces.append(part)
        return "\n".join(pieces)
    return str(content)


def _render_tool_calls(tool_calls: Any) -> str:
    lines = []
    for call in tool_calls or []:
        fn = call.get("function", {}) if isinstance(call, Mapping) else {}
        lines.append(f"[tool call] {fn.get('name', '?')}({fn.get('arguments', '')})")
    return "\n".join(lines)


def _render_turn(message: Any) -> str:
    role = str(_field(message, "role") or "user")
    text = message_text(_field(message, "content"))
    calls = _render_tool_calls(_field(message, "tool_calls"))
    body = "\n".join(part for part in (text, calls) if part)
    return f"{_ROLE_LABELS.get(role, role.capitalize())}: {body}"


def render_chat_instruction(messages: Sequence[Any], max_chars: int | None = None) -> str:
    """Renders a conversation as the instruction text Cappy scores responses against.

    Rules:
    - A conversation of one user message is its text verbatim: exactly what a completions prompt
      gives, and the shape Cappy was trained on (instruction → response).
    - Otherwise every message becomes a `Role: text` block (System, User, Assistant, Tool;
      `developer` counts as System), blocks separated by a blank line, in conversation order —
      so the last user turn comes last, unless messages follow it (tool results, an assistant
      prefix), which keep their place after it. Content parts render as their text, other parts
      as `[image_url]` etc.; assistant tool calls as `[tool call] name(arguments)`.
    - Within `max_chars`, the oldest turns before the last user turn are dropped first (then the
      system message), replaced by one `[... N earlier messages omitted]` line, so the question
      being answered survives: the scorer truncates long pairs at 512 tokens, and it would
      otherwise cut from the end. The last user turn and what follows it are never dropped.
    """
    if not messages:
        return ""
    roles = [str(_field(m, "role") or "") for m in messages]
    if len(messages) == 1 and roles[0] == "user":
        return message_text(_field(messages[0], "content"))
    blocks = [_render_turn(m) for m in messages]
    rendered = "\n\n".join(blocks)
    if max_chars is None or len(rendered) <= max_chars:
        return rendered
    last_user = max((i for i, r in enumerate(roles) if r == "user"), default=len(blocks) - 1)
    # Droppable: everything before the last user turn; system/developer messages last.
    droppable = [i for i in range(last_user) if roles[i] not in ("system", "developer")]
    droppable += [i for i in range(last_user) if roles[i] in ("system", "developer")]
    dropped: set[int] = set()

    def assemble() -> str:
        out: list[str] = []
        marker_done = False
        for i, block in enumerate(blocks):
            if i in dropped:
                if not marker_done:
                    out.append(f"[... {len(dropped)} earlier messages omitted]")
                    marker_done = True
                continue
            out.append(block)
        return "\n\n".join(out)

    for i in droppable:
        dropped.add(i)
        rendered = assemble()
        if len(rendered) <= max_chars:
            break
    return rendered


def render_completion_prompt(prompt: Any) -> str:
    """The instruction of a completions request: its one prompt string.

    Raises:
        InvalidProxyRequest: for several prompts or token-id prompts.
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    raise InvalidProxyRequest(
        "prompt must be one string: the best-of-N proxy does not accept several prompts or "
        "token-id prompts",
        param="prompt",
    )


def _choice_text(kind: str, choice: Mapping[str, Any]) -> str:
    if kind == "text":
        return str(choice.get("text") or "")
    message = choice.get("message") or {}
    text = message_text(message.get("content"))
    if not text and message.get("tool_calls"):
        return json.dumps(message["tool_calls"], ensure_ascii=False, separators=(",", ":"))
    if not text and isinstance(message.get("refusal"), str):
        return message["refusal"]
    return text


def _winner_label(candidate: Candidate) -> str:
    """Bounded metric label: default-recipe names, else `custom` (clients pick names)."""
    if candidate.substituted:
        return "substituted"
    return candidate.decoding if candidate.decoding in PAPER_DECODING_NAMES else "custom"


# --- fan-out ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Job:
    """One upstream call: `len(slots)` samples of one decoding (n > 1 when more than one)."""

    decoding: Decoding
    slots: tuple[int, ...]
    send_top_k: bool
    seed: int
    retry_of: Literal["n", "top_k"] | None = None


@dataclass(slots=True)
class _Outcome:
    job: _Job
    payload: dict[str, Any] | None = None
    error: UpstreamError | None = None


class _Fanout:
    """The calls of one request: spawns jobs, reacts to their outcomes, collects samples."""

    def __init__(
        self,
        owner: BestOfN,
        kind: Literal["chat", "text"],
        base_body: dict[str, Any],
        caps: UpstreamCapabilities,
        seed_base: int,
        api_key: str | None,
    ):
        self.owner = owner
        self.kind = kind
        self.base_body = base_body
        self.caps = caps
        self.api_key = api_key
        self._seed_base = seed_base
        self._seed_count = 0
        self.tasks: dict[asyncio.Task[_Outcome], _Job] = {}
        self.samples: dict[int, Candidate] = {}
        self.failures: dict[int, SampleFailure] = {}
        self.substituted: set[str] = set()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.slowest_call_s = 0.0  # the longest single upstream call (retries included)

    def next_seed(self) -> int:
        seed = (self._seed_base + self._seed_count) % _SEED_SPACE
        self._seed_count += 1
        return seed

    def plan(self, decodings: Sequence[Decoding]) -> int:
        slot = 0
        use_n = self.caps.n is not False
        send_top_k = self.caps.top_k is not False
        for decoding in decodings:
            slots = tuple(range(slot, slot + decoding.count))
            slot += decoding.count
            if use_n and len(slots) > 1:
                self.spawn(decoding, slots, send_top_k)
            else:
                for s in slots:
                    self.spawn(decoding, (s,), send_top_k)
        return slot

    def spawn(
        self,
        decoding: Decoding,
        slots: tuple[int, ...],
        send_top_k: bool,
        retry_of: Literal["n", "top_k"] | None = None,
    ) -> None:
        job = _Job(decoding, slots, send_top_k, self.next_seed(), retry_of)
        task = asyncio.create_task(self._call(job), name=f"cappy-upstream-{decoding.name}")
        self.tasks[task] = job

    def spawn_singles(
        self,
        decoding: Decoding,
        slots: Sequence[int],
        send_top_k: bool,
        retry_of: Literal["n", "top_k"] | None = None,
    ) -> None:
        for s in slots:
            self.spawn(decoding, (s,), send_top_k, retry_of)

    def body_for(self, job: _Job) -> dict[str, Any]:
        body = dict(self.base_body)
        body.update(job.decoding.sampling_params(send_top_k=job.send_top_k))
        if len(job.slots) > 1:
            body["n"] = len(job.slots)
        body["seed"] = job.seed
        return body

    async def _call(self, job: _Job) -> _Outcome:
        body = self.body_for(job)
        client = self.owner.client
        started = time.perf_counter()
        try:
            if self.kind == "chat":
                payload = await client.chat_completions(body, api_key=self.api_key)
            else:
                payload = await client.completions(body, api_key=self.api_key)
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
        auto_n = self.owner.config.n_support == "auto"
        auto_top_k = self.owner.config.top_k_support == "auto"
        sent_top_k = job.send_top_k and job.decoding.top_k is not None
        if outcome.error is not None:
            error = outcome.error
            if (
                auto_top_k
                and sent_top_k
                and error.is_rejection
                and ("top_k" in error.mentions or len(job.slots) == 1)
            ):
                logger.info(
                    "upstream rejected top_k for decoding %s; retrying without it",
                    job.decoding.name,
                )
                self.spawn(job.decoding, job.slots, False, "top_k")
                return
            if auto_n and len(job.slots) > 1 and error.is_rejection:
                logger.info("upstream rejected n=%d; retrying as single calls", len(job.slots))
                self.spawn_singles(job.decoding, job.slots, job.send_top_k, "n")
                return
            for s in job.slots:
                self.failures[s] = SampleFailure(job.decoding.name, error)
            return

        payload = outcome.payload or {}
        if job.retry_of == "n" and auto_n:
            self.caps.n = False
        if job.retry_of == "top_k" and auto_top_k:
            self.caps.top_k = False
        if sent_top_k and auto_top_k:
            self.caps.top_k = True
        if job.decoding.top_k is not None and not job.send_top_k:
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
                text=_choice_text(self.kind, choice),
                finish_reason=choice.get("finish_reason"),
                choice=choice,
                seed=job.seed,
                substituted=job.decoding.top_k is not None and not job.send_top_k,
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
                if auto_n:
                    self.caps.n = False
                logger.info(
                    "upstream returned %d of %d choices for %s; topping up with single calls",
                    len(choices),
                    len(job.slots),
                    job.decoding.name,
                )
                self.spawn_singles(job.decoding, missing, job.send_top_k)
            elif auto_n:
                self.caps.n = True


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class BestOfN:
    """Runs best-of-N requests against one upstream; one instance per app (holds what it learnt
    about the upstream's support for `n` and `top_k`, per model)."""

    def __init__(
        self,
        client: UpstreamClient,
        score: ScoreFn,
        config: ProxyConfig | None = None,
        *,
        rng: random.Random | None = None,
    ):
        """Args:
        client: the shared upstream client.
        score: `await score(instruction, texts) -> list[float]` (the batcher in production).
        config: proxy policy.
        rng: source of base seeds when a request has none (tests pass a seeded one).
        """
        self.client = client
        self.score = score
        self.config = config or ProxyConfig()
        self._rng = rng or random.Random()
        self._caps: OrderedDict[str, UpstreamCapabilities] = OrderedDict()

    def capabilities(self, model: str) -> UpstreamCapabilities:
        """What is known about `model` on the upstream (settings "yes"/"no" are fixed)."""
        caps = self._caps.get(model)
        if caps is None:
            caps = UpstreamCapabilities(
                n=None if self.config.n_support == "auto" else self.config.n_support == "yes",
                top_k=None
                if self.config.top_k_support == "auto"
                else self.config.top_k_support == "yes",
            )
            self._caps[model] = caps
            while len(self._caps) > _MAX_REMEMBERED_MODELS:
                self._caps.popitem(last=False)
        return caps

    @staticmethod
    def validate(request: ProxyRequest) -> None:
        """Refuses what the proxy cannot serve (call before streaming starts).

        Raises:
            InvalidProxyRequest: n > 1, best_of > 1, echo, or an unusable prompt.
        """
        if request.n is not None and request.n != 1:
            raise InvalidProxyRequest(
                "n must be 1: the proxy returns the best of its samples; ask for "
                "cappy.return_candidates to see all of them",
                param="n",
            )
        if isinstance(request, CompletionRequest):
            if request.best_of is not None and request.best_of != 1:
                raise InvalidProxyRequest(
                    "best_of is not supported: the proxy's cappy.recipe decides the samples",
                    param="best_of",
                )
            if request.echo:
                raise InvalidProxyRequest("echo is not supported by the proxy", param="echo")
            render_completion_prompt(request.prompt)

    async def select(
        self, request: ProxyRequest, options: ProxyOptions, *, api_key: str | None = None
    ) -> Selection:
        """Gathers the recipe's samples, scores them, and returns the selection.

        Args:
            request: the client's chat or completions request.
            options: recipe, `min_candidates`, `return_candidates` (see `resolve_options`).
            api_key: the caller's key to forward upstream (None: the configured key).

        Raises:
            InvalidProxyRequest: the request cannot be served (before any upstream call).
            NotEnoughCandidates: fewer than `options.min_candidates` samples arrived.
            Exception: whatever `score` raises (e.g. the batcher's overload error).
        """
        started = time.perf_counter()
        self.validate(request)
        kind: Literal["chat", "text"]
        if isinstance(request, ChatCompletionRequest):
            kind = "chat"
            instruction = render_chat_instruction(
                request.messages, self.config.instruction_max_chars
            )
        else:
            kind = "text"
            instruction = render_completion_prompt(request.prompt)

        base_body = {
            key: value
            for key, value in request.model_dump(mode="json", exclude_none=True).items()
            if key not in _OWNED_FIELDS
        }
        seed_base = (
            request.seed % _SEED_SPACE
            if request.seed is not None
            else self._rng.randrange(_SEED_SPACE)
        )
        fanout = _Fanout(
            self, kind, base_body, self.capabilities(request.model), seed_base, api_key
        )
        planned = fanout.plan(options.recipe.decodings)
        await fanout.run(self.config.timeout_s)
        gather_s = time.perf_counter() - started

        candidates = [fanout.samples[s] for s in sorted(fanout.samples)]
        failures = [fanout.failures[s] for s in sorted(fanout.failures) if s not in fanout.samples]
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
        scores = [float(s) for s in await self.score(instruction, [c.text for c in candidates])]
        scoring_s = time.perf_counter() - scoring_started
        if len(scores) != len(candidates):
            raise RuntimeError(
                f"score returned {len(scores)} scores for {len(candidates)} candidates"
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
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return Selection(
            kind=kind,
            id=f"{prefix}-cappy-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=best.model or request.model,
            instruction=instruction,
            options=options,
            candidates=candidates,
            scores=scores,
            winner=winner,
            usage=Usage(
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


# --- building the answer ------------------------------------------------------------------------
def build_response(selection: Selection) -> ChatCompletionResponse | CompletionResponse:
    """The OpenAI-shaped response: one choice (the winner), usage summed over all samples, and
    the `cappy` object when the request asked for candidates."""
    best = selection.best
    cappy = selection.cappy() if selection.options.return_candidates else None
    logprobs = best.choice.get("logprobs")
    logprobs = logprobs if isinstance(logprobs, dict) else None
    if selection.kind == "chat":
        message = dict(best.choice.get("message") or {})
        message["role"] = "assistant"
        if isinstance(message.get("content"), list):  # content parts: answer with their text
            message["content"] = message_text(message["content"])
        return ChatCompletionResponse(
            id=selection.id,
            created=selection.created,
            model=selection.model,
            choices=[
                ChatCompletionChoice(
                    index=0,
                    message=ChatCompletionMessage.model_validate(message),
                    finish_reason=best.finish_reason or "stop",
                    logprobs=logprobs,
                )
            ],
            usage=selection.usage,
            system_fingerprint=best.system_fingerprint,
            cappy=cappy,
        )
    return CompletionResponse(
        id=selection.id,
        created=selection.created,
        model=selection.model,
        choices=[
            CompletionChoice(
                index=0,
                text=best.text,
                finish_reason=best.finish_reason or "stop",
                logprobs=logprobs,
            )
        ],
        usage=selection.usage,
        system_fingerprint=best.system_fingerprint,
        cappy=cappy,
    )


def split_text(text: str, chunk_chars: int) -> list[str]:
    """Splits text into pieces of about `chunk_chars`, at whitespace; joins back exactly."""
    if not text:
        return []
    pieces: list[str] = []
    current = ""
    for token in re.findall(r"\s+|\S+\s*", text):
        current += token
        if len(current) >= chunk_chars:
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return pieces


async def stream_chunks(
    selection: Selection, *, include_usage: bool = False, chunk_chars: int = 24
) -> AsyncIterator[ChatCompletionChunk | CompletionChunk]:
    """The selected answer as OpenAI streaming chunks.

    Chat: a role delta first, the content in several deltas (tool calls in one delta), a chunk
    with the finish reason (and `cappy` when candidates were asked for), then — with
    `include_usage` — a chunk with `usage` and `choices: []`. Completions: text pieces, the
    finish chunk, the usage chunk. Logprobs are not streamed.
    """
    best = selection.best
    cappy = selection.cappy() if selection.options.return_candidates else None
    common: dict[str, Any] = {
        "id": selection.id,
        "created": selection.created,
        "model": selection.model,
        "system_fingerprint": best.system_fingerprint,
    }
    if selection.kind == "chat":
        message = best.choice.get("message") or {}
        content = message_text(message.get("content"))

        def chat(delta: ChatCompletionDelta, finish: str | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                **common,
                choices=[ChatCompletionChunkChoice(index=0, delta=delta, finish_reason=finish)],
            )

        yield chat(ChatCompletionDelta(role="assistant", content=""))
        for piece in split_text(content, chunk_chars):
            await asyncio.sleep(0)
            yield chat(ChatCompletionDelta(content=piece))
        if message.get("tool_calls"):
            calls = [
                {"index": i, **call} if isinstance(call, dict) else call
                for i, call in enumerate(message["tool_calls"])
            ]
            yield chat(ChatCompletionDelta(tool_calls=calls))
        if isinstance(message.get("refusal"), str):
            yield chat(ChatCompletionDelta(refusal=message["refusal"]))
        final = chat(ChatCompletionDelta(), best.finish_reason or "stop")
        final.cappy = cappy
        yield final
        if include_usage:
            yield ChatCompletionChunk(**common, choices=[], usage=selection.usage)
        return

    def text_chunk(text: str, finish: str | None = None) -> CompletionChunk:
        return CompletionChunk(
            **common, choices=[CompletionChunkChoice(index=0, text=text, finish_reason=finish)]
        )

    for piece in split_text(best.text, chunk_chars):
        await asyncio.sleep(0)
        yield text_chunk(piece)
    final_text = text_chunk("", best.finish_reason or "stop")
    final_text.cappy = cappy
    yield final_text
    if include_usage:
        yield CompletionChunk(**common, choices=[], usage=selection.usage)


def sse_data(obj: BaseModel | Mapping[str, Any]) -> str:
    """One server-sent event carrying `obj` as JSON (None fields left out)."""
    if isinstance(obj, BaseModel):
        payload = obj.model_dump_json(exclude_none=True)
    else:
        payload = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


async def keepalive_until_done(task: asyncio.Future[Any], interval_s: float) -> AsyncIterator[str]:
    """Yields an SSE comment (`": keep-alive\\n\\n"`) every `interval_s` until `task` is done.

    Proxies and clients drop idle connections; the comments keep a stream alive while the
    samples are gathered. If the consumer stops early (the client disconnected and the server
    cancelled the response), `task` is cancelled and awaited, which cancels its upstream calls.
    """
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=interval_s)
            if not done:
                yield KEEPALIVE
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


def default_error_envelope(error: BaseException) -> dict[str, Any]:
    """The OpenAI error body for an error raised after a stream started (never echoes `str()`
    of an unknown exception)."""
    if isinstance(error, ProxyError):
        return error.to_envelope()
    return {
        "error": {
            "message": "internal error while preparing the answer",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }


async def sse_stream(
    selection: asyncio.Future[Selection],
    *,
    include_usage: bool = False,
    keepalive_s: float = 10.0,
    keepalive_at_once: bool = False,
    chunk_chars: int = 24,
    error_envelope: Callable[[BaseException], Mapping[str, Any]] = default_error_envelope,
) -> AsyncIterator[str]:
    """The whole SSE body of a streaming proxy response, ready for a streaming response.

    Keep-alive comments while `selection` (a task running `BestOfN.select`) runs, then the
    chunks of `stream_chunks`, then `data: [DONE]`. An error raised by the selection after the
    stream started becomes an OpenAI error event (`data: {"error": {...}}`, built by
    `error_envelope`; pass your own to map e.g. the batcher's overload error) followed by
    `[DONE]` — the status line is already sent by then. To answer errors with a real status,
    wait on the task briefly before starting the stream and only stream if it is still running
    or succeeded. Closing this generator cancels the selection (and so every upstream call).
    With `keepalive_at_once` (the caller already held the status line for a keep-alive
    interval), a keep-alive comment opens the stream at once if the selection is still running.
    """
    try:
        if keepalive_at_once and not selection.done():
            yield KEEPALIVE
        async for comment in keepalive_until_done(selection, keepalive_s):
            yield comment
        try:
            result = selection.result()
        except Exception as error:  # reported in-stream: the 200 status line is already sent
            if not isinstance(error, ProxyError):
                logger.exception("proxy stream failed after it started")
            yield sse_data(error_envelope(error))
            yield SSE_DONE
            return
        async for chunk in stream_chunks(
            result, include_usage=include_usage, chunk_chars=chunk_chars
        ):
            yield sse_data(chunk)
        yield SSE_DONE
    finally:
        if not selection.done():
            selection.cancel()
            await asyncio.wait({selection})
