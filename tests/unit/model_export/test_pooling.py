"""Mean pooling for scorers fine-tuned from embedding models: the forward computes the
classifier of the masked mean, the checkpoint says so, and the export (its graph, parity and the
scores the service computes) follows it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model_export.pooling import POOLING_KEY, pooling_of, use_mean_pooling  # noqa: E402

PAIRS = [
    ("Capital of France?", "Paris is the capital."),
    ("Capital of France?", "Lyon"),
    ("Sum 2 and 2.", "four, which is " + "a long answer " * 20),
]


def _batch(tokenizer):  # type: ignore[no-untyped-def]
    return tokenizer(
        [p[0] for p in PAIRS], [p[1] for p in PAIRS], padding=True, return_tensors="pt"
    )


def _manual_mean(model, batch, classifier_reads_position_0: bool):  # type: ignore[no-untyped-def]
    base = getattr(model, model.base_model_prefix)
    hidden = base(**batch)[0]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    head = model.classifier
    return head(pooled.unsqueeze(1)) if classifier_reads_position_0 else head(pooled)


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "minilm_checkpoint"])
def test_the_forward_scores_the_masked_mean(fixture: str, request: pytest.FixtureRequest) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    checkpoint = request.getfixturevalue(fixture)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint)).eval()
    batch = tokenizer(
        [p[0] for p in PAIRS], [p[1] for p in PAIRS], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        first_token = model(**batch).logits
        use_mean_pooling(model)
        mean = model(**batch).logits
        expected = _manual_mean(model, batch, model.config.model_type == "roberta")
    assert pooling_of(model.config) == "mean"
    assert torch.allclose(mean, expected, atol=1e-6)
    assert not torch.allclose(mean, first_token, atol=1e-3)
    # Padding does not move a pair's score: alone, unpadded, it scores the same.
    alone = tokenizer([PAIRS[1][0]], [PAIRS[1][1]], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**alone).logits[0], mean[1], atol=1e-5)


def test_an_unknown_pooling_is_refused() -> None:
    class Config:
        cappy_pooling = "max"

    with pytest.raises(ValueError, match="cappy_pooling 'max'"):
        pooling_of(Config())


def test_the_export_of_a_mean_pooled_checkpoint_scores_as_it_does(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adapt.scoring import ExportScorer
    from model_export.pipeline import ExportOptions, export, verify

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_checkpoint)).eval()
    use_mean_pooling(model)
    checkpoint = tmp_path / "mean-pooled"
    model.save_pretrained(str(checkpoint))
    tokenizer.save_pretrained(str(checkpoint))
    assert json.loads((checkpoint / "config.json").read_text())[POOLING_KEY] == "mean"
    out = tmp_path / "export"
    result = export(ExportOptions(model=str(checkpoint), out=out, progress=False))
    manifest = result.manifest
    assert manifest["architecture"]["pooling"] == "mean"
    assert manifest["models"]["fp32"]["last_layer_first_token_only"] is False
    assert manifest["parity"]["fp32"]["status"] == "passed"
    assert verify(out, remeasure=True, progress=False).ok
    # What the service computes from the graph is the mean-pooled score.
    batch = tokenizer(
        [p[0] for p in PAIRS], [p[1] for p in PAIRS], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = model(**batch).logits[:, 0].numpy()
    served = ExportScorer(out).score(PAIRS)
    np.testing.assert_allclose(served, expected, atol=1e-4)
