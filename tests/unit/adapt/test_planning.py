"""Planning the samples of a run: the decodings per example, the seeds, the request bodies."""

from __future__ import annotations

from collections import Counter

import pytest

from adapt import planning
from adapt.errors import AdaptError
from service.upstream.recipe import PAPER_DECODINGS, Recipe
from service.upstream.samplers import Sends, sampling_params
from tests.unit.adapt.fakes import EXAMPLES, MODEL, sampling_config

SAMPLER_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")


def test_plan_decodings_round_robin_over_the_recipe() -> None:
    recipe = Recipe.default()
    full = planning.plan_decodings(recipe, 17)
    assert [(d.name, k) for d, k in full] == [
        (d.name, k) for d in PAPER_DECODINGS for k in range(d.count)
    ]
    eight = Counter(d.name for d, _ in planning.plan_decodings(recipe, 8))
    assert eight == {
        "sampling": 2,
        "temperature_0.9": 2,
        "top_k_40": 2,
        "top_p_0.95": 1,
        "greedy": 1,
    }
    assert planning.plan_decodings(recipe, 0) == []
    with pytest.raises(AdaptError, match="between 0 and 17"):
        planning.plan_decodings(recipe, 18)


def test_every_call_has_its_own_stable_seed() -> None:
    config = sampling_config(samples_per_example=17)
    planned = planning.plan(EXAMPLES, config)
    assert len(planned) == 5 * 17
    assert len({s.seed for s in planned}) == len(planned)
    assert [s.seed for s in planning.plan(EXAMPLES, config)] == [s.seed for s in planned]
    other = planning.plan(EXAMPLES, sampling_config(samples_per_example=17, seed=1))
    assert {s.seed for s in other}.isdisjoint({s.seed for s in planned})


def test_request_bodies_follow_the_recipe() -> None:
    config = sampling_config(samples_per_example=17, logprobs=True)
    by_name = {s.decoding.name: s for s in planning.plan(EXAMPLES[:1], config)}
    top_k = planning.build_body(by_name["top_k_40"], config)
    assert top_k == {
        "model": MODEL,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "Question 0?"}],
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 40,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
        "seed": by_name["top_k_40"].seed,
        "logprobs": True,
        "top_logprobs": 1,
    }
    greedy = planning.build_body(by_name["greedy"], config)
    assert greedy["temperature"] == 0.0 and "top_p" not in greedy and greedy["top_k"] == 0
    # The proxy's parameters, exactly: the same function builds both.
    for name, sample in by_name.items():
        body = planning.build_body(sample, config)
        assert {k: body[k] for k in SAMPLER_FIELDS if k in body} == sampling_params(
            sample.decoding, Sends()
        ), name
    no_top_k = sampling_config(
        samples_per_example=17, send_top_k=False, send_extras=False, endpoint="completions"
    )
    body = planning.build_body(by_name["top_k_40"], no_top_k)
    assert body["prompt"] == "Question 0?" and "logprobs" not in body
    assert not {"top_k", "min_p", "repeat_penalty"} & body.keys()
    assert planning.instruction_for(EXAMPLES[0], "chat") == "Question 0?"


def test_the_header_records_what_each_decoding_sent() -> None:
    header = sampling_config(samples_per_example=17).header()
    assert header["send_extras"] is True
    assert header["sent"]["sampling"] == {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
    }
    assert header["sent"]["top_k_40"]["top_k"] == 40
    plain = sampling_config(send_top_k=False, send_extras=False).header()
    assert plain["sent"]["top_k_40"] == {"temperature": 1.0, "top_p": 1.0}
    assert plain["sent"]["greedy"] == {"temperature": 0.0}
    config = planning.SamplingConfig.from_header(header)
    assert config.send_extras and config.header() == header


def test_a_header_from_before_the_extras_reads_as_sending_none() -> None:
    config = sampling_config(samples_per_example=17)
    old = {k: v for k, v in config.header().items() if k not in ("send_extras", "sent")}
    read = planning.SamplingConfig.from_header(old)
    assert read.send_top_k and not read.send_extras
    assert read.header()["sent"]["sampling"] == {"temperature": 1.0, "top_p": 1.0}
    assert read.header()["sent"]["top_k_40"] == {"temperature": 1.0, "top_p": 1.0, "top_k": 40}
    completed = planning.SamplingConfig.complete_header(old)
    assert completed == read.header()
    # What a header says is kept (the cache compares it); one that is not a header is left as is.
    recorded = {**config.header(), "sent": {"sampling": {"temperature": 0.5}}}
    assert planning.SamplingConfig.complete_header(recorded) == recorded
    assert planning.SamplingConfig.complete_header({"model": "m"}) == {"model": "m"}
