"""FirstTokenScorer: the last layer for the first token only gives the model's own logits, for
RoBERTa (the tiny random scorer) and BERT (MiniLM), and leaves the wrapped model unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from model_export.first_token import FirstTokenScorer, supports  # noqa: E402

INSTRUCTIONS = ["What is the capital of France?", "Solve 17 + 25.", "x " * 300, ""]
RESPONSES = ["Paris.", "The answer is 42 and some longer words here", "y " * 400, "ok"]


def load(checkpoint: Path):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    batch = tokenizer(
        INSTRUCTIONS,
        RESPONSES,
        padding=True,
        truncation="longest_first",
        max_length=512,
        return_tensors="pt",
    )
    return model, batch


@pytest.mark.parametrize("name", ["tiny_checkpoint", "minilm_checkpoint"])
def test_same_logits_as_the_model(name: str, request: pytest.FixtureRequest) -> None:
    model, batch = load(request.getfixturevalue(name))
    assert supports(model)
    assert batch["attention_mask"].min() == 0  # padded rows are part of the check
    layers = len(model.base_model.encoder.layer)
    with torch.inference_mode():
        expected = model(**batch).logits
        got = FirstTokenScorer(model).eval()(**batch)
        again = model(**batch).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The wrapped model still runs every layer and gives the same answer.
    assert len(model.base_model.encoder.layer) == layers
    torch.testing.assert_close(again, expected, atol=0, rtol=0)


def test_unsupported_architectures_are_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    for change in ({"position_embedding_type": "relative_key"}, {"num_hidden_layers": 1}):
        directory = tmp_path / next(iter(change))
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({**config, **change}))
        model = transformers.AutoModelForSequenceClassification.from_config(
            transformers.AutoConfig.from_pretrained(directory)
        )
        assert not supports(model)
        with pytest.raises(ValueError, match="not supported"):
            FirstTokenScorer(model)


def test_export_records_the_shortcut(tiny_export: Path) -> None:
    manifest = json.loads((tiny_export / "cappy_export.json").read_text())
    assert manifest["models"]["fp32"]["last_layer_first_token_only"] is True
    assert manifest["parity"]["fp32"]["status"] == "passed"
