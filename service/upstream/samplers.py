"""What an upstream call of a decoding sends to sample, what the upstream accepts, and what to
leave out when it refuses a call: the one place the proxy (`service.upstream.fanout`) and
`cappy adapt` / `cappy eval` (`adapt.planning`, `adapt.sampling`) build sampling parameters from.

Why more than the decoding's own parameters: llama.cpp (llama-cpp-python's server and the C++
server) samples with its own default for every parameter a request leaves out — top_k 40,
min_p 0.05, repeat_penalty 1.1 in llama-cpp-python 0.3 (typical_p, presence and frequency
penalties, mirostat are off by default). Sent only `temperature` and `top_p`, the paper's "plain
sampling" would be top-k 40 and min-p 0.05 sampling with a repetition penalty, and greedy would
be penalised greedy. So every decoding also sends the *sampler extras*, the values that switch
those samplers off:

    top_k 0 (no cut-off), min_p 0.0, repeat_penalty 1.0

A decoding that sets `top_k` itself (the paper's top-k 40) keeps its own value. OpenAI-like APIs
refuse these fields (OpenAI: 400 "Unrecognized request argument supplied: min_p") and sample
plainly by default, so they are sent nothing extra. vLLM's own defaults are neutral already; it
ignores `repeat_penalty` (its name is `repetition_penalty`) and takes `top_k` 0 as "off" (a
version that refuses 0 is detected as refusing the extras, below).

What is sent, per decoding (`sampling_params`), for the paper's recipe:

    decoding          llama.cpp (extras and top_k accepted)   OpenAI-like (neither)
    sampling          temperature 1.0, top_p 1.0, top_k 0,    temperature 1.0, top_p 1.0
                      min_p 0.0, repeat_penalty 1.0
    temperature_0.9   temperature 0.9, top_p 1.0, + the same  temperature 0.9, top_p 1.0
    top_k_40          temperature 1.0, top_p 1.0, top_k 40,   temperature 1.0, top_p 1.0
                      min_p 0.0, repeat_penalty 1.0           (substituted: no top_k)
    top_p_0.95        temperature 1.0, top_p 0.95, + the same temperature 1.0, top_p 0.95
    greedy            temperature 0.0, top_k 0, min_p 0.0,    temperature 0.0
                      repeat_penalty 1.0

What the upstream accepts (`UpstreamCapabilities`, per model) is learnt from answers, like `n`:
- `top_k` (a decoding's own): sent unless known refused. Setting it to "no"
  (`CAPPY_UPSTREAM_TOP_K_SUPPORT`, `cappy adapt --no-top-k`) sends neither `top_k` nor the
  extras: such an upstream is not llama.cpp-like.
- the extras: sent unless known refused (`top_k` 0 among them only where `top_k` is accepted).
- A call the upstream refuses (400/422) is asked again without one part (`to_drop`): the extras
  when the error names `min_p` or `repeat_penalty`, or names `top_k` while the call's `top_k`
  was the extras' 0; the decoding's own `top_k` when the error names `top_k`; for a
  single-sample call whose error names nothing, the extras first, then `top_k`. When the call
  then succeeds, what was left out is remembered as refused and never sent to that model again;
  a call that succeeds carrying a part marks it accepted. A refusal, once learnt, stands.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from service.upstream.errors import UpstreamError
from service.upstream.recipe import Decoding

Support = Literal["auto", "yes", "no"]
Part = Literal["top_k", "extras"]
"""What a call may be asked again without: the decoding's own `top_k`, or the sampler extras."""

SAMPLER_EXTRAS: Mapping[str, float | int] = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
"""llama.cpp's samplers that shape every sample unless switched off, and the values that do."""
_EXTRAS_BY_NAME = frozenset(SAMPLER_EXTRAS) - {"top_k"}  # names only the extras carry


@dataclass(frozen=True, slots=True)
class Sends:
    """What a call carries beyond the decoding's `temperature` and `top_p`.

    Attributes:
        top_k: `top_k` is accepted: the decoding's own, or the extras' 0.
        extras: the sampler extras (`SAMPLER_EXTRAS`).
    """

    top_k: bool = True
    extras: bool = True

    def without(self, part: Part) -> Sends:
        return replace(self, **{part: False})


def sampling_params(decoding: Decoding, sends: Sends) -> dict[str, float | int]:
    """The exact sampling parameters one call of `decoding` sends.

    The decoding's `temperature` and `top_p` (an unset one is not sent: the upstream's default
    applies), its own `top_k` where accepted, and the sampler extras where accepted, in the
    order temperature, top_p, top_k, min_p, repeat_penalty.
    """
    params: dict[str, float | int] = {}
    if decoding.temperature is not None:
        params["temperature"] = decoding.temperature
    if decoding.top_p is not None:
        params["top_p"] = decoding.top_p
    if sends.top_k and decoding.top_k is not None:
        params["top_k"] = decoding.top_k
    if sends.extras:
        for name, value in SAMPLER_EXTRAS.items():
            if name == "top_k" and not sends.top_k:
                continue
            params.setdefault(name, value)
    return params


def sent_by_decoding(
    decodings: Iterable[Decoding], sends: Sends
) -> dict[str, dict[str, float | int]]:
    """Each decoding's name and the parameters its calls send."""
    return {d.name: sampling_params(d, sends) for d in decodings}


def to_drop(
    error: UpstreamError,
    decoding: Decoding,
    sent: Sends,
    *,
    alone: bool,
    may_drop: Collection[Part] = ("top_k", "extras"),
) -> Part | None:
    """What to leave out of a refused call of `decoding` before asking again, or None when the
    refusal is not about what it carried (see the module docstring for the rules).

    Args:
        error: why the call failed.
        decoding: the call's decoding.
        sent: what the call carried.
        alone: the call asked for one sample (no `n` to blame for an unexplained refusal).
        may_drop: the parts whose support may be learnt (not fixed by a setting).
    """
    if not error.is_rejection:
        return None
    extras = sent.extras and "extras" in may_drop
    own_top_k = sent.top_k and decoding.top_k is not None
    mentions = error.mentions
    if extras and mentions & _EXTRAS_BY_NAME:
        return "extras"
    if "top_k" in mentions:
        if own_top_k:
            return "top_k" if "top_k" in may_drop else None
        if extras and sent.top_k:  # the extras' top_k 0
            return "extras"
    if alone:
        if extras:
            return "extras"
        if own_top_k and "top_k" in may_drop:
            return "top_k"
    return None


@dataclass(slots=True)
class UpstreamCapabilities:
    """What is known about one upstream model.

    Attributes:
        n: does it honour `n > 1`: True/False, or None when not yet known.
        top_k: does it accept `top_k`: True/False, or None when not yet known.
        extras: does it accept the sampler extras: True/False, or None when not yet known.
        learn_n: may calls change `n` (the setting is "auto"; "yes"/"no" fix it).
        learn_top_k: may calls change `top_k` (likewise).
        learn_extras: may calls change `extras` (fixed off when `top_k` is set to "no").
    """

    n: bool | None = None
    top_k: bool | None = None
    extras: bool | None = None
    learn_n: bool = True
    learn_top_k: bool = True
    learn_extras: bool = True

    @classmethod
    def configured(cls, n_support: Support, top_k_support: Support) -> UpstreamCapabilities:
        """What is known before any call: "yes"/"no" fixed, "auto" unknown and learnable; the
        extras are learnt unless `top_k_support` is "no"."""
        return cls(
            n=None if n_support == "auto" else n_support == "yes",
            top_k=None if top_k_support == "auto" else top_k_support == "yes",
            extras=False if top_k_support == "no" else None,
            learn_n=n_support == "auto",
            learn_top_k=top_k_support == "auto",
            learn_extras=top_k_support != "no",
        )

    def sends(self) -> Sends:
        """What calls carry now: every part not known to be refused."""
        return Sends(top_k=self.top_k is not False, extras=self.extras is not False)

    @property
    def may_drop(self) -> frozenset[Part]:
        """The parts a refused call may be asked again without (those still learnable)."""
        parts: set[Part] = set()
        if self.learn_top_k:
            parts.add("top_k")
        if self.learn_extras:
            parts.add("extras")
        return frozenset(parts)

    def learn(self, decoding: Decoding, sent: Sends, dropped: Collection[str]) -> None:
        """A call of `decoding` carrying `sent` succeeded, after the upstream refused it with
        what `dropped` names ("n", "top_k", "extras"); a refusal, once learnt, stands."""
        if "n" in dropped and self.learn_n:
            self.n = False
        if "top_k" in dropped and self.learn_top_k:
            self.top_k = False
        if "extras" in dropped and self.learn_extras:
            self.extras = False
        if sent.top_k and decoding.top_k is not None and self.learn_top_k and self.top_k is None:
            self.top_k = True
        if sent.extras and self.learn_extras and self.extras is None:
            self.extras = True
