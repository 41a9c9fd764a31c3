"""Types shared by the engine's parts: an encoded (instruction, response) pair, the padded batch
fed to a model, and the Scorer protocol every execution backend implements (with the stages of a
refining scorer, `Refinement`)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, Protocol, TypedDict

import numpy as np

from service.engine.errors import EngineStopped

# Where and how a scorer runs (settings, the runtime and load_scorer share these).
Device = Literal["auto", "cuda", "cpu"]
Engine = Literal["auto", "onnxruntime", "openvino"]
Precision = Literal["auto", "fp32", "fp16", "int8", "bf16"]
# Where a loaded scorer runs ("auto" resolved).
ScorerDevice = Literal["cuda", "cpu"]


class GraphInputs(TypedDict):
    """How a backend feeds an exported graph, besides the graph itself (the export's manifest
    says each), as keyword arguments of every backend's constructor.

    Keys:
        input_names: the graph's inputs, e.g. ("input_ids", "attention_mask").
        pad_token_id: the id that pads a row.
        output_name: the output holding the logits; "logits" when absent.
    """

    input_names: Sequence[str]
    pad_token_id: int
    output_name: NotRequired[str]


@dataclass(frozen=True, slots=True)
class EncodedPair:
    """One tokenized pair: `<s> instruction </s></s> response </s>` for RoBERTa (model-specific).

    Attributes:
        input_ids: int64 token ids, unpadded.
        token_type_ids: int64 segment ids, or None when the model takes none (RoBERTa).
        truncated: whether truncation to the export's `max_length` removed tokens.
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray | None
    truncated: bool

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def padded_width(length: int, multiple: int, max_length: int | None = None) -> int:
    """`length` rounded up to a multiple of `multiple`, but not past `max_length` (the model's
    longest input) unless `length` itself is longer."""
    width = -(-length // multiple) * multiple
    if max_length is not None and width > max_length:
        return max(length, max_length)
    return width


def pad_batch(
    items: Sequence[EncodedPair],
    pad_token_id: int,
    input_names: Sequence[str],
    width: int | None = None,
) -> dict[str, np.ndarray]:
    """Right-pads `items` to the longest one (or to `width`, if wider) and returns the model feeds
    named `input_names`."""
    width = max(width or 0, max(item.length for item in items))
    rows = len(items)
    input_ids = np.full((rows, width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((rows, width), dtype=np.int64)
    token_type_ids = np.zeros((rows, width), dtype=np.int64)
    for row, item in enumerate(items):
        n = item.length
        input_ids[row, :n] = item.input_ids
        attention_mask[row, :n] = 1
        if item.token_type_ids is not None:
            token_type_ids[row, :n] = item.token_type_ids
    feeds = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
    }
    return {name: feeds[name] for name in input_names}


# Tokenizes (instruction, response) pairs as requests are (`PairTokenizer.encode`).
Encoder = Callable[[Sequence[tuple[str, str]]], list[EncodedPair]]


class Scorer(Protocol):
    """An execution backend holding one exported Cappy model, or a chain of them ranked in stages
    (a refining scorer: a fast pass, then a more precise one on the near-tied leaders).

    Backends subclass it explicitly, and so inherit the defaults of a single-stage scorer
    (`refinement`, `describe`).

    Attributes:
        name: what runs, e.g. "onnxruntime-cuda-fp16" or "openvino-cpu-bf16-refined".
        input_names: the graph inputs `infer` reads, e.g. ("input_ids", "attention_mask").
        pad_token_id: the id that pads a row.
        device: where `infer` runs: "cuda" or "cpu" (the batcher's limits follow it).
        precision: what `infer` computes in: "fp32", "fp16", "bf16" or "int8".
        parallelism: how many `infer` calls may run at once from different threads (OpenVINO
            streams, ONNX Runtime sessions), at least 1; the batcher runs that many batches
            concurrently.
    """

    name: str
    input_names: Sequence[str]
    pad_token_id: int
    device: ScorerDevice
    precision: str
    parallelism: int

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Scores one padded batch (blocking): the raw regression output logits[:, 0] as
        float32, one value per row."""
        ...

    def warmup(self, stop: threading.Event | None = None) -> None:
        """Runs representative batches once, before the service turns ready; once `stop` is
        set, raises `EngineStopped` instead of finishing (as `warm` does)."""
        ...

    def warm(
        self, feeds: Mapping[str, np.ndarray], stop: threading.Event | None = None
    ) -> np.ndarray:
        """Scores a warm-up or calibration batch as `infer` does, unless `stop` is set: then it
        raises `EngineStopped`, before the batch starts and, where the backend can cancel a
        running batch (OpenVINO), while it runs. A server told to stop while it starts thus
        stops at once, not after a warm-up that takes minutes for a large model on a CPU."""
        stop_if_asked(stop)
        return self.infer(feeds)

    def calibrate(
        self, text: Sequence[Mapping[str, np.ndarray]], stop: threading.Event | None = None
    ) -> None:
        """Measures the ranking's re-scoring margin on padded batches of real text as well (the
        probe sets: `service.engine.warmup.text_batches`), after `warmup`, and stops as `warmup`
        does. A single-stage scorer has no margin: the default does nothing."""
        del text, stop

    def alone(self) -> LoneBatch | None:
        """How to score a batch that runs alone (no other batch on the model) on every core,
        where `infer` does not (OpenVINO's streams take a core each); None (the default): `infer`
        is that already. The batcher calls it only while nothing else runs on the model."""
        return None

    def refinement(self) -> Refinement | None:
        """The stages of a ranking: which scorer `infer` runs, which one re-scores its near-tied
        leaders, and within what margin. None (the default): one stage, whose scores are final."""
        return None

    def describe(self) -> dict[str, Any] | None:
        """What /info reports of the backend beyond its name, device and precision (None by
        default)."""
        return None


class LoneBatch(Protocol):
    """Scores a batch alone on every core (`Scorer.alone`); a warm-up pass gives it `stop`, which
    it takes as `Scorer.warm` does."""

    def __call__(
        self, feeds: Mapping[str, np.ndarray], stop: threading.Event | None = None
    ) -> np.ndarray: ...


# How often work that a stop request may cut short looks at it: a running warm-up batch (to
# cancel it), an export, a wait for another replica's export.
STOP_POLL_S = 0.05


def stop_if_asked(stop: threading.Event | None) -> None:
    """Raises `EngineStopped` once `stop` is set (the runtime sets it to stop a start)."""
    if stop is not None and stop.is_set():
        raise EngineStopped("the scorer's start-up was stopped")


@dataclass(frozen=True, slots=True)
class Refinement:
    """The two stages of a refining scorer, at the moment they are asked for (the margin is
    measured at warm-up: `service.engine.warmup.warm_up`).

    Attributes:
        fast: what `infer` runs: every candidate of a set is scored by it.
        exact: the more precise scorer of the near-tied leaders; it may refine in turn
            (int8 -> bf16 -> fp32).
        margin: candidates within this distance of the best fast score are near-ties.
    """

    fast: Scorer
    exact: Scorer
    margin: float

    def near_top(self, scores: np.ndarray) -> np.ndarray:
        """Indices (ascending) of the candidates within `margin` of the best; empty when the best
        is clear."""
        scores = np.asarray(scores)
        if scores.size < 2:
            return np.empty(0, dtype=np.int64)
        close = np.flatnonzero(scores >= scores.max() - self.margin)
        return close if close.size > 1 else np.empty(0, dtype=np.int64)
