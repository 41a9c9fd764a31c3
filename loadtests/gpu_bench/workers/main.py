"""`python -m loadtests.gpu_bench worker KIND ...`: one torch phase in its own process, its CPU
work confined to --threads cores; prints one JSON line of figures."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from loadtests.gpu_bench.workers.standin import SHAPES, worker_build
from loadtests.gpu_bench.workers.torch_peers import worker_crossencoder, worker_transformers


def confine(threads: int) -> list[int] | None:
    """Pins this process to its first `threads` usable cores (before any thread starts)."""
    if threads <= 0:
        return None
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    return cores


def worker_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.gpu_bench worker",
        description="One torch phase of gpu_bench in its own process (internal); prints a JSON "
        "line of figures.",
    )
    parser.add_argument(
        "kind",
        choices=["build", "reference", "transformers", "crossencoder"],
        help="what to run",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--requests", required=True, help="workload JSONL")
    parser.add_argument("--limit", type=int, default=0, help="first N requests (0: all)")
    parser.add_argument("--device", default="cpu", choices=["cuda", "cpu"], help="torch device")
    parser.add_argument("--max-length", type=int, default=512, help="truncation length")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batch")
    parser.add_argument("--threads", type=int, default=0, help="CPU cores to use (0: all)")
    parser.add_argument("--scores-out", default=None, help="JSON {request id: scores} to write")
    parser.add_argument(
        "--per-request-limit", type=int, default=0, help="crossencoder: then N one at a time"
    )
    parser.add_argument("--model-size", choices=sorted(SHAPES), default="tiny", help="build")
    parser.add_argument("--tokenizer", default="bpe", help="build: bpe, minilm or a directory")
    parser.add_argument("--seed", type=int, default=0, help="build: torch seed")
    parser.add_argument("--initializer-range", type=float, default=0.4, help="build: init std")
    args = parser.parse_args(argv)
    cores = confine(args.threads)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.kind == "build":
        figures = worker_build(args)
    elif args.kind in ("reference", "transformers"):
        figures = worker_transformers(args, fp32=args.kind == "reference")
    else:
        figures = worker_crossencoder(args)
    figures["cpu_cores"] = cores
    if isinstance(figures.get("per_request"), dict):
        figures["per_request"]["cpu_cores"] = cores
    print(json.dumps(figures), flush=True)
    return 0
