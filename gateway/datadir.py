"""The gateway's data dir holds keys, signatures and client addresses: owner only.

Everything the gateway writes there is created 0600 in a 0700 directory; a
data dir made by an older version (or by hand) is tightened on start, and
the log says so. The embedded node keeps its own files under ``node/`` with
the same rule (gateway/chain/node).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def secure_datadir(path: Path) -> None:
    """Create ``path`` 0700, or tighten it and every file in it (not below it)."""
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    _tighten(path, PRIVATE_DIR)
    for entry in path.iterdir():
        if entry.is_file() and not entry.is_symlink():
            _tighten(entry, PRIVATE_FILE)
        elif entry.is_dir() and not entry.is_symlink():
            _tighten(entry, PRIVATE_DIR)


def _tighten(path: Path, mode: int) -> None:
    current = stat.S_IMODE(path.stat().st_mode)
    if current & 0o077:
        tightened = (current & 0o700) or mode  # the owner's bits stay
        path.chmod(tightened)
        log.warning("%s was open to others (mode %o): now %o", path, current, tightened)


def write_private(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write ``text`` to ``path``, created 0600 (``exclusive``: fail if it exists)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, PRIVATE_FILE)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def create_private(path: Path) -> None:
    """Create ``path`` empty and 0600 if it does not exist (before SQLite opens it:
    its WAL and shared-memory files take the database file's mode)."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE))
