"""`cappy serve`: settings from the environment (CAPPY_*), overridden by flags; checks --model,
then runs uvicorn with graceful shutdown (the app exports a checkpoint or hub id itself)."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# flag -> (settings field, type, help)
_FLAGS: dict[str, tuple[str, Any, str]] = {
    "--model": ("model", str, "export directory, local checkpoint or hub id"),
    "--host": ("host", str, "bind address"),
    "--port": ("port", int, "bind port"),
    "--device": ("device", str, "auto | cuda | cpu"),
    "--engine": ("engine", str, "auto | onnxruntime | openvino"),
    "--precision": ("precision", str, "auto | fp32 | fp16 | int8 | bf16"),
    "--threads": ("threads", int, "CPU inference threads"),
    "--streams": ("streams", int, "batches run at once (CPU: OpenVINO streams; CUDA: sessions)"),
    "--max-batch-tokens": ("max_batch_tokens", int, "padded tokens per batch"),
    "--max-batch-size": ("max_batch_size", int, "pairs per batch"),
    "--max-wait-ms": ("max_wait_ms", float, "batch fill wait"),
    "--padding-tolerance": ("padding_tolerance", float, "padding per own token a pair may add"),
    "--pad-to-multiple": ("pad_to_multiple", int, "batch widths padded to a multiple of this"),
    "--max-queue-tokens": ("max_queue_tokens", int, "queued tokens before 429"),
    "--max-queue-wait-s": ("max_queue_wait_s", float, "expected queue wait before 429"),
    "--max-rescored": ("max_rescored", int, "near-tied leaders re-scored per request"),
    "--cache-dir": ("cache_dir", Path, "where exports of checkpoints are kept"),
    "--model-name": ("model_name", str, "name the API reports for the scorer"),
    "--log-level": ("log_level", str, "debug | info | warning | error"),
}
# switch -> (settings field, help): present sets the setting to true.
_SWITCHES: dict[str, tuple[str, str]] = {
    "--allow-ungated": ("allow_ungated", "serve graphs that did not pass a parity gate"),
    "--tensorrt": ("tensorrt", "CUDA: the TensorRT execution provider (fp16) before CUDA"),
}


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve the scorer over HTTP",
        description="Serve /score, /select, /v1/rerank. Every flag also reads from the "
        "environment as CAPPY_<NAME> (e.g. CAPPY_MAX_BATCH_TOKENS); flags win.",
    )
    for flag, (_, kind, text) in _FLAGS.items():
        serve.add_argument(flag, type=kind, default=None, help=text)
    for flag, (_, text) in _SWITCHES.items():
        serve.add_argument(flag, action="store_const", const=True, default=None, help=text)
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.model_source import ModelSourceError, check_model_source
    from service.settings import Settings

    fields = {flag: field for flag, (field, *_) in (_FLAGS | _SWITCHES).items()}
    overrides = {
        field: getattr(args, flag.lstrip("-").replace("-", "_"))
        for flag, field in fields.items()
        if getattr(args, flag.lstrip("-").replace("-", "_")) is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"error: {'.'.join(map(str, first['loc']))}: {first['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        check_model_source(settings.model)
    except ModelSourceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # A checkpoint or hub id is exported in the background once the port is open (/ready says
    # "exporting"); see service.app.create_app. The name the API reports follows the served
    # export, across reloads (service.model_source.display_name).
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.graceful_shutdown_s),
        access_log=settings.log_level == "debug",
    )
    server = uvicorn.Server(config)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again with the
    # handler it found in place, so that the default one kills the process (-SIGTERM, or a
    # KeyboardInterrupt traceback) after a clean drain. With its own handler in place instead,
    # the signal that stopped the server is taken as handled and the process exits 0. Installed
    # now, a signal that arrives before the server starts stops it as well.
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in _STOP_SIGNALS}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        return 3  # uvicorn's own code for a server that could not start (port taken...)
    return 0


def run(args: argparse.Namespace) -> int:
    return int(args.handler(args))
