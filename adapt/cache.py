"""The sample cache: an append-only JSONL file of upstream answers, so that sampling survives a
crash or Ctrl-C and a re-run resumes without asking the LLM again for anything it answered.

Layout: the first line is a header holding the sampling configuration (model, endpoint, max
tokens, logprobs, seed base, recipe, the parameters each decoding sent); every other line is one
answer, keyed by (example id, decoding, seed). A cache belongs to one configuration: opening it
with another is refused, naming the fields that differ, rather than mixing samples of two
settings.

Crash safety:
- each answer is written as one line, flushed and fsync'ed before the next is taken as done, so
  whatever the process acknowledged is on disk;
- a torn last line (the process died mid-write: no newline at the end) is cut off when the cache
  is opened; that sample is simply asked again;
- an undecodable line elsewhere (which this writer never produces) is skipped with a warning;
- one writer at a time: an exclusive advisory lock (flock) refuses a second process.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from adapt.errors import AdaptError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, one writer is then up to the user
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

FORMAT = "cappy-samples"
VERSION = 1

Key = tuple[str, str, int]
"""(example id, decoding name, seed)."""


@dataclass(frozen=True, slots=True)
class SampleRecord:
    """One upstream answer.

    Attributes:
        example_id: the example it answers.
        decoding: the recipe decoding's name.
        index: its position within that decoding's samples (0-based).
        seed: the seed sent with the call.
        text: the sample's text (what Cappy scores).
        finish_reason: the upstream's finish reason.
        logprobs: the sampled tokens' log-probabilities, when they were asked for and returned.
        completion_tokens: generated tokens, as the upstream reported them.
    """

    example_id: str
    decoding: str
    index: int
    seed: int
    text: str
    finish_reason: str | None = None
    logprobs: tuple[float, ...] | None = None
    completion_tokens: int | None = None

    @property
    def key(self) -> Key:
        return (self.example_id, self.decoding, self.seed)

    @property
    def mean_logprob(self) -> float | None:
        """The mean token log-probability (self-scoring), None when unknown or no tokens."""
        if not self.logprobs:
            return None
        return sum(self.logprobs) / len(self.logprobs)

    def to_line(self) -> bytes:
        data = asdict(self)
        data["logprobs"] = list(self.logprobs) if self.logprobs is not None else None
        return (json.dumps({"type": "sample", **data}, ensure_ascii=False) + "\n").encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SampleRecord:
        logprobs = data.get("logprobs")
        return cls(
            example_id=str(data["example_id"]),
            decoding=str(data["decoding"]),
            index=int(data["index"]),
            seed=int(data["seed"]),
            text=str(data["text"]),
            finish_reason=data.get("finish_reason"),
            logprobs=tuple(float(x) for x in logprobs) if logprobs is not None else None,
            completion_tokens=data.get("completion_tokens"),
        )


def _normal(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as JSON would give it back (tuples as lists), for comparisons."""
    result: dict[str, Any] = json.loads(json.dumps(config))
    return result


def _differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(recorded) | set(wanted))
    return [
        f"{key}: cache has {json.dumps(recorded.get(key))}, asked {json.dumps(wanted.get(key))}"
        for key in keys
        if recorded.get(key) != wanted.get(key)
    ]


@dataclass
class _Contents:
    config: dict[str, Any] | None
    records: dict[Key, SampleRecord]
    good_bytes: int  # length of the prefix made of whole lines
    torn: bool  # a partial last line follows them (cut on resume)
    missing_newline: bool  # the last line is a whole record without its newline
    skipped: int


def is_compressed(path: Path) -> bool:
    """Whether `path` names a gzip-compressed cache (read-only: how the measured caches are
    committed)."""
    return path.suffix == ".gz"


def _read(path: Path) -> bytes:
    data = path.read_bytes()
    if not is_compressed(path):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise AdaptError(f"{path}: not a readable gzip file ({exc})") from None


def _scan(path: Path) -> _Contents:
    data = _read(path)
    end = data.rfind(b"\n") + 1  # whole lines end here; anything after is a torn write
    torn = end < len(data)
    missing_newline = False
    if torn:
        try:  # a complete record that only lost its newline is kept
            json.loads(data[end:])
        except ValueError:
            pass
        else:
            end, torn, missing_newline = len(data), False, True
    config: dict[str, Any] | None = None
    records: dict[Key, SampleRecord] = {}
    skipped = 0
    for number, raw in enumerate(data[:end].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
            if number == 1:
                config = _header_config(path, item)
                continue
            record = SampleRecord.from_dict(item)
        except AdaptError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError):
            skipped += 1
            logger.warning("%s:%d: unreadable cache line skipped", path, number)
            continue
        records[record.key] = record
    return _Contents(config, records, end, torn, missing_newline, skipped)


def _header_config(path: Path, item: Any) -> dict[str, Any]:
    """The configuration of a decoded first line.

    Raises:
        AdaptError: it is not a header of this format and version.
    """
    if not isinstance(item, dict) or item.get("type") != "header" or item.get("format") != FORMAT:
        raise AdaptError(f"{path}: not a sample cache (no {FORMAT} header)")
    if item.get("version") != VERSION:
        raise AdaptError(f"{path}: sample cache version {item.get('version')}, expected {VERSION}")
    config = item.get("config")
    if not isinstance(config, dict):
        raise AdaptError(f"{path}: sample cache header without a configuration")
    return config


def read_header(path: Path) -> dict[str, Any] | None:
    """A cache's configuration, read from its first line alone; None when there is no cache yet
    (no file, an empty one, or only the torn header of a run that died before its first answer).

    Raises:
        AdaptError: the file is not a sample cache.
    """
    try:
        with gzip.open(path, "rb") if is_compressed(path) else path.open("rb") as file:
            first = file.readline()
    except FileNotFoundError:
        return None
    except (OSError, EOFError) as exc:
        raise AdaptError(f"{path}: not a readable gzip file ({exc})") from None
    if not first.strip():
        return None
    try:
        item = json.loads(first)
    except ValueError:
        if not first.endswith(b"\n"):  # torn: SampleCache starts it afresh
            return None
        raise AdaptError(f"{path}: not a sample cache (no {FORMAT} header)") from None
    return _header_config(path, item)


def read_cache(path: Path) -> tuple[dict[str, Any], dict[Key, SampleRecord]]:
    """Reads a cache without opening it for writing: (its configuration, its records). A path
    ending in `.gz` is read through gzip.

    Raises:
        AdaptError: missing file, or not a sample cache.
    """
    if not path.is_file():
        raise AdaptError(f"{path}: no such sample cache")
    contents = _scan(path)
    if contents.config is None:
        raise AdaptError(f"{path}: empty sample cache (no header)")
    return contents.config, contents.records


class SampleCache:
    """The cache opened for appending; use as a context manager (it holds a lock)."""

    def __init__(
        self,
        path: Path,
        config: Mapping[str, Any],
        *,
        complete: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ):
        """Opens (or creates) the cache at `path` for sampling configuration `config`.

        Args:
            path: the cache file.
            config: the sampling configuration; written as the header of a new cache, and
                compared with the header of an existing one.
            complete: fills in, before that comparison, the fields a header written by an
                older version lacks (`SamplingConfig.complete_header`); the file keeps its header.

        Raises:
            AdaptError: the cache was made with another configuration, is not a sample cache,
                is compressed (read-only), or another process is writing it.
        """
        if is_compressed(path):
            raise AdaptError(
                f"{path}: a compressed sample cache is read-only; decompress it (gunzip -k) to "
                "add samples to it, or leave out --upstream to evaluate from it"
            )
        self.path = path
        self.config = _normal(config)
        self._complete = complete
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = open(path, "a+b")  # noqa: SIM115 - closed by close()
        try:
            self._lock()
            self.records: dict[Key, SampleRecord] = {}
            self.resumed = 0
            if path.stat().st_size and not self._resume():
                # Only a torn header: the previous run died before its first answer.
                self._file.truncate(0)
            if not path.stat().st_size:
                header = {"type": "header", "format": FORMAT, "version": VERSION}
                self._write(json.dumps({**header, "config": self.config}).encode() + b"\n")
        except BaseException:
            self._file.close()
            raise

    def _lock(self) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AdaptError(f"{self.path}: another process is writing this sample cache") from None

    def _resume(self) -> bool:
        """Loads the records; False when the file holds nothing but a torn header."""
        contents = _scan(self.path)
        if contents.good_bytes == 0 and contents.torn:
            return False
        if contents.config is None:
            raise AdaptError(f"{self.path}: not a sample cache (no header)")
        recorded = contents.config
        if self._complete is not None:
            recorded = _normal(self._complete(recorded))
        differences = _differences(recorded, self.config)
        if differences:
            raise AdaptError(
                f"{self.path}: made with other sampling settings ({'; '.join(differences)}); "
                "use another cache file, or the settings it was made with"
            )
        size = self.path.stat().st_size
        if contents.good_bytes < size:
            # A torn last line: cut it so that the next record starts on a line of its own.
            logger.warning(
                "%s: cutting a torn last line (%d bytes) left by an interrupted run",
                self.path,
                size - contents.good_bytes,
            )
            self._file.truncate(contents.good_bytes)
            os.fsync(self._file.fileno())
        elif contents.missing_newline:  # a whole record that only lost its newline
            self._write(b"\n")
        self.records = contents.records
        self.resumed = len(self.records)
        return True

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def __contains__(self, key: Key) -> bool:
        return key in self.records

    def get(self, key: Key) -> SampleRecord | None:
        return self.records.get(key)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[SampleRecord]:
        return iter(self.records.values())

    def append(self, record: SampleRecord) -> None:
        """Writes one answer durably (flush + fsync) and remembers it."""
        self._write(record.to_line())
        self.records[record.key] = record

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing releases the flock

    def __enter__(self) -> SampleCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
