"""The naive baseline: PyTorch bf16 on the checkpoint, one request's pairs as one batch; its
/select picks the candidate that the same model in fp32 ranks first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from loadtests.naive_server import build_app
from model_export.pooling import POOLING_KEY, use_mean_pooling


def test_select_answers_the_checkpoints_best_candidate(tiny_checkpoint: Path) -> None:
    instruction = "Name a colour."
    candidates = ["red", "a long answer about many different things " * 4, "blue sky", "seven"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    with torch.inference_mode():
        batch = tokenizer(
            [instruction] * 4, candidates, padding=True, truncation=True, return_tensors="pt"
        )
        fp32 = model(**batch).logits[:, 0].tolist()

    with TestClient(build_app(str(tiny_checkpoint), max_length=512, threads=1)) as client:
        assert client.get("/ready").status_code == 200
        answer = client.post("/select", json={"instruction": instruction, "candidates": candidates})
        refused = client.post("/select", json={"instruction": instruction, "candidates": []})

    assert answer.status_code == 200, answer.text
    scores = answer.json()["scores"]
    assert len(scores) == 4
    assert max(abs(a - b) for a, b in zip(scores, fp32, strict=True)) < 0.05  # bf16 of the same
    assert answer.json()["index"] == max(range(4), key=scores.__getitem__)
    assert refused.status_code == 422


def test_a_mean_pooled_checkpoint_is_scored_by_its_mean(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "mean"
    shutil.copytree(tiny_checkpoint, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, POOLING_KEY: "mean"}))
    instruction = "Name a colour."
    candidates = ["red", "a long answer about many different things " * 4, "blue sky", "seven"]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    batch = tokenizer(
        [instruction] * 4, candidates, padding=True, truncation=True, return_tensors="pt"
    )
    with torch.inference_mode():
        model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
        first_token = model(**batch).logits[:, 0]
        mean = use_mean_pooling(model)(**batch).logits[:, 0]

    with TestClient(build_app(str(checkpoint), max_length=512, threads=1)) as client:
        answer = client.post("/select", json={"instruction": instruction, "candidates": candidates})

    served = torch.tensor(answer.json()["scores"])
    apart = float((mean - first_token).abs().max())
    assert float((served - mean).abs().max()) < min(0.05, apart / 4), (served, mean, first_token)
