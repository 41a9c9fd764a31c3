"""The peer phases: the same checkpoint through transformers (fp16, length-sorted batches) and
sentence-transformers' CrossEncoder.predict (in bulk, then one request at a time), each in a
worker process confined to --peer-threads cores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtests.gpu_bench.processes import run_json, worker_command, worker_env

if TYPE_CHECKING:
    from loadtests.gpu_bench.runner import GpuBench, Phase


def peer_args(bench: GpuBench, limit: int) -> list[str]:
    """A torch worker's flags: the checkpoint, the first `limit` requests, device and batch."""
    return [
        "--checkpoint",
        bench.report["model"]["checkpoint"],
        "--requests",
        str(bench.requests_path),
        "--limit",
        str(limit),
        "--device",
        bench.args.device,
        "--max-length",
        str(bench.max_length()),
        "--batch-size",
        str(bench.args.peer_batch_size),
    ]


def peer_phases(bench: GpuBench, checkpoint: Path | None) -> None:
    """transformers in one process; CrossEncoder bulk then per request in another (one
    model load and one sentence-transformers import for both: they take seconds)."""
    needs = ("the checkpoint", checkpoint)
    bench.phase("peer-transformers", "peer", peer("transformers"), needs=needs)
    per_request = bench.phase("peer-crossencoder", "peer", peer("crossencoder"), needs=needs)
    bench.phase(
        "peer-crossencoder-per-request",
        "peer",
        lambda bench, _budget, record: peer_figures(bench, per_request, record),
        needs=("the CrossEncoder process's per-request figures", per_request),
    )


def peer(kind: str) -> Phase:
    """A phase function running worker `kind` on the first --peer-limit requests; the
    CrossEncoder worker also runs --per-request-limit requests one at a time and the phase
    returns those figures."""

    def run(bench: GpuBench, budget: float, record: dict[str, Any]) -> dict[str, Any] | None:
        extra = ["--per-request-limit", str(bench.args.per_request_limit)]
        if kind == "crossencoder":
            budget = min(budget + bench.budgets["peer-crossencoder-per-request"], bench.remaining())
        figures, _ = run_json(
            [
                *worker_command(kind),
                *peer_args(bench, bench.args.peer_limit),
                "--threads",
                str(bench.args.peer_threads),
                "--scores-out",
                str(bench.work / f"peer_{kind}_scores.json"),
                *(extra if kind == "crossencoder" else []),
            ],
            budget,
            worker_env(bench.args.peer_threads),
        )
        per_request = figures.pop("per_request", None)
        peer_figures(bench, figures, record)
        return per_request

    return run


def worker_figures(
    bench: GpuBench, record: dict[str, Any], figures: dict[str, Any], **more: Any
) -> None:
    """The common figures of a torch worker's JSON line, timed over the window it reports."""
    bench.figures(
        record,
        requests=figures["requests"],
        pairs=figures["pairs"],
        seconds=figures["seconds"],
        tokens=figures["tokens"],
        window=(figures["t_start"], figures["t_end"]),
        **more,
    )


def peer_figures(bench: GpuBench, figures: dict[str, Any], record: dict[str, Any]) -> None:
    worker_figures(
        bench,
        record,
        figures,
        latency_ms=figures.get("latency_ms"),
        scores=json.loads(Path(figures["scores"]).read_text(encoding="utf-8")),
    )
    record["detail"] = figures
