"""What a decoding's calls send (the decoding's parameters, its own top_k, llama.cpp's sampler
extras), what a refused call is asked again without, and what the answers teach."""

from __future__ import annotations

import httpx
import pytest

from service.upstream.errors import FailureKind, UpstreamError
from service.upstream.recipe import PAPER_DECODINGS, Decoding
from service.upstream.responses import classify_status
from service.upstream.samplers import (
    SAMPLER_EXTRAS,
    Sends,
    UpstreamCapabilities,
    sampling_params,
    sent_by_decoding,
    to_drop,
)

EVERYTHING = Sends(top_k=True, extras=True)
NOTHING = Sends(top_k=False, extras=False)
PLAIN = Decoding("sampling", 4, temperature=1.0, top_p=1.0)
TOP_K = Decoding("top_k_40", 4, temperature=1.0, top_p=1.0, top_k=40)


def test_the_paper_decodings_switch_llama_cpp_samplers_off_where_accepted():
    assert sent_by_decoding(PAPER_DECODINGS, EVERYTHING) == {
        "sampling": {
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "repeat_penalty": 1.0,
        },
        "temperature_0.9": {
            "temperature": 0.9,
            "top_p": 1.0,
            "top_k": 0,
            "min_p": 0.0,
            "repeat_penalty": 1.0,
        },
        "top_k_40": {
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 40,
            "min_p": 0.0,
            "repeat_penalty": 1.0,
        },
        "top_p_0.95": {
            "temperature": 1.0,
            "top_p": 0.95,
            "top_k": 0,
            "min_p": 0.0,
            "repeat_penalty": 1.0,
        },
        "greedy": {"temperature": 0.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0},
    }
    # An OpenAI-like upstream: the decodings' own parameters only.
    assert sent_by_decoding(PAPER_DECODINGS, NOTHING) == {
        "sampling": {"temperature": 1.0, "top_p": 1.0},
        "temperature_0.9": {"temperature": 0.9, "top_p": 1.0},
        "top_k_40": {"temperature": 1.0, "top_p": 1.0},
        "top_p_0.95": {"temperature": 1.0, "top_p": 0.95},
        "greedy": {"temperature": 0.0},
    }


def test_sampling_params_keep_a_decodings_own_value_and_omit_unset_ones():
    assert list(sampling_params(TOP_K, EVERYTHING)) == [
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repeat_penalty",
    ]
    assert sampling_params(Decoding("k0", 1, top_k=0), NOTHING) == {}
    assert sampling_params(Decoding("k5", 1, top_k=5), EVERYTHING)["top_k"] == 5
    assert sampling_params(Decoding("bare", 1), EVERYTHING) == {
        "top_k": 0,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
    }
    # top_k refused, the extras accepted: min_p and repeat_penalty without any top_k.
    assert sampling_params(TOP_K, Sends(top_k=False, extras=True)) == {
        "temperature": 1.0,
        "top_p": 1.0,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
    }
    # top_k accepted, the extras refused: only the decoding's own.
    assert sampling_params(PLAIN, Sends(top_k=True, extras=False)) == {
        "temperature": 1.0,
        "top_p": 1.0,
    }
    assert sampling_params(TOP_K, Sends(top_k=True, extras=False))["top_k"] == 40
    assert dict(SAMPLER_EXTRAS) == {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}


def _refusal(message: str, status: int = 400) -> UpstreamError:
    response = httpx.Response(status, json={"error": {"message": message}})
    error, _ = classify_status("chat/completions", response)
    return error


@pytest.mark.parametrize(
    ("message", "decoding", "alone", "part"),
    [
        # Named: OpenAI's wording.
        ("Unrecognized request argument supplied: min_p", PLAIN, False, "extras"),
        ("Unrecognized request argument supplied: repeat_penalty", TOP_K, False, "extras"),
        ("Unrecognized request arguments supplied: min_p, top_k", TOP_K, False, "extras"),
        ("Unrecognized request argument supplied: top_k", TOP_K, False, "top_k"),
        # top_k named where the call's top_k was the extras' 0 (vLLM before 0.8).
        ("top_k must be -1 (disable), or at least 1, got 0.", PLAIN, False, "extras"),
        # Named nothing: a single-sample call drops the extras first; an n > 1 call blames n.
        ("invalid request", TOP_K, True, "extras"),
        ("invalid request", PLAIN, True, "extras"),
        ("invalid request", TOP_K, False, None),
        # Another parameter.
        ("seed must be an integer", PLAIN, False, None),
    ],
)
def test_what_a_refused_call_drops(message, decoding, alone, part):
    assert to_drop(_refusal(message), decoding, EVERYTHING, alone=alone) == part


def test_what_a_refused_call_drops_when_some_was_not_sent():
    named_top_k = _refusal("Unrecognized request argument supplied: top_k")
    unexplained = _refusal("invalid request")
    without_extras = Sends(top_k=True, extras=False)
    assert to_drop(unexplained, TOP_K, without_extras, alone=True) == "top_k"
    assert to_drop(unexplained, PLAIN, without_extras, alone=True) is None
    assert to_drop(named_top_k, PLAIN, without_extras, alone=True) is None
    assert to_drop(unexplained, TOP_K, NOTHING, alone=True) is None
    # A part fixed by a setting is never dropped.
    assert to_drop(named_top_k, TOP_K, EVERYTHING, alone=True, may_drop=("extras",)) is None
    assert to_drop(unexplained, TOP_K, without_extras, alone=True, may_drop=("extras",)) is None
    assert to_drop(unexplained, TOP_K, EVERYTHING, alone=True, may_drop=("top_k",)) == "top_k"
    # Not a refusal of the parameters: an outage, a rate limit, a 404.
    for status in (404, 429, 500):
        error = _refusal("Unrecognized request argument supplied: min_p", status)
        assert to_drop(error, PLAIN, EVERYTHING, alone=True) is None
    timeout = UpstreamError("timed out", kind=FailureKind.TIMEOUT)
    assert to_drop(timeout, PLAIN, EVERYTHING, alone=True) is None


def test_capabilities_configured_and_learnt():
    auto = UpstreamCapabilities.configured("auto", "auto")
    assert auto.sends() == EVERYTHING and auto.may_drop == {"top_k", "extras"}
    no = UpstreamCapabilities.configured("auto", "no")
    assert no.sends() == NOTHING and no.may_drop == frozenset() and no.extras is False
    yes = UpstreamCapabilities.configured("auto", "yes")
    assert yes.sends() == EVERYTHING and yes.may_drop == {"extras"} and yes.extras is None

    # Accepted: a success carrying a part marks it (top_k only from a decoding's own).
    auto.learn(PLAIN, EVERYTHING, ())
    assert (auto.top_k, auto.extras) == (None, True)
    auto.learn(TOP_K, EVERYTHING, ())
    assert (auto.top_k, auto.extras) == (True, True)

    # Refused: a success after leaving a part out marks it, and a refusal stands.
    refused = UpstreamCapabilities.configured("auto", "auto")
    refused.learn(PLAIN, Sends(top_k=True, extras=False), {"extras"})
    refused.learn(TOP_K, EVERYTHING, ())
    assert (refused.top_k, refused.extras) == (True, False)
    assert refused.sends() == Sends(top_k=True, extras=False)
    refused.learn(TOP_K, NOTHING, {"top_k", "n"})
    assert (refused.n, refused.top_k) == (False, False) and refused.sends() == NOTHING

    # Fixed by the settings: nothing learnt.
    yes.learn(TOP_K, Sends(top_k=False, extras=True), {"top_k"})
    assert yes.top_k is True and yes.extras is True
