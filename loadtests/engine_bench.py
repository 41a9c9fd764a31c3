"""In-process engine benchmark: tokenize the bench workload with PairTokenizer, form length-sorted
batches under a token budget (rows x longest row), run a scorer, print ONE JSON line of figures.

    python -m loadtests.engine_bench --export DIR --requests ../shared/data/bench_requests.jsonl \
        --engine openvino --precision bf16 --limit 300 --reference-scores ref.json

`pairs_per_s` counts inference (padding included) plus, for a refining scorer (the service's
CPU default: OpenVINO bf16 whose near-tied leaders are re-scored in fp32, per request), the
re-scoring; `e2e_pairs_per_s` adds tokenization and batch padding. `pairs_per_cpu_s` divides by
the process's CPU time instead of wall time: on a shared machine it moves less with other load.
With --reference-scores (a JSON object {request id: [score per candidate]}, e.g.
written by --write-scores from an fp32 run) or --check-argmax (computes ONNX Runtime fp32 scores
in this run, slow), it reports the share of requests whose best candidate is the same as fp32's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.workload import batches_by_length
from service import defaults
from service.engine import cascade
from service.engine.batching_config import BatcherConfig, for_device
from service.engine.export_dir import ExportDir
from service.engine.onnx_runtime import OnnxScorer, cuda_available
from service.engine.openvino_backend import OpenVinoScorer, openvino_precision
from service.engine.scorer import RefiningScorer, load_scorer
from service.engine.tokenize import PairTokenizer
from service.engine.types import EncodedPair, Scorer, pad_batch, padded_width
from service.engine.warmup import warm_up


def build_scorer(args: argparse.Namespace, export: ExportDir, pad_token_id: int) -> Scorer:
    common: dict[str, Any] = {
        "input_names": export.input_names,
        "pad_token_id": pad_token_id,
        "output_name": export.output_name,
    }
    model_file = Path(args.model_file) if args.model_file else None
    if args.engine == "openvino":
        fast = OpenVinoScorer(
            model_file or export.model_path("fp32"),
            precision=openvino_precision(args.precision),
            hint=args.hint,
            num_streams=args.streams,
            threads=args.threads,
            extra_config=dict(kv.split("=", 1) for kv in args.ov_config),
            **common,
        )
        if not args.refine:  # None (not asked) or False
            return fast
        exact: Scorer = OpenVinoScorer(  # compiled like the fast one, as the service does
            export.model_path("fp32"),
            precision="fp32",
            hint=args.hint,
            num_streams=args.streams,
            threads=args.threads,
            extra_config={"ENABLE_CPU_PINNING": False},  # as the service's twin
            **common,
        )
        if args.refine_via_bf16:  # int8 -> bf16 (margin) -> fp32 (bf16_margin)
            bf16 = OpenVinoScorer(
                export.model_path("fp32"), precision="bf16", threads=args.threads, **common
            )
            exact = RefiningScorer(bf16, exact, margin=args.bf16_margin)
        return RefiningScorer(fast, exact, margin=args.margin)
    if args.engine == "onnxruntime":
        precision = "fp32" if args.precision == "auto" else args.precision
        return OnnxScorer(
            model_file or export.model_path(precision),
            device="cpu" if args.device == "auto" else args.device,
            precision=precision,
            threads=args.threads,
            **common,
        )
    return load_scorer(
        export,
        args.device,
        "auto",
        args.precision,
        threads=args.threads,
        streams=args.streams,
        refine=args.refine is not False,
    )


def run_batches(
    scorer: Scorer,
    encoded: list[EncodedPair],
    batches: list[list[int]],
    pad_token_id: int,
    multiple: int = 1,
) -> tuple[np.ndarray, float, float]:
    """Scores every batch, as many at once as the scorer has streams (`parallelism`, as the
    service's batcher does), each padded to a multiple of `multiple` tokens (the service's
    `pad_to_multiple`); returns scores, wall seconds of inference, seconds padding."""
    scores = np.zeros(len(encoded), dtype=np.float32)
    t0 = time.perf_counter()
    feeds = []
    for batch in batches:
        rows = [encoded[i] for i in batch]
        width = padded_width(max(row.length for row in rows), multiple)
        feeds.append(pad_batch(rows, pad_token_id, scorer.input_names, width))
    pad_s = time.perf_counter() - t0
    workers = max(1, scorer.parallelism)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for batch, values in zip(batches, pool.map(scorer.infer, feeds), strict=True):
            scores[batch] = values
    return scores, time.perf_counter() - t0, pad_s


def rescore(
    scorer: Scorer, encoded: list[EncodedPair], scores: np.ndarray, args: argparse.Namespace
) -> np.ndarray:
    """One request's scores after the service's cascade: the same leaders (cascade.leaders: the
    near-ties, when at most the service's 16) re-scored by each later stage in the same
    budget-sized batches (cascade.budgeted_chunks); synchronous, without the batchers."""
    out = np.array(scores, dtype=np.float32, copy=True)
    rows = np.arange(len(out))
    stage = scorer
    while (step := stage.refinement()) is not None and rows.size > 1:
        chosen = cascade.leaders(step, out[rows], args.max_rescored)
        if not chosen.size:
            break
        rows = rows[chosen]
        chunks = cascade.budgeted_chunks(
            [encoded[i] for i in rows],
            args.max_batch_tokens,
            args.max_batch_size,
            args.seq_multiple,
            None,
        )
        fed = [
            pad_batch(
                chunk,
                scorer.pad_token_id,
                scorer.input_names,
                padded_width(max(e.length for e in chunk), args.seq_multiple),
            )
            for chunk in chunks
        ]
        out[rows] = np.concatenate([step.exact.infer(feeds) for feeds in fed])
        stage = step.exact
    return out


def request_spans(requests: list[dict[str, Any]]) -> list[slice]:
    """Each request's slice of the flat pair list (candidates in request order)."""
    ends = list(itertools.accumulate(len(r["candidates"]) for r in requests))
    return [slice(end - len(r["candidates"]), end) for r, end in zip(requests, ends, strict=True)]


def by_request(requests: list[dict[str, Any]], scores: np.ndarray) -> dict[str, list[float]]:
    """{request id: its candidates' scores}."""
    spans = request_spans(requests)
    return {str(r["id"]): scores[span].tolist() for r, span in zip(requests, spans, strict=True)}


def argmax_agreement(
    requests: list[dict[str, Any]], scores: np.ndarray, reference: dict[str, list[float]]
) -> tuple[float, float, int]:
    agree = total = 0
    worst = 0.0
    for request, span in zip(requests, request_spans(requests), strict=True):
        ours = scores[span]
        ref = reference.get(str(request["id"]))
        if ref is None:
            continue
        ref_arr = np.asarray(ref, dtype=np.float64)
        worst = max(worst, float(np.max(np.abs(ours - ref_arr))))
        agree += int(np.argmax(ours) == np.argmax(ref_arr))
        total += 1
    return (agree / total if total else float("nan")), worst, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--export", required=True, help="export directory")
    parser.add_argument("--requests", required=True, help="JSONL of {id, instruction, candidates}")
    parser.add_argument("--engine", default="auto", choices=["auto", "onnxruntime", "openvino"])
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "fp32", "fp16", "int8", "bf16"]
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--limit", type=int, default=None, help="first N requests only")
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="padded tokens per batch (default: the service's for the device)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="pairs per batch (default: the service's for the device)",
    )
    parser.add_argument(
        "--max-rescored",
        type=int,
        default=defaults.MAX_RESCORED,
        help="most near-tied leaders of a request re-scored per stage (the service's default)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--hint", default="LATENCY", choices=["LATENCY", "THROUGHPUT"])
    parser.add_argument("--streams", type=int, default=None)
    parser.add_argument(
        "--seq-multiple",
        type=int,
        default=1,
        help="pad each batch's width to a multiple of this (the service's CAPPY_PAD_TO_MULTIPLE)",
    )
    parser.add_argument(
        "--ov-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra OpenVINO compile property (repeatable)",
    )
    parser.add_argument("--model-file", default=None, help="override the graph file")
    parser.add_argument(
        "--refine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="re-score each request's near-tied leaders with OpenVINO fp32 (default: on for "
        "--engine auto, as the service does; off for an explicit engine)",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=None,
        help="with --engine openvino --refine: the re-scoring margin (default: measured at "
        "warm-up, as the service does); with --check-argmax, what a margin keeps of fp32's winners",
    )
    parser.add_argument(
        "--refine-via-bf16",
        action="store_true",
        help="with --refine: re-score leaders in bf16, then bf16 leaders in fp32",
    )
    parser.add_argument("--bf16-margin", type=float, default=None)
    parser.add_argument("--repeat", type=int, default=1, help="timed passes (best is reported)")
    parser.add_argument("--reference-scores", default=None)
    parser.add_argument("--write-scores", default=None)
    parser.add_argument("--check-argmax", action="store_true")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 check")
    parser.add_argument(
        "--allow-ungated",
        action="store_true",
        help="load graphs that did not pass a parity gate (an export made with --parity record)",
    )
    args = parser.parse_args(argv)
    if args.engine != "openvino":  # the service's own scorer (auto) or ONNX Runtime: no such knob
        given = [
            flag
            for flag, value in (
                ("--margin", args.margin),
                ("--refine-via-bf16", args.refine_via_bf16 or None),
                ("--bf16-margin", args.bf16_margin),
                ("--ov-config", args.ov_config or None),
            )
            if value is not None
        ]
        if given:
            parser.error(f"{', '.join(given)}: only with --engine openvino (and --refine)")
    # The service's batch limits for the device, where not given: a CPU budget with a CPU row
    # limit, a GPU's with a GPU's.
    device = args.device if args.device != "auto" else ("cuda" if cuda_available() else "cpu")
    limits = for_device(
        BatcherConfig(max_batch_tokens=args.max_batch_tokens, max_batch_size=args.max_batch_size),
        device,
    )
    args.max_batch_tokens, args.max_batch_size = limits.max_batch_tokens, limits.max_batch_size

    export = ExportDir.load(
        args.export, verify_hashes=not args.no_verify, allow_ungated=args.allow_ungated
    )
    tokenizer = PairTokenizer.from_dir(
        export.path,
        max_length=export.max_length,
        with_token_type_ids="token_type_ids" in export.input_names,
    )
    with open(args.requests, encoding="utf-8") as handle:
        requests = [json.loads(line) for line in handle if line.strip()]
    if args.limit:
        requests = requests[: args.limit]
    pairs = [(r["instruction"], c) for r in requests for c in r["candidates"]]

    t0 = time.perf_counter()
    encoded = tokenizer.encode(pairs)
    tokenize_s = time.perf_counter() - t0
    batches = batches_by_length(
        [e.length for e in encoded], args.max_batch_tokens, args.max_batch_size
    )

    t0 = time.perf_counter()
    scorer = build_scorer(args, export, tokenizer.pad_token_id)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm_up(scorer, tokenizer.encode)
    warmup_s = time.perf_counter() - t0

    best: tuple[np.ndarray, float, float] | None = None
    cpu_s = float("inf")
    for _ in range(max(1, args.repeat)):
        cpu0 = time.process_time()
        result = run_batches(scorer, encoded, batches, tokenizer.pad_token_id, args.seq_multiple)
        if best is None or result[1] < best[1]:
            best = result
            cpu_s = time.process_time() - cpu0
    assert best is not None
    scores, infer_s, pad_s = best
    refine_s, refined_pairs = 0.0, 0
    if (refinement := scorer.refinement()) is not None:
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        parts = request_spans(requests)

        def rescore_part(part: slice) -> np.ndarray:
            return rescore(scorer, encoded[part], scores[part], args)

        # Each request's near-ties, on as many threads as the scorer runs batches at once (the
        # service runs them on its batch workers).
        with ThreadPoolExecutor(max_workers=max(1, scorer.parallelism)) as pool:
            refined_parts = list(pool.map(rescore_part, parts))
        for part, refined in zip(parts, refined_parts, strict=True):
            refined_pairs += int(np.count_nonzero(refined != scores[part]))
            scores[part] = refined
        refine_s = time.perf_counter() - t0
        infer_s += refine_s
        cpu_s += time.process_time() - cpu0

    real_tokens = sum(e.length for e in encoded)
    padded_tokens = sum(len(b) * max(encoded[i].length for i in b) for b in batches)
    figures: dict[str, Any] = {
        "engine": scorer.name,
        "precision": scorer.precision,
        "requests": len(requests),
        "pairs": len(pairs),
        "batches": len(batches),
        "max_batch_tokens": args.max_batch_tokens,
        "threads": args.threads,
        "hint": args.hint if args.engine == "openvino" else None,
        "streams": (scorer.describe() or {}).get("streams"),
        "seq_multiple": args.seq_multiple,
        "model_file": Path(args.model_file).name if args.model_file else None,
        "seconds": round(infer_s, 3),
        "refine_s": round(refine_s, 3),
        "refined_pairs": refined_pairs,
        "margin": refinement.margin if refinement is not None else None,
        "pairs_per_s": round(len(pairs) / infer_s, 1),
        "e2e_pairs_per_s": round(len(pairs) / (infer_s + pad_s + tokenize_s), 1),
        # CPU seconds of the whole process while scoring (all threads): less sensitive than wall
        # time to other work on a shared machine; pairs per CPU-second x cores ~ an idle machine.
        "cpu_s": round(cpu_s, 2),
        "pairs_per_cpu_s": round(len(pairs) / cpu_s, 1),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "tokenize_s": round(tokenize_s, 3),
        "pad_s": round(pad_s, 3),
        "load_s": round(load_s, 2),
        "warmup_s": round(warmup_s, 2),
        "tokens_per_pair": round(real_tokens / len(pairs), 1),
        "padding_overhead": round(padded_tokens / real_tokens - 1, 4),
    }
    reference: dict[str, list[float]] | None = None
    if args.reference_scores:
        with open(args.reference_scores, encoding="utf-8") as handle:
            reference = json.load(handle)
    elif args.check_argmax:
        fp32 = OnnxScorer(
            export.model_path("fp32"),
            input_names=export.input_names,
            pad_token_id=tokenizer.pad_token_id,
            output_name=export.output_name,
            device="cpu",
            threads=args.threads,
        )
        ref_scores, _, _ = run_batches(fp32, encoded, batches, tokenizer.pad_token_id)
        reference = by_request(requests, ref_scores)
    if reference is not None:
        agreement, worst, compared = argmax_agreement(requests, scores, reference)
        figures.update(
            argmax_agreement=round(agreement, 4), max_abs_diff=round(worst, 5), compared=compared
        )
    if args.write_scores:
        Path(args.write_scores).write_text(
            json.dumps(by_request(requests, scores)), encoding="utf-8"
        )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
