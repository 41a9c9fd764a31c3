"""What the run asks the cappy commands for: the flags (one constant each, easy to adjust), the
task shards that sampling runs in parallel, and the merges of the shards' outputs through
adapt's own readers and writers (adapt.data's pairs file, adapt.cache's sample cache)."""

from __future__ import annotations

import random
import re
import subprocess
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loadtests.adapt_gpu.processes import ROOT, PhaseError, child_env

# `cappy adapt train` on the GPU: the paper's budget is its default (400 steps, effective batch
# 256, lr 2e-5, warm-up 10%), so only what differs here: bf16, one micro-batch per step (MiniLM
# is small), and no fp16 graph (`cappy eval` scores with ONNX Runtime fp32 on the CPU).
TRAIN_FLAGS = ("--bf16", "--micro-batch", "256", "--no-fp16")
DRY_TRAIN_FLAGS = ("--steps", "4", "--effective-batch", "8", "--micro-batch", "4", "--no-fp16")
# The held-out stop (adapt.train; on by default): a tenth of each task's examples held out and
# evaluated every tenth of the steps, training stopped after 5 evaluations without a better
# held-out selection Rouge-L, the best checkpoint exported. The run checks that `cappy adapt
# train --help` lists each flag (the report names any it lacks); values written beside a flag
# are passed, a flag alone keeps the command's default.
HELD_OUT_FLAGS: tuple[tuple[str, ...], ...] = (
    ("--eval-fraction",),
    ("--eval-steps",),
    ("--early-stopping-patience",),
)
# `cappy adapt data` / `cappy eval` sampling: long per-call timeouts (thousands of calls queue
# at the upstream), a failure allowance for a run of 127,000 calls, no progress bars in logs.
SAMPLING_FLAGS = ("--timeout", "900", "--max-failures", "500", "--quiet")


def cappy(python: str, *args: str) -> list[str]:
    return [python, "-m", "cappy.cli", *args]


def supported_flags(python: str, *subcommand: str) -> set[str]:
    """The flags `cappy SUBCOMMAND --help` lists (empty when it cannot be run)."""
    try:
        done = subprocess.run(
            cappy(python, *subcommand, "--help"),
            cwd=ROOT,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", done.stdout))


def held_out_flags(python: str) -> tuple[list[str], list[str]]:
    """(the arguments of HELD_OUT_FLAGS to pass: flags with values that `cappy adapt train`
    lists; the flags it lacks)."""
    listed = supported_flags(python, "adapt", "train")
    used: list[str] = []
    missing: list[str] = []
    for flag, *values in HELD_OUT_FLAGS:
        if flag not in listed:
            missing.append(flag)
        elif values:
            used += [flag, *values]
    return used, missing


def task_counts(data: Path, split: str) -> Counter[str]:
    """Examples per task of `split`, read as `cappy adapt` reads them."""
    from adapt.examples import load_examples

    return Counter(e.task for e in load_examples(data, split=split))


def shard_tasks(counts: Counter[str], shards: int) -> list[list[str]]:
    """Tasks in at most `shards` groups of about equal examples (largest first, each to the
    lightest group); empty groups dropped."""
    groups: list[list[str]] = [[] for _ in range(max(1, shards))]
    loads = [0] * len(groups)
    for task, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        lightest = loads.index(min(loads))
        groups[lightest].append(task)
        loads[lightest] += count
    return [sorted(g) for g in groups if g]


def task_flags(tasks: Sequence[str]) -> list[str]:
    return [arg for task in tasks for arg in ("--task", task)]


def merge_pairs(shard_dirs: Sequence[Path], out: Path, seed: int) -> dict[str, Any]:
    """The shards' regression pairs as one `cappy adapt data` output directory (pairs.jsonl,
    shuffled with `seed`, and data.json summing the shards' manifests). Shards hold whole tasks,
    so mismatches and de-duplication, both within a task, are what one run would have made."""
    import json

    from adapt.data import MANIFEST_FILE, PAIRS_FILE, read_pairs, write_atomic, write_jsonl_atomic

    pairs = []
    manifests = []
    for directory in shard_dirs:
        pairs.extend(read_pairs(directory))
        manifests.append(json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8")))
    if not pairs:
        raise PhaseError("no shard produced pairs")
    random.Random(seed).shuffle(pairs)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out / PAIRS_FILE, (asdict(p) for p in pairs))
    sources = Counter(p.source for p in pairs)
    samples: Counter[str] = Counter()
    for manifest in manifests:
        samples.update(manifest.get("samples") or {})
    manifest = {
        "merged_from": [str(d) for d in shard_dirs],
        "examples": sum(m["examples"] for m in manifests),
        "tasks": sorted(t for m in manifests for t in m["tasks"]),
        "samples_per_example": manifests[0].get("samples_per_example"),
        "sampling": manifests[0].get("sampling"),
        "samples": dict(samples),
        "pairs": len(pairs),
        "pairs_by_source": dict(sources),
        "seed": seed,
    }
    write_atomic(out / MANIFEST_FILE, [json.dumps(manifest, indent=2) + "\n"])
    return manifest


def merge_caches(paths: Sequence[Path], out: Path) -> int:
    """The records of the shards' sample caches (one sampling configuration) in one cache at
    `out` (resumed if it exists); returns how many it holds."""
    from adapt.cache import SampleCache, read_cache

    config: dict[str, Any] | None = None
    records = {}
    for path in paths:
        if not path.is_file():
            continue
        shard_config, shard_records = read_cache(path)
        if config is None:
            config = shard_config
        elif shard_config != config:
            raise PhaseError(f"{path} was sampled with other settings than {paths[0]}")
        records.update(shard_records)
    if config is None:
        raise PhaseError("no shard wrote a sample cache")
    with SampleCache(out, config) as cache:
        for key, record in records.items():
            if key not in cache:
                cache.append(record)
        return len(cache)
