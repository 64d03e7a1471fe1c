"""Entry point of the ``veilface`` command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from veilface.errors import VeilfaceError

# Command modules, each with ``register(subparsers)``. Imported lazily so that
# ``veilface serve`` does not import the face stack and vice versa.
_COMMAND_MODULES = (
    "veilface.cli.serve",
    "veilface.cli.tenant",
    "veilface.cli.token",
    "veilface.cli.gallery",
    "veilface.cli.bench",
    "veilface.cli.demo",
    "veilface.cli.embed",
    "veilface.cli.protect",
    "veilface.cli.fed",
    "veilface.cli.fed_deploy",  # after fed: adds "fed deploy-local"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veilface", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a command whose extra is not installed
            if exc.name and exc.name.startswith("veilface"):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = args.func(args)
    except VeilfaceError as exc:
        from veilface.cli.common import error_exit

        code, line = error_exit(exc)
        print(line, file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
