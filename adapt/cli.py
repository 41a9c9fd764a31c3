"""`cappy adapt data`, `cappy adapt train` and `cappy eval`: argument parsing, one-line errors and
the summary each prints; the work is in adapt.data, adapt.train and adapt.evaluate. torch and
transformers are imported only by `adapt train`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from adapt import options
from adapt.errors import AdaptError
from model_export.cli import add_export_flags

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Options = TypeVar("_Options", bound="DataclassInstance")

API_KEY_ENV = "CAPPY_UPSTREAM_API_KEY"
# What the `adapt` extra installs (pyproject.toml).
_EXTRA_MODULES = ("rouge_score", "accelerate", "matplotlib")
UPSTREAM_ENV = "CAPPY_UPSTREAM_BASE_URL"


def _examples_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--split", default=None, help="keep only examples whose `split` is this (e.g. train, test)"
    )
    parser.add_argument(
        "--task",
        dest="tasks",
        action="append",
        default=None,
        metavar="TASK",
        help="keep only this task (repeatable; default: every task)",
    )
    parser.add_argument(
        "--examples-per-task",
        type=int,
        default=None,
        metavar="N",
        help="the first N examples of each task, in file order, after --split (default: all)",
    )


def _upstream_flags(parser: argparse.ArgumentParser, *, required_for: str) -> None:
    parser.add_argument(
        "--upstream",
        default=os.environ.get(UPSTREAM_ENV),
        metavar="URL",
        help=f"OpenAI-compatible API root incl. version, e.g. http://127.0.0.1:8080/v1 "
        f"(default: ${UPSTREAM_ENV}); {required_for}",
    )
    parser.add_argument(
        "--model", default=None, help="upstream model name (default: the first it lists)"
    )
    parser.add_argument(
        "--api-key-env",
        default=API_KEY_ENV,
        metavar="VAR",
        help=f"environment variable holding the upstream API key (default: {API_KEY_ENV}); "
        "never pass a key on the command line",
    )
    parser.add_argument(
        "--max-tokens", type=int, help="new tokens per sample (default: %(default)s)"
    )
    parser.add_argument(
        "--endpoint",
        choices=("chat", "completions"),
        help="chat: the instruction as one user message (default); completions: as the prompt",
    )
    parser.add_argument(
        "--no-top-k",
        dest="send_top_k",
        action="store_false",
        help="send neither top_k nor llama.cpp's sampler extras (min_p 0, repeat_penalty 1); "
        "without it both are sent and an upstream that refuses them (e.g. OpenAI) is found "
        "from the first calls, as the proxy does",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        help="upstream calls in flight (default: %(default)s; llama.cpp's server runs one at a "
        "time)",
    )
    parser.add_argument(
        "--timeout",
        dest="timeout_s",
        type=float,
        metavar="SECONDS",
        help="seconds per call, retries included (default: %(default)s)",
    )
    parser.add_argument(
        "--max-failures",
        type=int,
        help="stop after this many failed calls (default: %(default)s); failed samples are asked "
        "again "
        "on the next run",
    )


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    adapt = subparsers.add_parser(
        "adapt",
        help="adapt the scorer to a downstream task: regression data, fine-tuning",
        description="Adapt Cappy to your task (the paper's section 3.4): `adapt data` builds "
        "regression data from your examples and the upstream LLM's own samples; `adapt train` "
        "fine-tunes a scorer on it and exports it.",
    )
    steps = adapt.add_subparsers(dest="adapt_command", required=True, metavar="STEP")

    data = steps.add_parser(
        "data",
        help="build regression data from examples and the LLM's samples",
        description="Each example gives (instruction, reference) -> 1.0, (instruction, a "
        "reference of another example of the same task) -> 0.0, and the LLM's samples -> "
        "Rouge-L against the references; de-duplicated and shuffled. Every LLM answer is "
        "cached as it arrives: an interrupted run resumes where it stopped.",
    )
    data.add_argument(
        "--train",
        type=Path,
        required=True,
        help='JSONL examples: {"instruction", "targets": [...], "task"?, "id"?, "split"?}',
    )
    data.add_argument("--out", type=Path, required=True, help="output directory")
    _examples_flags(data)
    data.add_argument(
        "--samples-per-example",
        type=int,
        metavar="N",
        help="LLM samples per example, 0-17, taken round-robin over the paper's recipe "
        "(default: %(default)s, the whole recipe; 0: no LLM, ground truth and mismatches only)",
    )
    data.add_argument(
        "--sampled-examples-per-task",
        type=int,
        default=None,
        metavar="N",
        help="LLM samples for the first N selected examples of each task only (the sampling "
        "budget); ground truth and mismatches still come from every selected example "
        "(default: samples for all)",
    )
    data.add_argument(
        "--no-mismatch", dest="mismatch", action="store_false", help="no mismatched pairs"
    )
    data.add_argument("--seed", type=int, help="seeds, mismatches, shuffle (default %(default)s)")
    data.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="the sample cache (default: OUT/samples.jsonl)",
    )
    _upstream_flags(data, required_for="required unless --samples-per-example 0")
    data.add_argument("--quiet", action="store_true", help="no progress bars")
    _defaults_from(data, options.DataOptions)
    data.set_defaults(handler=_data)

    train = steps.add_parser(
        "train",
        help="fine-tune a scorer on `adapt data` output and export it",
        description="Fine-tune with Hugging Face's Trainer (MSE, AdamW, linear warm-up and "
        "decay), then export and verify through model_export: OUT is a servable export "
        "directory. Multi-GPU: run this under torchrun or accelerate launch.",
    )
    train.add_argument(
        "--data", type=Path, required=True, help="`adapt data` output (or its pairs.jsonl)"
    )
    train.add_argument(
        "--base",
        required=True,
        help="hub id (btan2/cappy-large), local checkpoint, or an encoder without a regression "
        "head (one is added, num_labels=1)",
    )
    train.add_argument("--out", type=Path, required=True, help="export directory to create")
    train.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="where the fine-tuned checkpoint goes (default: OUT.checkpoint)",
    )
    train.add_argument("--revision", default=None, help="hub revision of --base")
    train.add_argument("--steps", type=int, help="optimiser steps (default: %(default)s)")
    train.add_argument(
        "--lr", dest="learning_rate", type=float, help="peak lr (default: %(default)s)"
    )
    train.add_argument(
        "--warmup-ratio", type=float, help="linear warm-up share (default: %(default)s)"
    )
    train.add_argument(
        "--effective-batch",
        type=int,
        help="pairs per optimiser step: micro-batch x accumulation x processes "
        "(default: %(default)s)",
    )
    train.add_argument(
        "--micro-batch", type=int, help="pairs per forward pass (default: %(default)s)"
    )
    train.add_argument("--max-length", type=int, help="tokens per pair (default: %(default)s)")
    train.add_argument("--weight-decay", type=float, help="AdamW (default: %(default)s)")
    train.add_argument("--optim", help="Trainer optimiser name (default: %(default)s)")
    train.add_argument("--seed", type=int, help="training seed (default: %(default)s)")
    train.add_argument(
        "--logging-steps", type=int, help="loss logged every N steps (default: %(default)s)"
    )
    train.add_argument(
        "--bf16",
        action="store_true",
        help="bf16 mixed precision (GPUs, and CPUs with native bf16 such as AMX)",
    )
    train.add_argument(
        "--group-by-length",
        action="store_true",
        help="batches of similar lengths (less padding, but a step then holds one or two tasks; "
        "default: random batches)",
    )
    train.add_argument(
        "--eval-fraction",
        type=float,
        help="share of each task's examples held out, all of an example's pairs together, and "
        "evaluated (default: %(default)s; 0: none, no early stop)",
    )
    train.add_argument(
        "--eval-steps",
        type=int,
        default=None,
        metavar="N",
        help="evaluate on the held-out examples and save a checkpoint every N steps "
        "(default: a tenth of --steps, at least 10)",
    )
    train.add_argument(
        "--early-stopping-patience",
        type=int,
        metavar="N",
        help="stop after N evaluations without a better held-out selection Rouge-L (or ground "
        "truth above mismatch, without samples); the best checkpoint is kept (default: "
        "%(default)s; 0: train every step, still keeping the best)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run (crash, kill, Ctrl-C) from its last checkpoint",
    )
    train.add_argument(
        "--head-lr",
        dest="head_learning_rate",
        type=float,
        default=None,
        help="learning rate of the regression head (and BERT's pooler); default: --lr",
    )
    train.add_argument(
        "--pooling",
        choices=("cls", "mean"),
        default=None,
        help="mean: score from the mean of the last layer, for embedding-model bases whose "
        "[CLS] was never trained (sentence-transformers); the export computes it too "
        "(default: the base's, cls for most)",
    )
    train.add_argument(
        "--listwise",
        dest="listwise_weight",
        type=float,
        metavar="WEIGHT",
        help="add WEIGHT x a listwise loss ranking each example's candidates against their "
        "labels (batches then hold whole examples; default: %(default)s, MSE alone)",
    )
    train.add_argument("--int8", action="store_true", help="export model.int8.onnx as well")
    add_export_flags(train, force_help="replace OUT and the checkpoint if they exist")
    _defaults_from(train, options.TrainOptions)
    train.set_defaults(handler=_train)

    evaluate = subparsers.add_parser(
        "eval",
        help="measure selection quality: Cappy vs self-scoring, greedy, nucleus, random, oracle",
        description="For every example, 17 LLM samples with the paper's recipe (with token "
        "log-probabilities, cached as they arrive), then the Rouge-L of the sample each method "
        "picks, per task and overall; writes report.md, report.json, report.png. With "
        "--samples CACHE and no --upstream, the LLM is not called.",
    )
    evaluate.add_argument("--data", type=Path, required=True, help="JSONL test examples")
    evaluate.add_argument(
        "--scorer", type=Path, default=None, help="export directory to evaluate (Cappy's picks)"
    )
    evaluate.add_argument(
        "--samples",
        type=Path,
        default=None,
        metavar="CACHE",
        help="the sample cache (default: OUT/samples.jsonl); without --upstream, read only",
    )
    evaluate.add_argument(
        "--out", type=Path, default=Path("cappy-eval"), help="report directory (cappy-eval)"
    )
    _examples_flags(evaluate)
    evaluate.add_argument(
        "--seed", type=int, help="call seeds and the random pick (default %(default)s)"
    )
    _upstream_flags(evaluate, required_for="without it, every sample must be in the cache")
    evaluate.add_argument(
        "--engine",
        choices=("onnxruntime", "openvino", "auto"),
        help="scorer engine (default: %(default)s, fp32: the exact scores)",
    )
    evaluate.add_argument(
        "--precision", help="scorer precision (default: %(default)s; auto, bf16, int8)"
    )
    evaluate.add_argument("--threads", type=int, default=None, help="scorer threads")
    evaluate.add_argument(
        "--allow-ungated", action="store_true", help="accept an export made with --parity record"
    )
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    _defaults_from(evaluate, options.EvalOptions)
    evaluate.set_defaults(handler=_eval)


def _defaults_from(parser: argparse.ArgumentParser, cls: type) -> None:
    """Each flag of `parser` whose destination is a field of the options dataclass `cls` takes
    that field's default: the default is stated once, in the dataclass."""
    fields = {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }
    parser.set_defaults(
        **{a.dest: fields[a.dest] for a in parser._actions if a.dest in fields}  # noqa: SLF001
    )


def _options(cls: type[_Options], args: argparse.Namespace, **derived: Any) -> _Options:
    """A command's options dataclass, each field from the flag of the same name; `derived` gives
    the fields that no flag names directly."""
    return cls(
        **{
            f.name: derived[f.name] if f.name in derived else getattr(args, f.name)
            for f in dataclasses.fields(cls)
        }
    )


def _sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The fields `cappy adapt data` and `cappy eval` share that no flag names directly. The key
    comes from the environment only, never from a flag."""
    return {
        "api_key": os.environ.get(args.api_key_env) or None,
        "progress": not args.quiet,
    }


def _data(args: argparse.Namespace) -> int:
    from adapt.data import run

    result = run(_options(options.DataOptions, args, **_sampling_options(args)))
    manifest = result.manifest
    keys = ("examples", "pairs", "pairs_by_source", "samples", "cache")
    print(json.dumps({"out": str(result.out), **{k: manifest[k] for k in keys}}))
    return 0


def _train(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from adapt.train import train

    hf_logging.set_verbosity_error()
    if args.quiet:
        hf_logging.disable_progress_bar()
    result = train(_options(options.TrainOptions, args, progress=not args.quiet))
    if result.out is None:  # not the main process of a distributed run
        return 0
    summary: dict[str, Any] = {
        "out": str(result.out),
        "checkpoint": str(result.checkpoint),
        "first_loss": result.losses[0][1] if result.losses else None,
        "last_loss": result.losses[-1][1] if result.losses else None,
        "best": result.best,
        "seconds": round(result.seconds, 1),
        "verify": "ok",
    }
    print(json.dumps(summary))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from adapt.evaluate import run

    result = run(_options(options.EvalOptions, args, **_sampling_options(args)))
    print(result.markdown.read_text(), end="")
    print(f"wrote {result.markdown}, {result.json}, {result.chart}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    """Runs `adapt data|train` or `eval`; AdaptError becomes a one-line message and exit 1."""
    from adapt.train import TrainingInterrupted
    from model_export.errors import ExportError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args))
    except TrainingInterrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 130
    except (AdaptError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        missing = exc.name if exc.name in _EXTRA_MODULES else None
        missing = missing or next((m for m in _EXTRA_MODULES if m in str(exc)), None)
        if missing is None:
            raise
        print(
            f"error: {missing} is not installed; install the adapt extra: "
            "pip install 'cappy-serve[adapt]'",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            "error: interrupted; every LLM answer received is in the sample cache, re-run the "
            "same command to resume",
            file=sys.stderr,
        )
        return 130
