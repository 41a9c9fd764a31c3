"""`cappy serve` flags: each maps to a setting, and parses to that setting's type."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from service.cli import _FLAGS, add_parsers, run
from service.settings import Settings


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser()
    add_parsers(root.add_subparsers())
    return root


def test_every_flag_names_a_setting() -> None:
    assert {field for field, _, _ in _FLAGS.values()} <= set(Settings.model_fields)


def test_flags_parse_and_validate_as_settings() -> None:
    args = parser().parse_args(
        ["serve", "--streams", "1", "--padding-tolerance", "0.25", "--max-wait-ms", "0"]
    )
    assert (args.streams, args.padding_tolerance, args.max_wait_ms) == (1, 0.25, 0.0)
    settings = Settings(streams=args.streams, padding_tolerance=args.padding_tolerance)
    assert settings.streams == 1 and settings.padding_tolerance == 0.25
    assert parser().parse_args(["serve"]).streams is None  # unset flags leave the environment's


class _Server:
    """Stands in for uvicorn.Server: keeps the config it was given, serves nothing."""

    made: list[_Server] = []

    def __init__(self, config: Any) -> None:
        self.config = config
        self.started = False
        _Server.made.append(self)

    def handle_exit(self, sig: int, frame: Any) -> None:  # noqa: ARG002 - a signal handler
        pass

    def run(self) -> None:
        self.started = True


def serve(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, Settings | None]:
    """`cappy serve ARGV` up to the server's start: the exit status and the app's settings
    (None when it never got that far)."""
    import uvicorn

    monkeypatch.setattr(uvicorn, "Server", _Server)
    _Server.made.clear()
    status = run(parser().parse_args(["serve", *argv]))
    return status, _Server.made[0].config.app.state.settings if _Server.made else None


def test_empty_variables_start_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """`CAPPY_MAX_QUEUE_WAIT_S=` (compose's `""`) was exit 2, "Input should be a valid number"."""
    for name in ("max_queue_wait_s", "threads", "streams", "max_batch_tokens", "max_batch_size"):
        monkeypatch.setenv(f"CAPPY_{name.upper()}", "")
    monkeypatch.setenv("CAPPY_PADDING_TOLERANCE", "")
    monkeypatch.setenv("CAPPY_MODEL_NAME", "")
    status, settings = serve(["--model", "org/scorer"], monkeypatch)
    assert status == 0 and settings is not None
    assert settings.max_queue_wait_s == Settings.model_fields["max_queue_wait_s"].default
    assert settings.threads is None and settings.padding_tolerance is None


def test_null_unsets_the_queue_wait_and_is_refused_where_nothing_can_be_unset(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CAPPY_MAX_QUEUE_WAIT_S", "null")
    status, settings = serve(["--model", "org/scorer"], monkeypatch)
    assert status == 0 and settings is not None and settings.max_queue_wait_s is None
    monkeypatch.setenv("CAPPY_PORT", "None")
    status, settings = serve(["--model", "org/scorer"], monkeypatch)
    assert status == 2 and settings is None
    assert "port: 'None' means unset" in capsys.readouterr().err


def test_the_reported_name_is_not_fixed_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """The name the API reports follows the served export across reloads
    (service.model_source.display_name): the CLI leaves it to the app unless it is set."""
    monkeypatch.delenv("CAPPY_MODEL_NAME", raising=False)
    _, settings = serve(["--model", "org/scorer"], monkeypatch)
    assert settings is not None and settings.model_name is None
    _, named = serve(["--model", "org/scorer", "--model-name", "x"], monkeypatch)
    assert named is not None and named.model_name == "x"
