"""Downstream examples: reading the JSONL that `cappy adapt data` and `cappy eval` take.

One example per line: `{"instruction": str, "targets": [str, ...]}`, optionally `"task"`,
`"id"` and `"split"` (the format of BIG-bench's extraction in ../shared/data/bigbench_dev.jsonl).
A line without an id gets `line-N`; ids must be unique, since the sample cache is keyed by them.

Subsampling is deterministic and easy to state: after the `--split` (and `--task`) filter, the
first `examples_per_task` examples of each task in file order.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from adapt.errors import AdaptError

NO_TASK = "(no task)"


@dataclass(frozen=True, slots=True)
class Example:
    """One downstream example.

    Attributes:
        id: unique within the file (the sample cache's key).
        instruction: what the LLM is asked and Cappy scores responses against.
        targets: the reference answers (at least one).
        task: the task it belongs to (mismatched references are drawn within a task).
        split: e.g. `train` / `test`, when the file says.
    """

    id: str
    instruction: str
    targets: tuple[str, ...]
    task: str = NO_TASK
    split: str | None = None


def _parse(line: str, where: str, number: int) -> Example:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise AdaptError(f"{where}: not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(raw, dict):
        raise AdaptError(f"{where}: expected a JSON object")
    instruction = raw.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise AdaptError(f"{where}: `instruction` must be a non-empty string")
    targets = raw.get("targets")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdaptError(f"{where}: `targets` must be a non-empty list of strings")
    task = raw.get("task", NO_TASK)
    split = raw.get("split")
    example_id = raw.get("id", f"line-{number}")
    if not isinstance(task, str) or not isinstance(example_id, str | int):
        raise AdaptError(f"{where}: `task` must be a string and `id` a string or an integer")
    if split is not None and not isinstance(split, str):
        raise AdaptError(f"{where}: `split` must be a string")
    return Example(str(example_id), instruction, tuple(targets), task, split)


def load_examples(
    path: Path,
    *,
    split: str | None = None,
    tasks: Sequence[str] | None = None,
    examples_per_task: int | None = None,
) -> list[Example]:
    """Reads, filters and subsamples a JSONL file of examples.

    Args:
        path: the JSONL file.
        split: keep only lines whose `split` is this (None: all lines).
        tasks: keep only these tasks (None: all).
        examples_per_task: keep the first N examples of each task, in file order (None: all).

    Raises:
        AdaptError: unreadable file, a malformed line (named by number), duplicate ids, or
            nothing left after filtering.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AdaptError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise AdaptError(f"{path}: not UTF-8 text") from None
    examples: list[Example] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        example = _parse(line, f"{path}:{number}", number)
        if example.id in seen:
            raise AdaptError(f"{path}:{number}: duplicate id {example.id!r}")
        seen.add(example.id)
        examples.append(example)
    return select(
        examples, split=split, tasks=tasks, examples_per_task=examples_per_task, where=path
    )


def select(
    examples: Iterable[Example],
    *,
    split: str | None = None,
    tasks: Sequence[str] | None = None,
    examples_per_task: int | None = None,
    where: object = "examples",
) -> list[Example]:
    """The filter and per-task subsampling of `load_examples`, on examples already read."""
    if examples_per_task is not None and examples_per_task < 1:
        raise AdaptError(f"examples per task must be >= 1, got {examples_per_task}")
    wanted = set(tasks) if tasks else None
    kept: list[Example] = []
    per_task: Counter[str] = Counter()
    for example in examples:
        if split is not None and example.split != split:
            continue
        if wanted is not None and example.task not in wanted:
            continue
        if examples_per_task is not None and per_task[example.task] >= examples_per_task:
            continue
        per_task[example.task] += 1
        kept.append(example)
    if not kept:
        what = f" with split {split!r}" if split is not None else ""
        what += " in the tasks asked for" if wanted else ""
        raise AdaptError(f"{where}: no examples{what}")
    if wanted is not None:
        missing = sorted(wanted - set(per_task))
        if missing:
            raise AdaptError(f"{where}: no examples for task(s) {', '.join(missing)}")
    return kept


def by_task(examples: Iterable[Example]) -> dict[str, list[Example]]:
    """Examples grouped by task, tasks and examples in first-seen order."""
    grouped: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        grouped[example.task].append(example)
    return dict(grouped)
