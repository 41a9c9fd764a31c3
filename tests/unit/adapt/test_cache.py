"""The sample cache on its own: durable appends, one configuration per cache, torn last lines,
one writer at a time."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from adapt.cache import SampleCache, SampleRecord, read_cache, read_header
from adapt.errors import AdaptError

CONFIG = {"model": "m", "max_tokens": 8, "recipe": [{"name": "greedy", "count": 1}]}


def _record(i: int, **extra: object) -> SampleRecord:
    return SampleRecord(f"ex{i}", "sampling", 0, 1000 + i, f"text {i} ✓", "stop", **extra)  # type: ignore[arg-type]


def test_append_then_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cache.jsonl"
    with SampleCache(path, CONFIG) as cache:
        assert len(cache) == 0
        cache.append(_record(0, logprobs=(-0.5, -1.5), completion_tokens=2))
        cache.append(_record(1))
    with SampleCache(path, CONFIG) as cache:
        assert cache.resumed == 2
        record = cache.get(("ex0", "sampling", 1000))
        assert record == _record(0, logprobs=(-0.5, -1.5), completion_tokens=2)
        assert record is not None and record.mean_logprob == pytest.approx(-1.0)
        assert ("ex1", "sampling", 1001) in cache
        assert ("ex1", "sampling", 9) not in cache
    config, records = read_cache(path)
    assert config == CONFIG and len(records) == 2
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0])["type"] == "header" and len(lines) == 3


def test_another_configuration_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    with SampleCache(path, CONFIG) as cache:
        cache.append(_record(0))
    with pytest.raises(AdaptError, match="max_tokens: cache has 8, asked 64"):
        SampleCache(path, {**CONFIG, "max_tokens": 64})
    # The refusal left the cache as it was and unlocked.
    with SampleCache(path, CONFIG) as cache:
        assert len(cache) == 1


def test_torn_last_line_is_cut_and_its_sample_forgotten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "cache.jsonl"
    with SampleCache(path, CONFIG) as cache:
        cache.append(_record(0))
        cache.append(_record(1))
    whole = path.read_bytes()
    path.write_bytes(whole + _record(2).to_line()[:25])  # died mid-write
    with caplog.at_level(logging.WARNING), SampleCache(path, CONFIG) as cache:
        assert len(cache) == 2 and ("ex2", "sampling", 1002) not in cache
        assert path.read_bytes() == whole
        cache.append(_record(3))
    assert "torn last line" in caplog.text
    _, records = read_cache(path)
    assert sorted(r.example_id for r in records.values()) == ["ex0", "ex1", "ex3"]


def test_a_whole_record_without_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    with SampleCache(path, CONFIG) as cache:
        cache.append(_record(0))
    path.write_bytes(path.read_bytes() + _record(1).to_line().rstrip(b"\n"))
    with SampleCache(path, CONFIG) as cache:
        assert len(cache) == 2
        cache.append(_record(2))
    assert len(read_cache(path)[1]) == 3


def test_only_a_torn_header_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    path.write_bytes(b'{"type": "header", "form')
    with SampleCache(path, CONFIG) as cache:
        cache.append(_record(0))
    assert read_cache(path)[0] == CONFIG


def test_a_bad_line_in_the_middle_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    with SampleCache(path, CONFIG) as cache:
        cache.append(_record(0))
    path.write_bytes(path.read_bytes() + b"garbage\n" + _record(1).to_line())
    with SampleCache(path, CONFIG) as cache:
        assert len(cache) == 2


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    with SampleCache(path, CONFIG):
        with pytest.raises(AdaptError, match="another process is writing"):
            SampleCache(path, CONFIG)
    SampleCache(path, CONFIG).close()


def test_not_a_cache(tmp_path: Path) -> None:
    path = tmp_path / "other.jsonl"
    path.write_text('{"instruction": "q"}\n')
    with pytest.raises(AdaptError, match="not a sample cache"):
        SampleCache(path, CONFIG)
    with pytest.raises(AdaptError, match="not a sample cache"):
        read_header(path)
    with pytest.raises(AdaptError, match="no such sample cache"):
        read_cache(tmp_path / "missing.jsonl")


def test_the_header_alone(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    assert read_header(path) is None  # no cache yet
    path.write_bytes(b'{"type": "header", "form')  # a torn header: no cache yet either
    assert read_header(path) is None
    path.unlink()
    with SampleCache(path, CONFIG) as cache:
        assert read_header(path) == CONFIG
        cache.append(_record(0))
    assert read_header(path) == CONFIG


def test_an_older_header_is_completed_before_the_comparison(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    with SampleCache(path, CONFIG) as cache:
        cache.append(_record(0))
    newer = {**CONFIG, "send_extras": False}

    def complete(recorded: dict) -> dict:
        return {"send_extras": False, **recorded}

    with pytest.raises(AdaptError, match="send_extras: cache has null, asked false"):
        SampleCache(path, newer)
    with SampleCache(path, newer, complete=complete) as cache:
        assert len(cache) == 1
        cache.append(_record(1))
    with pytest.raises(AdaptError, match="send_extras: cache has false, asked true"):
        SampleCache(path, {**CONFIG, "send_extras": True}, complete=complete)
    assert read_header(path) == CONFIG  # the file keeps the header it was written with


def test_a_compressed_cache_reads_the_same_and_is_read_only(tmp_path: Path) -> None:
    path = tmp_path / "cache.jsonl"
    with SampleCache(path, CONFIG) as cache:
        cache.append(_record(0, logprobs=(-0.5,)))
        cache.append(_record(1))
    packed = tmp_path / "cache.jsonl.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    assert read_header(packed) == CONFIG
    assert read_cache(packed) == read_cache(path)
    with pytest.raises(AdaptError, match="read-only; decompress it"):
        SampleCache(packed, CONFIG)
    not_gzip = tmp_path / "plain.jsonl.gz"
    not_gzip.write_bytes(path.read_bytes())
    with pytest.raises(AdaptError, match="not a readable gzip file"):
        read_cache(not_gzip)
    with pytest.raises(AdaptError, match="not a readable gzip file"):
        read_header(not_gzip)
