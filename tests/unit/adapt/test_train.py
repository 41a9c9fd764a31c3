"""`adapt train`: a few steps on the tiny RoBERTa lower the loss and give a verified, servable
export; a base without a regression head gets one; outputs are checked before training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from adapt.errors import AdaptError
from adapt.train import ADAPT_RECORD, TrainOptions, accumulation_steps, train
from model_export.pipeline import verify
from service.engine.export_dir import ExportDir

WORDS = "alpha beta gamma delta river mountain music code paris france".split()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 pairs whose label is learnable: 1.0 when the response names paris."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with path.open("w") as out:
        for i in range(64):
            response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
            label = 1.0 if "paris" in response else 0.0
            out.write(
                json.dumps(
                    {"instruction": f"question {i % 8}", "response": response, "label": label}
                )
                + "\n"
            )
    return path


def _options(data: Path, base: Path, out: Path, **overrides: object) -> TrainOptions:
    values: dict[str, object] = {
        "data": data,
        "base": str(base),
        "out": out,
        "steps": 12,
        "learning_rate": 1e-3,
        "effective_batch": 16,
        "micro_batch": 8,
        "logging_steps": 1,
        "fp16": False,
        "progress": False,
    }
    values.update(overrides)
    return TrainOptions(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("effective", "micro", "processes", "expected"),
    [(256, 16, 1, 16), (256, 16, 4, 4), (256, 48, 1, 5), (8, 16, 1, 1), (256, 32, 16, 1)],
)
def test_accumulation(effective: int, micro: int, processes: int, expected: int) -> None:
    assert accumulation_steps(effective, micro, processes) == expected


def test_a_few_steps_lower_the_loss_and_export_a_verified_scorer(
    tiny_checkpoint: Path, pairs_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "adapted"
    result = train(_options(pairs_file, tiny_checkpoint, out))
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert result.out == out
    report = verify(out)
    assert report.ok, report.problems
    assert any(line.startswith("re-measured parity fp32: passed") for line in report.lines)
    served = ExportDir.load(out)  # what the service itself accepts
    assert served.max_length == 512
    record = json.loads((result.checkpoint / ADAPT_RECORD).read_text())
    assert record["head"] == "kept" and record["gradient_accumulation_steps"] == 2
    assert record["effective_batch"] == 16 and len(record["losses"]) == 12
    assert result.checkpoint == tmp_path / "adapted.checkpoint"
    assert not (tmp_path / "adapted.checkpoint.trainer").exists()


def test_an_encoder_without_a_head_gets_a_regression_head(
    tiny_checkpoint: Path, pairs_file: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer, RobertaModel

    encoder = tmp_path / "encoder"
    RobertaModel.from_pretrained(str(tiny_checkpoint)).save_pretrained(str(encoder))
    AutoTokenizer.from_pretrained(str(tiny_checkpoint)).save_pretrained(str(encoder))
    assert json.loads((encoder / "config.json").read_text())["architectures"] == ["RobertaModel"]
    result = train(_options(pairs_file, encoder, tmp_path / "out", steps=2, max_length=64))
    record = json.loads((result.checkpoint / ADAPT_RECORD).read_text())
    assert record["head"] == "added" and record["max_length"] == 64
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(result.checkpoint))
    assert config.architectures == ["RobertaForSequenceClassification"]
    assert (config.num_labels, config.problem_type) == (1, "regression")
    assert ExportDir.load(tmp_path / "out").max_length == 64


def test_outputs_are_checked_before_training(
    tiny_checkpoint: Path, pairs_file: Path, tmp_path: Path
) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(AdaptError, match="--out .*taken: already exists"):
        train(_options(pairs_file, tiny_checkpoint, tmp_path / "taken"))
    with pytest.raises(AdaptError, match="parent directory .* does not exist"):
        train(_options(pairs_file, tiny_checkpoint, tmp_path / "no" / "out"))
    with pytest.raises(AdaptError, match="--base ./missing-model: .*cannot be loaded|--base"):
        train(_options(pairs_file, Path("./missing-model"), tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_unchanged_under_torchrun(tiny_checkpoint: Path, pairs_file: Path, tmp_path: Path) -> None:
    """Two processes (CPU, gloo): DDP splits the data, only the main process exports."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "-m", "cappy", "adapt", "train",
        "--data", str(pairs_file), "--base", str(tiny_checkpoint), "--out", str(out),
        "--steps", "4", "--effective-batch", "16", "--micro-batch", "4", "--logging-steps", "1",
        "--no-fp16", "--quiet",
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=Path(__file__).resolve().parents[3],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "ddp.checkpoint" / ADAPT_RECORD).read_text())
    # 2 processes x micro-batch 4 x accumulation 2 = 16 pairs a step: 4 steps are one epoch of
    # the 64 pairs only if each process saw its own half.
    assert (record["processes"], record["gradient_accumulation_steps"]) == (2, 2)
    assert record["epochs"] == pytest.approx(1.0)
    assert verify(out).ok


def test_bf16_without_a_gpu_trains_on_the_cpu(tmp_path: Path) -> None:
    """The Trainer refuses bf16 on a machine without a GPU unless told to use the CPU."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bf16 runs there")
    from adapt.train import _training_arguments

    options = _options(tmp_path / "pairs.jsonl", tmp_path / "base", tmp_path / "out", bf16=True)
    args = _training_arguments(options, accumulation=2, scratch=tmp_path / "scratch")
    assert args.bf16 is True
    assert args.use_cpu is True
    plain = _training_arguments(
        _options(tmp_path / "pairs.jsonl", tmp_path / "base", tmp_path / "out"),
        accumulation=2,
        scratch=tmp_path / "scratch",
    )
    assert plain.use_cpu is False
