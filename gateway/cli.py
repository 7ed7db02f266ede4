"""The ``gateway`` command line: ``node``, ``serve``, ``publish``, ``media``,
``channels``, ``settle`` and ``bench``.

Each subcommand lives beside the code it drives; this module only wires them
into one argparse tree. A module contributes its subcommands through a
``register_cli(subparsers)`` function that sets ``func`` on its parsers; the
function is called with the parsed arguments and returns the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Re-exported: subcommands and tests import it from here too.
from gateway.errors import CliError

#: Modules that contribute subcommands, in the order ``--help`` lists them.
_COMMAND_MODULES = (
    "gateway.chain.node.cli",
    "gateway.media.cli",
    "gateway.server_cli",
    "gateway.bench",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the full ``gateway`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="gateway", description="Paystream pay-per-second media gateway"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # a part not built yet contributes no commands
        module.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gateway`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"gateway: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # python -m gateway.cli (gateway bench starts it so)
    sys.exit(main())
