"""Operations on the running service: switching the served model (`POST /admin/reload`).

Admin routes want an API key like every protected route, and refuse to run at all when the
service has no keys (CAPPY_API_KEYS unset): a model switch is not for anonymous callers.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from pydantic import Field

from service.deps import RuntimeDep, SettingsDep
from service.engine.errors import EngineStopped, ScorerError
from service.engine.export_dir import ExportDirError
from service.engine.runtime import ReloadError, ScoringRuntime
from service.errors import ApiError
from service.schemas.common import RequestModel, error_responses

logger = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])


class ReloadRequest(RequestModel):
    """`POST /admin/reload` body."""

    model_config = {"extra": "forbid"}

    model: str = Field(
        min_length=1,
        max_length=4096,
        description="An export directory on the server (made by `cappy export` or "
        "`cappy adapt train`) to serve instead of the current one.",
    )


async def reload_model(runtime: ScoringRuntime, directory: str) -> dict[str, Any]:
    """Switches the runtime to `directory` (also used by SIGHUP); ApiError on refusal."""
    previous = str(runtime.export.path) if runtime.export is not None else None
    try:
        await runtime.reload(Path(directory).expanduser())
    except ReloadError as exc:
        raise ApiError(409, f"{exc}.", code="reload_refused") from exc
    except EngineStopped:
        raise  # the server is shutting down: 503, as for any request then
    except Exception as exc:  # any reason the directory cannot be loaded: the old one serves on
        logger.warning("reload to %s refused", directory, exc_info=exc)
        raise ApiError(
            400,
            f"{_refusal(exc, directory)}; still serving the current model.",
            param="model",
            code="bad_model",
        ) from exc
    assert runtime.export is not None
    return {
        "model": str(runtime.export.path),
        "previous": previous,
        "source": runtime.export.manifest.source,
        "load_seconds": runtime.describe()["load_seconds"],
    }


@router.post("/admin/reload", responses=error_responses(400, 401, 403, 409, 503))
async def reload(body: ReloadRequest, runtime: RuntimeDep, settings: SettingsDep) -> dict[str, Any]:
    """Loads and warms another export directory beside the serving one, then switches to it:
    no request in flight fails (they finish on the old model, which then drains and stops). A
    directory that cannot be served is refused with 400 and the old model keeps serving;
    /info shows the new manifest once this answers."""
    if not settings.api_key_list():
        raise ApiError(
            403,
            "Admin routes need API keys: set CAPPY_API_KEYS.",
            type="permission_error",
            code="admin_disabled",
        )
    if not runtime.ready:
        raise ApiError(503, "The scorer is not serving yet.", type="server_error", code="not_ready")
    return await reload_model(runtime, body.model)


# Longest path an answer repeats whole; a longer one is cut (a client may send 4 KiB of it).
_SHOWN_CHARS = 80


def _shown(directory: str) -> str:
    """The path as the client sent it, cut short past `_SHOWN_CHARS`."""
    if len(directory) <= _SHOWN_CHARS:
        return directory
    return f"{directory[: _SHOWN_CHARS // 2]}... ({len(directory)} characters)"


def _refusal(exc: Exception, directory: str) -> str:
    """Why `directory` cannot be served, for the client: in the service's words, naming the
    directory as the client sent it, with no exception class and no other server path (the
    details go to the log)."""
    shown = _shown(directory)
    if isinstance(exc, ExportDirError | ScorerError):
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "cannot be served"
        # These name the directory as the engine resolved it (absolute, links followed).
        with contextlib.suppress(OSError, RuntimeError):
            reason = reason.replace(str(Path(directory).expanduser().resolve()), shown)
        return reason if reason.startswith(shown) else f"{shown}: {reason}"
    if isinstance(exc, OSError):
        if exc.errno == errno.ENAMETOOLONG:
            return f"{shown}: the path is too long for the server's file system"
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"{shown}: no such export directory"
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"{shown}: the server is not allowed to read it"
        return f"{shown}: the server cannot read it"
    return f"{shown}: its model cannot be loaded (the server's log says why)"
