"""The benchmark workload: a JSONL of `{"id", "instruction", "candidates"}` requests, the body each
becomes for /select, /v1/rerank and /score, the order they are sent in, and the batching by
length of the in-process scorers."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

DEFAULT_REQUESTS = Path(__file__).resolve().parents[1].parent / "shared/data/bench_requests.jsonl"
# With --duration and no --limit, the workload is cycled at most this many times.
MAX_CYCLES = 1000


def load_workload(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Reads the JSONL workload (`{"id", "instruction", "candidates"}` per line)."""
    requests: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            if not isinstance(item.get("candidates"), list) or "instruction" not in item:
                raise ValueError(f"{path}:{number}: needs 'instruction' and a 'candidates' list")
            item.setdefault("id", number - 1)
            requests.append(item)
            if limit is not None and len(requests) >= limit:
                break
    if not requests:
        raise ValueError(f"{path}: no requests")
    return requests


def select_body(item: dict[str, Any]) -> dict[str, Any]:
    """The POST /select body for one workload line."""
    return {"instruction": item["instruction"], "candidates": item["candidates"]}


def rerank_body(item: dict[str, Any], top_n: int | None = 3) -> dict[str, Any]:
    """The POST /v1/rerank body for one workload line (the locustfile's mix)."""
    body: dict[str, Any] = {"query": item["instruction"], "documents": item["candidates"]}
    if top_n is not None:
        body["top_n"] = min(top_n, len(item["candidates"]))
    return body


def score_body(item: dict[str, Any]) -> dict[str, Any]:
    """The POST /score body for one workload line: one pair per candidate."""
    return {
        "pairs": [{"instruction": item["instruction"], "response": c} for c in item["candidates"]]
    }


def schedule(
    workload: Sequence[dict[str, Any]], limit: int | None, cycle: bool
) -> Iterator[dict[str, Any]]:
    """The requests to send, in order: the workload once, or cycled (bounded) when `cycle`."""
    sent = 0
    for _ in range(MAX_CYCLES if cycle else 1):
        for item in workload:
            if limit is not None and sent >= limit:
                return
            yield item
            sent += 1


def batches_by_length(
    lengths: Sequence[int], max_tokens: float = math.inf, max_rows: float = math.inf
) -> list[list[int]]:
    """Index lists sorted by length, cut so that rows x longest row stays within `max_tokens`
    and rows within `max_rows` (a single longer row goes alone): the in-process batching of
    every benchmark here."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending: the newest row is the longest
        if current and ((len(current) + 1) * lengths[i] > max_tokens or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
