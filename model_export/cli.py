"""`cappy export` and `cappy verify`: argument parsing and one-line errors; the work is in
model_export.pipeline and model_export.verify."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from model_export.errors import ExportError
from model_export.source import DEFAULT_MODEL


def add_export_flags(parser: argparse.ArgumentParser, *, force_help: str) -> None:
    """--fp16, --parity, --force and --quiet: how the export step writes and gates its graphs,
    the same for `cappy export` and `cappy adapt train` (which exports what it trains)."""
    parser.add_argument(
        "--fp16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write model.fp16.onnx for GPU serving (default: on)",
    )
    parser.add_argument(
        "--parity",
        choices=("gate", "record"),
        default="gate",
        help="gate (default): ship only the graphs whose parity with PyTorch passed its gate, and "
        "nothing at all unless fp32 passes; record: measure and record parity but gate nothing "
        "(benchmark stand-ins with random weights); the manifest says the export was not gated "
        "and the service refuses it unless allowed to serve ungated exports",
    )
    parser.add_argument("--force", action="store_true", help=force_help)
    parser.add_argument("--quiet", action="store_true", help="no progress display")


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export",
        help="export a Hugging Face Cappy checkpoint to a verified ONNX export directory",
        description="Export a sequence-classification checkpoint (num_labels=1) to ONNX: fp32 "
        "(graph-optimised), fp16 for GPU serving, optionally int8 for CPU; measures parity "
        "against PyTorch and writes cappy_export.json.",
    )
    export.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id or local checkpoint directory (default: {DEFAULT_MODEL})",
    )
    export.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    export.add_argument("--out", required=True, type=Path, help="export directory to create")
    export.add_argument(
        "--int8",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also write model.int8.onnx, dynamically quantised (default: off)",
    )
    export.add_argument(
        "--int8-calibration",
        type=Path,
        default=None,
        metavar="JSONL",
        help="also write model.int8.xml/.bin, OpenVINO int8 statically quantised with NNCF, "
        'calibrated on this file\'s candidate sets (one per line: {"instruction": ..., '
        '"candidates"|"targets": [...]} or {"instruction": ..., "response": ...}); about a '
        "tenth is held out to measure parity (needs the int8 extra)",
    )
    export.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="max tokens per pair (default: 512, capped by the model's positions)",
    )
    add_export_flags(export, force_help="replace --out if it exists")
    export.set_defaults(handler=_export)

    verify = subparsers.add_parser(
        "verify",
        help="check an export directory (manifest, hashes, parity)",
        description="Check the manifest and file hashes of an export directory and, when the "
        "source checkpoint is reachable locally, re-measure parity. Exit 1 on any failure.",
    )
    verify.add_argument("directory", type=Path, help="the export directory")
    verify.add_argument(
        "--no-remeasure",
        action="store_true",
        help="only check the manifest, hashes and recorded parity",
    )
    verify.set_defaults(handler=_verify)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _export(args: argparse.Namespace) -> int:
    from model_export.pipeline import ExportOptions, export

    _quiet_libraries()
    result = export(
        ExportOptions(
            model=args.model,
            out=args.out,
            revision=args.revision,
            fp16=args.fp16,
            int8=args.int8,
            int8_calibration=args.int8_calibration,
            max_length=args.max_length,
            force=args.force,
            progress=not args.quiet,
            parity=args.parity,
        )
    )
    parity = result.manifest["parity"]
    fields = ("status", "gated", "max_abs_diff", "max_rel_diff", "argmax_agreement", "provider")
    summary = {
        "out": str(result.out),
        "seconds": round(result.seconds, 1),
        "models": sorted(result.manifest["models"]),
        "parity_mode": parity["mode"],
        "parity": {
            k: {f: v.get(f) for f in fields} for k, v in parity.items() if isinstance(v, dict)
        },
    }
    if parity["mode"] != "gate":
        print("warning: parity recorded, not gated (--parity record)", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from model_export.verify import verify

    _quiet_libraries()
    report = verify(args.directory, remeasure=not args.no_remeasure, progress=sys.stderr.isatty())
    for line in report.lines:
        print(line)
    for problem in report.problems:
        print(f"FAILED: {problem}")
    verdict = "ok" if report.ok else "FAILED"
    print(f"verify: {verdict}" + ("" if report.gated else " (not gated: --parity record)"))
    return 0 if report.ok else 1


def run(args: argparse.Namespace) -> int:
    """Runs a model_export subcommand; ExportError becomes a one-line message and exit 1."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing written", file=sys.stderr)
        return 130
