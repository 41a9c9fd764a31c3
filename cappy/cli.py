"""`cappy <subcommand>`: dispatches to model_export (export, verify), the service (serve) and
adapt (adapt data, adapt train, eval).

Each package registers its own subcommands; heavy imports (torch, uvicorn) happen only inside
the subcommand that needs them, so `cappy serve` never loads torch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from adapt import cli as adapt_cli
    from model_export import cli as export_cli
    from service import cli as service_cli

    parser = argparse.ArgumentParser(
        prog="cappy", description="Serve and export Cappy, the instruction-response scorer."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export_cli.add_parsers(subparsers)
    service_cli.add_parsers(subparsers)
    adapt_cli.add_parsers(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from service import cli as service_cli

        return service_cli.run(args)
    if args.command in ("adapt", "eval"):
        from adapt import cli as adapt_cli

        return adapt_cli.run(args)
    from model_export import cli as export_cli

    return export_cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
