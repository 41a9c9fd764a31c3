"""What `cappy adapt train` adds to Hugging Face's Trainer: how batches are drawn, the loss, a
learning rate for the head, and a Ctrl-C that saves before it stops.

- Batches: random pairs by default (each step sees many tasks), and within each optimiser step
  (micro-batch x accumulation x processes pairs) sorted by length before they are cut into
  micro-batches: the step's pairs, and so its gradient, are the same, with far less padding
  (random BIG-bench pairs of 16 pad to ~477 tokens for a mean of ~192). `group_by_length` fills a
  step with pairs of similar length from a larger pool (less padding still, but a step then holds
  one or two tasks); with a listwise term, whole examples (all of an example's pairs in one
  batch, examples shuffled), so that each example's candidates can be ranked against each other.
- Loss: MSE on the labels (the paper's), plus `listwise_weight` x ListNet: for each example in
  the batch with two or more pairs, the cross-entropy between the softmax of its labels and the
  softmax of its scores, both over `LISTWISE_TEMPERATURE`.
- The head (the regression head, and BERT's pooler, both fresh or barely trained on an encoder
  base) may learn at its own rate (`head_learning_rate`), the body at the Trainer's.
- The first Ctrl-C (SIGINT) asks for a checkpoint at the end of the current step and stops
  there; `--resume` continues from it. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import random
import signal
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback

LISTWISE_TEMPERATURE = 0.1
GROUP_KEY = "example_group"


class ExampleSampler(Sampler[int]):
    """Indices grouped by example (an example's pairs back to back), examples in a new random
    order each epoch."""

    def __init__(self, groups: Sequence[int], seed: int):
        self.groups: dict[int, list[int]] = defaultdict(list)
        for index, group in enumerate(groups):
            self.groups[group].append(index)
        self.seed = seed
        self.epoch = 0
        self.size = len(groups)

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        order = sorted(self.groups)
        random.Random(self.seed + self.epoch).shuffle(order)
        self.epoch += 1
        for group in order:
            yield from self.groups[group]


class StepSortedSampler(Sampler[int]):
    """A new random order each epoch, sorted by length within each window of `step` indices
    (one optimiser step's pairs), so that its micro-batches pad less."""

    def __init__(self, lengths: Sequence[int], step: int, seed: int):
        self.lengths = list(lengths)
        self.step = max(1, step)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = list(range(len(self.lengths)))
        random.Random(self.seed + self.epoch).shuffle(order)
        self.epoch += 1
        for start in range(0, len(order), self.step):
            yield from sorted(order[start : start + self.step], key=self.lengths.__getitem__)


def listnet(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """ListNet's cross-entropy averaged over the groups with two or more members (0 if none)."""
    losses = []
    for group in torch.unique(groups):
        members = groups == group
        if int(members.sum()) < 2:
            continue
        target = torch.softmax(labels[members] / LISTWISE_TEMPERATURE, dim=0)
        predicted = torch.log_softmax(scores[members] / LISTWISE_TEMPERATURE, dim=0)
        losses.append(-(target * predicted).sum())
    if not losses:
        return scores.sum() * 0.0
    return torch.stack(losses).mean()


def head_parameter_names(model: Any) -> set[str]:
    """The regression head's parameters: everything outside the base model, and BERT's pooler."""
    prefix = getattr(model, "base_model_prefix", "")
    names = set()
    for name, _ in model.named_parameters():
        if not prefix or not name.startswith(prefix + ".") or name.startswith(prefix + ".pooler."):
            names.add(name)
    return names


class CappyTrainer(Trainer):
    """The Trainer with the sampler, loss and optimizer above."""

    def __init__(
        self,
        *args: Any,
        listwise_weight: float = 0.0,
        head_learning_rate: float | None = None,
        sort_within_steps: bool = True,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.listwise_weight = listwise_weight
        self.head_learning_rate = head_learning_rate
        self.sort_within_steps = sort_within_steps

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset: Any = train_dataset if train_dataset is not None else self.train_dataset
        if dataset is None:
            return super()._get_train_sampler(train_dataset)
        if self.listwise_weight > 0:
            groups = [dataset[i][GROUP_KEY] for i in range(len(dataset))]
            return ExampleSampler(groups, self.args.seed)
        if self.sort_within_steps:
            args = self.args
            step = args.per_device_train_batch_size * args.gradient_accumulation_steps
            lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
            return StepSortedSampler(lengths, step * args.world_size, args.seed)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,  # noqa: ARG002 - the Trainer's signature
    ) -> Any:
        inputs = dict(inputs)  # prediction_step reads the labels from its own dict afterwards
        groups = inputs.pop(GROUP_KEY, None)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        scores = outputs.logits[:, 0].float()
        loss = torch.nn.functional.mse_loss(scores, labels.float())
        if self.listwise_weight > 0 and groups is not None:
            loss = loss + self.listwise_weight * listnet(scores, labels.float(), groups)
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is not None or self.head_learning_rate is None:
            return super().create_optimizer(*([model] if model is not None else []))
        model = model if model is not None else self.model
        head = head_parameter_names(model)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for n, p in params if n not in head], "lr": self.args.learning_rate},
                {"params": [p for n, p in params if n in head], "lr": self.head_learning_rate},
            ],
            lr=self.args.learning_rate,
            weight_decay=self.args.weight_decay,
        )
        return self.optimizer


class StopOnInterrupt(TrainerCallback):
    """The first SIGINT saves a checkpoint after the current step and ends training; `stopped`
    says whether it did. Installed for the duration of `trainer.train()` (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: Any = None

    def __enter__(self) -> StopOnInterrupt:
        try:
            self._previous = signal.signal(signal.SIGINT, self._request)
        except ValueError:  # not the main thread: Ctrl-C keeps its default
            self._previous = None
        return self

    def __exit__(self, *_: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _request(self, *_: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:  # noqa: ARG002
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control
