"""`cappy adapt train`: fine-tune a scorer on the regression pairs of `cappy adapt data` with
Hugging Face's Trainer (the paper's §3.4 recipe), then export and verify it through
model_export, so that what comes out is a servable export directory.

Recipe (every part a flag): MSE regression on the labels, AdamW, lr 2e-5, 10% linear warm-up then
linear decay to 0, effective batch 256 (micro-batch x gradient accumulation x processes), 400
optimiser steps, random batches, pairs truncated `longest_first` to 512 tokens, instruction first.

What a run can be left to do (adapt.heldout, adapt.trainer):
- `eval_fraction` (10%) of each task's examples is held out, all pairs of an example together,
  and evaluated every `eval_steps`: pair MSE, ground truth above its mismatch, and the selection
  Rouge-L among each held-out example's LLM samples;
- a checkpoint is saved at each evaluation; training stops when the watched metric (the
  selection Rouge-L where samples exist, else ground truth above mismatch, else MSE) has not
  improved for `early_stopping_patience` evaluations, and the best checkpoint is the one kept;
- `resume` continues an interrupted run (a crash, a kill, or Ctrl-C, which saves first) from its
  last checkpoint, kept in `OUT.checkpoint.trainer/` until the run ends;
- the head may learn at its own rate (`head_learning_rate`), a listwise term may rank each
  example's candidates against their labels (`listwise_weight`), and the score may come from the
  mean of the last layer (`pooling="mean"`, model_export.pooling) for embedding-model bases.

`--base` is a hub id (`btan2/cappy-large`), a local checkpoint, or an encoder with no regression
head: a `num_labels=1` head is added (a classification head of another size is replaced, with a
warning). The fine-tuned checkpoint is saved next to the export (`OUT.checkpoint/`, with
`cappy_adapt.json`: options, data, the held-out evaluations, loss history), because the export's
manifest names it as its source and `cappy verify` re-measures parity against it.

Multi-GPU: the same command under `torchrun --nproc-per-node N -m cappy.cli adapt train ...` or
`accelerate launch -m cappy.cli adapt train ...`; the Trainer runs DDP, the accumulation is
divided by the number of processes, and only the main process exports.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from adapt import heldout
from adapt.data import read_pairs
from adapt.errors import AdaptError
from adapt.options import TrainOptions
from model_export import pooling

logger = logging.getLogger(__name__)

ADAPT_RECORD = "cappy_adapt.json"


@dataclass
class TrainResult:
    out: Path | None  # None on processes other than the main one
    checkpoint: Path
    losses: list[tuple[int, float]] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] | None = None  # the kept checkpoint's step and held-out metrics
    export_manifest: dict[str, Any] | None = None
    verify_lines: list[str] = field(default_factory=list)
    seconds: float = 0.0


def world_size() -> int:
    """Processes training together (torchrun and accelerate set WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def accumulation_steps(effective_batch: int, micro_batch: int, processes: int) -> int:
    """Gradient accumulation that makes micro x processes x accumulation closest to the effective
    batch (at least 1)."""
    if effective_batch < 1 or micro_batch < 1:
        raise AdaptError("--effective-batch and --micro-batch must be >= 1")
    return max(1, round(effective_batch / (micro_batch * processes)))


class TrainingInterrupted(AdaptError):
    """Ctrl-C: a checkpoint was saved; `--resume` continues from it."""


def _check_outputs(options: TrainOptions) -> None:
    """Refuses before hours of training what the export would refuse after them, and a new run
    over an interrupted one."""
    for path, flag in ((options.out, "--out"), (options.checkpoint_dir, "--checkpoint")):
        if path.exists() and not options.force:
            raise AdaptError(f"{flag} {path}: already exists (pass --force to replace it)")
    parent = options.out.parent
    if not parent.is_dir():
        raise AdaptError(f"--out {options.out}: parent directory {parent} does not exist")
    scratch = options.scratch_dir
    if scratch.exists() and not options.resume:
        if not options.force:
            raise AdaptError(
                f"{scratch} holds an interrupted run: pass --resume to continue it, or --force "
                "to start over"
            )
        shutil.rmtree(scratch)


def _last_checkpoint(scratch: Path) -> Path | None:
    from transformers.trainer_utils import get_last_checkpoint

    return (
        Path(found) if scratch.is_dir() and (found := get_last_checkpoint(str(scratch))) else None
    )


def _load_base(options: TrainOptions) -> tuple[Any, Any, str]:
    """(model, tokenizer, head): the base as a num_labels=1 regression model; head says whether
    its regression head was `kept` or `added`."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from model_export.source import hub_offline

    base = options.base
    kwargs: dict[str, Any] = {"revision": options.revision}
    where = "is not a local directory, and " + (
        "the hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache"
        if hub_offline()
        else "could not be loaded from the hub"
    )
    if Path(base).expanduser().exists():
        base = str(Path(base).expanduser())
        where = "cannot be loaded"
    try:
        config = AutoConfig.from_pretrained(base, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(base, use_fast=True, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdaptError(f"--base {options.base}: {where} ({first})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise AdaptError(f"--base {options.base}: has no fast tokenizer (tokenizer.json)")
    architectures = list(getattr(config, "architectures", None) or [])
    is_scorer = config.num_labels == 1 and any(
        a.endswith("ForSequenceClassification") for a in architectures
    )
    head = "kept" if is_scorer else "added"
    if not is_scorer and any(a.endswith("ForSequenceClassification") for a in architectures):
        logger.warning(
            "--base %s has a %d-label classification head; replacing it with a fresh "
            "regression head (num_labels=1)",
            options.base,
            config.num_labels,
        )
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=1,
        problem_type="regression",
        ignore_mismatched_sizes=not is_scorer,
        dtype=torch.float32,
        **kwargs,
    )
    wanted = options.pooling or pooling.pooling_of(config)
    if wanted == "mean":
        try:
            pooling.use_mean_pooling(model)
        except ValueError as exc:
            raise AdaptError(f"--pooling mean: {exc}") from None
    elif pooling.pooling_of(config) == "mean":
        raise AdaptError(
            f"--base {options.base} scores from mean pooling (its config's "
            f"{pooling.POOLING_KEY}); --pooling cls would train a head it does not use"
        )
    return model, tokenizer, head


class _PairDataset:
    """Tokenized pairs as a map-style dataset of feature dicts (what the collator pads)."""

    def __init__(self, features: list[dict[str, Any]]):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.features[index]


def tokenize_pairs(tokenizer: Any, pairs: list[Any], max_length: int) -> _PairDataset:
    """Pairs -> features, instruction first, truncated longest_first as the service does; each
    with its example's group number (adapt.trainer's listwise term and sampler)."""
    encoded = tokenizer(
        [p.instruction for p in pairs],
        [p.response for p in pairs],
        truncation="longest_first",
        max_length=max_length,
    )
    from adapt.trainer import GROUP_KEY

    names = list(encoded.keys())
    groups: dict[str, int] = {}
    features = [
        {
            **{name: encoded[name][i] for name in names},
            "labels": float(pair.label),
            GROUP_KEY: groups.setdefault(pair.id, len(groups)),
        }
        for i, pair in enumerate(pairs)
    ]
    return _PairDataset(features)


def _training_arguments(options: TrainOptions, accumulation: int, metric: str | None) -> Any:
    import torch
    from transformers import TrainingArguments

    params = inspect.signature(TrainingArguments.__init__).parameters
    every = options.every
    kwargs: dict[str, Any] = {
        "output_dir": str(options.scratch_dir),
        "max_steps": options.steps,
        "per_device_train_batch_size": options.micro_batch,
        "per_device_eval_batch_size": max(options.micro_batch, 32),
        "gradient_accumulation_steps": accumulation,
        "learning_rate": options.learning_rate,
        # An integer step count, which every transformers version reads the same way.
        "warmup_steps": math.ceil(options.steps * options.warmup_ratio),
        "lr_scheduler_type": "linear",
        "optim": options.optim,
        "weight_decay": options.weight_decay,
        "logging_steps": options.logging_steps,
        "logging_first_step": True,
        # A checkpoint at every evaluation: what --resume continues from and the best is kept of.
        "save_strategy": "steps",
        "save_steps": every,
        "save_total_limit": 2,
        "report_to": "none",
        "seed": options.seed,
        "bf16": options.bf16,
        "disable_tqdm": not options.progress,
        "remove_unused_columns": False,
        # Page-locked batches help only a GPU (and warn without one).
        "dataloader_pin_memory": torch.cuda.is_available(),
    }
    if metric is not None:
        strategy = "eval_strategy" if "eval_strategy" in params else "evaluation_strategy"
        kwargs[strategy] = "steps"
        kwargs["eval_steps"] = every
        kwargs["load_best_model_at_end"] = True
        kwargs["metric_for_best_model"] = metric
        kwargs["greater_is_better"] = metric != "mse"
    if (world_size() > 1 or options.bf16) and not torch.cuda.is_available():
        # Without a GPU the Trainer sets up DDP (gloo), and bf16 autocast on a CPU with native
        # bf16 (AMX here: 4x fp32's matmul rate), only when told to use the CPU; otherwise each
        # process would train alone on all the data, and bf16 is refused.
        kwargs["use_cpu"] = True
    if options.group_by_length and options.listwise_weight == 0:
        # Batches of similar lengths pad less (bigbench instructions run 25 to 1500 characters),
        # but each then holds one or two tasks.
        if "train_sampling_strategy" in params:
            kwargs["train_sampling_strategy"] = "group_by_length"
        elif "group_by_length" in params:
            kwargs["group_by_length"] = True
    return TrainingArguments(**kwargs)


def _check(options: TrainOptions) -> None:
    if options.steps < 1:
        raise AdaptError("--steps must be >= 1")
    if not 0 <= options.warmup_ratio < 1:
        raise AdaptError("--warmup-ratio must be in [0, 1)")
    if options.eval_steps is not None and options.eval_steps < 1:
        raise AdaptError("--eval-steps must be >= 1")
    if options.early_stopping_patience < 0:
        raise AdaptError("--early-stopping-patience must be >= 0 (0: no early stop)")
    if options.listwise_weight < 0:
        raise AdaptError("--listwise must be >= 0")
    if options.head_learning_rate is not None and options.head_learning_rate <= 0:
        raise AdaptError("--head-lr must be > 0")
    if options.pooling not in (None, *pooling.POOLINGS):
        raise AdaptError(f"--pooling {options.pooling}: expected one of {pooling.POOLINGS}")


def train(options: TrainOptions) -> TrainResult:
    """Fine-tunes (with the held-out evaluations and stop), saves the best checkpoint, exports
    and verifies; see the module docstring.

    Raises:
        AdaptError: bad input (data, base, outputs), or an export that fails verification.
        TrainingInterrupted: Ctrl-C; a checkpoint was saved for `resume`.
    """
    started = time.perf_counter()
    _check(options)
    processes = world_size()
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        _check_outputs(options)
    split = heldout.split_by_example(read_pairs(options.data), options.eval_fraction, options.seed)
    metric = heldout.watched_metric(split.held_out)
    accumulation = accumulation_steps(options.effective_batch, options.micro_batch, processes)
    effective = options.micro_batch * processes * accumulation
    if effective != options.effective_batch:
        logger.warning(
            "effective batch %d (micro %d x %d processes x accumulation %d), not %d",
            effective,
            options.micro_batch,
            processes,
            accumulation,
            options.effective_batch,
        )

    from transformers import DataCollatorWithPadding, EarlyStoppingCallback

    from adapt.trainer import CappyTrainer, StopOnInterrupt
    from model_export.source import max_length_for

    model, tokenizer, head = _load_base(options)
    limit = max_length_for(model.config, tokenizer)
    max_length = min(options.max_length, limit)
    if max_length < options.max_length:
        logger.warning("--max-length %d: this model takes at most %d", options.max_length, limit)
    held_out = split.held_out

    def compute_metrics(prediction: Any) -> dict[str, float]:
        scores = prediction.predictions
        scores = scores[0] if isinstance(scores, tuple) else scores
        return heldout.metrics(
            held_out, [float(s) for s in scores.reshape(len(held_out), -1)[:, 0]]
        )

    interrupt = StopOnInterrupt()
    callbacks: list[Any] = [interrupt]
    if metric is not None and options.early_stopping_patience > 0:
        callbacks.append(
            EarlyStoppingCallback(early_stopping_patience=options.early_stopping_patience)
        )
    trainer = CappyTrainer(
        model=model,
        args=_training_arguments(options, accumulation, metric),
        train_dataset=tokenize_pairs(tokenizer, split.train, max_length),
        eval_dataset=tokenize_pairs(tokenizer, held_out, max_length) if metric else None,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics if metric else None,
        callbacks=callbacks,
        listwise_weight=options.listwise_weight,
        head_learning_rate=options.head_learning_rate,
        sort_within_steps=not options.group_by_length,
    )
    resumed = _last_checkpoint(options.scratch_dir) if options.resume else None
    if options.resume and resumed is None:
        logger.warning(
            "--resume: no checkpoint in %s yet; starting from the base", options.scratch_dir
        )
    with interrupt:
        trainer.train(resume_from_checkpoint=str(resumed) if resumed else None)
    if interrupt.stopped_at is not None:
        raise TrainingInterrupted(
            f"interrupted at step {interrupt.stopped_at} of {options.steps}; a checkpoint is in "
            f"{options.scratch_dir}: re-run the same command with --resume to continue"
        )
    history = trainer.state.log_history
    losses = [(int(e["step"]), float(e["loss"])) for e in history if "loss" in e]
    evaluations = [_evaluation(entry) for entry in history if "eval_loss" in entry]
    best = _best(trainer, evaluations, metric)
    checkpoint = options.checkpoint_dir
    if checkpoint.exists() and trainer.is_world_process_zero() and main_process:
        shutil.rmtree(checkpoint)
    trainer.save_model(str(checkpoint))  # every process: FSDP/DeepSpeed gather the weights
    result = TrainResult(
        out=None, checkpoint=checkpoint, losses=losses, evaluations=evaluations, best=best
    )
    if not (trainer.is_world_process_zero() and main_process):
        return result
    tokenizer.save_pretrained(str(checkpoint))
    record = {
        "base": options.base,
        "head": head,
        "data": str(options.data),
        "pairs": len(split.train) + len(held_out),
        "held_out": {
            "examples": split.held_out_examples,
            "pairs": len(held_out),
            "metric": metric,
            "best": best,
            "evaluations": evaluations,
            "stopped_early": trainer.state.global_step < options.steps,
        },
        "resumed_from": str(resumed) if resumed else None,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "max_length": max_length,
        "processes": processes,
        "gradient_accumulation_steps": accumulation,
        "effective_batch": effective,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "losses": losses,
        "train_seconds": round(time.perf_counter() - started, 1),
    }
    (checkpoint / ADAPT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(options.scratch_dir, ignore_errors=True)
    del trainer, model

    result.out, result.export_manifest, result.verify_lines = export_checkpoint(
        checkpoint, options, max_length
    )
    result.seconds = time.perf_counter() - started
    return result


def _evaluation(entry: dict[str, Any]) -> dict[str, float]:
    """One held-out evaluation of the Trainer's log: its step and metrics (without `eval_`)."""
    metrics = {
        key.removeprefix("eval_"): float(value)
        for key, value in entry.items()
        if key.startswith("eval_") and isinstance(value, int | float)
    }
    return {"step": int(entry["step"]), **metrics}


def _best(
    trainer: Any, evaluations: list[dict[str, float]], metric: str | None
) -> dict[str, Any] | None:
    """The step and metrics of the checkpoint the Trainer kept as best (None without held-out
    evaluations)."""
    if metric is None or not evaluations:
        return None
    path = trainer.state.best_model_checkpoint
    step = int(Path(path).name.rsplit("-", 1)[-1]) if path else evaluations[-1]["step"]
    return next((e for e in evaluations if e["step"] == step), evaluations[-1])


def export_checkpoint(
    checkpoint: Path, options: TrainOptions, max_length: int
) -> tuple[Path, dict[str, Any], list[str]]:
    """Exports the fine-tuned checkpoint to `options.out` and verifies it (re-measuring parity
    against the checkpoint). Raises AdaptError when either fails."""
    from model_export.errors import ExportError
    from model_export.pipeline import ExportOptions, export, verify

    try:
        exported = export(
            ExportOptions(
                model=str(checkpoint),
                out=options.out,
                fp16=options.fp16,
                int8=options.int8,
                max_length=max_length,
                force=options.force,
                progress=options.progress,
                parity=options.parity,
            )
        )
    except ExportError as exc:
        raise AdaptError(
            f"export of the fine-tuned checkpoint {checkpoint} failed: {exc}"
        ) from None
    report = verify(exported.out, remeasure=True, progress=False)
    if not report.ok:
        raise AdaptError(f"{exported.out}: verification failed: {'; '.join(report.problems)}")
    return exported.out, exported.manifest, report.lines
