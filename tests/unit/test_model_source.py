"""`--model` checks made before the server starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.model_source import ModelSourceError, check_model_source, is_export_dir


@pytest.mark.parametrize("model", ["btan2/cappy-large", "roberta-large", "org/name.v2_x-1"])
def test_hub_ids_pass(model: str) -> None:
    check_model_source(model)


def test_directories_pass_and_missing_paths_fail(tmp_path: Path) -> None:
    check_model_source(str(tmp_path))
    with pytest.raises(ModelSourceError, match="no such directory"):
        check_model_source(str(tmp_path / "missing"))
    with pytest.raises(ModelSourceError, match="no such directory"):
        check_model_source("./not/here/at/all")
    file = tmp_path / "model.onnx"
    file.write_bytes(b"")
    with pytest.raises(ModelSourceError, match="not a directory"):
        check_model_source(str(file))


def test_export_dir_is_recognised_by_its_manifest(tmp_path: Path) -> None:
    assert not is_export_dir(str(tmp_path))
    (tmp_path / "cappy_export.json").write_text("{}")
    assert is_export_dir(str(tmp_path))
