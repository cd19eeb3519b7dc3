"""`blockpruner` command line: one small parser function beside each command.

Each command is `@command(name, its_arguments, help=...)` over a function that calls the
package, in the module of its stage (`data`, `search`, `prune`, `evaluate`, `report`); this
module only builds the parser from them and dispatches. Every command checks its arguments and
the artifacts it reads before loading a model, and a `UserError` is printed as one line
(`blockpruner: error: ...`) with exit status 2; a step stopped by SIGTERM or SIGINT says how to
resume it (`blockpruner: stopped: ...`) and exits with status 75 (`errors.EXIT_RESUMABLE`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import EXIT_RESUMABLE, Resumable, UserError
from ..version import __version__
from . import data, search, prune, evaluate, report  # in stage order: each registers its commands as it is imported
from .common import COMMANDS, DESCRIPTION

STAGES = (data, search, prune, evaluate, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockpruner", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"blockpruner {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help, description=c.description or c.help[:1].upper() + c.help[1:] + ".")
        c.arguments(p)
        p.set_defaults(func=c.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        a.func(a)
    except UserError as e:
        print(f"blockpruner: error: {e}", file=sys.stderr)
        return 2
    except Resumable as e:
        print(f"blockpruner: stopped: {e}", file=sys.stderr)
        return EXIT_RESUMABLE
    return 0
