"""Wire models of the OpenAI-compatible proxy: chat/completions and completions requests and
responses, streaming chunks, and the model list. The `cappy` extension object they carry is in
`service.schemas.cappy`.

Requests allow unknown fields (`extra="allow"`): whatever the client sends that is not listed here
(`min_p`, `repeat_penalty`, vendor extensions, newer OpenAI fields) is kept and passed upstream
unchanged (see `service.upstream.recipe` for exactly which fields the proxy owns). No text
anywhere in a request, unknown fields included, may hold a lone surrogate (`RequestModel`): it
could not be sent upstream nor scored.

The two APIs are parallel wire formats: a field both have is stated once, as a type below (a
request's) or in a base class (a response's), and each class lists its fields in its own API's
order, which is the order of the JSON schema and of validation errors.

Responses are built by `service.upstream.answer` and serialised with `exclude_none=True`.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from service.schemas.cappy import CappyRequest, CappyResponse
from service.schemas.common import RequestModel

# --- fields both requests have ------------------------------------------------------------------
_T = TypeVar("_T")

_Passed = Annotated[_T | None, Field(description="Passed upstream.")]
_UpstreamModel = Annotated[str, Field(description="Upstream model to sample from.", min_length=1)]
_IgnoredTemperature = Annotated[
    float | None,
    Field(ge=0.0, le=2.0, description="Ignored: the sampling recipe sets the temperature."),
]
_IgnoredTopP = Annotated[
    float | None, Field(ge=0.0, le=1.0, description="Ignored: the sampling recipe sets top_p.")
]
_IgnoredTopK = Annotated[int | None, Field(description="Ignored: the sampling recipe sets top_k.")]
_SingleSample = Annotated[
    int | None,
    Field(ge=1, description="Must be 1 (or absent): the proxy returns the single best sample."),
]
_BaseSeed = Annotated[
    int | None,
    Field(description="Base seed: sampled calls get seed, seed+1, ...; random when absent."),
]
_SampleMaxTokens = Annotated[
    int | None, Field(ge=1, description="Per-sample generation limit, passed upstream.")
]
_Stop = Annotated[str | list[str] | None, Field(description="Stop sequences, passed upstream.")]
_EndUser = Annotated[str | None, Field(description="End-user id, passed upstream.")]
_CappyExtension = Annotated[
    CappyRequest | None,
    Field(description="cappy-serve extension: recipe override and candidate reporting."),
]


# --- shared pieces ------------------------------------------------------------------------------
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


_StreamOptions = Annotated[StreamOptions | None, Field(description="Streaming options.")]


class _ChoiceBase(BaseModel):
    """A choice whose `finish_reason` is always on the wire, `null` included.

    Responses are dumped with `exclude_none=True`, but OpenAI sends `"finish_reason": null` in
    every streamed chunk and strict clients (the openai SDK's `Completion`) require the key.
    """

    finish_reason: str | None = Field(default=None, description="Why generation stopped.")
    index: int = Field(default=0, description="Always 0.")

    # No return annotation on purpose: pydantic then keeps the model's own JSON schema.
    @model_serializer(mode="wrap")
    def _keep_finish_reason(self, handler: SerializerFunctionWrapHandler):
        data = handler(self)
        if isinstance(data, dict):
            data.setdefault("finish_reason", self.finish_reason)
        return data


class _SelectedChoice(_ChoiceBase):
    """The one choice of a whole answer: the best sample."""

    finish_reason: str | None = Field(
        default=None, description="The selected sample's finish reason."
    )


_SelectedLogprobs = Annotated[
    dict[str, Any] | None,
    Field(description="The selected sample's logprobs, when requested and given."),
]
_UnstreamedLogprobs = Annotated[
    dict[str, Any] | None, Field(description="Not streamed by the proxy.")
]

_Choice = TypeVar("_Choice", bound=_ChoiceBase)


class _Answer(BaseModel, Generic[_Choice]):
    """A whole (unstreamed) answer; each API names its `object` and its choice."""

    id: str
    object: str
    created: int = Field(description="Unix time (seconds) of the response.")
    model: str = Field(description="The upstream model that produced the selected sample.")
    choices: list[_Choice] = Field(description="One choice: the best sample.")
    usage: CompletionUsage = Field(
        description="Tokens summed over every sample drawn for this request."
    )
    system_fingerprint: str | None = Field(default=None, description="The upstream's fingerprint.")
    cappy: CappyResponse | None = Field(
        default=None, description="Candidates and scores (when `cappy.return_candidates`)."
    )


class _Chunk(BaseModel, Generic[_Choice]):
    """One server-sent event of a streamed answer; each API names its `object` and its choice."""

    id: str = Field(description="Same id in every chunk of a response.")
    object: str
    created: int = Field(description="Unix time (seconds), same in every chunk.")
    model: str = Field(description="The upstream model that produced the selected sample.")
    choices: list[_Choice] = Field(description="One choice, or none in the final usage chunk.")
    usage: CompletionUsage | None = Field(
        default=None, description="Only in the final chunk, with `stream_options.include_usage`."
    )
    system_fingerprint: str | None = Field(default=None, description="The upstream's fingerprint.")
    cappy: CappyResponse | None = Field(
        default=None,
        description="In the finish chunk, when `cappy.return_candidates` (candidates, scores).",
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

    model: _UpstreamModel
    messages: list[ChatMessage] = Field(
        description="The conversation; Cappy scores each sample against its text rendering.",
        min_length=1,
    )
    temperature: _IgnoredTemperature = None
    top_p: _IgnoredTopP = None
    top_k: _IgnoredTopK = None
    n: _SingleSample = None
    seed: _BaseSeed = None
    stream: bool | None = Field(
        default=None,
        description="Stream the selected answer as chat.completion.chunk events once the "
        "samples are gathered and scored (keep-alive comments are sent meanwhile).",
    )
    stream_options: _StreamOptions = None
    max_tokens: _SampleMaxTokens = None
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Per-sample generation limit (newer name), passed upstream."
    )
    stop: _Stop = None
    presence_penalty: _Passed[float] = None
    frequency_penalty: _Passed[float] = None
    logit_bias: _Passed[dict[str, float]] = None
    logprobs: bool | None = Field(
        default=None, description="Passed upstream; the winner's logprobs are returned."
    )
    top_logprobs: _Passed[int] = None
    response_format: _Passed[dict[str, Any]] = None
    tools: _Passed[list[dict[str, Any]]] = None
    tool_choice: _Passed[str | dict[str, Any]] = None
    user: _EndUser = None
    cappy: _CappyExtension = None


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


class ChatCompletionChoice(_SelectedChoice):
    """A choice of a chat completion; the proxy returns exactly one, the best sample."""

    message: ChatCompletionMessage = Field(description="The selected sample.")
    logprobs: _SelectedLogprobs = None


class ChatCompletionResponse(_Answer[ChatCompletionChoice]):
    """`chat.completion` object."""

    id: str = Field(description="Response id (`chatcmpl-...`).")
    object: Literal["chat.completion"] = Field(
        default="chat.completion", description="Object type."
    )
    system_fingerprint: str | None = Field(
        default=None, description="The upstream's system fingerprint for the selected sample."
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

    delta: ChatCompletionDelta = Field(description="What this chunk adds.")
    finish_reason: str | None = Field(default=None, description="Set in the last content chunk.")
    logprobs: _UnstreamedLogprobs = None


class ChatCompletionChunk(_Chunk[ChatCompletionChunkChoice]):
    """`chat.completion.chunk` object (one server-sent event)."""

    object: Literal["chat.completion.chunk"] = Field(
        default="chat.completion.chunk", description="Object type."
    )


# --- completions --------------------------------------------------------------------------------
class CompletionRequest(RequestModel):
    """`POST /v1/completions`. Unknown fields are kept and passed upstream."""

    model_config = ConfigDict(extra="allow")

    model: _UpstreamModel
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="One prompt string (a list holding one string is accepted); Cappy scores "
        "each sample against it. Token-id prompts and several prompts are refused."
    )
    suffix: _Passed[str] = None
    temperature: _IgnoredTemperature = None
    top_p: _IgnoredTopP = None
    top_k: _IgnoredTopK = None
    n: _SingleSample = None
    best_of: int | None = Field(
        default=None, ge=1, description="Must be 1 (or absent): use `cappy.recipe` instead."
    )
    seed: _BaseSeed = None
    stream: bool | None = Field(
        default=None,
        description="Stream the selected completion as text_completion events once the samples "
        "are gathered and scored (keep-alive comments are sent meanwhile).",
    )
    stream_options: _StreamOptions = None
    max_tokens: _SampleMaxTokens = None
    stop: _Stop = None
    echo: bool | None = Field(default=None, description="Must be false: echo is not supported.")
    logprobs: int | None = Field(
        default=None, ge=0, description="Passed upstream; the winner's logprobs are returned."
    )
    presence_penalty: _Passed[float] = None
    frequency_penalty: _Passed[float] = None
    logit_bias: _Passed[dict[str, float]] = None
    user: _EndUser = None
    cappy: _CappyExtension = None


class CompletionChoice(_SelectedChoice):
    """A choice of a text completion; the proxy returns exactly one, the best sample."""

    text: str = Field(description="The selected sample's text.")
    logprobs: _SelectedLogprobs = None


class CompletionResponse(_Answer[CompletionChoice]):
    """`text_completion` object."""

    id: str = Field(description="Response id (`cmpl-...`).")
    object: Literal["text_completion"] = Field(
        default="text_completion", description="Object type."
    )


class CompletionChunkChoice(_ChoiceBase):
    """A choice of a streaming text completion chunk."""

    text: str = Field(default="", description="The next piece of the selected text.")
    finish_reason: str | None = Field(default=None, description="Set in the last chunk.")
    logprobs: _UnstreamedLogprobs = None


class CompletionChunk(_Chunk[CompletionChunkChoice]):
    """A streamed `text_completion` object (one server-sent event)."""

    object: Literal["text_completion"] = Field(
        default="text_completion", description="Object type."
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
