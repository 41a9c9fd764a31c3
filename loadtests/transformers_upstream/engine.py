"""The model side: loading a causal LM (a GGUF file, dequantized by transformers, or a checkpoint
directory) with its tokenizer and chat template, and `Engine.generate`: ONE batched `generate`
over left-padded rows, each sampled by its own parameters (loadtests.transformers_upstream.
sampling), cut at its own end-of-sequence or token budget."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessorList,
)

from loadtests.transformers_upstream.sampling import RowSampler, SamplingParams

logger = logging.getLogger(__name__)

# ChatML, for tokenizers without a chat template of their own (SmolLM2's GGUF carries one).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")

Finish = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class Row:
    """One sequence to generate: a tokenized prompt and how to continue it."""

    prompt_ids: Sequence[int]
    params: SamplingParams
    max_new_tokens: int
    top_logprobs: int = 0


@dataclass(slots=True)
class RowOutput:
    """What one row generated, its end-of-sequence token excluded."""

    token_ids: list[int]
    logprobs: list[float]
    finish: Finish
    top: list[list[tuple[int, float]]] | None = None


@dataclass
class EngineStats:
    """Counters of `Engine.generate` (read by /stats and the tests)."""

    generate_calls: int = 0
    rows: int = 0
    prompt_tokens: int = 0
    padded_prompt_tokens: int = 0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    max_rows: int = 0
    oom_splits: int = 0
    batch_sizes: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        calls = self.generate_calls
        return {
            "generate_calls": calls,
            "rows": self.rows,
            "mean_rows": round(self.rows / calls, 2) if calls else None,
            "max_rows": self.max_rows,
            "prompt_tokens": self.prompt_tokens,
            "prompt_padding_fraction": round(1 - self.prompt_tokens / self.padded_prompt_tokens, 4)
            if self.padded_prompt_tokens
            else None,
            "generated_tokens": self.generated_tokens,
            "generate_seconds": round(self.generate_seconds, 3),
            "generated_tokens_per_s": round(self.generated_tokens / self.generate_seconds, 1)
            if self.generate_seconds
            else None,
            "oom_splits": self.oom_splits,
        }


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


class Engine:
    """A causal LM and its tokenizer on one device; `generate` runs one batch."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.eos_ids = end_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(self.eos_ids))
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.stats = EngineStats()
        # A clean configuration: no model default (a repetition penalty, say) may process the
        # logits before RowSampler sees them raw.
        self.model.generation_config = GenerationConfig(
            bos_token_id=getattr(model.generation_config, "bos_token_id", None),
            eos_token_id=list(self.eos_ids),
            pad_token_id=self.pad_id,
        )

    @classmethod
    def load(
        cls,
        *,
        gguf: Path | None = None,
        model_dir: Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
    ) -> Engine:
        """The model of a GGUF file (transformers dequantizes it; needs the `gguf` package) or of
        a checkpoint directory, in `dtype` on `device`, in eval mode."""
        target = pick_device(device)
        torch_dtype = pick_dtype(dtype, target)
        if gguf is not None:
            folder, options = str(gguf.parent), {"gguf_file": gguf.name}
        elif model_dir is not None:
            folder, options = str(model_dir), {}
        else:
            raise ValueError("give a GGUF file or a model directory")
        started = time.monotonic()
        tokenizer = AutoTokenizer.from_pretrained(folder, **options)
        model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **options)
        model = model.to(target).eval()
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = CHATML_TEMPLATE
        logger.info(
            "loaded %s (%s, %s) on %s in %.1f s",
            gguf or model_dir,
            model.config.model_type,
            torch_dtype,
            target,
            time.monotonic() - started,
        )
        return cls(model, tokenizer, target)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids of a conversation rendered by the chat template, ready for the reply."""
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text_prompt(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def generate(self, rows: Sequence[Row]) -> list[RowOutput]:
        """One batched `generate` over `rows` (left-padded to the longest prompt, run to the
        largest `max_new_tokens`); each row is cut at its first end token ("stop") or its own
        budget ("length")."""
        if not rows:
            return []
        width = max(len(r.prompt_ids) for r in rows)
        max_new = max(r.max_new_tokens for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        pads = []
        for i, row in enumerate(rows):
            pad = width - len(row.prompt_ids)
            pads.append(pad)
            input_ids[i, pad:] = torch.tensor(list(row.prompt_ids), dtype=torch.long)
            attention[i, pad:] = 1
        top_k = max(r.top_logprobs for r in rows)
        sampler = RowSampler(
            [r.params for r in rows],
            prompt_pad=pads,
            max_new_tokens=max_new,
            top_logprobs=top_k,
            device=self.device,
        )
        config = GenerationConfig(
            max_new_tokens=max_new,
            do_sample=False,
            num_beams=1,
            eos_token_id=list(self.eos_ids),
            pad_token_id=self.pad_id,
        )
        started = time.monotonic()
        with torch.inference_mode():
            sequences = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler]),
            )
            new = sequences[:, width:].cpu()
            logprobs = sampler.chosen_logprobs().float().cpu()
            top = sampler.top()
            top_cpu = (top[0].float().cpu(), top[1].cpu()) if top is not None else None
        outputs = [self._cut(i, row, new, logprobs, top_cpu) for i, row in enumerate(rows)]
        stats = self.stats
        stats.generate_calls += 1
        stats.rows += len(rows)
        stats.max_rows = max(stats.max_rows, len(rows))
        stats.prompt_tokens += sum(len(r.prompt_ids) for r in rows)
        stats.padded_prompt_tokens += width * len(rows)
        stats.generated_tokens += sum(len(o.token_ids) for o in outputs)
        stats.generate_seconds += time.monotonic() - started
        return outputs

    def generate_fitting(self, rows: Sequence[Row]) -> list[RowOutput]:
        """`generate`, split in halves (recursively) when the device runs out of memory."""
        try:
            return self.generate(rows)
        except torch.OutOfMemoryError:
            if len(rows) < 2:
                raise
        self.stats.oom_splits += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(rows) // 2
        logger.warning(
            "out of memory at %d rows: running them as %d + %d", len(rows), half, len(rows) - half
        )
        return self.generate_fitting(rows[:half]) + self.generate_fitting(rows[half:])

    def _cut(
        self,
        i: int,
        row: Row,
        new: torch.Tensor,
        logprobs: torch.Tensor,
        top: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> RowOutput:
        ids = new[i].tolist()[: row.max_new_tokens]
        finish: Finish = "length"
        for n, token in enumerate(ids):
            if token in self.eos_ids:
                ids, finish = ids[:n], "stop"
                break
        count = len(ids)
        lp = logprobs[i, :count].tolist()
        best = None
        if top is not None and row.top_logprobs > 0:
            values, tokens = top
            best = [
                list(
                    zip(
                        tokens[i, s, : row.top_logprobs].tolist(),
                        values[i, s, : row.top_logprobs].tolist(),
                        strict=True,
                    )
                )
                for s in range(count)
            ]
        return RowOutput(token_ids=ids, logprobs=lp, finish=finish, top=best)


def end_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokens that end a reply: the model's and the tokenizer's end-of-sequence, and the
    usual chat end markers that the vocabulary holds."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list | tuple):
        ids.update(int(t) for t in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[t]) for t in _END_TOKENS if t in vocab)
    if not ids:
        raise ValueError("the model has no end-of-sequence token")
    return frozenset(ids)
