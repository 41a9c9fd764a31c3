"""`cappy adapt data`: the regression data of the paper's §3.4, built from the user's examples
and the upstream LLM's own samples.

Each example gives, in this order:
- its ground truth, (instruction, reference) -> 1.0, one pair per reference;
- the LLM's samples, (instruction, sample) -> Rouge-L F against the references (adapt.labels):
  17 by default (the paper's whole recipe), for every example or, within a sampling budget, for
  the first `sampled_examples_per_task` of each task (ground truths and mismatches cost no
  upstream call and come from every example);
- a mismatch, (instruction, a reference of another example of the same task) -> 0.0, none when
  the task has one example.
Pairs are de-duplicated on (instruction, response), keeping the first, so a sample that repeats
a reference keeps the 1.0 of the ground truth and a sample equal to the mismatched reference
keeps its Rouge-L label; then shuffled, seeded.

Output directory: `pairs.jsonl` (one `{"instruction", "response", "label", "source", "id",
"task", "decoding"}` per line, what `cappy adapt train` reads), `data.json` (the options and
counts), and by default the sample cache `samples.jsonl` that a re-run resumes from.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from adapt import planning, sampling
from adapt.cache import SampleRecord
from adapt.errors import AdaptError
from adapt.examples import Example, by_task, select
from adapt.labels import RougeL, mismatch_reference
from adapt.options import DataOptions
from service.upstream.recipe import Recipe

PAIRS_FILE = "pairs.jsonl"
MANIFEST_FILE = "data.json"
CACHE_FILE = "samples.jsonl"


@dataclass(frozen=True, slots=True)
class Pair:
    """One regression example: Cappy should score (instruction, response) as `label`."""

    instruction: str
    response: str
    label: float
    source: str  # "ground_truth" | "sample" | "mismatch"
    id: str
    task: str
    decoding: str | None = None


def build_pairs(
    examples: Sequence[Example],
    samples: Mapping[str, Sequence[SampleRecord]],
    *,
    instruction_of: Mapping[str, str] | None = None,
    seed: int = 0,
    mismatch: bool = True,
    rouge: RougeL | None = None,
) -> list[Pair]:
    """The de-duplicated, shuffled regression pairs of `examples`.

    Args:
        examples: the examples (mismatches are drawn among these, within a task).
        samples: each example id's LLM samples.
        instruction_of: the instruction Cappy reads per example id (default: the example's).
        seed: seeds the mismatch draws and the shuffle.
        mismatch: add the mismatched-reference pairs.
        rouge: the labeller (default: a new RougeL).
    """
    rouge = rouge or RougeL()
    rng = random.Random(seed)
    tasks = by_task(examples)
    pairs: list[Pair] = []
    for example in examples:
        instruction = (instruction_of or {}).get(example.id, example.instruction)
        common = {"instruction": instruction, "id": example.id, "task": example.task}
        pairs.extend(
            Pair(response=t, label=1.0, source="ground_truth", **common) for t in example.targets
        )
        for record in samples.get(example.id, ()):
            label = rouge(record.text, example.targets)
            pairs.append(
                Pair(
                    response=record.text,
                    label=label,
                    source="sample",
                    decoding=record.decoding,
                    **common,
                )
            )
        if mismatch:
            wrong = mismatch_reference(example, tasks[example.task], rng)
            if wrong is not None:
                pairs.append(Pair(response=wrong, label=0.0, source="mismatch", **common))
    unique = dedupe(pairs)
    rng.shuffle(unique)
    return unique


def dedupe(pairs: Iterable[Pair]) -> list[Pair]:
    """The first pair of each (instruction, response), in order."""
    seen: set[tuple[str, str]] = set()
    unique: list[Pair] = []
    for p in pairs:
        key = (p.instruction, p.response)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def write_atomic(path: Path, chunks: Iterable[str]) -> None:
    """Writes text to a temporary sibling and renames it into place: never half a file."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            for chunk in chunks:
                out.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl_atomic(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Writes JSONL atomically (see `write_atomic`)."""
    write_atomic(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_pairs(path: Path) -> list[Pair]:
    """Reads `pairs.jsonl` (or a directory holding it).

    Raises:
        AdaptError: missing file or a malformed line (named by number).
    """
    if path.is_dir():
        path = path / PAIRS_FILE
    if not path.is_file():
        raise AdaptError(f"{path}: no such file (make it with `cappy adapt data`)")
    pairs: list[Pair] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                pairs.append(
                    Pair(
                        instruction=str(raw["instruction"]),
                        response=str(raw["response"]),
                        label=float(raw["label"]),
                        source=str(raw.get("source", "unknown")),
                        id=str(raw.get("id", f"line-{number}")),
                        task=str(raw.get("task", "")),
                        decoding=raw.get("decoding"),
                    )
                )
            except (ValueError, KeyError, TypeError):
                raise AdaptError(
                    f"{path}:{number}: expected {{'instruction', 'response', 'label'}}"
                ) from None
    if not pairs:
        raise AdaptError(f"{path}: no pairs")
    return pairs


@dataclass
class DataResult:
    out: Path
    pairs: list[Pair]
    manifest: dict[str, Any]


def run(options: DataOptions, *, transport: httpx.AsyncBaseTransport | None = None) -> DataResult:
    """Builds the regression data; see the module docstring.

    Raises:
        AdaptError: bad input, no upstream while samples are asked for, or too many failed calls.
    """
    examples = options.select_examples(options.train)
    # Validate the sample count before any call is made.
    planning.plan_decodings(Recipe.default(), options.samples_per_example)
    options.out.mkdir(parents=True, exist_ok=True)
    cache_path = options.cache or options.out / CACHE_FILE
    samples: dict[str, list[SampleRecord]] = {}
    sampling_info: dict[str, Any] | None = None
    stats = sampling.CollectStats()
    if options.samples_per_example > 0:
        if not options.upstream:
            raise AdaptError(
                "--upstream is required to collect LLM samples (or pass --samples-per-example 0)"
            )
        sampled = (
            select(examples, examples_per_task=options.sampled_examples_per_task)
            if options.sampled_examples_per_task is not None
            else examples
        )
        config, samples, stats = asyncio.run(
            sampling.gather(
                options,
                sampled,
                cache_path,
                transport,
                logprobs=False,
                samples_per_example=options.samples_per_example,
            )
        )
        sampling_info = config.header()
    instruction_of = {e.id: planning.instruction_for(e, options.endpoint) for e in examples}
    pairs = build_pairs(
        examples,
        samples,
        instruction_of=instruction_of,
        seed=options.seed,
        mismatch=options.mismatch,
    )
    write_jsonl_atomic(options.out / PAIRS_FILE, (asdict(p) for p in pairs))
    sources = Counter(p.source for p in pairs)
    sample_labels = [p.label for p in pairs if p.source == "sample"]
    manifest = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "train": str(options.train),
        "split": options.split,
        "tasks": sorted({e.task for e in examples}),
        "examples_per_task": options.examples_per_task,
        "examples": len(examples),
        "examples_by_task": dict(Counter(e.task for e in examples)),
        "samples_per_example": options.samples_per_example,
        "sampled_examples": len(samples),
        "sampled_examples_per_task": options.sampled_examples_per_task,
        "mismatch": options.mismatch,
        "seed": options.seed,
        "sampling": sampling_info,
        "cache": str(cache_path) if options.samples_per_example > 0 else None,
        "samples": {
            "planned": stats.planned,
            "from_cache": stats.cached,
            "fetched": stats.fetched,
            "failed": len(stats.failed),
        },
        "pairs": len(pairs),
        "pairs_by_source": dict(sources),
        "sample_label_mean": sum(sample_labels) / len(sample_labels) if sample_labels else None,
    }
    write_atomic(options.out / MANIFEST_FILE, [json.dumps(manifest, indent=2) + "\n"])
    return DataResult(options.out, pairs, manifest)
