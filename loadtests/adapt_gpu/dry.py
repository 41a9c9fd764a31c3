"""The dry run's inputs, made on the fly in the work directory: a BIG-bench-shaped JSONL of two
tasks (3 train and 2 test examples each), a tiny random causal LM as the upstream's model
(loadtests.transformers_upstream.standin) and the tiny random RoBERTa scorer the test suite
builds (tests.support.checkpoints) as the base to fine-tune. Each is reused when present."""

from __future__ import annotations

import json
from pathlib import Path

TASKS = {
    "tiny_capitals": [
        ("What is the capital of France?", "Paris"),
        ("What is the capital of Italy?", "Rome"),
        ("What is the capital of Spain?", "Madrid"),
        ("What is the capital of Japan?", "Tokyo"),
        ("What is the capital of Egypt?", "Cairo"),
    ],
    "tiny_sums": [
        ("Solve 2 + 3.", "5"),
        ("Solve 7 + 8.", "15"),
        ("Solve 10 + 11.", "21"),
        ("Solve 4 + 4.", "8"),
        ("Solve 9 + 1.", "10"),
    ],
}
TRAIN_PER_TASK = 3


def write_data(path: Path) -> Path:
    """Two tasks, the first 3 examples of each in `train` and the other 2 in `test`."""
    if path.is_file():
        return path
    lines = []
    for task, examples in TASKS.items():
        for n, (instruction, target) in enumerate(examples):
            split = "train" if n < TRAIN_PER_TASK else "test"
            lines.append(
                json.dumps(
                    {
                        "task": task,
                        "split": split,
                        "id": f"{task}-{split}-{n}",
                        "instruction": f"Q: {instruction}\nA:",
                        "targets": [target],
                    }
                )
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def llm(directory: Path) -> Path:
    from loadtests.transformers_upstream.standin import build_tiny_llama

    if (directory / "config.json").is_file():
        return directory
    corpus = [q for examples in TASKS.values() for q, _ in examples]
    return build_tiny_llama(directory, corpus=corpus)


def scorer_base(directory: Path) -> Path:
    from tests.support.checkpoints import build_tiny_roberta

    if (directory / "config.json").is_file():
        return directory
    return build_tiny_roberta(directory)
