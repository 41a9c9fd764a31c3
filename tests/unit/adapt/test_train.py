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
        "--no-fp16", "--quiet", "--eval-fraction", "0",
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
    args = _training_arguments(options, accumulation=2, metric=None)
    assert args.bf16 is True
    assert args.use_cpu is True
    plain = _training_arguments(
        _options(tmp_path / "pairs.jsonl", tmp_path / "base", tmp_path / "out"),
        accumulation=2,
        metric=None,
    )
    assert plain.use_cpu is False


# --- held out, stopped early, resumed -----------------------------------------------------------


@pytest.fixture(scope="module")
def examples_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 examples in 2 tasks, each with its ground truth, a mismatch and three LLM samples
    labelled 1.0 / 0.5 / 0.0: every held-out metric can be measured."""
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("examples") / "pairs.jsonl"
    rows = []
    for i in range(40):
        word, other = rng.sample(WORDS, 2)
        common = {"instruction": f"say {word} {i}", "id": f"ex{i}", "task": f"task{i % 2}"}
        rows += [
            {**common, "response": word, "label": 1.0, "source": "ground_truth"},
            {**common, "response": other, "label": 0.0, "source": "mismatch"},
            {**common, "response": f"{word} {word}", "label": 1.0, "source": "sample"},
            {**common, "response": f"{word} {other}", "label": 0.5, "source": "sample"},
            {**common, "response": f"{other} {other}", "label": 0.0, "source": "sample"},
        ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _held_out_scores(checkpoint: Path, data: Path, seed: int = 0) -> dict[str, float]:
    """The held-out metrics of a saved checkpoint, recomputed here."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from adapt.data import read_pairs
    from adapt.heldout import metrics, split_by_example

    held = split_by_example(read_pairs(data), 0.1, seed).held_out
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForSequenceClassification.from_pretrained(str(checkpoint)).eval()
    batch = tokenizer(
        [p.instruction for p in held], [p.response for p in held], padding=True,
        return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        scores = model(**batch).logits[:, 0].tolist()
    return metrics(held, scores)


def test_held_out_evaluations_keep_the_best_checkpoint(
    tiny_checkpoint: Path, examples_file: Path, tmp_path: Path
) -> None:
    options = _options(
        examples_file, tiny_checkpoint, tmp_path / "out", eval_steps=3, early_stopping_patience=0
    )
    result = train(options)
    record = json.loads((result.checkpoint / ADAPT_RECORD).read_text())
    held = record["held_out"]
    assert held["metric"] == "selection_rouge" and held["examples"] == 4 and held["pairs"] == 20
    assert [e["step"] for e in held["evaluations"]] == [3, 6, 9, 12]
    assert {"mse", "gt_accuracy", "selection_rouge"} <= set(held["evaluations"][0])
    best = max(held["evaluations"], key=lambda e: e["selection_rouge"])
    assert (
        held["best"]["selection_rouge"] == best["selection_rouge"] == result.best["selection_rouge"]
    )
    # The checkpoint kept is the best one: its held-out metrics, recomputed, are the best's.
    again = _held_out_scores(result.checkpoint, examples_file)
    assert again["selection_rouge"] == pytest.approx(held["best"]["selection_rouge"])
    assert again["mse"] == pytest.approx(held["best"]["mse"], rel=1e-3)
    assert not held["stopped_early"] and record["steps"] == 12


def test_training_stops_when_the_held_out_metric_stops_improving(
    tiny_checkpoint: Path, examples_file: Path, tmp_path: Path
) -> None:
    """A learning rate of 0 never improves: patience 1 stops after the second evaluation."""
    options = _options(
        examples_file, tiny_checkpoint, tmp_path / "out", eval_steps=3,
        early_stopping_patience=1, learning_rate=0.0,
    )  # fmt: skip
    record = json.loads((train(options).checkpoint / ADAPT_RECORD).read_text())
    assert record["steps"] == 6 and record["held_out"]["stopped_early"] is True
    assert [e["step"] for e in record["held_out"]["evaluations"]] == [3, 6]


KILL_AT_STEP_6 = """
import os, sys
from pathlib import Path
from transformers import TrainerCallback
import adapt.trainer as trainer_module
from adapt.train import TrainOptions, train

class Die(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 6:
            os._exit(9)  # as a crash or a kill -9: nothing saved on the way out

init = trainer_module.CappyTrainer.__init__
def with_death(self, *a, **k):
    init(self, *a, **k)
    self.add_callback(Die())
trainer_module.CappyTrainer.__init__ = with_death
data, base, out = sys.argv[1:4]
train(TrainOptions(data=Path(data), base=base, out=Path(out), steps=12, eval_steps=4,
                   learning_rate=1e-3, effective_batch=16, micro_batch=8, logging_steps=1,
                   fp16=False, progress=False))
"""


def test_resume_continues_a_killed_run_from_its_last_checkpoint(
    tiny_checkpoint: Path, examples_file: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", KILL_AT_STEP_6, str(examples_file), str(tiny_checkpoint), str(out)],
        cwd=Path(__file__).resolve().parents[3],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 9, done.stderr[-2000:]
    scratch = tmp_path / "out.checkpoint.trainer"
    assert sorted(p.name for p in scratch.glob("checkpoint-*")) == ["checkpoint-4"]
    options = _options(examples_file, tiny_checkpoint, out, eval_steps=4)
    with pytest.raises(AdaptError, match="interrupted run: pass --resume"):
        train(options)
    result = train(_options(examples_file, tiny_checkpoint, out, eval_steps=4, resume=True))
    record = json.loads((result.checkpoint / ADAPT_RECORD).read_text())
    assert record["resumed_from"].endswith("checkpoint-4") and record["steps"] == 12
    assert [step for step, _ in record["losses"]] == list(range(1, 13))
    assert not scratch.exists() and verify(out).ok


def test_ctrl_c_saves_then_resume_finishes(
    tiny_checkpoint: Path, examples_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    from adapt.train import TrainingInterrupted
    from adapt.trainer import StopOnInterrupt

    original = StopOnInterrupt.on_step_end

    def press_ctrl_c_at_step_5(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == 5 and not self.requested:
            signal.raise_signal(signal.SIGINT)
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(StopOnInterrupt, "on_step_end", press_ctrl_c_at_step_5)
    options = _options(examples_file, tiny_checkpoint, tmp_path / "out", eval_steps=4)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 5 of 12.*--resume"):
        train(options)
    assert (tmp_path / "out.checkpoint.trainer" / "checkpoint-5").is_dir()
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(StopOnInterrupt, "on_step_end", original)
    result = train(
        _options(examples_file, tiny_checkpoint, tmp_path / "out", eval_steps=4, resume=True)
    )
    record = json.loads((result.checkpoint / ADAPT_RECORD).read_text())
    assert record["resumed_from"].endswith("checkpoint-5") and record["steps"] == 12


def test_the_head_learns_at_its_own_rate(tiny_checkpoint: Path, examples_file: Path) -> None:
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
    )

    from adapt.train import _training_arguments
    from adapt.trainer import CappyTrainer, head_parameter_names

    roberta = AutoModelForSequenceClassification.from_pretrained(str(tiny_checkpoint))
    assert head_parameter_names(roberta) == {
        n for n, _ in roberta.named_parameters() if n.startswith("classifier.")
    }
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=50,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=8,
            num_labels=1,
        )
    )
    names = head_parameter_names(bert)
    assert any(n.startswith("bert.pooler.") for n in names) and any(
        n.startswith("classifier.") for n in names
    )
    assert not any(n.startswith("bert.encoder.") for n in names)
    options = _options(examples_file, tiny_checkpoint, Path("unused"), head_learning_rate=5e-3)
    trainer = CappyTrainer(
        model=roberta, args=_training_arguments(options, 1, None), head_learning_rate=5e-3
    )
    groups = trainer.create_optimizer().param_groups
    assert [g["lr"] for g in groups] == [1e-3, 5e-3]
    assert sum(len(g["params"]) for g in groups) == len(list(roberta.parameters()))


def test_listwise_term_ranks_each_examples_candidates(
    tiny_checkpoint: Path, examples_file: Path, tmp_path: Path
) -> None:
    import torch

    from adapt.trainer import ExampleSampler, listnet

    labels = torch.tensor([1.0, 0.5, 0.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    right = listnet(torch.tensor([2.0, 1.0, 0.0, 1.0, 0.0]), labels, groups)
    wrong = listnet(torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0]), labels, groups)
    assert right < wrong
    assert listnet(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]), torch.tensor([0, 1])) == 0
    order = list(ExampleSampler([0, 1, 0, 2, 1, 2], seed=0))
    assert sorted(order) == list(range(6))
    assert [sorted(order[i : i + 2]) for i in (0, 2, 4)] in (
        [[0, 2], [1, 4], [3, 5]], [[0, 2], [3, 5], [1, 4]], [[1, 4], [0, 2], [3, 5]],
        [[1, 4], [3, 5], [0, 2]], [[3, 5], [0, 2], [1, 4]], [[3, 5], [1, 4], [0, 2]],
    )  # fmt: skip
    result = train(
        _options(examples_file, tiny_checkpoint, tmp_path / "out", steps=4, listwise_weight=0.5)
    )
    assert len(result.losses) == 4


def test_mean_pooling_trains_exports_and_is_kept_from_the_base(
    tiny_checkpoint: Path, examples_file: Path, tmp_path: Path
) -> None:
    from model_export.pooling import POOLING_KEY

    options = _options(examples_file, tiny_checkpoint, tmp_path / "out", steps=2, pooling="mean")
    result = train(options)
    config = json.loads((result.checkpoint / "config.json").read_text())
    assert config[POOLING_KEY] == "mean"
    manifest = json.loads((tmp_path / "out" / "cappy_export.json").read_text())
    assert manifest["architecture"]["pooling"] == "mean" and verify(tmp_path / "out").ok
    # Fine-tuned again, the checkpoint keeps scoring from the mean; asking for cls is refused.
    again = train(_options(examples_file, result.checkpoint, tmp_path / "again", steps=1))
    assert json.loads((again.checkpoint / "config.json").read_text())[POOLING_KEY] == "mean"
    with pytest.raises(AdaptError, match="--pooling cls would train a head it does not use"):
        train(_options(examples_file, result.checkpoint, tmp_path / "cls", steps=1, pooling="cls"))


def test_each_steps_random_pairs_are_sorted_by_length_before_micro_batches() -> None:
    """The pairs of one optimiser step are a random draw, cut into micro-batches by length."""
    from adapt.trainer import StepSortedSampler

    lengths = [random.Random(i).randint(5, 500) for i in range(100)]
    sampler = StepSortedSampler(lengths, step=32, seed=0)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(100))
    assert first != second  # a new order each epoch
    for order in (first, second):
        windows = [order[i : i + 32] for i in range(0, 100, 32)]
        assert all([lengths[j] for j in w] == sorted(lengths[j] for j in w) for w in windows)
    # Not sorted across steps: each step is its own random draw.
    assert [lengths[j] for j in first] != sorted(lengths)
