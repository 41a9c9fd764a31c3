"""The sampling recipe: the paper's default, parsing, validation (the same rules for the setting
and a request), and request overrides."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from service.errors import envelope_for
from service.schemas.cappy import CappyRequest
from service.schemas.openai import ChatCompletionRequest
from service.upstream.errors import RecipeError
from service.upstream.recipe import (
    PAPER_DECODINGS,
    Decoding,
    ProxyOptions,
    Recipe,
    resolve_options,
)


def test_default_recipe_is_the_papers_17_samples():
    recipe = Recipe.default()
    assert recipe.total == 17
    by_name = {d.name: d for d in recipe.decodings}
    assert [d.name for d in recipe.decodings] == [
        "sampling",
        "temperature_0.9",
        "top_k_40",
        "top_p_0.95",
        "greedy",
    ]
    assert by_name["sampling"] == Decoding("sampling", 4, temperature=1.0, top_p=1.0)
    assert by_name["temperature_0.9"].temperature == 0.9
    assert by_name["top_k_40"].top_k == 40 and by_name["top_k_40"].temperature == 1.0
    assert by_name["top_p_0.95"].top_p == 0.95 and by_name["top_p_0.95"].top_k is None
    assert by_name["greedy"].count == 1 and by_name["greedy"].is_greedy


def test_from_spec_parses_and_keeps_order():
    recipe = Recipe.from_spec(
        [
            {"name": "hot", "count": 3, "temperature": 1.2},
            {"name": "k0", "count": 2, "top_k": 0},
            {"name": "nucleus", "top_p": 0.9},
        ]
    )
    assert [d.name for d in recipe.decodings] == ["hot", "k0", "nucleus"]
    assert recipe.total == 6
    assert recipe.decodings[1].top_k == 0
    assert recipe.decodings[2].count == 1  # count defaults to 1
    assert Recipe.from_spec(recipe.to_list()) == recipe


@pytest.mark.parametrize(
    ("spec", "param", "fragment"),
    [
        ([], "cappy.recipe", "at least one decoding"),
        ("sampling", "cappy.recipe", "must be a list"),
        ([1], "cappy.recipe[0]", "must be an object"),
        ([{"count": 1}], "cappy.recipe[0].name", "name must be"),
        ([{"name": "bad name!", "count": 1}], "cappy.recipe[0].name", "name must be"),
        ([{"name": "a", "count": 0}], "cappy.recipe[0].count", "count must be an integer >= 1"),
        ([{"name": "a", "count": 1.5}], "cappy.recipe[0].count", "count must be"),
        ([{"name": "a", "count": True}], "cappy.recipe[0].count", "count must be"),
        ([{"name": "a", "temperature": 2.5}], "cappy.recipe[0].temperature", "[0, 2]"),
        ([{"name": "a", "temperature": "hot"}], "cappy.recipe[0].temperature", "[0, 2]"),
        ([{"name": "a", "top_p": 0}], "cappy.recipe[0].top_p", "(0, 1]"),
        ([{"name": "a", "top_k": -1}], "cappy.recipe[0].top_k", ">= 0"),
        ([{"name": "a", "beams": 4}], "cappy.recipe[0].beams", "unknown field"),
        ([{"name": "a"}, {"name": "a"}], "cappy.recipe[1].name", "duplicate"),
        ([{"name": "a", "count": 40}, {"name": "b", "count": 30}], "cappy.recipe", "at most 64"),
    ],
)
def test_from_spec_rejects_with_a_clear_message(spec, param, fragment):
    with pytest.raises(RecipeError) as info:
        Recipe.from_spec(spec)
    assert info.value.param == param
    assert fragment in info.value.message
    assert info.value.http_status == 400
    envelope = envelope_for(info.value)["error"]
    assert envelope["type"] == "invalid_request_error" and envelope["param"] == param


def test_total_bound_is_configurable():
    spec = [{"name": "a", "count": 10}]
    assert Recipe.from_spec(spec, max_samples=10).total == 10
    with pytest.raises(RecipeError, match="at most 8"):
        Recipe.from_spec(spec, max_samples=8)


def test_from_setting_json_default_and_errors():
    assert Recipe.from_setting(None, max_samples=64) == Recipe.default()
    assert Recipe.from_setting("  ", max_samples=64) == Recipe.default()
    spec = json.dumps([{"name": "t07", "count": 5, "temperature": 0.7}])
    assert Recipe.from_setting(spec, max_samples=64).total == 5
    with pytest.raises(RecipeError) as info:
        Recipe.from_setting("[{", max_samples=64)
    assert info.value.param == "CAPPY_PROXY_RECIPE" and "not valid JSON" in info.value.message
    with pytest.raises(RecipeError) as info:
        Recipe.from_setting('[{"name": "a", "count": 0}]', max_samples=64)
    assert info.value.param == "CAPPY_PROXY_RECIPE[0].count"
    with pytest.raises(RecipeError, match="CAPPY_PROXY_MAX_SAMPLES"):
        Recipe.from_setting(None, max_samples=16)


def test_resolve_options_defaults():
    options = resolve_options(None, default_recipe=Recipe.default(), default_min_candidates=3)
    assert options == ProxyOptions(Recipe.default(), min_candidates=3, return_candidates=False)
    # A configured floor above a small recipe is clamped to the recipe's total.
    small = Recipe.from_spec([{"name": "a", "count": 2}])
    assert resolve_options({}, default_recipe=small, default_min_candidates=5).min_candidates == 2


def test_resolve_options_request_overrides_settings():
    configured = Recipe.from_spec([{"name": "configured", "count": 8}])
    options = resolve_options(
        {
            "recipe": [{"name": "t09", "count": 4, "temperature": 0.9}],
            "return_candidates": True,
            "min_candidates": 2,
        },
        default_recipe=configured,
    )
    assert [d.name for d in options.recipe.decodings] == ["t09"]
    assert options.return_candidates is True and options.min_candidates == 2


def test_resolve_options_accepts_the_wire_model():
    cappy = CappyRequest.model_validate(
        {"recipe": [{"name": "x", "count": 3, "top_k": 5}], "return_candidates": True}
    )
    options = resolve_options(cappy, default_recipe=Recipe.default())
    assert options.recipe.decodings == (Decoding("x", 3, top_k=5),)
    assert options.return_candidates


@pytest.mark.parametrize(
    ("cappy", "param"),
    [
        ({"min_candidates": 18}, "cappy.min_candidates"),
        ({"min_candidates": 0}, "cappy.min_candidates"),
        ({"return_candidates": "yes"}, "cappy.return_candidates"),
        ({"recipes": []}, "cappy.recipes"),
        ({"recipe": [{"name": "a", "count": 100}]}, "cappy.recipe"),
    ],
)
def test_resolve_options_errors(cappy, param):
    with pytest.raises(RecipeError) as info:
        resolve_options(cappy, default_recipe=Recipe.default())
    assert info.value.param == param


def test_paper_decodings_have_distinct_names():
    assert len({d.name for d in PAPER_DECODINGS}) == len(PAPER_DECODINGS)


@pytest.mark.parametrize(
    "recipe",
    [
        [{"name": "bad name!"}],
        [{"name": "a", "count": 0}],
        [{"name": "a", "count": 1.5}],
        [{"name": "a", "temperature": "0.9"}],
        [{"name": "a", "top_p": 1.5}],
        [{"name": "a", "top_k": -1}],
        [{"name": "a"}, {"name": "a"}],
        [],
    ],
)
def test_the_setting_and_a_request_are_held_to_the_same_rules(recipe):
    with pytest.raises(RecipeError) as setting:
        Recipe.from_setting(json.dumps(recipe), max_samples=64)
    with pytest.raises(ValidationError) as request:
        ChatCompletionRequest.model_validate(
            {
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "cappy": {"recipe": recipe},
            }
        )
    error = request.value.errors()[0]
    assert error["loc"][:2] == ("cappy", "recipe")
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"][2:])
    assert setting.value.param == f"CAPPY_PROXY_RECIPE{where}"
    assert setting.value.message == f"CAPPY_PROXY_RECIPE{where} {error['msg']}"
