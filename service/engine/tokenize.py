"""Pair tokenization: (instruction, response) -> EncodedPair, exactly as Hugging Face's
`tokenizer(instruction, response, truncation=True, max_length=...)` does it, with only the
`tokenizers` library (no transformers in the service).

The tokenizer's truncation and padding state is fixed once at construction and never touched
again. That matters twice over: a saved tokenizer.json may carry its own truncation/padding
settings (sentence-transformers saves `max_length: 128`, for instance), and mutating a
`tokenizers.Tokenizer` while another thread is inside `encode_batch` (which releases the GIL)
fails with "Already borrowed". Read-only use from many threads is safe.

Text the Rust tokenizer cannot take (a lone surrogate, which is not Unicode, or a non-string)
raises `UnencodableText` naming the pair, never the library's bare TypeError: the HTTP schemas
refuse such text first; this is the guard behind them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

from service.engine.errors import EngineError
from service.engine.types import EncodedPair

logger = logging.getLogger(__name__)

_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|padding|>")
_SURROGATE = re.compile("[\ud800-\udfff]")


class TokenizerError(ValueError):
    """The tokenizer files of an export directory are missing or unusable."""


class UnencodableText(EngineError):
    """A text of the request cannot be tokenized: it holds a lone surrogate (not Unicode) or is
    not a string. The caller's input is at fault; nothing was queued.

    Attributes:
        pair: index of the first offending pair in the request (None when unknown).
        side: "instruction" or "response" (None when unknown).
    """

    def __init__(self, pair: int | None = None, side: str | None = None) -> None:
        where = f"pair {pair}: the {side}" if pair is not None and side else "a text"
        super().__init__(
            f"{where} cannot be tokenized: it is not valid Unicode text (a lone surrogate?)"
        )
        self.pair = pair
        self.side = side


def _is_unencodable(text: object) -> bool:
    return not isinstance(text, str) or _SURROGATE.search(text) is not None


def _unencodable(pairs: Sequence[tuple[str, str]]) -> UnencodableText:
    """The error naming the first pair whose instruction or response the tokenizer refuses."""
    for i, pair in enumerate(pairs):
        for side, text in zip(("instruction", "response"), pair, strict=False):
            if _is_unencodable(text):
                return UnencodableText(i, side)
    return UnencodableText()


@dataclass(frozen=True)
class _PairTemplate:
    """Where the post-processor puts its special tokens around a pair (`<s> A </s></s> B </s>`
    for RoBERTa, `[CLS] A [SEP] B [SEP]` for BERT) and which segment ids it gives each part."""

    prefix_ids: np.ndarray
    prefix_types: np.ndarray
    middle_ids: np.ndarray
    middle_types: np.ndarray
    suffix_ids: np.ndarray
    suffix_types: np.ndarray
    type_a: int
    type_b: int

    @property
    def n_special(self) -> int:
        return len(self.prefix_ids) + len(self.middle_ids) + len(self.suffix_ids)

    @classmethod
    def learn(cls, tokenizer: Tokenizer) -> _PairTemplate | None:
        """Reads the template off one post-processed probe pair; None when it does not fit the
        prefix / A / middle / B / suffix shape."""
        first = tokenizer.encode("hello there", add_special_tokens=False)
        second = tokenizer.encode("general kenobi", add_special_tokens=False)
        n_a, n_b = len(first.ids), len(second.ids)
        if n_a == 0 or n_b == 0:
            return None
        merged = tokenizer.post_process(first, second, add_special_tokens=True)
        ids = np.asarray(merged.ids, dtype=np.int64)
        types = np.asarray(merged.type_ids, dtype=np.int64)
        content = [i for i, special in enumerate(merged.special_tokens_mask) if not special]
        if len(content) != n_a + n_b:
            return None
        a_pos, b_pos = content[:n_a], content[n_a:]
        if a_pos != list(range(a_pos[0], a_pos[0] + n_a)) or b_pos != list(
            range(b_pos[0], b_pos[0] + n_b)
        ):
            return None
        if ids[a_pos].tolist() != first.ids or ids[b_pos].tolist() != second.ids:
            return None
        if len(set(types[a_pos].tolist())) != 1 or len(set(types[b_pos].tolist())) != 1:
            return None
        a0, a1, b0, b1 = a_pos[0], a_pos[-1] + 1, b_pos[0], b_pos[-1] + 1
        return cls(
            prefix_ids=ids[:a0],
            prefix_types=types[:a0],
            middle_ids=ids[a1:b0],
            middle_types=types[a1:b0],
            suffix_ids=ids[b1:],
            suffix_types=types[b1:],
            type_a=int(types[a0]),
            type_b=int(types[b0]),
        )


def longest_first(n_a: int, n_b: int, budget: int) -> tuple[int, int]:
    """Tokens kept of each side when a pair must fit `budget` (max_length minus the specials):
    the `longest_first` rule of `tokenizers` (the shorter side is kept whole if it fits in half,
    else both get half)."""
    if n_a + n_b <= budget:
        return n_a, n_b
    swap = n_a > n_b
    short, long_ = (n_b, n_a) if swap else (n_a, n_b)
    long_ = short if short > budget else max(short, budget - short)
    if short + long_ > budget:
        short = budget // 2
        long_ = short + budget % 2
    keep_a, keep_b = (long_, short) if swap else (short, long_)
    return min(keep_a, n_a), min(keep_b, n_b)


class PairTokenizer:
    """Tokenizes (instruction, response) pairs, instruction first, truncating `longest_first`.

    Each distinct text of a call is encoded once, on its own and without special tokens (the
    instruction of a candidate set is shared by all its candidates); the pair is then cut and
    framed with the post-processor's special tokens here. That is what `tokenizers` does inside a
    pair encode, minus its overflow bookkeeping, which grows with the product of the two sides'
    overflow and took seconds for one pair of two long documents. Where the template cannot be
    learnt (an unusual post-processor), the library's own truncating pair encode is used.

    Thread-safe: `encode` and `truncate_texts` only read the underlying tokenizers, whose
    configuration is set once here.

    Attributes:
        max_length: the longest encoded pair, special tokens included.
        pad_token_id: the id to right-pad batches with.
        with_token_type_ids: whether `encode` returns segment ids (BERT) or None (RoBERTa).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        max_length: int,
        pad_token_id: int,
        with_token_type_ids: bool,
        truncation_side: str = "right",
    ) -> None:
        if max_length < 4:
            raise TokenizerError(f"max_length must be at least 4, got {max_length}")
        if truncation_side not in ("left", "right"):
            raise TokenizerError(
                f"truncation_side must be 'left' or 'right', not {truncation_side!r}"
            )
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.with_token_type_ids = with_token_type_ids
        self._left = truncation_side == "left"
        # Independent Rust tokenizers, each configured once and only read afterwards: `plain`
        # (no truncation, no padding) for single texts, `truncating` for the fallback pair path.
        # `Tokenizer` has no copy(); a JSON round-trip gives an independent one.
        serialized = tokenizer.to_str()
        self._plain = Tokenizer.from_str(serialized)
        self._plain.no_padding()
        self._plain.no_truncation()
        self._truncating = Tokenizer.from_str(serialized)
        self._truncating.no_padding()
        self._truncating.enable_truncation(
            max_length, stride=0, strategy="longest_first", direction=truncation_side
        )
        n_special = self._plain.num_special_tokens_to_add(True)
        if max_length <= n_special:
            raise TokenizerError(
                f"max_length {max_length} leaves no room next to {n_special} special tokens"
            )
        self._template = _PairTemplate.learn(self._plain)
        if self._template is not None and self._template.n_special != n_special:
            self._template = None
        if self._template is None:
            logger.warning("pair template not recognised: using the slower library pair encode")

    @classmethod
    def from_dir(
        cls, path: str | Path, *, max_length: int, with_token_type_ids: bool
    ) -> PairTokenizer:
        """Builds the tokenizer from an export directory (tokenizer.json + tokenizer_config.json).

        Args:
            path: the directory that `save_pretrained` wrote the tokenizer into.
            max_length: the truncation length, from the export manifest.
            with_token_type_ids: whether the model takes `token_type_ids`.

        Raises:
            TokenizerError: tokenizer.json is missing or no pad token can be found.
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{tokenizer_file} not found: the export needs a fast tokenizer")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"cannot read {tokenizer_file}: {exc}") from exc
        config = _read_json(path / "tokenizer_config.json")
        pad_token_id = _find_pad_token_id(tokenizer, config)
        truncation_side = str(config.get("truncation_side") or "right")
        return cls(
            tokenizer,
            max_length=max_length,
            pad_token_id=pad_token_id,
            with_token_type_ids=with_token_type_ids,
            truncation_side=truncation_side,
        )

    def encode(self, pairs: Sequence[tuple[str, str]]) -> list[EncodedPair]:
        """Tokenizes pairs, truncating each to `max_length` tokens (longest_first).

        Args:
            pairs: (instruction, response) tuples.

        Returns:
            One EncodedPair per input pair, in order; `truncated` says whether tokens were cut.
        """
        if not pairs:
            return []
        template = self._template
        if template is None:
            try:
                encodings = self._truncating.encode_batch(list(pairs), add_special_tokens=True)
            except TypeError:  # the Rust side refuses what is not a (Unicode) str
                raise _unencodable(pairs) from None
            return [self._from_encoding(encoding) for encoding in encodings]
        pieces = self._encode_texts(pairs)
        budget = self.max_length - template.n_special
        out = []
        for instruction, response in pairs:
            ids_a, ids_b = pieces[instruction], pieces[response]
            keep_a, keep_b = longest_first(len(ids_a), len(ids_b), budget)
            truncated = keep_a < len(ids_a) or keep_b < len(ids_b)
            if truncated:
                ids_a, ids_b = self._cut(ids_a, keep_a), self._cut(ids_b, keep_b)
            input_ids = np.concatenate(
                (template.prefix_ids, ids_a, template.middle_ids, ids_b, template.suffix_ids)
            )
            token_type_ids = None
            if self.with_token_type_ids:
                token_type_ids = np.concatenate(
                    (
                        template.prefix_types,
                        np.full(len(ids_a), template.type_a, dtype=np.int64),
                        template.middle_types,
                        np.full(len(ids_b), template.type_b, dtype=np.int64),
                        template.suffix_types,
                    )
                )
            out.append(EncodedPair(input_ids, token_type_ids, truncated))
        return out

    def truncate_texts(self, texts: Sequence[str], max_tokens: int) -> list[str]:
        """Each text cut after its first `max_tokens` tokens (no special tokens counted), at the
        end of that token in the text; shorter texts are returned as they are.

        For a per-document token limit (Cohere's `max_tokens_per_doc`). The cut text can
        tokenize to a token or so more or fewer than `max_tokens` where a word was split.

        Raises:
            ValueError: `max_tokens` is below 1.
            UnencodableText: a text is not valid Unicode (`pair` is its index).
        """
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not texts:
            return []
        try:
            encodings = self._plain.encode_batch(list(texts), add_special_tokens=False)
        except TypeError:
            raise _unencodable([("", text) for text in texts]) from None
        out = []
        for text, encoding in zip(texts, encodings, strict=True):
            if len(encoding.ids) <= max_tokens:
                out.append(text)
            else:
                out.append(text[: encoding.offsets[max_tokens - 1][1]])
        return out

    def _encode_texts(self, pairs: Sequence[tuple[str, str]]) -> dict[str, np.ndarray]:
        """Token ids (no specials) of every distinct text in `pairs`, each encoded once."""
        texts = list(dict.fromkeys(text for pair in pairs for text in pair))
        try:
            encodings = self._plain.encode_batch(texts, add_special_tokens=False)
        except TypeError:  # the Rust side refuses what is not a (Unicode) str
            raise _unencodable(pairs) from None
        return {
            text: np.asarray(encoding.ids, dtype=np.int64)
            for text, encoding in zip(texts, encodings, strict=True)
        }

    def _cut(self, ids: np.ndarray, keep: int) -> np.ndarray:
        if keep >= len(ids):
            return ids
        return ids[len(ids) - keep :] if self._left else ids[:keep]

    def _from_encoding(self, encoding: Encoding) -> EncodedPair:
        input_ids = np.asarray(encoding.ids, dtype=np.int64)
        token_type_ids = (
            np.asarray(encoding.type_ids, dtype=np.int64) if self.with_token_type_ids else None
        )
        # With stride 0, the removed tokens land in `overflowing`; it is empty iff nothing was cut.
        return EncodedPair(
            input_ids=input_ids,
            token_type_ids=token_type_ids,
            truncated=bool(encoding.overflowing),
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _find_pad_token_id(tokenizer: Tokenizer, config: dict[str, Any]) -> int:
    """The pad id: tokenizer_config.json's `pad_token`, else tokenizer.json's padding, else a
    conventional pad token present in the vocabulary."""
    pad = config.get("pad_token")
    if isinstance(pad, dict):  # older transformers saved AddedToken dicts
        pad = pad.get("content")
    if isinstance(pad, str):
        pad_id = tokenizer.token_to_id(pad)
        if pad_id is not None:
            return int(pad_id)
    padding = tokenizer.padding
    if padding is not None and padding.get("pad_token") is not None:
        pad_id = tokenizer.token_to_id(padding["pad_token"])
        if pad_id is not None:
            return int(pad_id)
    for token in _PAD_CANDIDATES:
        pad_id = tokenizer.token_to_id(token)
        if pad_id is not None:
            return int(pad_id)
    raise TokenizerError("the tokenizer defines no pad token")
