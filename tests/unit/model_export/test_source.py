"""Resolving --model and the checks on what it points at."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from model_export import source
from model_export.errors import ExportError


def test_existing_directory_is_local(tiny_checkpoint: Path) -> None:
    ref = source.resolve(str(tiny_checkpoint))
    assert ref.kind == "local" and ref.path == tiny_checkpoint.resolve()


@pytest.mark.parametrize("model", ["btan2/cappy-large", "roberta-large"])
def test_hub_ids(model: str) -> None:
    ref = source.resolve(model, revision="main")
    assert ref.kind == "hub" and ref.path is None and ref.revision == "main"


@pytest.mark.parametrize("model", ["./missing", "/no/such/dir", "~/nope", "a/b/c"])
def test_missing_paths(model: str) -> None:
    with pytest.raises(ExportError, match="no such directory"):
        source.resolve(model)


def test_a_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(ExportError, match="is a file"):
        source.resolve(str(path))


def test_hub_id_not_cached_while_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ExportError, match=r"offline .* not in the local Hugging Face cache.*--model"
    ):
        source.load(source.resolve("btan2/cappy-large"))


def test_plain_encoder_is_refused() -> None:
    from tests.support.checkpoints import minilm_dir

    with pytest.raises(ExportError, match=r"not a sequence-classification model \(.*BertModel"):
        source.load_config(source.resolve(str(minilm_dir())))


def test_more_than_one_label_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    copy = tmp_path / "two-labels"
    shutil.copytree(tiny_checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    config["id2label"] = {"0": "LABEL_0", "1": "LABEL_1"}
    config["label2id"] = {"LABEL_0": 0, "LABEL_1": 1}
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="num_labels=2"):
        source.load_config(source.resolve(str(copy)))


def test_directory_without_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="cannot load a checkpoint"):
        source.load_config(source.resolve(str(tmp_path)))


def _config(model_type: str, positions: int, pad: int) -> SimpleNamespace:
    return SimpleNamespace(
        model_type=model_type, max_position_embeddings=positions, pad_token_id=pad
    )


def test_max_length_never_reaches_roberta_positions() -> None:
    tokenizer = SimpleNamespace(model_max_length=512)
    assert source.max_length_for(_config("roberta", 514, 1), tokenizer) == 512
    assert source.max_length_for(_config("bert", 512, 0), tokenizer) == 512
    assert (
        source.max_length_for(_config("bert", 512, 0), SimpleNamespace(model_max_length=256)) == 256
    )
    assert source.max_length_for(_config("roberta", 514, 1), tokenizer, requested=128) == 128
    with pytest.raises(ExportError, match="between 8 and 512"):
        source.max_length_for(_config("roberta", 514, 1), tokenizer, requested=514)
