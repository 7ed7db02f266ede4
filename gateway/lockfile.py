"""One process per data dir: an exclusive ``flock`` on a pid file inside it.

Two gateways (or two embedded nodes) on one data dir would both open its
chainstate and its store; the second one used to fail deep inside
libbitcoinkernel with a long traceback. ``gateway serve`` takes
``DATADIR/gateway.pid`` (and, with the embedded node, ``DATADIR/node/node.pid``)
before it starts anything; ``gateway node --datadir D`` takes ``D/node.pid``.
With ``--workers N`` the supervisor holds them for its workers.

The lock says whether the dir is held, not the pid written in the file: the
kernel drops a ``flock`` when its holder exits, even by SIGKILL, so a pid file
left behind never blocks a restart. The pid (and what holds it) is only there
for the message, and for ``gateway settle`` to check that the gateway named in
``gateway.json`` is the one running.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

#: ``gateway serve``'s lock in its data dir.
GATEWAY_LOCK = "gateway.pid"
#: The embedded node's lock in its data dir (``DATADIR/node`` under a gateway).
NODE_LOCK = "node.pid"
#: How long a reader waits for a new holder to write its pid (it does so at once).
_PID_WAIT_S = 1.0
#: How long a start retries past a reader's brief shared lock (:func:`holder_pid`).
_PROBE_WAIT_S = 0.2


class DataDirInUse(Exception):
    """Another process holds the data dir; the message names it."""


class DataDirLock:
    """A held lock; released by :meth:`release`, on ``with`` exit or when the process ends."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Let the data dir go (the pid file stays: it is not what marks it held)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DataDirLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def lock_datadir(datadir: Path, name: str, holder: str) -> DataDirLock:
    """Hold ``datadir/name`` for this process (``holder``: "gateway" or "node").

    Creates ``datadir`` if needed. Raises :class:`DataDirInUse` ("data dir D is
    in use by another gateway (pid N)") if another process holds it.
    """
    datadir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = datadir / name
    # O_CLOEXEC: a worker or any other child must not inherit (and so keep) the lock.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _lock_exclusive(fd)
    except BlockingIOError:
        pid, what = _read_holder(fd)
        os.close(fd)
        raise DataDirInUse(
            f"data dir {datadir} is in use by another {what or 'process'}"
            + (f" (pid {pid})" if pid else "")
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {holder}\n".encode(), 0)
    return DataDirLock(path, fd)


def holder_pid(datadir: Path, name: str) -> int | None:
    """The pid holding ``datadir/name``; None if no process holds it. Creates nothing."""
    try:
        fd = os.open(datadir / name, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, _ = _read_holder(fd)
            return pid or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _lock_exclusive(fd: int) -> None:
    """``flock(LOCK_EX)`` without waiting for a holder, but past a passing probe.

    :func:`holder_pid` holds a shared lock for an instant; a start that
    collided with it would otherwise name the previous holder as running.
    """
    deadline = time.monotonic() + _PROBE_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def _read_holder(fd: int) -> tuple[int | None, str]:
    """(pid, what) from a held pid file, waiting briefly for a holder that just took it."""
    deadline = time.monotonic() + _PID_WAIT_S
    while True:
        words = os.pread(fd, 64, 0).decode(errors="replace").split()
        if len(words) == 2 and words[0].isdigit():
            return int(words[0]), words[1]
        if time.monotonic() >= deadline:
            return None, ""
        time.sleep(0.02)
