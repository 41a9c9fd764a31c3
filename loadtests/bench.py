"""HTTP benchmark of a running cappy-serve: the fixed /select workload, closed loop at a given
concurrency, ONE JSON line of figures on stdout.

    python -m loadtests.bench --url http://127.0.0.1:8000 --concurrency 8 --limit 400
    python -m loadtests.bench --self-contained --export /tmp/ex/minilm --concurrency 8 \\
        --limit 400 --serve-arg max_wait_ms=0 --check-argmax ref.jsonl
    python -m loadtests.bench reference --checkpoint CKPT_DIR --out ref.jsonl --limit 400

Each workload line `{"id", "instruction", "candidates"}` is sent as POST /select
`{"instruction", "candidates"}`. `--concurrency` workers share one httpx.AsyncClient (keep-alive,
pool sized to the concurrency); each sends its next request as soon as its previous one is
answered. The run is bounded: the workload once, or `--limit` requests (the workload cycled if
it is shorter), or, with `--duration`, the workload cycled until the time is up or `--limit`
requests were sent, whichever comes first.
`--warmup N` requests go first and are not counted.

The figures: requests, pairs, seconds, requests/s, pairs/s, client-side latency percentiles,
errors by status, and from the server's /metrics (scraped before and after the timed phase,
differenced) the mean batch size, batch tokens and padding fraction, queue and inference time,
rejections by reason. `--check-argmax FILE` compares the returned best index with a reference
(`reference` writes one: fp32 PyTorch from the checkpoint, or ONNX Runtime fp32 from the export).

`--self-contained --export DIR` starts `cappy serve` on a free 127.0.0.1 port with any
`--serve-arg KEY=VALUE` settings (passed as CAPPY_KEY=VALUE), waits for /ready, runs, and stops it
with SIGTERM. Only loopback addresses are accepted as targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from loadtests.closed_loop import benchmark, load_reference
from loadtests.local_server import READY_TIMEOUT_S, running_server
from loadtests.reference import write_reference
from loadtests.workload import DEFAULT_REQUESTS, load_workload


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--url", default=None, help="a running server (loopback only)")
    target.add_argument(
        "--self-contained",
        action="store_true",
        help="start `cappy serve --model EXPORT` on a free port for the run",
    )
    parser.add_argument(
        "--server",
        choices=("cappy", "naive"),
        default="cappy",
        help="--self-contained: `cappy serve` on the export, or the naive PyTorch bf16 baseline "
        "(loadtests/naive_server.py) on the checkpoint that --export names",
    )
    parser.add_argument(
        "--export",
        default=None,
        help="export directory (--self-contained; a checkpoint with --server naive)",
    )
    parser.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="server setting for --self-contained, e.g. max_batch_size=64 "
        "(sent as CAPPY_MAX_BATCH_SIZE); repeatable",
    )
    parser.add_argument("--requests", default=str(DEFAULT_REQUESTS), help="workload JSONL")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="timed requests (default: the workload once; with --duration, no limit but the time)",
    )
    parser.add_argument("--duration", type=float, default=None, help="seconds of timed load")
    parser.add_argument("--warmup", type=int, default=0, help="untimed requests sent first")
    parser.add_argument(
        "--check-argmax",
        default=None,
        metavar="FILE",
        help="reference JSONL of {id, index} (see the reference subcommand)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("CAPPY_BENCH_API_KEY"),
        help="sent as Authorization: Bearer (env CAPPY_BENCH_API_KEY)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S)
    parser.add_argument("--label", default=None, help="free text copied into the JSON line")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "reference":
        return write_reference(argv[1:])
    if argv and argv[0] == "run":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if args.concurrency < 1:
        raise SystemExit("error: --concurrency must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise SystemExit("error: --limit must be at least 1")
    if args.duration is not None and args.duration <= 0:
        raise SystemExit("error: --duration must be positive")
    workload = load_workload(args.requests)
    reference = load_reference(args.check_argmax) if args.check_argmax else None

    def run(url: str) -> dict[str, Any]:
        return asyncio.run(
            benchmark(
                url,
                workload,
                concurrency=args.concurrency,
                limit=args.limit,
                duration_s=args.duration,
                warmup=args.warmup,
                api_key=args.api_key,
                reference=reference,
                timeout_s=args.timeout,
            )
        )

    if args.self_contained:
        if not args.export:
            raise SystemExit("error: --self-contained needs --export DIR")
        naive = [sys.executable, "-m", "loadtests.naive_server"]
        with running_server(
            args.export,
            args.serve_arg,
            ready_timeout_s=args.ready_timeout,
            api_key=args.api_key,
            server=naive if args.server == "naive" else None,
        ) as url:
            figures = run(url)
        figures["serve_args"] = list(args.serve_arg)
        figures["served_by"] = args.server
    else:
        figures = run(args.url or "http://127.0.0.1:8000")
    if args.label:
        figures = {"label": args.label, **figures}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
