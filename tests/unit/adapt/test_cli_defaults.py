"""The defaults of `cappy adapt data|train` and `cappy eval` are the options dataclasses' own:
every flag that names a field takes that field's default, stated once."""

from __future__ import annotations

import dataclasses

import pytest

from adapt.data import DataOptions
from adapt.evaluate import EvalOptions
from adapt.train import TrainOptions
from cappy.cli import build_parser

COMMANDS = {
    "adapt data": (DataOptions, ["--train", "t.jsonl", "--out", "o"]),
    "adapt train": (TrainOptions, ["--data", "d", "--base", "b", "--out", "o"]),
    "eval": (EvalOptions, ["--data", "d.jsonl"]),
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_defaults_to_its_dataclass_field(command: str) -> None:
    cls, required = COMMANDS[command]
    args = build_parser().parse_args([*command.split(), *required])
    checked = 0
    for field in dataclasses.fields(cls):
        if field.default is dataclasses.MISSING or not hasattr(args, field.name):
            continue
        assert getattr(args, field.name) == field.default, field.name
        checked += 1
    assert checked >= (15 if cls is TrainOptions else 8)
