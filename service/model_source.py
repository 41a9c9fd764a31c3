"""`--model` for serving: an export directory is used as is; a local checkpoint or a hub id is
exported once (by `cappy export` in a subprocess: the service never imports torch) into the
cache directory and reused on the next start."""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
import sys
from pathlib import Path

from cappy.export_format import MANIFEST

logger = logging.getLogger(__name__)


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


def resolve_export_dir(model: str, cache_dir: Path, *, timeout_s: float = 3600) -> Path:
    """The export directory to serve for `model`, exporting it first if needed."""
    if is_export_dir(model):
        return Path(model).expanduser()
    target = cache_path(model, cache_dir)
    if (target / MANIFEST).is_file():
        logger.info("using the cached export %s for %s", target, model)
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    logger.info("exporting %s to %s (once; later starts reuse it)", model, target)
    command = [sys.executable, "-m", "cappy", "export", "--model", model, "--out", str(target)]
    try:
        done = subprocess.run(
            command, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise ModelSourceError(f"exporting {model} took longer than {timeout_s:.0f} s") from exc
    if done.returncode != 0 or not (target / MANIFEST).is_file():
        raise ModelSourceError(f"could not export {model} (see the error above)")
    return target
