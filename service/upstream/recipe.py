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
(`CAPPY_PROXY_MAX_SAMPLES`, 64 by default).

What wins between the client's own parameters and the recipe — exactly:
- The recipe owns the sampling triple `temperature`, `top_p`, `top_k`. Whatever the client sent
  for these three is ignored while a recipe is in effect (and one always is). A decoding that
  leaves one of them unset sends nothing for it, so the upstream's own default applies (note:
  llama.cpp defaults to top_k 40, top_p 0.95, min_p 0.05; write `"top_k": 0` in a decoding to
  disable top-k there).
- `top_k` is only sent to upstreams that accept it (`CAPPY_UPSTREAM_TOP_K_SUPPORT`); elsewhere
  the decoding is sent without it (top-k 40 at temperature 1.0 becomes plain sampling) and the
  response reports it as substituted.
- The proxy owns `n` (the client may only ask for 1: it gets one choice, the best), `seed` (every
  sampled call gets its own; derived as `seed + i` when the client sent `seed`, so a request is
  reproducible where the upstream is), `stream` and `stream_options` (upstream calls never
  stream; the proxy streams the selected answer itself), and `best_of` (refused when > 1).
- Everything else the client sent passes through unchanged to every upstream call: `model`,
  `max_tokens` / `max_completion_tokens`, `stop`, penalties, `logit_bias`, `logprobs`,
  `response_format`, `tools`, `user`, and any field the proxy does not know (`min_p`,
  `repeat_penalty`, ...). The `cappy` object itself is never sent upstream.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.upstream.errors import RecipeError

DEFAULT_MAX_SAMPLES = 64
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_DECODING_KEYS = frozenset({"name", "count", "temperature", "top_p", "top_k"})
_CAPPY_KEYS = frozenset({"recipe", "return_candidates", "min_candidates"})


@dataclass(frozen=True, slots=True)
class Decoding:
    """One decoding of a recipe: `count` samples drawn with these sampling parameters.

    Attributes:
        name: a label ([A-Za-z0-9_.:-], at most 64 characters), unique within a recipe.
        count: samples to draw with this decoding (>= 1).
        temperature: 0 (greedy) to 2, or None to leave the upstream's default.
        top_p: nucleus mass in (0, 1], or None for the upstream's default.
        top_k: top-k cut-off (>= 0; 0 disables it on llama.cpp / vLLM), or None to send none.
    """

    name: str
    count: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def sampling_params(self, *, send_top_k: bool = True) -> dict[str, float | int]:
        """The parameters this decoding sets on an upstream call (unset ones are omitted)."""
        params: dict[str, float | int] = {}
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.top_p is not None:
            params["top_p"] = self.top_p
        if self.top_k is not None and send_top_k:
            params["top_k"] = self.top_k
        return params

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
        spec: Sequence[Mapping[str, Any]],
        *,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        where: str = "cappy.recipe",
    ) -> Recipe:
        """Parses and validates a recipe given as a list of decoding objects.

        Args:
            spec: e.g. `[{"name": "t09", "count": 4, "temperature": 0.9}, ...]`.
            max_samples: the bound on the recipe's total samples.
            where: the parameter path used in error messages (`cappy.recipe`, a setting name).

        Raises:
            RecipeError: with a message naming the offending entry and field.
        """
        if isinstance(spec, str | bytes) or not isinstance(spec, Sequence):
            raise RecipeError(f"{where} must be a list of decodings", param=where)
        if not spec:
            raise RecipeError(f"{where} must contain at least one decoding", param=where)
        decodings: list[Decoding] = []
        seen: set[str] = set()
        for i, item in enumerate(spec):
            decoding = _parse_decoding(item, f"{where}[{i}]")
            if decoding.name in seen:
                raise RecipeError(
                    f"{where}[{i}].name: duplicate decoding name {decoding.name!r}",
                    param=f"{where}[{i}].name",
                )
            seen.add(decoding.name)
            decodings.append(decoding)
        recipe = cls(tuple(decodings))
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
        return cls.from_spec(value, max_samples=max_samples, where="CAPPY_PROXY_RECIPE")  # type: ignore[arg-type]

    def to_list(self) -> list[dict[str, Any]]:
        return [d.to_dict() for d in self.decodings]


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    """What one proxy request runs: the recipe, the candidates floor, whether to list them."""

    recipe: Recipe
    min_candidates: int
    return_candidates: bool = False


def resolve_options(
    cappy: Mapping[str, Any] | Any | None,
    *,
    default_recipe: Recipe,
    default_min_candidates: int = 1,
    max_samples: int = DEFAULT_MAX_SAMPLES,
) -> ProxyOptions:
    """Applies a request's `cappy` object over the configured defaults.

    Args:
        cappy: the request's `cappy` extension: a mapping or a pydantic model with the keys
            `recipe`, `return_candidates`, `min_candidates`; None when absent.
        default_recipe: the configured recipe (see `Recipe.from_setting`).
        default_min_candidates: the configured floor; clamped to the recipe's total.
        max_samples: the bound on a recipe's total samples.

    Raises:
        RecipeError: for an invalid recipe, an unknown key, or `min_candidates` above the
            recipe's total.
    """
    if cappy is None:
        spec: Mapping[str, Any] = {}
    elif hasattr(cappy, "model_dump"):
        spec = cappy.model_dump(exclude_none=True)
    elif isinstance(cappy, Mapping):
        spec = cappy
    else:
        raise RecipeError("cappy must be an object", param="cappy")
    unknown = sorted(set(spec) - _CAPPY_KEYS)
    if unknown:
        raise RecipeError(
            f"cappy: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(_CAPPY_KEYS))}",
            param=f"cappy.{unknown[0]}",
        )
    recipe = default_recipe
    if spec.get("recipe") is not None:
        recipe = Recipe.from_spec(spec["recipe"], max_samples=max_samples)

    return_candidates = spec.get("return_candidates", False)
    if not isinstance(return_candidates, bool):
        raise RecipeError(
            "cappy.return_candidates must be a boolean", param="cappy.return_candidates"
        )

    if spec.get("min_candidates") is not None:
        min_candidates = spec["min_candidates"]
        if not _is_int(min_candidates) or min_candidates < 1:
            raise RecipeError(
                "cappy.min_candidates must be an integer >= 1", param="cappy.min_candidates"
            )
        if min_candidates > recipe.total:
            raise RecipeError(
                f"cappy.min_candidates is {min_candidates} but the recipe draws only "
                f"{recipe.total} samples",
                param="cappy.min_candidates",
            )
    else:
        min_candidates = max(1, min(default_min_candidates, recipe.total))
    return ProxyOptions(recipe, min_candidates, return_candidates)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _parse_decoding(item: object, where: str) -> Decoding:
    if hasattr(item, "model_dump"):
        item = item.model_dump(exclude_none=True)
    if not isinstance(item, Mapping):
        raise RecipeError(f"{where} must be an object", param=where)
    unknown = sorted(set(item) - _DECODING_KEYS)
    if unknown:
        raise RecipeError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(_DECODING_KEYS))}",
            param=f"{where}.{unknown[0]}",
        )
    name = item.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise RecipeError(
            f"{where}.name must be 1-64 characters of [A-Za-z0-9_.:-]", param=f"{where}.name"
        )
    count = item.get("count", 1)
    if not _is_int(count) or count < 1:
        raise RecipeError(f"{where}.count must be an integer >= 1", param=f"{where}.count")
    temperature = item.get("temperature")
    if temperature is not None and (not _is_number(temperature) or not 0 <= temperature <= 2):
        raise RecipeError(
            f"{where}.temperature must be a number in [0, 2]", param=f"{where}.temperature"
        )
    top_p = item.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise RecipeError(f"{where}.top_p must be a number in (0, 1]", param=f"{where}.top_p")
    top_k = item.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise RecipeError(f"{where}.top_k must be an integer >= 0", param=f"{where}.top_k")
    return Decoding(
        name=name,
        count=count,
        temperature=float(temperature) if temperature is not None else None,
        top_p=float(top_p) if top_p is not None else None,
        top_k=top_k,
    )
