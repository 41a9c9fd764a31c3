"""Session-wide fixtures: real small checkpoints and their export directories, built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.checkpoints import build_tiny_roberta

    return build_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"))


@pytest.fixture(scope="session")
def minilm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.support.checkpoints import build_minilm_scorer

    return build_minilm_scorer(tmp_path_factory.mktemp("minilm-scorer"))


def _export(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """The export directory, with int8, of a session checkpoint."""
    from model_export.pipeline import ExportOptions, export

    out = tmp_path_factory.mktemp("exports") / name
    export(ExportOptions(model=str(checkpoint), out=out, int8=True, progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tiny_checkpoint, tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def minilm_export(minilm_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(minilm_checkpoint, tmp_path_factory, "minilm")
