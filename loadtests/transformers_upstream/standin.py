"""A tiny random causal LM saved as a checkpoint directory, for tests and dry runs on a CPU: a
2-layer LlamaForCausalLM and a byte-level BPE trained in a second with `tokenizers`, with
SmolLM2's specials (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`) and a ChatML chat template.
Served with `python -m loadtests.transformers_upstream --model DIR`."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from loadtests.transformers_upstream.engine import CHATML_TEMPLATE

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CORPUS = (
    "Answer the question. What is the capital of France? Paris is the capital of France.",
    "Translate to German: the weather is nice today. Das Wetter ist heute schön.",
    "Solve 17 + 25. The answer is 42. Sort the list: 3 1 2 -> 1 2 3.",
    "the model answers a question about rivers mountains history code music physics recipes",
    "Q: Which word does not belong? apple banana car. A: car. user assistant system",
)


def build_tiny_llama(
    directory: Path, *, seed: int = 0, corpus: Iterable[str] = (), vocab_size: int = 512
) -> Path:
    """Writes the model, its tokenizer and generation config to `directory` and returns it."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [*_CORPUS, *corpus] * 4,
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIALS),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=2048,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # Wide random weights: peaked next-token distributions, so that greedy, top-k and
        # nucleus sampling differ visibly.
        initializer_range=0.3,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory
