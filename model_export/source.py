"""Resolving `--model` (a local checkpoint directory or a Hugging Face hub id) and loading it as a
sequence-classification scorer with its fast tokenizer, with a clear error for each bad input."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_export import pooling
from model_export.errors import ExportError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "btan2/cappy-large"
# Hub ids are `name` or `owner/name`; anything else that does not exist locally is a bad path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Models whose position ids start after the padding index (RoBERTa: 514 positions, 512 tokens).
_OFFSET_POSITION_MODELS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer"}
REFERENCE_MAX_LENGTH = 512


@dataclass(frozen=True)
class SourceRef:
    """Where a checkpoint comes from, as recorded in the manifest."""

    model: str
    kind: str  # "local" | "hub"
    path: Path | None  # the local directory (kind == "local")
    revision: str | None  # hub revision asked for (kind == "hub")


@dataclass
class LoadedSource:
    ref: SourceRef
    model: Any  # transformers PreTrainedModel, eval mode, fp32
    tokenizer: Any  # transformers PreTrainedTokenizerFast
    commit: str | None  # resolved hub commit hash, when known


def hub_offline() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def resolve(model: str, revision: str | None = None) -> SourceRef:
    """Decides whether `model` is a local directory or a hub id, without loading anything."""
    candidate = Path(model).expanduser()
    if candidate.exists():
        if not candidate.is_dir():
            raise ExportError(f"--model {model}: is a file; expected a checkpoint directory")
        return SourceRef(model=model, kind="local", path=candidate.resolve(), revision=None)
    if model.startswith((".", "/", "~")) or not _HUB_ID.match(model):
        raise ExportError(f"--model {model}: no such directory")
    return SourceRef(model=model, kind="hub", path=None, revision=revision)


def _reference(ref: SourceRef) -> str:
    return str(ref.path) if ref.path is not None else ref.model


def _not_found(ref: SourceRef, exc: Exception) -> ExportError:
    if ref.kind == "local":
        return ExportError(
            f"--model {ref.model}: cannot load a checkpoint from it ({_first_line(exc)})"
        )
    where = (
        "offline (HF_HUB_OFFLINE=1) and not"
        if hub_offline()
        else "could not be downloaded and is not"
    )
    return ExportError(
        f"--model {ref.model}: {where} in the local Hugging Face cache; download it where the hub "
        f"is reachable (huggingface-cli download {ref.model}) or pass a local checkpoint directory "
        "with --model /path/to/checkpoint"
    )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_config(ref: SourceRef, *, local_only: bool = False) -> Any:
    """Loads and checks the config: a sequence-classification model with one output."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            _reference(ref), revision=ref.revision, local_files_only=local_only or hub_offline()
        )
    except (OSError, ValueError) as exc:
        raise _not_found(ref, exc) from exc
    architectures = list(getattr(config, "architectures", None) or [])
    if not any(arch.endswith("ForSequenceClassification") for arch in architectures):
        found = ", ".join(architectures) or "none declared"
        raise ExportError(
            f"--model {ref.model}: not a sequence-classification model (architectures: {found}); "
            "Cappy checkpoints are *ForSequenceClassification with num_labels=1"
        )
    if config.num_labels != 1:
        raise ExportError(
            f"--model {ref.model}: has num_labels={config.num_labels}; a Cappy scorer is a "
            "regression model with num_labels=1"
        )
    return config


def load(ref: SourceRef, *, local_only: bool = False) -> LoadedSource:
    """Loads the model (fp32, eager attention: ONNX Runtime fuses it) and its fast tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = load_config(ref, local_only=local_only)
    kwargs: dict[str, Any] = {
        "revision": ref.revision,
        "local_files_only": local_only or hub_offline(),
    }
    try:
        tokenizer = AutoTokenizer.from_pretrained(_reference(ref), use_fast=True, **kwargs)
        model = AutoModelForSequenceClassification.from_pretrained(
            _reference(ref),
            config=config,
            dtype=torch.float32,
            attn_implementation="eager",
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise _not_found(ref, exc) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(
            f"--model {ref.model}: has no fast tokenizer; the service needs tokenizer.json"
        )
    if pooling.pooling_of(config) == "mean":
        pooling.use_mean_pooling(model)
    model.eval()
    return LoadedSource(
        ref=ref, model=model, tokenizer=tokenizer, commit=getattr(config, "_commit_hash", None)
    )


def max_length_for(config: Any, tokenizer: Any, requested: int | None = None) -> int:
    """The longest pair the export accepts: the reference 512, never past the position table."""
    offset = (config.pad_token_id or 0) + 1 if config.model_type in _OFFSET_POSITION_MODELS else 0
    limit = min(REFERENCE_MAX_LENGTH, int(config.max_position_embeddings) - offset)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < limit:
        limit = model_max
    if requested is not None:
        if requested < 8 or requested > limit:
            raise ExportError(
                f"--max-length {requested}: must be between 8 and {limit} for this model"
            )
        return requested
    return limit
