"""
What several test modules share: the external programs the tests drive
(required on CI, optional elsewhere), bounded polling, files taken out of
the page cache, and Twisted's socket transport over a real TCP connection.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest
from twisted.internet import tcp
from twisted.internet.interfaces import IProtocol, IReactorFDSet


def unavailable(why: str) -> NoReturn:
    """
    Give up on a test that cannot run here: a failure on CI (C{CI=true}),
    which must run every test, and a skip elsewhere.
    """
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}, and CI must run this test")
    pytest.skip(why)


def required_program(name: str, package: str | None = None) -> str:
    """
    The path of program C{name} (from Debian package C{package}), or
    L{unavailable} when it is not installed.
    """
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (Debian package {package or name})")
    return path


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """
    Poll C{predicate} until it holds (L{True}) or C{timeout} seconds pass
    (L{False}).
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def evict(path: str | Path) -> None:
    """
    Drop the file's pages from the page cache (written out first: only
    clean pages can be dropped).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def transport_over(protocol: IProtocol, reactor: IReactorFDSet) -> tuple[tcp.Server, socket.socket]:
    """
    Twisted's socket transport over one end of a TCP connection on
    127.0.0.1, connected to C{protocol}; the other end is returned for
    reading.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname(), timeout=5)
        ours, _ = listener.accept()
    ours.setblocking(False)
    theirs.setblocking(False)
    transport = tcp.Server(ours, protocol, ("127.0.0.1", 1), None, 1, reactor)  # type: ignore[arg-type]
    protocol.makeConnection(transport)
    return transport, theirs


def drain(peer: socket.socket) -> bytes:
    """
    Everything the peer can read now.
    """
    chunks = []
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
