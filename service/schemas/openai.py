"""Wire models of the OpenAI-compatible proxy: chat/completions and completions requests and
responses, streaming chunks, the model list, and the `cappy` extension object.

Requests allow unknown fields (`extra="allow"`): whatever the client sends that is not listed here
(`min_p`, `repeat_penalty`, vendor extensions, newer OpenAI fields) is kept and passed upstream
unchanged (see `service.upstream.recipe` for exactly which fields the proxy owns). The `cappy`
object is ours, so it is strict (`extra="forbid"`, no coercion of strings to numbers or booleans):
a typo there is an error, not a silent no-op. No text anywhere in a request, unknown fields
included, may hold a lone surrogate (`RequestModel`): it could not be sent upstream nor scored.

Responses are built by `service.upstream.answer` and serialised with `exclude_none=True`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_serializer,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from service.schemas.common import RequestModel


# --- the cappy extension ------------------------------------------------------------------------
# These models are the one statement of the recipe rules: a request's `cappy` object is validated
# by them, and so is CAPPY_PROXY_RECIPE (`service.upstream.recipe`, through a TypeAdapter over
# `CappyRecipe`). Only the bound on a recipe's total samples, which is a setting, is checked there.
def _must_be(rule: str) -> WrapValidator:
    """Words a value's error as its rule ("must be an integer >= 1") in place of pydantic's
    wording of the one constraint it broke; errors inside the value (a field of an item) keep
    their own words. The error type (the answer's `code`) stays pydantic's."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            errors = exc.errors()
            if any(error["loc"] for error in errors):
                raise
            raise PydanticCustomError(errors[0]["type"], "must be {rule}", {"rule": rule}) from None

    return WrapValidator(validate)


class CappyDecodingSpec(BaseModel):
    """One decoding of a recipe given in a request."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[
        str,
        Field(pattern=r"^[A-Za-z0-9_.:\-]{1,64}$", strict=True),
        _must_be("1-64 characters of [A-Za-z0-9_.:-]"),
    ] = Field(
        description="Label of this decoding, unique within the recipe; reported with each "
        "candidate and in the `x-cappy-winning-decoding` header."
    )
    count: Annotated[int, Field(ge=1, strict=True), _must_be("an integer >= 1")] = Field(
        default=1,
        description="Samples to draw with this decoding (the recipe's total is bounded by "
        "the server, 64 by default).",
    )
    temperature: (
        Annotated[float, Field(ge=0.0, le=2.0, strict=True), _must_be("a number in [0, 2]")] | None
    ) = Field(
        default=None,
        description="Sampling temperature; 0 is greedy. Unset: the upstream's default.",
    )
    top_p: (
        Annotated[float, Field(gt=0.0, le=1.0, strict=True), _must_be("a number in (0, 1]")] | None
    ) = Field(default=None, description="Nucleus mass. Unset: the upstream's default.")
    top_k: Annotated[int, Field(ge=0, strict=True), _must_be("an integer >= 0")] | None = Field(
        default=None,
        description="Top-k cut-off, sent only to upstreams that accept it (0 disables it on "
        "llama.cpp and vLLM). Unset: not sent.",
    )


def _unique_names(decodings: list[CappyDecodingSpec]) -> list[CappyDecodingSpec]:
    seen: set[str] = set()
    for i, decoding in enumerate(decodings):
        if decoding.name in seen:
            error = PydanticCustomError(
                "duplicate_name",
                "must not duplicate an earlier decoding's name ('{name}')",
                {"name": decoding.name},
            )
            details = InitErrorDetails(type=error, loc=(i, "name"), input=decoding.name)
            raise ValidationError.from_exception_data("CappyRecipe", [details])
        seen.add(decoding.name)
    return decodings


CappyRecipe = Annotated[
    list[Annotated[CappyDecodingSpec, _must_be("an object")]],
    Field(min_length=1),
    _must_be("a list of at least one decoding"),
    AfterValidator(_unique_names),
]
"""A sampling recipe: decodings in sample order, at least one, names unique."""


class CappyRequest(BaseModel):
    """The request's `cappy` object: change the sampling recipe or ask for every candidate."""

    model_config = ConfigDict(extra="forbid")

    recipe: CappyRecipe | None = Field(
        default=None,
        description="Decodings to sample with, replacing the configured recipe (default: the "
        "paper's 17 samples). The total count is bounded by the server (64 by default).",
    )
    return_candidates: Annotated[bool, Field(strict=True), _must_be("a boolean")] = Field(
        default=False,
        description="Add `cappy.candidates` to the response: every sample with its decoding, "
        "score and finish reason.",
    )
    min_candidates: Annotated[int, Field(ge=1, strict=True), _must_be("an integer >= 1")] | None = (
        Field(
            default=None,
            description="Answer only if at least this many samples arrived (others may fail), "
            "at most the recipe's total; otherwise an error (502, or 504 when the failures "
            "were timeouts).",
        )
    )


class CappyCandidate(BaseModel):
    """One sample the proxy gathered and scored."""

    index: int = Field(description="Position of the sample in recipe order (0-based).")
    decoding: str = Field(description="Name of the decoding that produced it.")
    text: str = Field(description="The text Cappy scored (the message content or the completion).")
    score: float = Field(description="Cappy's raw score for (instruction, text); higher is better.")
    finish_reason: str | None = Field(default=None, description="The upstream's finish reason.")
    substituted: bool = Field(
        default=False,
        description="True when the decoding could not be sent as specified (the upstream does "
        "not accept top_k) and was sampled without top_k.",
    )
    seed: int | None = Field(default=None, description="The seed sent with the upstream call.")


class CappyFailure(BaseModel):
    """Samples that did not arrive, grouped by decoding and cause."""

    decoding: str = Field(description="Name of the decoding whose samples failed.")
    kind: str = Field(
        description="Failure kind: rate_limited, http_4xx, http_5xx, timeout, connection, "
        "malformed."
    )
    upstream_status: int | None = Field(
        default=None, description="The upstream's HTTP status, if any."
    )
    count: int = Field(description="How many samples failed this way.")


class CappyResponse(BaseModel):
    """The response's `cappy` object (present when `cappy.return_candidates` was true)."""

    winner: int = Field(description="Index into `candidates` of the returned sample.")
    winning_decoding: str = Field(description="Decoding that produced the returned sample.")
    num_candidates: int = Field(description="Samples gathered and scored.")
    num_planned: int = Field(description="Samples the recipe asked for.")
    substituted: list[str] = Field(
        default_factory=list,
        description="Decodings sampled without their top_k because the upstream does not "
        "accept it.",
    )
    failures: list[CappyFailure] = Field(
        default_factory=list, description="Samples that did not arrive, by decoding and cause."
    )
    candidates: list[CappyCandidate] | None = Field(
        default=None, description="Every gathered sample, in recipe order, with its score."
    )


# --- shared pieces ------------------------------------------------------------------------------
class _ChoiceBase(BaseModel):
    """A choice whose `finish_reason` is always on the wire, `null` included.

    Responses are dumped with `exclude_none=True`, but OpenAI sends `"finish_reason": null` in
    every streamed chunk and strict clients (the openai SDK's `Completion`) require the key.
    """

    finish_reason: str | None = Field(default=None, description="Why generation stopped.")

    # No return annotation on purpose: pydantic then keeps the model's own JSON schema.
    @model_serializer(mode="wrap")
    def _keep_finish_reason(self, handler: SerializerFunctionWrapHandler):
        data = handler(self)
        if isinstance(data, dict):
            data.setdefault("finish_reason", self.finish_reason)
        return data


class CompletionUsage(BaseModel):
    """Token counts of one proxy request, summed over every upstream sample (billing sums them
    too); OpenAI's `CompletionUsage`, not the scorer's `service.schemas.common.Usage`."""

    prompt_tokens: int = Field(default=0, ge=0, description="Prompt tokens, summed over all calls.")
    completion_tokens: int = Field(
        default=0, ge=0, description="Generated tokens, summed over all samples."
    )
    total_tokens: int = Field(default=0, ge=0, description="prompt_tokens + completion_tokens.")


class StreamOptions(BaseModel):
    """OpenAI's `stream_options`."""

    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = Field(
        default=None,
        description="Send a last chunk with `usage` (summed over all samples) and `choices: []`.",
    )


# --- chat completions ---------------------------------------------------------------------------
class ChatMessage(BaseModel):
    """One message of the conversation (any role; extra fields are passed upstream)."""

    model_config = ConfigDict(extra="allow")

    role: str = Field(
        description="system, developer, user, assistant, tool (or function).", min_length=1
    )
    content: str | list[dict[str, Any]] | None = Field(
        default=None, description='Text, or a list of content parts (`{"type": "text", ...}`).'
    )
    name: str | None = Field(default=None, description="Optional participant name.")
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None, description="Tool calls made by an assistant message."
    )
    tool_call_id: str | None = Field(default=None, description="The call a tool message answers.")


class ChatCompletionRequest(RequestModel):
    """`POST /v1/chat/completions`. Unknown fields are kept and passed upstream."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="Upstream model to sample from.", min_length=1)
    messages: list[ChatMessage] = Field(
        description="The conversation; Cappy scores each sample against its text rendering.",
        min_length=1,
    )
    temperature: float | None = Field(
        default=None,
        ge=0.0,
        le=2.0,
        description="Ignored: the sampling recipe sets the temperature.",
    )
    top_p: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Ignored: the sampling recipe sets top_p."
    )
    top_k: int | None = Field(default=None, description="Ignored: the sampling recipe sets top_k.")
    n: int | None = Field(
        default=None,
        ge=1,
        description="Must be 1 (or absent): the proxy returns the single best sample.",
    )
    seed: int | None = Field(
        default=None,
        description="Base seed: sampled calls get seed, seed+1, ...; random when absent.",
    )
    stream: bool | None = Field(
        default=None,
        description="Stream the selected answer as chat.completion.chunk events once the "
        "samples are gathered and scored (keep-alive comments are sent meanwhile).",
    )
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options.")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Per-sample generation limit, passed upstream."
    )
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Per-sample generation limit (newer name), passed upstream."
    )
    stop: str | list[str] | None = Field(
        default=None, description="Stop sequences, passed upstream."
    )
    presence_penalty: float | None = Field(default=None, description="Passed upstream.")
    frequency_penalty: float | None = Field(default=None, description="Passed upstream.")
    logit_bias: dict[str, float] | None = Field(default=None, description="Passed upstream.")
    logprobs: bool | None = Field(
        default=None, description="Passed upstream; the winner's logprobs are returned."
    )
    top_logprobs: int | None = Field(default=None, description="Passed upstream.")
    response_format: dict[str, Any] | None = Field(default=None, description="Passed upstream.")
    tools: list[dict[str, Any]] | None = Field(default=None, description="Passed upstream.")
    tool_choice: str | dict[str, Any] | None = Field(default=None, description="Passed upstream.")
    user: str | None = Field(default=None, description="End-user id, passed upstream.")
    cappy: CappyRequest | None = Field(
        default=None, description="cappy-serve extension: recipe override and candidate reporting."
    )


class ChatCompletionMessage(BaseModel):
    """The assistant message of a choice, as the upstream returned it (extra fields kept)."""

    model_config = ConfigDict(extra="allow")

    role: str = Field(default="assistant", description="Always `assistant`.")
    content: str | None = Field(default=None, description="The selected sample's text.")
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None, description="Tool calls of the selected sample, if any."
    )
    refusal: str | None = Field(
        default=None, description="A refusal message, if the upstream gave one."
    )


class ChatCompletionChoice(_ChoiceBase):
    """A choice of a chat completion; the proxy returns exactly one, the best sample."""

    index: int = Field(default=0, description="Always 0.")
    message: ChatCompletionMessage = Field(description="The selected sample.")
    finish_reason: str | None = Field(
        default=None, description="The selected sample's finish reason."
    )
    logprobs: dict[str, Any] | None = Field(
        default=None, description="The selected sample's logprobs, when requested and given."
    )


class ChatCompletionResponse(BaseModel):
    """`chat.completion` object."""

    id: str = Field(description="Response id (`chatcmpl-...`).")
    object: Literal["chat.completion"] = Field(
        default="chat.completion", description="Object type."
    )
    created: int = Field(description="Unix time (seconds) of the response.")
    model: str = Field(description="The upstream model that produced the selected sample.")
    choices: list[ChatCompletionChoice] = Field(description="One choice: the best sample.")
    usage: CompletionUsage = Field(
        description="Tokens summed over every sample drawn for this request."
    )
    system_fingerprint: str | None = Field(
        default=None, description="The upstream's system fingerprint for the selected sample."
    )
    cappy: CappyResponse | None = Field(
        default=None, description="Candidates and scores (when `cappy.return_candidates`)."
    )


class ChatCompletionDelta(BaseModel):
    """The delta of a streaming chat chunk."""

    model_config = ConfigDict(extra="allow")

    role: str | None = Field(default=None, description="`assistant` in the first chunk.")
    content: str | None = Field(default=None, description="The next piece of the selected text.")
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None, description="Tool calls of the selected sample (each with its `index`)."
    )
    refusal: str | None = Field(default=None, description="A refusal message, if any.")


class ChatCompletionChunkChoice(_ChoiceBase):
    """A choice of a streaming chat chunk."""

    index: int = Field(default=0, description="Always 0.")
    delta: ChatCompletionDelta = Field(description="What this chunk adds.")
    finish_reason: str | None = Field(default=None, description="Set in the last content chunk.")
    logprobs: dict[str, Any] | None = Field(default=None, description="Not streamed by the proxy.")


class ChatCompletionChunk(BaseModel):
    """`chat.completion.chunk` object (one server-sent event)."""

    id: str = Field(description="Same id in every chunk of a response.")
    object: Literal["chat.completion.chunk"] = Field(
        default="chat.completion.chunk", description="Object type."
    )
    created: int = Field(description="Unix time (seconds), same in every chunk.")
    model: str = Field(description="The upstream model that produced the selected sample.")
    choices: list[ChatCompletionChunkChoice] = Field(
        description="One choice, or none in the final usage chunk."
    )
    usage: CompletionUsage | None = Field(
        default=None, description="Only in the final chunk, with `stream_options.include_usage`."
    )
    system_fingerprint: str | None = Field(default=None, description="The upstream's fingerprint.")
    cappy: CappyResponse | None = Field(
        default=None,
        description="In the finish chunk, when `cappy.return_candidates` (candidates, scores).",
    )


# --- completions --------------------------------------------------------------------------------
class CompletionRequest(RequestModel):
    """`POST /v1/completions`. Unknown fields are kept and passed upstream."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="Upstream model to sample from.", min_length=1)
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="One prompt string (a list holding one string is accepted); Cappy scores "
        "each sample against it. Token-id prompts and several prompts are refused."
    )
    suffix: str | None = Field(default=None, description="Passed upstream.")
    temperature: float | None = Field(
        default=None,
        ge=0.0,
        le=2.0,
        description="Ignored: the sampling recipe sets the temperature.",
    )
    top_p: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Ignored: the sampling recipe sets top_p."
    )
    top_k: int | None = Field(default=None, description="Ignored: the sampling recipe sets top_k.")
    n: int | None = Field(
        default=None,
        ge=1,
        description="Must be 1 (or absent): the proxy returns the single best sample.",
    )
    best_of: int | None = Field(
        default=None, ge=1, description="Must be 1 (or absent): use `cappy.recipe` instead."
    )
    seed: int | None = Field(
        default=None,
        description="Base seed: sampled calls get seed, seed+1, ...; random when absent.",
    )
    stream: bool | None = Field(
        default=None,
        description="Stream the selected completion as text_completion events once the samples "
        "are gathered and scored (keep-alive comments are sent meanwhile).",
    )
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options.")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Per-sample generation limit, passed upstream."
    )
    stop: str | list[str] | None = Field(
        default=None, description="Stop sequences, passed upstream."
    )
    echo: bool | None = Field(default=None, description="Must be false: echo is not supported.")
    logprobs: int | None = Field(
        default=None, ge=0, description="Passed upstream; the winner's logprobs are returned."
    )
    presence_penalty: float | None = Field(default=None, description="Passed upstream.")
    frequency_penalty: float | None = Field(default=None, description="Passed upstream.")
    logit_bias: dict[str, float] | None = Field(default=None, description="Passed upstream.")
    user: str | None = Field(default=None, description="End-user id, passed upstream.")
    cappy: CappyRequest | None = Field(
        default=None, description="cappy-serve extension: recipe override and candidate reporting."
    )


class CompletionChoice(_ChoiceBase):
    """A choice of a text completion; the proxy returns exactly one, the best sample."""

    index: int = Field(default=0, description="Always 0.")
    text: str = Field(description="The selected sample's text.")
    finish_reason: str | None = Field(
        default=None, description="The selected sample's finish reason."
    )
    logprobs: dict[str, Any] | None = Field(
        default=None, description="The selected sample's logprobs, when requested and given."
    )


class CompletionResponse(BaseModel):
    """`text_completion` object."""

    id: str = Field(description="Response id (`cmpl-...`).")
    object: Literal["text_completion"] = Field(
        default="text_completion", description="Object type."
    )
    created: int = Field(description="Unix time (seconds) of the response.")
    model: str = Field(description="The upstream model that produced the selected sample.")
    choices: list[CompletionChoice] = Field(description="One choice: the best sample.")
    usage: CompletionUsage = Field(
        description="Tokens summed over every sample drawn for this request."
    )
    system_fingerprint: str | None = Field(default=None, description="The upstream's fingerprint.")
    cappy: CappyResponse | None = Field(
        default=None, description="Candidates and scores (when `cappy.return_candidates`)."
    )


class CompletionChunkChoice(_ChoiceBase):
    """A choice of a streaming text completion chunk."""

    index: int = Field(default=0, description="Always 0.")
    text: str = Field(default="", description="The next piece of the selected text.")
    finish_reason: str | None = Field(default=None, description="Set in the last chunk.")
    logprobs: dict[str, Any] | None = Field(default=None, description="Not streamed by the proxy.")


class CompletionChunk(BaseModel):
    """A streamed `text_completion` object (one server-sent event)."""

    id: str = Field(description="Same id in every chunk of a response.")
    object: Literal["text_completion"] = Field(
        default="text_completion", description="Object type."
    )
    created: int = Field(description="Unix time (seconds), same in every chunk.")
    model: str = Field(description="The upstream model that produced the selected sample.")
    choices: list[CompletionChunkChoice] = Field(
        description="One choice, or none in the final usage chunk."
    )
    usage: CompletionUsage | None = Field(
        default=None, description="Only in the final chunk, with `stream_options.include_usage`."
    )
    system_fingerprint: str | None = Field(default=None, description="The upstream's fingerprint.")
    cappy: CappyResponse | None = Field(
        default=None,
        description="In the finish chunk, when `cappy.return_candidates` (candidates, scores).",
    )


# --- models -------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    """One entry of `GET /v1/models` (upstream entries are passed through with extra fields)."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(description="Model id.")
    object: str = Field(default="model", description="Always `model`.")
    created: int | None = Field(
        default=None, description="Unix time the model was created, if known."
    )
    owned_by: str | None = Field(default=None, description="Owner of the model.")


class ModelList(BaseModel):
    """`GET /v1/models` response."""

    object: Literal["list"] = Field(default="list", description="Always `list`.")
    data: list[ModelCard] = Field(description="Upstream models, plus the scorer.")
