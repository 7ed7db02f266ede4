"""Errors shared by the command-line entry points.

``CliError`` lives here, not in ``gateway.cli``, so that a subcommand module
(``gateway node``, ``gateway serve``...) can raise it without importing the
module that imports every subcommand: that was an import cycle.
"""

from __future__ import annotations


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""
