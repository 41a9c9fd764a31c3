"""`--model` checks made before the server starts."""

from __future__ import annotations

import fcntl
import logging
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from service import model_source
from service.engine.errors import EngineStopped
from service.model_source import (
    ModelSourceError,
    cache_path,
    check_model_source,
    display_name,
    is_export_dir,
)
from service.settings import Settings


@pytest.mark.parametrize("model", ["btan2/cappy-large", "roberta-large", "org/name.v2_x-1"])
def test_hub_ids_pass(model: str) -> None:
    check_model_source(model)


def test_directories_pass_and_missing_paths_fail(tmp_path: Path) -> None:
    check_model_source(str(tmp_path))
    with pytest.raises(ModelSourceError, match="no such directory"):
        check_model_source(str(tmp_path / "missing"))
    with pytest.raises(ModelSourceError, match="no such directory"):
        check_model_source("./not/here/at/all")
    file = tmp_path / "model.onnx"
    file.write_bytes(b"")
    with pytest.raises(ModelSourceError, match="not a directory"):
        check_model_source(str(file))


def test_export_dir_is_recognised_by_its_manifest(tmp_path: Path) -> None:
    assert not is_export_dir(str(tmp_path))
    (tmp_path / "cappy_export.json").write_text("{}")
    assert is_export_dir(str(tmp_path))


def test_an_install_without_torch_refuses_to_export_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The serve-only image: one message that says what to do, and no export attempted."""
    monkeypatch.setattr(model_source, "EXPORT_MODULES", ("torch", "no_such_module_cappy"))
    with pytest.raises(ModelSourceError) as refused:
        model_source.resolve_export_dir("btan2/cappy-large", tmp_path / "cache")
    message = str(refused.value)
    assert "no_such_module_cappy not installed" in message
    assert "mount an export directory" in message and "CAPPY_MODEL" in message
    assert not (tmp_path / "cache").exists()


def test_a_failed_export_is_one_message_with_its_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hub id that cannot be fetched (offline here): the export's own `error:` line becomes
    the reason; everything else it printed stays at debug level."""
    caplog.set_level(logging.INFO, logger="service.model_source")
    with pytest.raises(ModelSourceError) as failed:
        model_source.resolve_export_dir("btan2/cappy-large", tmp_path / "cache")
    message = str(failed.value)
    assert message.startswith("could not export btan2/cappy-large: ")
    assert "not in the local Hugging Face cache" in message
    assert "\n" not in message
    assert [r.levelno for r in caplog.records] == [logging.INFO]  # "exporting ... (once ...)"


def test_a_replica_waits_for_anothers_export_and_uses_it(tmp_path: Path) -> None:
    """Replicas sharing a cache volume: while one exports (holding the lock), another waits and
    then takes the finished export instead of exporting again."""
    cache = tmp_path / "cache"
    cache.mkdir()
    target = model_source.cache_path("btan2/cappy-large", cache)
    found: list[Path] = []
    with (cache / f".{target.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = threading.Thread(
            target=lambda: found.append(model_source.resolve_export_dir("btan2/cappy-large", cache))
        )
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and not found  # blocked on the lock
        target.mkdir()
        (target / "cappy_export.json").write_text("{}")
    waiting.join(30)
    assert found == [target]


def _resolving(cache: Path, stop: threading.Event) -> tuple[threading.Thread, list[BaseException]]:
    """`resolve_export_dir` of a hub id, started in a thread; what it raises is recorded."""
    raised: list[BaseException] = []

    def resolve() -> None:
        try:
            model_source.resolve_export_dir("btan2/cappy-large", cache, stop)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            raised.append(exc)

    thread = threading.Thread(target=resolve)
    thread.start()
    return thread, raised


def test_a_replica_waiting_for_anothers_export_stops_when_told(tmp_path: Path) -> None:
    """A start stopped (SIGTERM) while it waits for another replica's export ends its wait."""
    cache = tmp_path / "cache"
    cache.mkdir()
    target = model_source.cache_path("btan2/cappy-large", cache)
    stop = threading.Event()
    with (cache / f".{target.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting, raised = _resolving(cache, stop)
        waiting.join(0.5)
        assert waiting.is_alive()  # blocked on the lock
        stop.set()
        waiting.join(30)
        assert not waiting.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], EngineStopped)
    assert not target.exists()


# Stands in for `cappy export`: says it started, then waits; SIGINT (KeyboardInterrupt) is
# recorded and ends it as the real export ends (exit 130, its scratch directory removed).
_SLOW_EXPORT = """
import pathlib, sys, time
marks = pathlib.Path(sys.argv[1])
(marks / "started").touch()
try:
    time.sleep(600)
except KeyboardInterrupt:
    (marks / "interrupted").touch()
    sys.exit(130)
"""


def test_an_export_under_way_is_interrupted_when_told_to_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A start stopped while it exports interrupts the export (SIGINT, so that `cappy export`
    removes its scratch directory) and ends with `EngineStopped`, nothing cached."""
    marks = tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "slow_export.py"
    script.write_text(_SLOW_EXPORT)
    monkeypatch.setattr(
        model_source, "_export_command", lambda *_: [sys.executable, str(script), str(marks)]
    )
    monkeypatch.setattr(model_source, "_missing_export_modules", lambda: [])
    cache, stop = tmp_path / "cache", threading.Event()
    exporting, raised = _resolving(cache, stop)
    for _ in range(600):  # the child's interpreter start
        if (marks / "started").exists():
            break
        exporting.join(0.05)
    assert (marks / "started").exists()
    stop.set()
    exporting.join(60)
    assert not exporting.is_alive()
    assert (marks / "interrupted").exists()  # SIGINT, not a kill: its clean-up ran
    assert len(raised) == 1 and isinstance(raised[0], EngineStopped)
    assert not model_source.cache_path("btan2/cappy-large", cache).exists()


def _served(path: Path, source: str) -> Any:
    """What display_name reads of a served export: its directory and its manifest's source."""
    return SimpleNamespace(path=path, manifest=SimpleNamespace(source={"model": source}))


def test_the_display_name_is_the_served_exports(tmp_path: Path) -> None:
    tmp_path = tmp_path.resolve()  # served exports' paths are resolved
    settings = Settings(model=str(tmp_path / "exports" / "cappy-v1"), cache_dir=tmp_path / "cache")
    assert display_name(settings, None) == "cappy-v1"  # before the model is loaded
    # An export directory: its own name (two exports of one checkpoint differ by it).
    v2 = _served(tmp_path / "exports" / "cappy-v2", "btan2/cappy-large")
    assert display_name(settings, v2) == "cappy-v2"
    # One this service exported into its cache: named after what was exported.
    cached = _served(cache_path("btan2/cappy-large", settings.cache_dir), "btan2/cappy-large")
    assert display_name(settings, cached) == "cappy-large"
    checkpoint = str(tmp_path / "checkpoints" / "my-scorer")
    cached = _served(cache_path(checkpoint, settings.cache_dir), checkpoint)
    assert display_name(settings, cached) == "my-scorer"
    # CAPPY_MODEL_NAME wins whatever is served.
    named = settings.model_copy(update={"model_name": "house-scorer"})
    assert display_name(named, v2) == display_name(named, None) == "house-scorer"
    hub = Settings(model="btan2/cappy-large", cache_dir=tmp_path / "cache")
    assert display_name(hub, None) == "cappy-large"
