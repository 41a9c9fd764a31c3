"""The `cappy` extension object of the OpenAI-compatible proxy: a request's recipe override and
candidate reporting (`CappyRequest`), a response's candidates and scores (`CappyResponse`).

A request's object is ours, so it is strict (`extra="forbid"`, no coercion of strings to numbers
or booleans): a typo there is an error, not a silent no-op. The OpenAI wire models that carry it
are in `service.schemas.openai`.

These models are the one statement of the recipe rules: a request's `cappy` object is validated by
them, and so is CAPPY_PROXY_RECIPE (`service.upstream.recipe`, through a TypeAdapter over
`CappyRecipe`). Only the bound on a recipe's total samples, which is a setting, is checked there.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError


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
