"""Types shared by the engine's parts: an encoded (instruction, response) pair, the padded batch
fed to a model, and the Scorer protocol every execution backend implements."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NotRequired, Protocol, TypedDict

import numpy as np

# Where and how a scorer runs (settings, the runtime and load_scorer share these).
Device = Literal["auto", "cuda", "cpu"]
Engine = Literal["auto", "onnxruntime", "openvino"]
Precision = Literal["auto", "fp32", "fp16", "int8", "bf16"]


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


class Scorer(Protocol):
    """An execution backend holding one exported Cappy model.

    `infer` is blocking; it returns the raw regression output (logits[:, 0]) as float32, one
    value per row. A scorer may also have `parallelism` (int, 1 when absent): how many `infer`
    calls may run at once from different threads (OpenVINO streams); the batcher runs that many
    batches concurrently.
    """

    @property
    def name(self) -> str: ...

    @property
    def input_names(self) -> Sequence[str]: ...

    @property
    def pad_token_id(self) -> int: ...

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray: ...

    def warmup(self) -> None: ...
