"""`cappy serve` flags: each maps to a setting, and parses to that setting's type."""

from __future__ import annotations

import argparse

from service.cli import _FLAGS, add_parsers
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
