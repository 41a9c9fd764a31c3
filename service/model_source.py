"""`--model` for serving: an export directory is used as is; a local checkpoint or a hub id is
exported once (by `cappy export` in a subprocess: the service never imports torch) into the
cache directory and reused on the next start. Also the name the API reports for the export
being served (`display_name`)."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cappy.export_format import MANIFEST
from service.engine.types import STOP_POLL_S, stop_if_asked

if TYPE_CHECKING:
    from service.engine.export_dir import ExportDir
    from service.settings import Settings

logger = logging.getLogger(__name__)

# An export told to stop gets SIGINT (it then removes its scratch directory) and this long to
# exit before it is killed.
_INTERRUPT_GRACE_S = 5.0


class ModelSourceError(Exception):
    """`--model` cannot be turned into an export directory; the message says why."""


def _fingerprint(model: str) -> str:
    """Identifies what would be exported: a hub id, or a local checkpoint's files and mtimes
    (a changed checkpoint gets a new export)."""
    path = Path(model).expanduser()
    digest = hashlib.sha256()
    if path.is_dir():
        digest.update(str(path.resolve()).encode())
        for item in sorted(path.iterdir()):
            if item.is_file():
                stat = item.stat()
                digest.update(f"{item.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    else:
        digest.update(model.encode())
    return digest.hexdigest()[:12]


def cache_path(model: str, cache_dir: Path) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "--", model.strip("/~.")).strip("-") or "model"
    return cache_dir / f"{name[-80:]}-{_fingerprint(model)}"


def display_name(settings: Settings, export: ExportDir | None) -> str:
    """The name the API reports for the scorer: `CAPPY_MODEL_NAME` when set, else the name of
    the export being served, which changes with a reload.

    That is the export directory's name, except for an export this service made in its cache
    from a checkpoint or hub id (named `<model>-<fingerprint>`): it is named after that
    checkpoint or hub id, as the operator named it (`btan2/cappy-large` -> `cappy-large`).
    Before a model is loaded: the last component of `CAPPY_MODEL`.
    """
    if settings.model_name:
        return settings.model_name
    if export is None:
        return _last_component(settings.model)
    if export.path.parent == settings.cache_dir.resolve():
        return _last_component(str(export.manifest.source.get("model") or settings.model))
    return export.path.name or _last_component(settings.model)


def _last_component(model: str) -> str:
    """`btan2/cappy-large` -> `cappy-large`; a path -> its last component."""
    return model.rstrip("/").split("/")[-1] or model


# A Hugging Face hub id: "name" or "owner/name".
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def check_model_source(model: str) -> None:
    """Fails fast on a `--model` that can be neither a local directory nor a hub id, before
    anything starts; whether a hub id is reachable is only known when it is exported.

    Raises:
        ModelSourceError: `model` is not an existing directory and not shaped like a hub id.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise ModelSourceError(
            f"{model}: not a directory (an export directory, a checkpoint "
            "directory or a Hugging Face hub id is expected)"
        )
    if not _HUB_ID.fullmatch(model):
        raise ModelSourceError(f"{model}: no such directory, and not a Hugging Face hub id")


def is_export_dir(model: str) -> bool:
    """Whether `model` names an export directory (it holds a manifest)."""
    return (Path(model).expanduser() / MANIFEST).is_file()


# What `cappy export` needs beyond the service (the `export` extra); not imported here.
EXPORT_MODULES = ("torch", "transformers", "onnx")


def _missing_export_modules() -> list[str]:
    return [name for name in EXPORT_MODULES if importlib.util.find_spec(name) is None]


def resolve_export_dir(
    model: str,
    cache_dir: Path,
    stop: threading.Event | None = None,
    *,
    timeout_s: float = 3600,
) -> Path:
    """The export directory to serve for `model`, exporting it first if needed.

    The export's own output goes to this log at debug level (its progress, the hub client's
    retries); a failure is raised as one message that carries the export's reason. Once `stop`
    is set, an export under way is interrupted and a wait for another replica's export ends.

    Raises:
        ModelSourceError: it cannot be exported here (no torch: the serve-only install), the
            export failed (the message says why) or took longer than `timeout_s`.
        EngineStopped: `stop` was set before the export directory was ready.
    """
    if is_export_dir(model):
        return Path(model).expanduser()
    target = cache_path(model, cache_dir)
    if (target / MANIFEST).is_file():
        logger.info("using the cached export %s for %s", target, model)
        return target
    missing = _missing_export_modules()
    if missing:
        raise ModelSourceError(
            f"{model} is not an export directory, and this installation cannot export it "
            f"({', '.join(missing)} not installed: the serve-only image or a package installed "
            "without its `export` extra); mount an export directory and point CAPPY_MODEL at "
            "it, or use the image that exports (the default target)"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Replicas sharing a cache volume export once: the others wait here, then find it cached.
    with (cache_dir / f".{target.name}.lock").open("a") as lock:
        _lock(lock.fileno(), stop)
        if (target / MANIFEST).is_file():
            logger.info("using the export %s of %s made meanwhile", target, model)
            return target
        return _export(model, target, timeout_s, stop)


def _lock(fd: int, stop: threading.Event | None) -> None:
    """Takes the exclusive lock on `fd`, waiting for it unless `stop` is set first."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            stop_if_asked(stop)
            time.sleep(STOP_POLL_S)


def _interrupt_on(stop: threading.Event, process: subprocess.Popen[str]) -> None:
    """Interrupts `process` once `stop` is set (SIGINT, then SIGKILL after
    `_INTERRUPT_GRACE_S`); returns when it has exited."""
    while process.poll() is None:
        if stop.wait(STOP_POLL_S):
            process.send_signal(signal.SIGINT)
            try:
                process.wait(_INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
            return


def _export_command(model: str, target: Path) -> list[str]:
    return [sys.executable, "-m", "cappy", "export", "--model", model, "--out", str(target)]


def _export(model: str, target: Path, timeout_s: float, stop: threading.Event | None) -> Path:
    logger.info("exporting %s to %s (once; later starts reuse it)", model, target)
    started = time.monotonic()
    process = subprocess.Popen(
        _export_command(model, target),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )
    timer = threading.Timer(timeout_s, process.kill)
    timer.start()
    if stop is not None:
        threading.Thread(target=_interrupt_on, args=(stop, process), daemon=True).start()
    reason = ""
    try:
        assert process.stderr is not None
        for line in process.stderr:
            text = line.rstrip()
            if text.startswith("error: "):
                reason = text.removeprefix("error: ")
            elif text:
                logger.debug("export: %s", text)
        process.wait()
    finally:
        timer.cancel()
    stop_if_asked(stop)
    if time.monotonic() - started >= timeout_s:
        raise ModelSourceError(f"exporting {model} took longer than {timeout_s:.0f} s")
    if process.returncode != 0 or not (target / MANIFEST).is_file():
        raise ModelSourceError(
            f"could not export {model}: {reason or f'cappy export exited {process.returncode}'}"
        )
    logger.info("exported %s in %.0f s", model, time.monotonic() - started)
    return target
