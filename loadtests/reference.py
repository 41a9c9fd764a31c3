"""`python -m loadtests.bench reference`: the fp32 scores and argmax of every workload request, from
PyTorch on the checkpoint or ONNX Runtime on the export, for --check-argmax."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtests.workload import DEFAULT_REQUESTS, batches_by_length, load_workload
from service.defaults import DEVICE_BATCH_LIMITS


def _reference_checkpoint(export: Path | None) -> Path | None:
    """The export's source checkpoint when it is a local directory (from its manifest)."""
    if export is None:
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        manifest = json.loads((export / "cappy_export.json").read_text(encoding="utf-8"))
        source = Path(str(manifest["source"]["model"]))
        if (source / "config.json").is_file():
            return source
    return None


class _TorchReference:
    """fp32 PyTorch scorer from a Hugging Face checkpoint (the export's ground truth)."""

    def __init__(self, checkpoint: Path, max_length: int, threads: int | None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            checkpoint, torch_dtype=torch.float32
        ).eval()
        self.max_length = max_length
        self.name = f"torch fp32 ({checkpoint})"

    def _encode(self, instruction: str, candidates: Sequence[str], **options: Any) -> Any:
        return self.tokenizer(
            [instruction] * len(candidates),
            list(candidates),
            truncation="longest_first",
            max_length=self.max_length,
            **options,
        )

    def lengths(self, instruction: str, candidates: Sequence[str]) -> list[int]:
        return [len(ids) for ids in self._encode(instruction, candidates)["input_ids"]]

    def score(self, instruction: str, candidates: Sequence[str]) -> list[float]:
        batch = self._encode(instruction, candidates, padding=True, return_tensors="pt")
        with self.torch.inference_mode():
            logits = self.model(**batch).logits
        return [float(v) for v in logits[:, 0].tolist()]


class _OnnxReference:
    """ONNX Runtime fp32 (CPU provider) on the export's model.onnx."""

    def __init__(self, export: Path, threads: int | None) -> None:
        import numpy as np
        import onnxruntime as ort
        from tokenizers import Tokenizer

        manifest = json.loads((export / "cappy_export.json").read_text(encoding="utf-8"))
        self.np = np
        self.inputs = list(manifest["inputs"])
        self.pad = int(manifest.get("pad_token_id") or 0)
        self.tokenizer = Tokenizer.from_file(str(export / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(manifest["max_length"]), strategy="longest_first")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        model_file = manifest["models"]["fp32"]["file"]
        self.session = ort.InferenceSession(
            str(export / model_file), options, providers=["CPUExecutionProvider"]
        )
        self.output = str(manifest.get("output") or "logits")
        self.name = f"onnxruntime fp32 ({export / model_file})"

    def _encode(self, instruction: str, candidates: Sequence[str]) -> list[Any]:
        return self.tokenizer.encode_batch([(instruction, c) for c in candidates])

    def lengths(self, instruction: str, candidates: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in self._encode(instruction, candidates)]

    def score(self, instruction: str, candidates: Sequence[str]) -> list[float]:
        np = self.np
        encoded = self._encode(instruction, candidates)
        width = max(len(e.ids) for e in encoded)
        feeds = {
            "input_ids": np.full((len(encoded), width), self.pad, dtype=np.int64),
            "attention_mask": np.zeros((len(encoded), width), dtype=np.int64),
            "token_type_ids": np.zeros((len(encoded), width), dtype=np.int64),
        }
        for row, e in enumerate(encoded):
            n = len(e.ids)
            feeds["input_ids"][row, :n] = e.ids
            feeds["attention_mask"][row, :n] = 1
            feeds["token_type_ids"][row, :n] = e.type_ids
        feeds = {name: feeds[name] for name in self.inputs}
        (logits,) = self.session.run([self.output], feeds)
        return [float(v) for v in logits[:, 0].tolist()]


def write_reference(argv: Sequence[str]) -> int:
    """`reference`: the fp32 argmax (and scores) of every workload request, as JSONL."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench reference",
        description="Compute fp32 reference scores and argmax per workload request (JSONL "
        "{id, index, scores}) for --check-argmax. PyTorch fp32 from the checkpoint when one is "
        "given or the export's manifest names a local one, else ONNX Runtime fp32 from the "
        "export's model.onnx.",
    )
    parser.add_argument("--requests", default=str(DEFAULT_REQUESTS), help="workload JSONL")
    parser.add_argument("--out", required=True, help="JSONL to write")
    parser.add_argument("--checkpoint", default=None, help="Hugging Face checkpoint directory")
    parser.add_argument("--export", default=None, help="export directory")
    parser.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto")
    parser.add_argument("--limit", type=int, default=None, help="first N requests only")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="truncation length (default: the export's, else 512)",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=DEVICE_BATCH_LIMITS["cpu"][0],
        help="padded tokens per batch (default: the service's on the CPU, %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    from tqdm import tqdm

    export = Path(args.export) if args.export else None
    checkpoint = Path(args.checkpoint) if args.checkpoint else _reference_checkpoint(export)
    max_length = args.max_length
    if max_length is None and export is not None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            manifest = json.loads((export / "cappy_export.json").read_text(encoding="utf-8"))
            max_length = int(manifest["max_length"])
    max_length = max_length or 512
    backend = args.backend
    if backend == "auto":
        backend = "torch" if checkpoint is not None else "onnx"
    scorer: _TorchReference | _OnnxReference
    if backend == "torch":
        if checkpoint is None:
            raise SystemExit(
                "error: --backend torch needs --checkpoint (or an export whose "
                "manifest names a local checkpoint)"
            )
        scorer = _TorchReference(checkpoint, max_length, args.threads)
    else:
        if export is None:
            raise SystemExit("error: --backend onnx needs --export")
        scorer = _OnnxReference(export, args.threads)

    workload = load_workload(args.requests, args.limit)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    started = time.perf_counter()
    total_pairs = sum(len(r["candidates"]) for r in workload)
    with (
        open(partial, "w", encoding="utf-8") as handle,
        tqdm(
            total=total_pairs, unit="pair", desc=f"reference ({backend} fp32)", file=sys.stderr
        ) as progress,
    ):
        for item in workload:
            candidates = item["candidates"]
            lengths = scorer.lengths(item["instruction"], candidates)
            scores = [0.0] * len(candidates)
            for batch in batches_by_length(lengths, args.max_batch_tokens):
                values = scorer.score(item["instruction"], [candidates[i] for i in batch])
                for i, value in zip(batch, values, strict=True):
                    scores[i] = value
                progress.update(len(batch))
            best = min(range(len(scores)), key=lambda i: (-scores[i], i))
            ordered = sorted(scores, reverse=True)
            margin = ordered[0] - ordered[1] if len(ordered) > 1 else None
            handle.write(
                json.dumps({"id": item["id"], "index": best, "scores": scores, "margin": margin})
                + "\n"
            )
    partial.replace(out)
    print(
        json.dumps(
            {
                "reference": str(out),
                "backend": scorer.name,
                "requests": len(workload),
                "pairs": total_pairs,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )
    return 0
