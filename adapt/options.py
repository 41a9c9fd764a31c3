"""The options of `cappy adapt data`, `cappy adapt train` and `cappy eval`: each default stated
once, here, and read by the CLI's flags.

Standard library only, so that `cappy --help` and every parser build in an install without the
`adapt` extra (the serving image): the commands import their heavy dependencies when they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from adapt.examples import Example

Endpoint = Literal["chat", "completions"]


@dataclass(kw_only=True)
class SamplingOptions:
    """The options `cappy adapt data` and `cappy eval` share: which examples, which upstream,
    how to sample it (see adapt.cli for each flag). Keyword-only, so that each command's own
    options, some of them required, can follow these defaulted ones."""

    upstream: str | None = None
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    split: str | None = None
    tasks: list[str] | None = None
    examples_per_task: int | None = None
    max_tokens: int = 64
    endpoint: Endpoint = "chat"
    send_top_k: bool = True  # where accepted (detected); False: neither top_k nor the extras
    seed: int = 0
    concurrency: int = 1
    timeout_s: float = 120.0
    max_failures: int = 50
    progress: bool = True

    def select_examples(self, path: Path) -> list[Example]:
        """The examples of the JSONL file `path` that --split, --task and --examples-per-task
        select."""
        from adapt.examples import load_examples

        return load_examples(
            path, split=self.split, tasks=self.tasks, examples_per_task=self.examples_per_task
        )


@dataclass(kw_only=True)
class DataOptions(SamplingOptions):
    """`cappy adapt data` options (see adapt.cli for each flag's meaning)."""

    train: Path
    out: Path
    samples_per_example: int = 17
    # The sampling budget: LLM samples for the first N examples of each task (None: all).
    sampled_examples_per_task: int | None = None
    mismatch: bool = True
    cache: Path | None = None


@dataclass(kw_only=True)
class EvalOptions(SamplingOptions):
    """`cappy eval` options (see adapt.cli for each flag)."""

    data: Path
    out: Path
    scorer: Path | None = None
    samples: Path | None = None  # the cache; default OUT/samples.jsonl
    engine: str = "onnxruntime"
    precision: str = "fp32"
    threads: int | None = None
    allow_ungated: bool = False


@dataclass
class TrainOptions:
    """`cappy adapt train` options (see adapt.cli for each flag)."""

    data: Path
    base: str
    out: Path
    checkpoint: Path | None = None  # default: OUT.checkpoint next to OUT
    revision: str | None = None
    steps: int = 400
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.1
    effective_batch: int = 256
    micro_batch: int = 16
    max_length: int = 512
    weight_decay: float = 0.0
    optim: str = "adamw_torch"
    seed: int = 0
    logging_steps: int = 10
    bf16: bool = False
    group_by_length: bool = False
    # held out, evaluated, stopped early, resumed (module docstring)
    eval_fraction: float = 0.1
    eval_steps: int | None = None  # default: a tenth of the steps (at least 10)
    early_stopping_patience: int = 5
    resume: bool = False
    head_learning_rate: float | None = None
    listwise_weight: float = 0.0
    pooling: str | None = None  # cls | mean; default: the base's (model_export.pooling)
    # export
    fp16: bool = True
    int8: bool = False
    parity: str = "gate"
    force: bool = False
    progress: bool = True

    @property
    def checkpoint_dir(self) -> Path:
        return self.checkpoint or self.out.with_name(self.out.name + ".checkpoint")

    @property
    def scratch_dir(self) -> Path:
        """The Trainer's checkpoints while the run lasts (what `resume` continues from)."""
        return self.checkpoint_dir.with_name(self.checkpoint_dir.name + ".trainer")

    @property
    def every(self) -> int:
        """Steps between evaluations and checkpoints."""
        return self.eval_steps or max(10, self.steps // 10)
