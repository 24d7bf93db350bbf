"""
Objects that are not in the page cache are read by a worker thread, never
on the event loop: the read functions against real files made cold with
C{posix_fadvise(DONTNEED)}, and the GET answers that use them.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from resticd.reads import PROBE_STEP, _read_through, is_cached, read_cached, warm
from resticd.threads import run_inline

from .logcapture import LogCapture
from .tools import drain, evict, transport_over
from .web import Server, make_server, name_of

ensure = pytest_twisted.ensureDeferred

MiB = 1 << 20


def nowait_works(path: str | Path) -> bool:
    """
    Whether the filesystem of C{path} answers C{preadv2(RWF_NOWAIT)} (tmpfs,
    for one, does not), asked of the system directly with a file of its
    own beside it: a probe of C{path} itself could start reading it.
    """
    probe = Path(path).with_name(".nowait-probe")
    probe.write_bytes(b"x")
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()
    return True


@pytest.fixture
def cold_file(tmp_path: Path) -> tuple[Path, bytes]:
    """
    A 3 MiB file none of which is in the page cache. Reading it through a
    descriptor without read-ahead (C{POSIX_FADV_RANDOM}) brings in only
    what is read: even a C{RWF_NOWAIT} read that finds nothing starts
    reading what it asked for, and the read-ahead of a plain descriptor can
    be MiBs.
    """
    data = os.urandom(3 * MiB)
    path = tmp_path / "object"
    path.write_bytes(data)
    assert evict(path) == 0
    return path, data


def test_cached_bytes_are_read_at_once(tmp_path: Path) -> None:
    """
    Bytes just written are in the page cache: C{read_cached} returns them
    and C{is_cached} says so, where the filesystem can tell; where it
    cannot, both leave the read to a worker. An empty read needs no read.
    """
    data = os.urandom(2 * MiB + 5)
    path = tmp_path / "object"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        if nowait_works(path):
            assert read_cached(fd, 4096, 100) == bytearray(data[100:4196])
            assert read_cached(fd, MiB, MiB) == bytearray(data[MiB : 2 * MiB])
            assert is_cached(fd, 0, len(data))
        else:
            assert read_cached(fd, 4096, 100) is None
            assert not is_cached(fd, 0, len(data))
        assert read_cached(fd, 0, 0) == bytearray()
        # Past the end of the file: not all there, so a worker reads (and
        # finds the file shorter).
        assert read_cached(fd, 4096, len(data) - 10) is None
    finally:
        os.close(fd)


def test_bytes_not_in_the_page_cache_are_left_to_a_worker(cold_file: tuple[Path, bytes]) -> None:
    """
    Nothing of an evicted file reads as cached; after C{warm} of a range,
    that range does (and its bytes are the file's), the rest still does
    not.
    """
    path, data = cold_file
    fd = os.open(path, os.O_RDONLY)
    # No read-ahead beyond what is read, so that the rest stays cold.
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    try:
        assert read_cached(fd, 4096, 0) is None
        assert read_cached(fd, 64 * 1024, 2 * MiB) is None
        assert not is_cached(fd, 0, len(data))
        warm(fd, MiB, MiB + 1)
        if nowait_works(path):
            assert is_cached(fd, MiB, MiB + 1)
            assert read_cached(fd, 4096, MiB + 10) == bytearray(data[MiB + 10 : MiB + 4106])
            assert not is_cached(fd, 0, len(data))
    finally:
        os.close(fd)


def test_a_range_cached_only_at_its_start_is_not_cached(cold_file: tuple[Path, bytes]) -> None:
    """
    C{is_cached} looks at every L{PROBE_STEP} of the range and its last
    byte, not only the first: a range whose first MiB is cached and whose
    end is not reads as not cached.
    """
    path, data = cold_file
    fd = os.open(path, os.O_RDONLY)
    # No read-ahead beyond what is read, so that the rest stays cold.
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    try:
        warm(fd, 0, PROBE_STEP)
        if nowait_works(path):
            assert is_cached(fd, 0, PROBE_STEP)
        assert not is_cached(fd, 0, len(data))
    finally:
        os.close(fd)


def test_warm_stops_at_the_end_of_the_file(tmp_path: Path) -> None:
    """
    Warming past the end of a file (it shrank since it was opened) returns
    instead of reading forever.
    """
    path = tmp_path / "object"
    path.write_bytes(b"x" * 1000)
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, length in ((0, 5 * MiB), (2000, 10)):
            worker = threading.Thread(target=warm, args=(fd, offset, length), daemon=True)
            worker.start()
            worker.join(10)
            assert not worker.is_alive(), f"warm({offset}, {length}) did not return"
    finally:
        os.close(fd)


def test_reading_through_brings_bytes_into_the_page_cache(cold_file: tuple[Path, bytes]) -> None:
    """
    Where C{sendfile} to C{/dev/null} is refused, C{warm} reads the bytes
    through a scratch buffer instead, with the same outcome.
    """
    path, data = cold_file
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    try:
        _read_through(fd, MiB - 3, 2 * MiB + 7)
        _read_through(fd, len(data) - 10, len(data) + 100)
        if nowait_works(path):
            assert is_cached(fd, MiB - 3, MiB + 10)
            assert read_cached(fd, 10, len(data) - 10) == bytearray(data[-10:])
            assert not is_cached(fd, 0, len(data))
    finally:
        os.close(fd)


# -- GET answers ------------------------------------------------------------------------


class Recorded:
    """
    A runner that does the work inline and records the name of each
    function it was given, or (held) keeps the work until released.
    """

    def __init__(self, hold: bool = False) -> None:
        self.calls: list[str] = []
        self.hold = hold
        self.pending: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        self.calls.append(f.__name__)
        if not self.hold:
            return run_inline(f, *args)
        d: Deferred[Any] = Deferred()
        self.pending.append((d, f, args))
        return d

    def release(self) -> None:
        for d, f, args in self.pending:
            run_inline(f, *args).chainDeferred(d)
        self.pending = []


async def stored_object(server: Server, size: int) -> tuple[str, bytes, str]:
    """
    An object of C{size} random bytes uploaded to C{/r/}: its URL path, its
    bytes and its file.
    """
    body = os.urandom(size)
    name = name_of(body)
    assert (await server.client.post("/r/?create=true")).code == 200
    assert (await server.client.post(f"/r/data/{name}", body)).code == 200
    return f"/r/data/{name}", body, server.layout.object_path(("r",), "data", name)


@ensure
async def test_a_cold_small_range_is_read_by_a_worker(tmp_path: Path) -> None:
    """
    A range of an object that is not in the page cache is read in a worker
    thread and answered with the right bytes; the same range once cached
    is answered from the event loop without one.
    """
    run = Recorded()
    server = make_server(str(tmp_path / "data"), run=run)
    path, body, file = await stored_object(server, 256 * 1024)
    evict(file)
    run.calls.clear()
    reply = await server.client.get(path, range="bytes=1000-70999")
    assert reply.code == 206 and reply.body == body[1000:71000]
    assert reply.header("content-range") == f"bytes 1000-70999/{len(body)}"
    assert run.calls == ["pread_closing"]
    run.calls.clear()
    reply = await server.client.get(path, range="bytes=1000-70999")
    assert reply.code == 206 and reply.body == body[1000:71000]
    assert run.calls == ([] if nowait_works(file) else ["pread_closing"])


@ensure
async def test_a_cold_large_object_is_warmed_by_a_worker_then_sent(tmp_path: Path) -> None:
    """
    A whole object (and a range) over a MiB that is not in the page cache,
    sent by static's producers (TLS, HTTP/2; here in memory): a worker
    reads its first 4 MiB into the page cache before the answer starts,
    workers the rest meanwhile, 4 MiB per call, through a descriptor of its
    own that is closed at the end. The answer is complete and right, and
    the second time no worker is needed.
    """
    run = Recorded()
    server = make_server(str(tmp_path / "data"), run=run)
    path, body, file = await stored_object(server, 9 * MiB + 17)
    evict(file)
    run.calls.clear()
    before = open_descriptors()
    reply = await server.client.get(path)
    assert reply.code == 200 and reply.body == body
    assert run.calls == ["warm"] * 3
    assert open_descriptors() == before
    run.calls.clear()
    reply = await server.client.get(path, range=f"bytes={MiB}-")
    assert reply.code == 206 and reply.body == body[MiB:]
    assert run.calls == ([] if nowait_works(file) else ["warm"] * 3)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("size", [64 * 1024, 2 * MiB])
@ensure
async def test_a_client_gone_while_a_worker_reads_gets_nothing(tmp_path: Path, size: int) -> None:
    """
    When the client goes away while a worker reads its object, nothing is
    written once the read is done, and the object's file is closed.
    """
    run = Recorded()
    server = make_server(str(tmp_path / "data"), run=run)
    path, _, file = await stored_object(server, size)
    evict(file)
    run.hold = True
    before = open_descriptors()
    protocol = server.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert len(run.pending) == 1 and transport.value() == b""
    protocol.connectionLost(Failure(ConnectionDone()))
    run.release()
    assert transport.value() == b""
    assert open_descriptors() == before


@ensure
async def test_a_read_that_fails_in_the_worker_is_a_server_error(tmp_path: Path, logged: LogCapture) -> None:
    """
    A read error in the worker (the disk) answers 500 with a plain-text
    body, without the range's C{Content-Range}, and is logged once.
    """

    def failing(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if f.__name__ == "pread_closing":
            os.close(args[0])  # what the worker owns, it closes
        if f.__name__ in ("pread_closing", "warm"):
            return run_inline(_raise_eio)
        return run_inline(f, *args)

    server = make_server(str(tmp_path / "data"), run=failing)
    path, _, file = await stored_object(server, 2 * MiB)
    evict(file)
    before = open_descriptors()
    small = await server.client.get(path, range="bytes=0-99")
    large = await server.client.get(path)
    for reply in (small, large):
        assert reply.code == 500 and reply.header("content-type") == "text/plain; charset=utf-8"
        assert reply.header("content-range") is None
    assert len([e for e in logged.events if e.get("log_failure") is not None]) == 2
    assert open_descriptors() == before


def _raise_eio() -> None:
    raise OSError(errno.EIO, "Input/output error")


@ensure
async def test_a_read_that_fails_in_the_middle_of_a_sendfile_answer_cuts_it(
    tmp_path: Path, logged: LogCapture
) -> None:
    """
    Over a plain socket (the C{sendfile} answer), a read error in a worker
    once the answer has begun cuts the connection: the client gets a
    200 with fewer bytes than its C{Content-Length} promised, all of them
    right, never a made-up rest; the error is logged once and the object's
    file is closed.
    """
    warms = []

    def failing_after_the_first_turn(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if f.__name__ == "warm":
            warms.append(args[1])
            if len(warms) > 1:
                return run_inline(_raise_eio)
        return run_inline(f, *args)

    server = make_server(str(tmp_path / "data"), run=failing_after_the_first_turn)
    path, body, file = await stored_object(server, 12 * MiB)
    evict(file)
    reactor = MemoryReactorClock()
    before = open_descriptors()
    channel = server.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert channel is not None
    transport, peer = transport_over(channel, reactor)
    try:
        channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = b""
        for _ in range(10_000):
            reactor.advance(0)
            if transport.disconnected:
                break
            if not received:
                # The first turn is out: the page cache drops the object
                # (memory pressure), so the next turn needs a worker.
                evict(file)
            received += drain(peer)
            if transport in reactor.getWriters():
                transport.doWrite()
        assert transport.disconnected, "the connection was not cut"
        peer.settimeout(5)
        try:
            while chunk := peer.recv(1 << 20):
                received += chunk
        except ConnectionResetError:  # cut with a reset: the rest is gone
            pass
    finally:
        if hasattr(transport, "socket"):
            transport.socket.close()
        peer.close()
    head, _, sent = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and f"Content-Length: {len(body)}".encode() in head
    assert 0 < len(sent) < len(body) and sent == body[: len(sent)]
    assert len(warms) >= 2
    assert len([e for e in logged.events if e.get("log_failure") is not None]) == 1
    assert open_descriptors() == before
