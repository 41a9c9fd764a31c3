"""Engine fixtures: a tiny random RoBERTa scorer exported to ONNX with plain torch.onnx.export and
a hand-written manifest, so the engine's tests do not depend on model_export's pipeline.

torch and transformers are used here, in tests only; the service never imports them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cappy import export_format as fmt
from service.engine.export_dir import ExportDir
from service.engine.tokenize import PairTokenizer
from service.engine.types import pad_batch

MAX_LENGTH = 512


def _openvino_importable() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


# The cpu extra brings OpenVINO; a GPU install (EXTRAS=gpu,dev) has none, and these tests skip.
requires_openvino = pytest.mark.skipif(
    not _openvino_importable(), reason="openvino is not installed (the cpu extra)"
)


@dataclass(frozen=True)
class TinyExport:
    """An export directory of the tiny RoBERTa plus the checkpoint it came from."""

    path: Path
    checkpoint: Path
    input_names: tuple[str, ...]


def write_manifest(directory: Path, **overrides: Any) -> dict[str, Any]:
    """A manifest shaped like model_export's for `directory` (the contract's own constants and
    hashing, cappy.export_format)."""
    manifest: dict[str, Any] = {
        "format": fmt.FORMAT,
        "format_version": fmt.FORMAT_VERSION,
        "source": {"model": "tiny-roberta", "kind": "local", "revision": None},
        "architecture": {
            "model_type": "roberta",
            "architectures": ["RobertaForSequenceClassification"],
        },
        "opset": 17,
        "max_length": MAX_LENGTH,
        "truncation": "longest_first",
        "pair_order": ["instruction", "response"],
        "inputs": ["input_ids", "attention_mask"],
        "output": "logits",
        "pad_token_id": 1,
        "score": fmt.SCORE_SEMANTICS,
        "models": {"fp32": {"file": "model.onnx", "dtype": "float32"}},
        "parity": {"fp32": {"status": "passed", "max_abs_diff": 1e-6, "argmax_agreement": 1.0}},
        "files": fmt.hash_directory(directory),
    }
    manifest.update(overrides)
    (directory / fmt.MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return manifest


def export_onnx(model: Any, input_names: list[str], path: Path) -> None:
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return self.inner(**dict(zip(input_names, args, strict=True))).logits

    sample = tuple(torch.ones((2, 7), dtype=torch.int64) for _ in input_names)
    axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    axes["logits"] = {0: "batch"}
    with torch.inference_mode():
        torch.onnx.export(
            Logits(model),
            sample,
            str(path),
            input_names=input_names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


@pytest.fixture(scope="session")
def tiny_engine_export(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    """Tiny RoBERTa (2 layers, hidden 32) -> model.onnx + tokenizer + manifest."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tests.support.checkpoints import build_tiny_roberta

    root = tmp_path_factory.mktemp("engine")
    checkpoint = build_tiny_roberta(root / "checkpoint")
    shutil.rmtree(checkpoint / "_bpe", ignore_errors=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(checkpoint), attn_implementation="eager"
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    out = root / "export"
    out.mkdir()
    input_names = ["input_ids", "attention_mask"]
    export_onnx(model, input_names, out / "model.onnx")
    tokenizer.save_pretrained(str(out))
    write_manifest(out, pad_token_id=int(tokenizer.pad_token_id))
    return TinyExport(path=out, checkpoint=checkpoint, input_names=tuple(input_names))


@pytest.fixture
def export_copy(tiny_engine_export: TinyExport, tmp_path: Path) -> Path:
    """A private copy of the tiny export that a test may damage."""
    target = tmp_path / "export"
    shutil.copytree(tiny_engine_export.path, target)
    return target


WORDS = "the model answers a question about rivers mountains history code music".split()


def batches_of_pairs() -> list[list[tuple[str, str]]]:
    """Candidate sets of very different lengths, so every batch carries padding."""
    rng = np.random.default_rng(1)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    sets = []
    for size in (1, 3, 8, 17):
        instruction = words(int(rng.integers(3, 40)))
        sets.append([(instruction, words(int(rng.integers(0, 120)))) for _ in range(size)])
    sets.append([(words(600), "yes"), ("Answer.", words(5)), ("", "")])  # truncated + tiny
    sets.append([("Réponds en français 中文 🌤️", "Bleu ✓"), ("q", words(200))])
    return sets


@pytest.fixture(scope="session")
def export(tiny_engine_export: TinyExport) -> ExportDir:
    return ExportDir.load(tiny_engine_export.path)


@pytest.fixture(scope="session")
def tokenizer(export: ExportDir) -> PairTokenizer:
    return PairTokenizer.from_dir(
        export.path, max_length=export.max_length, with_token_type_ids=False
    )


@pytest.fixture(scope="session")
def cases(
    tiny_engine_export: TinyExport, tokenizer: PairTokenizer, export: ExportDir
) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(feeds, PyTorch fp32 scores) per padded batch."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_engine_export.checkpoint), attn_implementation="eager"
    ).eval()
    return pytorch_cases(model, tokenizer, export.input_names)


def pytorch_cases(
    model: Any, tokenizer: PairTokenizer, input_names: Sequence[str]
) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(feeds, `model`'s fp32 scores) per padded batch of `batches_of_pairs()`."""
    import torch

    out = []
    for pairs in batches_of_pairs():
        feeds = pad_batch(tokenizer.encode(pairs), tokenizer.pad_token_id, input_names)
        with torch.inference_mode():
            logits = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits
        out.append((feeds, logits[:, 0].float().numpy()))
    return out


def assert_close(scorer: object, cases: list, atol: float, rtol: float = 0.0) -> None:
    for feeds, expected in cases:
        got = scorer.infer(feeds)  # type: ignore[attr-defined]
        assert got.dtype == np.float32 and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=atol, rtol=rtol)


def common(export: ExportDir, tokenizer: PairTokenizer) -> dict:
    return {"input_names": export.input_names, "pad_token_id": tokenizer.pad_token_id}
