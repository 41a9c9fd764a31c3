"""The real MiniLM-based export served with the default CPU engine: /select picks what the fp32
PyTorch model picks."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from service.schemas.scoring import SelectResponse
from tests.integration.conftest import running_app

SETS = [
    ("What is the capital of France?", ["Paris.", "London is big.", "I do not know.", ""]),
    (
        "Is this review positive or negative? 'A joy from start to finish.'",
        ["positive", "negative"],
    ),
    (
        "Translate to German: good morning",
        ["Guten Morgen", "Bonjour", "good morning", "Gute Nacht"],
    ),
    (
        "Write a haiku about rain.",
        [
            "Rain taps on the roof / puddles gather silver light / the street hums softly",
            "It is raining.",
            "Haiku: 5-7-5 syllables.",
            "sunny days are best",
        ],
    ),
    ("Solve: 12 * 3 = ?", ["36", "The answer is 36.", "15", "twelve times three"]),
    (
        "请用一句话介绍北京。",
        ["北京是中国的首都。", "Beijing.", "I like pizza.", "东京是日本的首都。"],
    ),
]


def _torch_scores(checkpoint: Path) -> list[list[float]]:
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    out = []
    for instruction, candidates in SETS:
        batch = tokenizer(
            [instruction] * len(candidates),
            candidates,
            truncation=True,
            max_length=512,
            padding=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            out.append(model(**batch).logits[:, 0].tolist())
    return out


def _argmax(scores: list[float]) -> int:
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


async def _served_picks(export: Path, **overrides: str) -> tuple[str, list[int]]:
    async with running_app(export, **overrides) as client:
        engine = (await client.get("/info")).json()["runtime"]["engine"]
        picks = []
        for instruction, candidates in SETS:
            response = await client.post(
                "/select", json={"instruction": instruction, "candidates": candidates}
            )
            assert response.status_code == 200, response.text
            picks.append(SelectResponse.model_validate(response.json()).index)
    return engine, picks


async def test_fp32_engine_agrees_exactly(minilm_export: Path, minilm_checkpoint: Path) -> None:
    expected = [_argmax(s) for s in _torch_scores(minilm_checkpoint)]
    engine, picks = await _served_picks(minilm_export, engine="onnxruntime", precision="fp32")
    assert engine == "onnxruntime-cpu-fp32"
    assert picks == expected


async def test_default_engine_agrees_beyond_its_resolution(
    minilm_export: Path, minilm_checkpoint: Path
) -> None:
    """The default CPU engine (bf16 where the CPU has it) must pick PyTorch's argmax on every
    set whose top two reference scores are further apart than bf16 can resolve (1e-3 here; the
    seeded head gives scores near 0.01). The workload-wide agreement is a benchmark figure."""
    reference = _torch_scores(minilm_checkpoint)
    engine, picks = await _served_picks(minilm_export)
    assert engine
    if engine.endswith("-refined"):
        # bf16 + fp32 re-scoring of the near-tied leaders: fp32's winner on every set.
        assert picks == [_argmax(scores) for scores in reference]
    for scores, pick in zip(reference, picks, strict=True):
        best = _argmax(scores)
        runner_up = sorted(scores, reverse=True)[1]
        if scores[best] - runner_up >= 1e-3:
            assert pick == best, (engine, scores, pick)
        else:
            assert scores[best] - scores[pick] < 1e-3
