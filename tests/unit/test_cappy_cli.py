"""`cappy`: the parser, every subcommand's included, builds in the base install.

The serving image installs no optional extra (no torch, transformers, rouge-score...): there
`cappy --help`, `cappy serve` and each command's `--help` must work, and the commands that need
an extra import it when they run."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap

from cappy.cli import build_parser

# The top-level modules of the optional extras (pyproject's export, adapt, int8, e2e, dev).
EXTRAS_ONLY = (
    "torch",
    "transformers",
    "onnx",
    "rouge_score",
    "accelerate",
    "matplotlib",
    "nncf",
    "gguf",
    "llama_cpp",
)


def _commands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> list[tuple[str, ...]]:
    """Every command path of `parser`: ("serve",), ("adapt", "train"), ..."""
    found = []
    for action in parser._actions:  # noqa: SLF001 - argparse keeps its subparsers here
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                found.append((*prefix, name))
                found.extend(_commands(sub, (*prefix, name)))
    return found


def test_every_command_helps_without_the_optional_extras() -> None:
    commands = _commands(build_parser())
    assert {("serve",), ("export",), ("adapt", "train"), ("eval",)} <= set(commands)
    script = textwrap.dedent(
        f"""
        import contextlib, importlib.abc, io, sys
        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {EXTRAS_ONLY!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}")
                return None
        sys.meta_path.insert(0, Absent())
        from cappy.cli import main
        for argv in [[], *{[list(c) for c in commands]!r}]:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    main([*argv, "--help"])
                except SystemExit as stop:
                    assert stop.code == 0, (argv, stop.code)
            assert "usage: cappy" in out.getvalue(), argv
        print("ok", sorted(m for m in {EXTRAS_ONLY!r} if m in sys.modules))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "ok []"
