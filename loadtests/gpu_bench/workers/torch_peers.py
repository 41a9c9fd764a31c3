"""The PyTorch scorers on the stand-in checkpoint: transformers' AutoModelForSequenceClassification
in length-sorted batches (fp32 with TF32 off: the reference; fp16 on CUDA: a peer) and
sentence-transformers' CrossEncoder.predict, in bulk and one request at a time."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loadtests.stats import percentile
from loadtests.workload import batches_by_length, load_workload


def pad_columns(
    encoded: dict[str, list[list[int]]], batch: Sequence[int], pad_id: int
) -> dict[str, Any]:
    """One right-padded int64 array per tokenizer output column for the rows in `batch`."""
    import numpy as np

    width = max(len(encoded["input_ids"][i]) for i in batch)
    arrays = {}
    for key, column in encoded.items():
        array = np.full((len(batch), width), pad_id if key == "input_ids" else 0, dtype=np.int64)
        for row, i in enumerate(batch):
            array[row, : len(column[i])] = column[i]
        arrays[key] = array
    return arrays


def workload_pairs(requests_path: str, limit: int) -> tuple[list[dict[str, Any]], list[int]]:
    """The first `limit` requests (0: all) and each pair's request index."""
    requests = load_workload(requests_path, limit or None)
    owner = [n for n, r in enumerate(requests) for _ in r["candidates"]]
    return requests, owner


def by_request(
    requests: Sequence[dict[str, Any]], owner: Sequence[int], scores: Sequence[float]
) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {str(r["id"]): [] for r in requests}
    for n, score in zip(owner, scores, strict=True):
        out[str(requests[n]["id"])].append(float(score))
    return out


def torch_device(device: str) -> tuple[Any, str, Any]:
    """(torch, its device string, the GPU's name or None)."""
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch sees no GPU")
        return torch, "cuda", torch.cuda.get_device_name(0)
    return torch, "cpu", None


def worker_transformers(args: argparse.Namespace, fp32: bool) -> dict[str, Any]:
    """Length-sorted batches of --batch-size rows through AutoModelForSequenceClassification:
    fp16 on CUDA (the peer), or fp32 with TF32 off (the reference). Timed: tokenisation,
    padding and inference of every pair."""
    torch, device, device_name = torch_device(args.device)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dtype = torch.float16 if device == "cuda" and not fp32 else torch.float32
    requests, owner = workload_pairs(args.requests, args.limit)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    loaded = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(args.checkpoint)
    model = model.to(device=device, dtype=dtype).eval()
    load_s = time.perf_counter() - loaded
    instructions = [requests[n]["instruction"] for n in owner]
    candidates = [c for r in requests for c in r["candidates"]]

    def score_all(firsts: list[str], seconds: list[str]) -> tuple[list[float], int]:
        encoded = tokenizer(firsts, seconds, truncation="longest_first", max_length=args.max_length)
        columns = {
            k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded
        }
        lengths = [len(ids) for ids in columns["input_ids"]]
        outputs, order = [], []
        with torch.inference_mode():
            for batch in batches_by_length(lengths, max_rows=args.batch_size):
                feeds = {
                    k: torch.from_numpy(v).to(device)
                    for k, v in pad_columns(columns, batch, tokenizer.pad_token_id).items()
                }
                outputs.append(model(**feeds).logits[:, 0])
                order.extend(batch)
            values = torch.cat(outputs).float().cpu().tolist()
        scores = [0.0] * len(values)
        for i, value in zip(order, values, strict=True):
            scores[i] = value
        return scores, sum(lengths)

    score_all(instructions[: args.batch_size], candidates[: args.batch_size])  # warm-up
    t_start, started = time.time(), time.perf_counter()
    scores, tokens = score_all(instructions, candidates)
    seconds = time.perf_counter() - started
    Path(args.scores_out).write_text(
        json.dumps(by_request(requests, owner, scores)), encoding="utf-8"
    )
    return {
        "kind": args.kind,
        "scores": args.scores_out,
        "dtype": str(dtype).replace("torch.", ""),
        "device_name": device_name,
        "requests": len(requests),
        "pairs": len(owner),
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "t_start": t_start,
        "t_end": t_start + seconds,
        "load_s": round(load_s, 2),
        "batch_rows": args.batch_size,
    }


def _identity_activation(predict: Callable[..., Any], torch: Any) -> dict[str, Any]:
    """predict's keyword for raw logits (sentence-transformers >= 4: activation_fn; 3: _fct):
    its default sigmoid saturates in fp16 and turns distinct scores into ties."""
    import inspect

    parameters = inspect.signature(predict).parameters
    for name in ("activation_fn", "activation_fct"):
        if name in parameters:
            return {name: torch.nn.Identity()}
    return {}


def worker_crossencoder(args: argparse.Namespace) -> dict[str, Any]:
    """sentence-transformers CrossEncoder.predict: the first --limit requests' pairs in one call
    (--batch-size rows a batch), then the first --per-request-limit requests one call each, with
    their latency (figures under "per_request")."""
    torch, device, device_name = torch_device(args.device)
    import sentence_transformers
    from sentence_transformers import CrossEncoder

    loaded = time.perf_counter()
    encoder = CrossEncoder(args.checkpoint, device=device, max_length=args.max_length)
    if device == "cuda":  # sentence-transformers >= 4 is a Module; 3 holds the model
        (encoder if isinstance(encoder, torch.nn.Module) else encoder.model).half()
    load_s = time.perf_counter() - loaded
    options = {
        "batch_size": args.batch_size,
        "show_progress_bar": False,
        "convert_to_numpy": True,
        **_identity_activation(encoder.predict, torch),
    }
    common = {
        "kind": args.kind,
        "dtype": "float16" if device == "cuda" else "float32",
        "device_name": device_name,
        "sentence_transformers": sentence_transformers.__version__,
        "load_s": round(load_s, 2),
        "batch_rows": args.batch_size,
    }

    def run(limit: int, per_request: bool, scores_out: Path) -> dict[str, Any]:
        requests, owner = workload_pairs(args.requests, limit)
        pairs = [(r["instruction"], c) for r in requests for c in r["candidates"]]
        lengths = encoder.tokenizer(
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            truncation=True,
            max_length=args.max_length,
        )["input_ids"]
        encoder.predict(pairs[: args.batch_size], **options)  # warm-up
        latencies: list[float] = []
        scores: list[float] = []
        t_start, started = time.time(), time.perf_counter()
        if per_request:
            for r in requests:
                sent = time.perf_counter()
                values = encoder.predict(
                    [(r["instruction"], c) for c in r["candidates"]], **options
                )
                latencies.append((time.perf_counter() - sent) * 1000)
                scores.extend(float(v) for v in values)
        else:
            scores = [float(v) for v in encoder.predict(pairs, **options)]
        seconds = time.perf_counter() - started
        scores_out.write_text(json.dumps(by_request(requests, owner, scores)), encoding="utf-8")
        return {
            **common,
            "one_request_per_call": per_request,
            "requests": len(requests),
            "pairs": len(pairs),
            "tokens": sum(len(ids) for ids in lengths),
            "seconds": round(seconds, 3),
            "t_start": t_start,
            "t_end": t_start + seconds,
            "scores": str(scores_out),
            "latency_ms": {"p50": percentile_ms(latencies, 50), "p99": percentile_ms(latencies, 99)}
            if per_request
            else None,
        }

    scores_out = Path(args.scores_out)
    figures = run(args.limit, False, scores_out)
    if args.per_request_limit > 0:
        per_request_out = scores_out.with_name(scores_out.stem + "_per_request.json")
        figures["per_request"] = run(args.per_request_limit, True, per_request_out)
    return figures


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    value = percentile(values, q)
    return None if value is None else round(value, 1)
