"""The sampling recipe of the best-of-N proxy: which decodings, how many samples of each.

The default is the paper's (Cappy, §4.2; reference `scripts/bigbench_flan_generate.py`),
17 samples:

    name             count  temperature  top_p  top_k
    sampling           4       1.0        1.0     -     plain sampling
    temperature_0.9    4       0.9        1.0     -
    top_k_40           4       1.0        1.0    40
    top_p_0.95         4       1.0        0.95    -     nucleus
    greedy             1       0.0         -      -     stands in for beam search (width 4),
                                                        which hosted APIs do not offer

A recipe comes from, in order of precedence: the request's `cappy.recipe`, then the
`CAPPY_PROXY_RECIPE` setting (the same JSON list), then the default above. `cappy.min_candidates`
overrides `CAPPY_PROXY_MIN_CANDIDATES`. A recipe's total samples are bounded
(`CAPPY_PROXY_MAX_SAMPLES`, 64 by default). Both are validated by the wire model
`service.schemas.cappy.CappyRecipe` (the rules of a decoding, stated once); this module adds only
that bound, which is a setting.

What wins between the client's own parameters and the recipe — exactly:
- The recipe owns sampling: `temperature`, `top_p`, `top_k`, `min_p` and `repeat_penalty`.
  Whatever the client sent for these five is ignored while a recipe is in effect (and one always
  is), so that the paper's decodings are what their names say. What each call sends is
  `service.upstream.samplers.sampling_params`: the decoding's `temperature` and `top_p` (one
  left unset is not sent: the upstream's default applies), its own `top_k`, and, where the
  upstream accepts them (llama.cpp), the sampler extras that switch llama.cpp's other samplers
  off: `top_k` 0, `min_p` 0.0, `repeat_penalty` 1.0. A decoding that sets `top_k` itself keeps
  its own value (top-k 40 sends `top_k` 40 with `min_p` 0.0 and `repeat_penalty` 1.0).
  OpenAI-like upstreams, which refuse these fields, are sent the decoding's parameters only.
- `top_k` and the extras are only sent to upstreams that accept them (detected, or fixed by
  `CAPPY_UPSTREAM_TOP_K_SUPPORT`; "no" sends neither); elsewhere a top-k decoding is sent
  without its `top_k` (top-k 40 at temperature 1.0 becomes plain sampling) and the response
  reports it as substituted.
- The proxy owns `n` (the client may only ask for 1: it gets one choice, the best), `seed` (every
  sampled call gets its own; derived as `seed + i` when the client sent `seed`, so a request is
  reproducible where the upstream is), `stream` and `stream_options` (upstream calls never
  stream; the proxy streams the selected answer itself), and `best_of` (refused when > 1).
- Everything else the client sent passes through unchanged to every upstream call: `model`,
  `max_tokens` / `max_completion_tokens`, `stop`, `presence_penalty` / `frequency_penalty`,
  `logit_bias`, `logprobs`, `response_format`, `tools`, `user`, and any field the proxy does not
  know (`typical_p`, `mirostat_mode`, ...). The `cappy` object itself is never sent upstream.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from service import defaults
from service.schemas.cappy import CappyDecodingSpec, CappyRecipe, CappyRequest
from service.upstream.errors import RecipeError

_RECIPE: TypeAdapter[list[CappyDecodingSpec]] = TypeAdapter(CappyRecipe)
# The errors that keep pydantic's wording, worded to follow a parameter path.
_WORDS = {"missing": "must be given", "extra_forbidden": "is an unknown field"}


@dataclass(frozen=True, slots=True)
class Decoding:
    """One decoding of a recipe: `count` samples drawn with these sampling parameters (the
    rules on each are `CappyDecodingSpec`'s).

    Attributes:
        name: a label, unique within a recipe.
        count: samples to draw with this decoding.
        temperature: 0 (greedy) to 2, or None to leave the upstream's default.
        top_p: nucleus mass, or None for the upstream's default.
        top_k: top-k cut-off (0 disables it on llama.cpp / vLLM), or None: none of its own
            (the sampler extras' 0 where the upstream takes them, `service.upstream.samplers`).
    """

    name: str
    count: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    @classmethod
    def from_spec(cls, spec: CappyDecodingSpec) -> Decoding:
        return cls(spec.name, spec.count, spec.temperature, spec.top_p, spec.top_k)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "count": self.count}
        for key in ("temperature", "top_p", "top_k"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


PAPER_DECODINGS: tuple[Decoding, ...] = (
    Decoding("sampling", 4, temperature=1.0, top_p=1.0),
    Decoding("temperature_0.9", 4, temperature=0.9, top_p=1.0),
    Decoding("top_k_40", 4, temperature=1.0, top_p=1.0, top_k=40),
    Decoding("top_p_0.95", 4, temperature=1.0, top_p=0.95),
    Decoding("greedy", 1, temperature=0.0),
)
PAPER_DECODING_NAMES = frozenset(d.name for d in PAPER_DECODINGS)


@dataclass(frozen=True, slots=True)
class Recipe:
    """An ordered list of decodings; sample order (and so tie-breaking) follows it."""

    decodings: tuple[Decoding, ...]

    @classmethod
    def default(cls) -> Recipe:
        """The paper's 17-sample recipe."""
        return cls(PAPER_DECODINGS)

    @property
    def total(self) -> int:
        return sum(d.count for d in self.decodings)

    @classmethod
    def from_spec(
        cls,
        spec: object,
        *,
        max_samples: int = defaults.PROXY_MAX_SAMPLES,
        where: str = "cappy.recipe",
    ) -> Recipe:
        """Validates a recipe given as a list of decoding objects.

        Args:
            spec: e.g. `[{"name": "t09", "count": 4, "temperature": 0.9}, ...]`.
            max_samples: the bound on the recipe's total samples.
            where: the parameter path used in error messages (`cappy.recipe`, a setting name).

        Raises:
            RecipeError: with a message naming the offending entry and field.
        """
        try:
            specs = _RECIPE.validate_python(spec)
        except ValidationError as exc:
            raise _recipe_error(exc, where) from None
        return cls.from_decodings(specs, max_samples=max_samples, where=where)

    @classmethod
    def from_decodings(
        cls, specs: Sequence[CappyDecodingSpec], *, max_samples: int, where: str
    ) -> Recipe:
        """The recipe of validated decodings, within `max_samples` samples in total.

        Raises:
            RecipeError: the decodings draw more than `max_samples` samples.
        """
        recipe = cls(tuple(Decoding.from_spec(spec) for spec in specs))
        if recipe.total > max_samples:
            raise RecipeError(
                f"{where}: {recipe.total} samples in total, at most {max_samples} allowed",
                param=where,
            )
        return recipe

    @classmethod
    def from_setting(
        cls, value: str | Sequence[Mapping[str, Any]] | None, *, max_samples: int
    ) -> Recipe:
        """The recipe configured in settings (`CAPPY_PROXY_RECIPE`, JSON), or the paper's.

        Raises:
            RecipeError: when the setting is not valid JSON or not a valid recipe.
        """
        if value is None or (isinstance(value, str) and not value.strip()):
            recipe = cls.default()
            if recipe.total > max_samples:
                raise RecipeError(
                    f"the default recipe has {recipe.total} samples but "
                    f"CAPPY_PROXY_MAX_SAMPLES is {max_samples}",
                    param="CAPPY_PROXY_MAX_SAMPLES",
                )
            return recipe
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise RecipeError(
                    f"CAPPY_PROXY_RECIPE is not valid JSON: {exc.msg} at position {exc.pos}",
                    param="CAPPY_PROXY_RECIPE",
                ) from None
        return cls.from_spec(value, max_samples=max_samples, where="CAPPY_PROXY_RECIPE")

    def to_list(self) -> list[dict[str, Any]]:
        return [d.to_dict() for d in self.decodings]


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    """What one proxy request runs: the recipe, the candidates floor, whether to list them."""

    recipe: Recipe
    min_candidates: int
    return_candidates: bool = False


def resolve_options(
    cappy: CappyRequest | Mapping[str, Any] | None,
    *,
    default_recipe: Recipe,
    default_min_candidates: int = defaults.PROXY_MIN_CANDIDATES,
    max_samples: int = defaults.PROXY_MAX_SAMPLES,
) -> ProxyOptions:
    """Applies a request's `cappy` object over the configured defaults.

    Args:
        cappy: the request's `cappy` extension (validated with the request), or a mapping
            validated here the same way; None when absent.
        default_recipe: the configured recipe (see `Recipe.from_setting`).
        default_min_candidates: the configured floor; clamped to the recipe's total.
        max_samples: the bound on a recipe's total samples.

    Raises:
        RecipeError: for an invalid `cappy` object, a recipe over `max_samples`, or
            `min_candidates` above the recipe's total.
    """
    if cappy is None:
        cappy = CappyRequest()
    elif not isinstance(cappy, CappyRequest):
        try:
            cappy = CappyRequest.model_validate(cappy)
        except ValidationError as exc:
            raise _recipe_error(exc, "cappy") from None
    recipe = default_recipe
    if cappy.recipe is not None:
        recipe = Recipe.from_decodings(cappy.recipe, max_samples=max_samples, where="cappy.recipe")
    min_candidates = cappy.min_candidates
    if min_candidates is None:
        min_candidates = max(1, min(default_min_candidates, recipe.total))
    elif min_candidates > recipe.total:
        raise RecipeError(
            f"cappy.min_candidates is {min_candidates} but the recipe draws only "
            f"{recipe.total} samples",
            param="cappy.min_candidates",
        )
    return ProxyOptions(recipe, min_candidates, cappy.return_candidates)


def _recipe_error(exc: ValidationError, where: str) -> RecipeError:
    """The first error of a recipe's or a `cappy` object's validation, as a `RecipeError` whose
    `param` is the path below `where` (`cappy.recipe[0].count`, `CAPPY_PROXY_RECIPE[1].name`)."""
    error = exc.errors(include_url=False)[0]
    param = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"])
    return RecipeError(f"{param} {_WORDS.get(error['type'], error['msg'])}", param=param)
