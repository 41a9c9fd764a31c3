"""The naive baseline the service is measured against: a Hugging Face checkpoint in PyTorch bf16
behind FastAPI, with none of the service's work (no export, no batching across requests, no
length bucketing, no admission).

    python -m loadtests.naive_server --model CHECKPOINT_DIR --port 8001 [--threads N]
    python -m loadtests.bench --self-contained --server naive --export CHECKPOINT_DIR ...

`POST /select {"instruction", "candidates"}` tokenizes the request's pairs (padded to its
longest), runs them as one batch with every core (one request at a time: concurrent batches would
only fight over the cores), and answers `{"index", "scores"}` as the service's /select does.
A checkpoint that scores from mean pooling (`"cappy_pooling": "mean"` in its config, as `cappy
adapt train` writes for embedding-model bases) is scored that way, as its export is.
`GET /ready` says when the model is loaded. A benchmark baseline, never part of the product.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field


class Select(BaseModel):
    instruction: str
    candidates: list[str] = Field(min_length=1)


def build_app(checkpoint: str, *, max_length: int, threads: int | None = None) -> Any:
    import torch
    from fastapi import FastAPI
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from model_export import pooling

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(
        checkpoint, dtype=torch.bfloat16
    ).eval()
    if pooling.pooling_of(model.config) == "mean":  # the checkpoint's own score, as exported
        pooling.use_mean_pooling(model)
    lock = threading.Lock()

    app = FastAPI(title="naive bf16 baseline")

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/select")
    def select(body: Select) -> dict[str, Any]:
        batch = tokenizer(
            [body.instruction] * len(body.candidates),
            body.candidates,
            truncation="longest_first",
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        with lock, torch.inference_mode():
            logits = model(**batch).logits[:, 0].float()
        scores = logits.tolist()
        return {"index": int(logits.argmax()), "scores": scores}

    return app


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m loadtests.naive_server", description=__doc__)
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--max-length", type=int, default=512, help="truncation length (the exports': 512)"
    )
    args = parser.parse_args(argv)
    uvicorn.run(
        build_app(args.model, max_length=args.max_length, threads=args.threads),
        host=args.host,
        port=args.port,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
