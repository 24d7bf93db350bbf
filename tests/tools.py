"""
What several test modules share: the external programs the tests drive
(required on CI, optional elsewhere), bounded polling, files taken out of
the page cache, filesystems mounted for a test, and Twisted's socket
transport over a real TCP connection.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


@contextmanager
def mounted(kind: str, target: Path, options: str = "") -> Iterator[None]:
    """
    A real filesystem of type C{kind} (C{mount -t KIND [-o OPTIONS]})
    mounted on the directory C{target} while the block runs, unmounted at
    its end (lazily, and failing the test, if it is busy). Mounting needs
    root or CAP_SYS_ADMIN: where it is refused, the test is L{unavailable}
    (CI runs as root).
    """
    mount = shutil.which("mount")
    if mount is None:
        unavailable(f"cannot mount a {kind} here (no mount command)")
    argv = [mount, "-t", kind, *(["-o", options] if options else []), kind, str(target)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except OSError as e:
        unavailable(f"cannot mount a {kind} here ({e})")
    if done.returncode != 0:
        unavailable(f"cannot mount a {kind} here (mount exited {done.returncode}: {done.stderr.strip()})")
    try:
        yield
    finally:
        done = subprocess.run(["umount", str(target)], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)
            raise AssertionError(f"cannot unmount {target} (lazily unmounted): {done.stderr}")


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


def evict(path: str | Path) -> int:
    """
    Drop the file's pages from the page cache (written out first: only
    clean pages can be dropped), asking again a few times while
    C{mincore(2)} still finds some there (the kernel may keep a page it is
    busy with); how many pages stay (a daemon reading the file meanwhile
    brings some back).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        for _ in range(5):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            left = resident_pages(fd)
            if not left:
                break
            time.sleep(0.02)
        return left
    finally:
        os.close(fd)


def resident_pages(fd: int) -> int:
    """
    How many pages of the file C{fd} are in the page cache (C{mincore(2)}
    of a read-only mapping of it, which reads nothing).
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vector = ctypes.create_string_buffer(pages)
        if libc.mincore(address, size, vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return sum(byte & 1 for byte in vector.raw)
    finally:
        libc.munmap(address, size)


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
