"""`cappy <subcommand>`: dispatches to model_export (export, verify) and, later, the service."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from model_export import cli as export_cli

    parser = argparse.ArgumentParser(
        prog="cappy", description="Serve and export Cappy, the instruction-response scorer."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export_cli.add_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from model_export import cli as export_cli

    return export_cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
