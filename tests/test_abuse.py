"""
Clients that misbehave, crowds, races, and file modes: the real daemon (a
subprocess, over plain HTTP/1.1 on 127.0.0.1, stopped by its pid) where
sockets, timeouts and process resources matter, the site in memory where a
clock must be driven.

Misbehaving clients must each be cut off in time and leave nothing behind:
no spool file, no file descriptor, no memory; a crowd of idle keep-alive
connections must not slow down clients that transfer data; uploads of the
same name, and uploads racing deletes, end in one correct file or none.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import resource
import signal
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from h2.events import Event, ResponseReceived, StreamReset
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from resticd.certs import write_self_signed
from resticd.paths import HASHED_TYPES, is_object_name
from resticd.site import IDLE_TIMEOUT

from .daemon import Daemon, running, sha256_hex
from .tools import wait_for
from .web import HeldWrites, Server, http2_connection, make_server

pytestmark = pytest.mark.network

#: Seconds any one socket operation may take.
TIMEOUT = 15.0
MIB = 1 << 20
#: The daemon's --request-timeout in this module.
REQUEST_TIMEOUT = 2.0
#: Slack for a timeout to fire on a loaded 2-core machine.
SLACK = 2.0


# -- the daemon and raw HTTP/1.1 ----------------------------------------------


@contextmanager
def open_files_limit_raised() -> Iterator[None]:
    """
    Raise this process's soft limit on open files to the hard limit for the
    block (the load test holds 1,000 connections; the daemon, started
    inside, inherits the limit and raises its own).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


#: Loaded by the daemons of this module (through PYTHONPATH): SIGUSR2 makes
#: them run a full garbage collection, so that memory can be measured
#: without the garbage that is waiting for one.
SITECUSTOMIZE = """
import gc, signal
signal.signal(signal.SIGUSR2, lambda number, frame: gc.collect())
"""


@contextmanager
def measurable_memory(directory: Path) -> Iterator[None]:
    """
    Daemons started in the block can be measured: glibc's malloc returns
    freed large buffers to the system (a fixed mmap threshold) so that the
    resident size follows the memory in use rather than the allocator's
    high-water mark, and SIGUSR2 runs a full garbage collection
    (L{SITECUSTOMIZE}). A leak still shows; garbage and allocator noise,
    which swing by tens of MiB, do not.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
    names = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "PYTHONPATH")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "131072"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(directory), saved["PYTHONPATH"]]))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """
    One daemon for the module: plain HTTP, no authentication, a 2-second
    request timeout, and a repository C{/r/}.
    """
    tmp = tmp_path_factory.mktemp("abuse")
    with open_files_limit_raised(), measurable_memory(tmp / "site"):
        with running(
            tmp, "--request-timeout", str(REQUEST_TIMEOUT), tls=False
        ) as d:
            conn = connect(d)
            assert call(conn, "POST", "/r/?create=true")[0] == 200
            conn.close()
            yield d
            assert_every_object_intact(d.data)


def connect(daemon: Daemon) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(daemon.host, daemon.port, timeout=TIMEOUT)


def call(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, bytes]:
    """
    One request on a keep-alive connection: its status and whole body.
    """
    conn.request(method, path, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})
    response = conn.getresponse()
    return response.status, response.read()


def raw(daemon: Daemon) -> socket.socket:
    """
    A plain TCP connection to the daemon, for bytes no HTTP client sends.
    """
    sock = socket.create_connection((daemon.host, daemon.port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def head(method: str, path: str, length: int | None = None, extra: str = "") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: resticd.test"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def read_response(sock: socket.socket, method: str = "GET") -> tuple[int, bytes] | None:
    """
    The next response on a raw socket, or L{None} when the server closed
    the connection (or reset it) instead.
    """
    response = http.client.HTTPResponse(sock, method=method)
    try:
        response.begin()
        return response.status, response.read()
    except (http.client.RemoteDisconnected, ConnectionResetError, http.client.IncompleteRead):
        return None
    except http.client.BadStatusLine as e:
        if not str(e).strip("'\""):
            return None
        raise
    finally:
        response.close()


def closed_by_server(sock: socket.socket, timeout: float) -> float | None:
    """
    Wait up to C{timeout} seconds for the server to close (or reset) the
    connection, discarding what it sends; how long that took, or L{None}.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except (TimeoutError, socket.timeout):
            return None
        except ConnectionResetError:
            return time.monotonic() - started
        if not data:
            return time.monotonic() - started


def reset(sock: socket.socket) -> None:
    """
    Close with a TCP reset rather than a FIN, as a crashed client's kernel
    does.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def open_fds(daemon: Daemon) -> int:
    return len(os.listdir(f"/proc/{daemon.process.pid}/fd"))


def catches(daemon: Daemon, number: int) -> bool:
    """
    Whether the daemon has a handler for signal C{number}.
    """
    with open(f"/proc/{daemon.process.pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (number - 1)))
    return False


def rss(daemon: Daemon, collect: bool = False) -> int:
    """
    The daemon's resident memory, in bytes; with C{collect}, after a full
    garbage collection (see L{measurable_memory}).
    """
    if collect:
        assert catches(daemon, signal.SIGUSR2), "the daemon did not load the sitecustomize of measurable_memory"
        daemon.process.send_signal(signal.SIGUSR2)
        time.sleep(0.5)
    with open(f"/proc/{daemon.process.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stored(daemon: Daemon, kind: str, name: str, repo: str = "r") -> Path:
    """
    Where an object is on disk (restic's local layout).
    """
    if kind == "data":
        return daemon.data / repo / kind / name[:2] / name
    return daemon.data / repo / kind / name


def assert_every_object_intact(data: Path) -> None:
    """
    Every file under a type directory of every repository is named by the
    sha256 of its content: no upload was ever stored short, long or mixed.
    """
    for dirpath, _, filenames in os.walk(data):
        parts = Path(dirpath).relative_to(data).parts
        if not any(kind in parts for kind in HASHED_TYPES) or ".spool" in parts:
            continue
        for name in filenames:
            path = Path(dirpath) / name
            assert is_object_name(name), f"a stray file in a type directory: {path}"
            assert sha256_hex(path.read_bytes()) == name, f"{path} does not hash to its name"


def random_body(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# -- connections dropped and bodies of the wrong length -----------------------


def test_connection_dropped_mid_upload(daemon):
    """
    A client that goes away halfway through an upload (closing, or resetting
    the connection) leaves no object and no spool file behind.
    """
    body = random_body(3 * MIB, 1)
    name = sha256_hex(body)
    for close in (socket.socket.close, reset):
        sock = raw(daemon)
        sock.sendall(head("POST", f"/r/data/{name}", len(body)) + body[: len(body) // 2])
        assert wait_for(lambda: len(daemon.spool_files()) == 1, 5), "the upload was not being spooled"
        close(sock)
        assert daemon.wait_spool_empty() == []
    assert not stored(daemon, "data", name).exists()


def test_connection_dropped_mid_download(daemon):
    """
    A client that goes away after the first bytes of a large download does
    not disturb the daemon: its file is closed (no descriptor stays open)
    and the next client reads the whole object.
    """
    body = random_body(8 * MIB, 2)
    name = sha256_hex(body)
    conn = connect(daemon)
    assert call(conn, "POST", f"/r/data/{name}", body)[0] == 200
    before = open_fds(daemon)
    for close in (socket.socket.close, reset):
        sock = raw(daemon)
        sock.sendall(head("GET", f"/r/data/{name}", extra="Range: bytes=0-\r\n"))
        assert sock.recv(65536)
        close(sock)
    assert wait_for(lambda: open_fds(daemon) <= before, 5), f"{open_fds(daemon)} fds open, {before} before"
    status, got = call(conn, "GET", f"/r/data/{name}", Range="bytes=0-")
    assert status == 206 and got == body
    conn.close()


def test_body_shorter_than_content_length_then_close(daemon):
    """
    A body that ends, with the connection, before its Content-Length is not
    stored (even though the bytes that did arrive hash to the name) and
    leaves no spool file.
    """
    body = random_body(100_000, 3)
    name = sha256_hex(body)
    sock = raw(daemon)
    sock.sendall(head("POST", f"/r/keys/{name}", len(body) + 1000) + body)
    sock.shutdown(socket.SHUT_WR)
    assert read_response(sock, "POST") is None, "answered an upload whose body never ended"
    sock.close()
    assert daemon.wait_spool_empty() == []
    conn = connect(daemon)
    assert call(conn, "HEAD", f"/r/keys/{name}")[0] == 404
    conn.close()


def test_body_longer_than_content_length(daemon):
    """
    Bytes past a body's Content-Length are the next request: garbage there
    is answered 400 or the connection is closed, and what is stored is
    exactly the declared body. When the declared length cuts the object
    short, the upload fails its hash (400) and nothing is stored.
    """
    body = random_body(200_000, 4)
    name = sha256_hex(body)
    sock = raw(daemon)
    sock.sendall(head("POST", f"/r/keys/{name}", len(body)) + body + b"GARBAGE\x00\xff not http\r\n\r\n")
    assert read_response(sock, "POST") == (200, b"")
    following = read_response(sock)
    assert following is None or following[0] == 400, following
    sock.close()
    assert stored(daemon, "keys", name).read_bytes() == body

    other = random_body(200_000, 5)
    other_name = sha256_hex(other)
    sock = raw(daemon)
    sock.sendall(head("POST", f"/r/keys/{other_name}", len(other) - 1000) + other + b"\r\n\r\n")
    first = read_response(sock, "POST")
    assert first is not None and first[0] == 400, first
    following = read_response(sock)
    assert following is None or following[0] == 400, following
    sock.close()
    assert not stored(daemon, "keys", other_name).exists()
    assert daemon.wait_spool_empty() == []


# -- slowloris ------------------------------------------------------------------


@pytest.mark.parametrize(
    "first, dripped",
    [
        (b"", b"POST /r/keys/" + b"0" * 64 + b" HTTP/1.1\r\nHost: resticd.test\r\n"),
        (b"POST /r/keys/" + b"0" * 64 + b" HTTP/1.1\r\n", b"Host: resticd.test\r\nContent-Length: 1000\r\nX-Slow: " + b"x" * 100),
    ],
    ids=["request line", "headers"],
)
def test_slowloris_is_cut_off(daemon, first, dripped):
    """
    A client that sends its request one byte per second, never stopping, is
    disconnected once C{--request-timeout} (2 s here) has passed since its
    request began: whether it drips the request line itself or the headers
    after it. Its request leaves no spool file.
    """
    sock = raw(daemon)
    sock.sendall(first)
    started = time.monotonic()
    closed = None
    for byte in dripped:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            closed = time.monotonic() - started
            break
        if closed_by_server(sock, 1.0) is not None:
            closed = time.monotonic() - started
            break
        if time.monotonic() - started > REQUEST_TIMEOUT + SLACK + 1:
            break
    sock.close()
    assert closed is not None, f"still connected after {time.monotonic() - started:.1f} s of dripping"
    assert REQUEST_TIMEOUT - 0.5 <= closed <= REQUEST_TIMEOUT + SLACK, f"disconnected after {closed:.1f} s"
    assert daemon.wait_spool_empty() == []


def test_stalled_body_is_cut_off(daemon):
    """
    An upload whose body keeps coming (a byte every half second, for longer
    than the timeout) is not cut off; once the body stalls for
    C{--request-timeout}, the connection is closed and its spool file
    removed, and nothing is stored.
    """
    body = random_body(MIB + 1000, 6)
    name = sha256_hex(body)
    sock = raw(daemon)
    # A first MiB at once: enough for a piece to be written to a spool file.
    sock.sendall(head("POST", f"/r/keys/{name}", len(body)) + body[:MIB])
    dripped = MIB
    for _ in range(6):  # 3 s of progress, more than the 2 s timeout
        sock.sendall(body[dripped : dripped + 1])
        dripped += 1
        assert closed_by_server(sock, 0.5) is None, "cut off while the body was still coming"
    assert len(daemon.spool_files()) == 1
    stalled = closed_by_server(sock, REQUEST_TIMEOUT + SLACK)
    sock.close()
    assert stalled is not None, "a stalled body was never cut off"
    assert stalled >= REQUEST_TIMEOUT - 0.5 - 0.5, f"cut off {stalled:.1f} s into the stall"
    assert daemon.wait_spool_empty() == []
    assert not stored(daemon, "keys", name).exists()


# -- 1,000 misbehaving requests: no leaks -----------------------------------------


def _misbehaviours(daemon: Daemon, big: str) -> list[Callable[[], None]]:
    """
    Ways to misbehave, each one request on a new connection.
    """
    small = random_body(50_000, 7)
    small_name = sha256_hex(small)

    def dropped_upload() -> None:
        sock = raw(daemon)
        sock.sendall(head("POST", f"/r/data/{small_name}", len(small)) + small[:20_000])
        sock.close()

    def reset_upload() -> None:
        sock = raw(daemon)
        sock.sendall(head("POST", f"/r/data/{small_name}", len(small)) + small[:20_000])
        reset(sock)

    def dropped_download() -> None:
        sock = raw(daemon)
        sock.sendall(head("GET", f"/r/data/{big}", extra="Range: bytes=0-\r\n"))
        sock.recv(32768)
        sock.close()

    def reset_download() -> None:
        sock = raw(daemon)
        sock.sendall(head("GET", f"/r/data/{big}", extra="Range: bytes=0-\r\n"))
        sock.recv(32768)
        reset(sock)

    def short_body() -> None:
        sock = raw(daemon)
        sock.sendall(head("POST", f"/r/data/{small_name}", len(small) + 10) + small)
        sock.shutdown(socket.SHUT_WR)
        read_response(sock, "POST")
        sock.close()

    def long_body() -> None:
        sock = raw(daemon)
        sock.sendall(head("POST", f"/r/data/{small_name}", len(small) - 10) + small + b"\r\n\r\n")
        read_response(sock, "POST")
        read_response(sock)
        sock.close()

    def garbage() -> None:
        sock = raw(daemon)
        sock.sendall(os.urandom(300) + b"\r\n\r\n")
        read_response(sock)
        sock.close()

    def too_large() -> None:
        sock = raw(daemon)
        sock.sendall(head("POST", f"/r/data/{small_name}", 1 << 40))
        read_response(sock, "POST")
        sock.close()

    def headers_then_close() -> None:
        sock = raw(daemon)
        sock.sendall(b"GET /r/keys/ HTTP/1.1\r\nHost: resticd.test\r\n")
        sock.close()

    def stalled_headers() -> None:
        sock = raw(daemon)
        sock.sendall(b"GET /r/keys/ HTTP/1.1\r\nHost: resticd.test\r\n")
        closed_by_server(sock, REQUEST_TIMEOUT + SLACK)
        sock.close()

    def stalled_body() -> None:
        sock = raw(daemon)
        sock.sendall(head("POST", f"/r/data/{small_name}", len(small)) + small[:1000])
        closed_by_server(sock, REQUEST_TIMEOUT + SLACK)
        sock.close()

    quick = [dropped_upload, reset_upload, dropped_download, reset_download, short_body, long_body, garbage, too_large, headers_then_close]
    # The slow ones (2 s each, until the server cuts them off) are one in twenty.
    return quick * 2 + [stalled_headers, stalled_body]


SLOW = ("stalled_headers", "stalled_body")


#: Misbehaving clients at once.
PARALLEL = 32


def _settled(daemon: Daemon, fds: int) -> bool:
    return open_fds(daemon) <= fds and daemon.spool_files() == []


def test_misbehaving_requests_leak_nothing(daemon):
    """
    After 1,000 misbehaving requests (a mix of dropped and reset uploads and
    downloads, bodies shorter and longer than declared, garbage, oversized
    declarations, stalled headers and bodies; 32 at a time), the daemon's
    open file descriptors return to what they were and its memory grows by
    at most 4 MiB (measured after a warm-up of 500 of the same mix, each
    time after a full garbage collection), no spool file is left, and the
    daemon still answers.
    """
    big = random_body(8 * MIB, 8)
    big_name = sha256_hex(big)
    conn = connect(daemon)
    assert call(conn, "POST", f"/r/data/{big_name}", big)[0] == 200
    conn.close()
    kinds = _misbehaviours(daemon, big_name)
    rng = random.Random(9)

    def run(count: int) -> None:
        chosen = [rng.choice(kinds) for _ in range(count)]
        slow = [kind for kind in chosen if kind.__name__ in SLOW]
        # The slow ones only wait: they get a thread each.
        with ThreadPoolExecutor(PARALLEL) as pool, ThreadPoolExecutor(len(slow) or 1) as waiting:
            futures = [(waiting if kind in slow else pool).submit(kind) for kind in chosen]
            for future in futures:
                try:
                    future.result(TIMEOUT)
                except OSError:
                    pass  # the server may reset a misbehaving connection

    run(500)
    assert wait_for(lambda: daemon.spool_files() == [], 10)
    fds, memory = open_fds(daemon), rss(daemon, collect=True)
    started = time.monotonic()
    run(1000)
    elapsed = time.monotonic() - started
    assert wait_for(lambda: _settled(daemon, fds), 10), (
        f"{open_fds(daemon)} fds open (baseline {fds}), spool {daemon.spool_files()}"
    )
    uncollected = rss(daemon)
    after = rss(daemon, collect=True)
    grown = after - memory
    print(
        f"\n1,000 misbehaving requests in {elapsed:.1f} s; RSS {memory / MIB:.1f} -> {after / MIB:.1f} MiB "
        f"({uncollected / MIB:.1f} MiB before a full garbage collection)"
    )
    assert grown <= 4 * MIB, f"RSS grew by {grown / MIB:.1f} MiB"
    conn = connect(daemon)
    assert call(conn, "GET", f"/r/data/{big_name}", Range="bytes=0-9") == (206, big[:10])
    conn.close()


# -- timeouts, in memory ------------------------------------------------------------


class Connection:
    """
    One connection to a site in memory, fed raw bytes.
    """

    def __init__(self, server: Server) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 40000), lenient=True)
        protocol = server.site.buildProtocol(self.transport.getPeer())
        assert protocol is not None
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting or self.transport.disconnected)

    def lose(self) -> None:
        """
        The connection is gone: the transport stops its producer (the
        channel), then tells the protocol, as TCP transports do.
        """
        producer, self.transport.producer = self.transport.producer, None
        if producer is not None:
            producer.stopProducing()
        self.protocol.connectionLost(Failure(ConnectionDone()))


def test_idle_keepalive_connection_is_closed_after_180_seconds(tmp_path):
    """
    An idle keep-alive connection stays open for longer than Go's client
    keeps idle connections (90 s) and is closed once it has been idle for
    180 s.
    """
    server = make_server(str(tmp_path / "data"))
    conn = Connection(server)
    conn.send(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
    assert conn.transport.value().startswith(b"HTTP/1.1 200 ")
    assert IDLE_TIMEOUT == 180
    server.reactor.advance(90.5)
    assert not conn.closing, "closed before Go's 90 s idle timeout"
    server.reactor.advance(179 - 90.5)
    assert not conn.closing, "closed before 180 s"
    server.reactor.advance(1.5)
    assert conn.closing, "still open after 180 idle seconds"
    conn.lose()


def test_header_timeout_aborts_a_request_line_without_headers(tmp_path):
    """
    A request line whose headers never come is aborted C{--request-timeout}
    seconds after it arrived (here 5 s), well before the idle timeout.
    """
    server = make_server(str(tmp_path / "data"), request_timeout=5.0)
    conn = Connection(server)
    conn.send(b"GET /r/keys/ HTTP/1.1\r\n")
    server.reactor.advance(4.9)
    assert not conn.closing
    server.reactor.advance(0.2)
    assert conn.transport.disconnected, "the connection was not aborted"
    conn.lose()
    assert [c for c in server.reactor.getDelayedCalls() if c.active()] == []


def test_request_line_dripped_byte_by_byte_is_aborted(tmp_path):
    """
    A request line that arrives one byte per second (a slowloris that never
    finishes its first line, so never idles) is aborted
    C{--request-timeout} seconds (here 5 s) after its first byte.
    """
    server = make_server(str(tmp_path / "data"), request_timeout=5.0)
    conn = Connection(server)
    for byte in b"GET /r/keys/ HTTP/1.1":
        conn.send(bytes([byte]))
        server.reactor.advance(1.0)
        if conn.closing:
            break
    assert conn.transport.disconnected, "still connected after 21 s of a request line dripping in"
    conn.lose()


def test_stalled_body_is_aborted_in_memory(tmp_path):
    """
    A body that stops arriving is aborted C{--request-timeout} seconds after
    its last byte, not after its first, and its spool file is removed.
    """
    server = make_server(str(tmp_path / "data"), request_timeout=5.0)
    assert server.client is not None
    conn = Connection(server)
    # A first MiB at once, written to a spool file; then a byte at a time.
    conn.send(b"POST /r/keys/" + b"0" * 64 + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MIB + 100))
    conn.send(b"x" * MIB)
    for _ in range(4):
        server.reactor.advance(4.0)
        conn.send(b"x")
    assert not conn.closing, "aborted although the body kept coming"
    assert len(server.spool_files()) == 1
    server.reactor.advance(5.1)
    assert conn.transport.disconnected
    conn.lose()
    assert server.spool_files() == []


def test_idle_timeout_counts_from_the_last_answer(tmp_path):
    """
    The idle timeout starts again after each answer: a connection used
    every 100 s stays open, and closes 180 s after its last answer.
    """
    server = make_server(str(tmp_path / "data"))
    conn = Connection(server)
    for _ in range(3):
        conn.send(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
        server.reactor.advance(100.0)
    assert conn.transport.value().count(b"HTTP/1.1 200 ") == 3
    assert not conn.closing, "closed although it was used every 100 s"
    server.reactor.advance(79.0)
    assert not conn.closing, "closed before 180 s since the last answer"
    server.reactor.advance(1.5)
    assert conn.closing, "still open 180 s after the last answer"
    conn.lose()


@pytest.mark.parametrize("request_timeout", [5.0, 0.0])
def test_an_answer_slower_than_the_idle_timeout_is_not_cut_off(tmp_path, request_timeout):
    """
    While an answer is being made (here a listing whose directory read
    takes 400 s) neither the idle timeout nor the request timeout (if any)
    closes the connection; the idle timeout counts again from the answer.
    """
    held = HeldWrites()
    server = make_server(str(tmp_path / "data"), run=held, request_timeout=request_timeout)
    conn = Connection(server)
    conn.send(b"POST /r/?create=true HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    held.release_all()
    assert conn.transport.value().startswith(b"HTTP/1.1 200 ")
    conn.transport.clear()
    conn.send(b"GET /r/keys/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert held.queued, "the listing does not wait for a worker"
    server.reactor.advance(400.0)
    assert not conn.closing, "closed while the answer was being made"
    held.release_all()
    assert conn.transport.value().startswith(b"HTTP/1.1 200 ")
    server.reactor.advance(179.0)
    assert not conn.closing
    server.reactor.advance(1.5)
    assert conn.closing, "still open 180 s after the answer"
    conn.lose()


def test_a_connection_closed_by_its_client_leaves_no_timer(tmp_path):
    """
    A keep-alive connection its client closes (idle, or with a request line
    begun) leaves no timer behind in the daemon.
    """
    server = make_server(str(tmp_path / "data"))
    for last in (b"", b"GET /r/"):
        conn = Connection(server)
        conn.send(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n" + last)
        assert conn.transport.value().startswith(b"HTTP/1.1 200 ")
        conn.lose()
        assert [c for c in server.reactor.getDelayedCalls() if c.active()] == []


def test_without_request_timeout_bytes_keep_a_connection_open(tmp_path):
    """
    With C{--request-timeout 0} only the idle timeout applies, and every
    byte that arrives restarts it: a request line dripping in every 100 s
    is not cut off, and 180 s of silence closes the connection.
    """
    server = make_server(str(tmp_path / "data"), request_timeout=0.0)
    conn = Connection(server)
    for byte in b"GET /r/":
        conn.send(bytes([byte]))
        server.reactor.advance(100.0)
    assert not conn.closing, "closed although bytes kept coming"
    server.reactor.advance(79.0)
    assert not conn.closing
    server.reactor.advance(1.5)
    assert conn.closing, "still open after 180 s without a byte"
    conn.lose()


def test_requests_on_a_keepalive_connection_schedule_no_timer_each(tmp_path, monkeypatch):
    """
    The idle, request-line and header timeouts of a keep-alive connection
    share one timer, moved rather than made again: 200 requests (a restic
    run makes thousands) schedule at most a few timers, not several each,
    and the timeouts still work afterwards.
    """
    server = make_server(str(tmp_path / "data"), request_timeout=5.0)
    scheduled: list[float] = []
    call_later = server.reactor.callLater

    def counting(delay: float, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        scheduled.append(delay)
        return call_later(delay, f, *args, **kwargs)

    monkeypatch.setattr(server.reactor, "callLater", counting)
    conn = Connection(server)
    conn.send(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
    first = len(scheduled)
    for _ in range(200):
        conn.send(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
        server.reactor.advance(0.01)
    assert conn.transport.value().count(b"HTTP/1.1 200 ") == 201
    assert len(scheduled) - first <= 2, f"{len(scheduled) - first} timers for 200 requests"
    conn.send(b"GET /r/keys/ HTTP/1.1\r\n")
    server.reactor.advance(5.1)
    assert conn.transport.disconnected, "a request line without headers was not aborted"
    conn.lose()
    assert [c for c in server.reactor.getDelayedCalls() if c.active()] == []


def test_stalled_http2_upload_is_reset_after_the_request_timeout(tmp_path):
    """
    Over HTTP/2 each stream has its own body timeout: an upload whose body
    stops arriving is reset C{--request-timeout} seconds after its last
    bytes (not after its first), while another stream on the connection
    is answered; nothing of it is left in the spool. No timer of any
    stream (the reset one, a completed upload) stays behind.
    """
    server = make_server(str(tmp_path / "data"), request_timeout=5.0)
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 40000), lenient=True)
    protocol, client = http2_connection(server, transport)

    def exchange() -> list[Event]:
        protocol.dataReceived(client.data_to_send())
        events = client.receive_data(transport.value())
        transport.clear()
        protocol.dataReceived(client.data_to_send())
        return events

    exchange()
    client.send_headers(1, [(":method", "POST"), (":path", "/?create=true"), (":scheme", "https"), (":authority", "x")], end_stream=True)
    exchange()
    name = "0" * 64
    client.send_headers(3, [(":method", "POST"), (":path", f"/keys/{name}"), (":scheme", "https"), (":authority", "x"),
                            ("content-length", str(MIB + 100))])
    client.send_data(3, b"x" * 60_000)
    exchange()
    for _ in range(4):
        server.reactor.advance(4.0)
        client.send_data(3, b"x")
        assert not [e for e in exchange() if isinstance(e, StreamReset)], "reset although its body kept coming"
    client.send_headers(5, [(":method", "GET"), (":path", "/-/healthy"), (":scheme", "https"), (":authority", "x")], end_stream=True)
    answered = exchange()
    assert [e.headers for e in answered if isinstance(e, ResponseReceived) and e.stream_id == 5]
    server.reactor.advance(5.1)
    resets = [e for e in exchange() if isinstance(e, StreamReset)]
    assert [e.stream_id for e in resets] == [3]
    assert server.spool_files() == []
    body = b"y" * 100_000
    client.send_headers(7, [(":method", "POST"), (":path", f"/keys/{sha256_hex(body)}"), (":scheme", "https"),
                            (":authority", "x"), ("content-length", str(len(body)))])
    client.send_data(7, body, end_stream=True)
    stored = exchange()
    assert [dict(e.headers)[b":status"] for e in stored if isinstance(e, ResponseReceived)] == [b"200"]
    protocol.connectionLost(Failure(ConnectionDone()))
    assert [c for c in server.reactor.getDelayedCalls() if c.active()] == []


# -- load ---------------------------------------------------------------------------


def test_load_with_1000_idle_connections(daemon):
    """
    With 1,000 keep-alive connections held open, 8 clients each upload and
    read back four 8 MiB objects at full speed (256 MiB each way, HTTP/1.1):
    every transfer completes with the right content, and all the while a
    HEAD on one of the held connections is answered within a second. The
    held connections still work afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft >= 1200, f"open files limit {soft} (hard {hard}): too low to hold 1,000 connections"
    held: list[socket.socket] = []
    try:
        # In batches answered before the next: a burst of connections
        # beyond the listen backlog (Twisted's default, 50) waits for SYN
        # retransmits, a second each.
        for _ in range(25):
            batch = [raw(daemon) for _ in range(40)]
            held += batch
            for sock in batch:
                sock.sendall(head("HEAD", "/r/config"))
            for sock in batch:
                answer = read_response(sock, "HEAD")
                assert answer is not None and answer[0] == 404
        failures: list[str] = []
        latencies: list[float] = []
        done = threading.Event()

        def client(number: int) -> None:
            conn = connect(daemon)
            try:
                for i in range(4):
                    body = random_body(8 * MIB, 1000 + 10 * number + i)
                    name = sha256_hex(body)
                    status, _ = call(conn, "POST", f"/r/data/{name}", body)
                    if status != 200:
                        failures.append(f"upload {number}/{i}: {status}")
                        continue
                    status, got = call(conn, "GET", f"/r/data/{name}", Range="bytes=0-")
                    if status != 206 or hashlib.sha256(got).hexdigest() != name:
                        failures.append(f"download {number}/{i}: {status}, {len(got)} bytes")
            except OSError as e:
                failures.append(f"client {number}: {e!r}")
            finally:
                conn.close()

        def probe() -> None:
            i = 0
            while not done.is_set():
                sock = held[i % len(held)]
                i += 7
                started = time.monotonic()
                sock.sendall(head("HEAD", "/r/config"))
                answer = read_response(sock, "HEAD")
                latencies.append(time.monotonic() - started)
                if answer is None or answer[0] != 404:
                    failures.append(f"held connection {i}: {answer}")
                    return
                done.wait(0.02)

        prober = threading.Thread(target=probe)
        prober.start()
        started = time.monotonic()
        clients = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(120)
        elapsed = time.monotonic() - started
        done.set()
        prober.join(TIMEOUT)
        assert failures == []
        assert latencies, "the probe never ran"
        print(
            f"\nload: 512 MiB in {elapsed:.1f} s ({512 / elapsed:.0f} MiB/s) with 1,000 idle connections; "
            f"{len(latencies)} probes, slowest {max(latencies) * 1000:.0f} ms"
        )
        assert max(latencies) < 1.0, f"a HEAD took {max(latencies):.2f} s under load"
        for sock in held[::50]:
            sock.sendall(head("HEAD", "/r/config"))
            answer = read_response(sock, "HEAD")
            assert answer is not None and answer[0] == 404
    finally:
        for sock in held:
            sock.close()
    assert daemon.wait_spool_empty() == []


# -- concurrency --------------------------------------------------------------------


def test_same_object_uploaded_by_20_clients_at_once(daemon):
    """
    Twenty clients uploading the same 1 MiB object at the same moment all
    get 200, and one correct file is stored; no spool file is left.
    """
    body = random_body(MIB, 10)
    name = sha256_hex(body)
    barrier = threading.Barrier(20)
    codes: list[int] = []

    def upload() -> None:
        conn = connect(daemon)
        conn.connect()
        barrier.wait(TIMEOUT)
        codes.append(call(conn, "POST", f"/r/data/{name}", body)[0])
        conn.close()

    threads = [threading.Thread(target=upload) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    assert codes == [200] * 20
    assert stored(daemon, "data", name).read_bytes() == body
    assert daemon.wait_spool_empty() == []


def test_uploads_racing_deletes(daemon):
    """
    Uploads of a 2 MiB object racing deletes of it (3 uploaders and 3
    deleters at once, the deletes at random moments from the start of the
    uploads to after their end; 15 rounds): every request gets 200, and
    each round ends with the correct file or none, never a partial or
    mixed one, and with no spool file. (Both endings must occur, or the
    race was not run.)
    """
    outcomes = {"present": 0, "absent": 0}
    rng = random.Random(12)
    for round_ in range(15):
        body = random_body(2 * MIB, 100 + round_)
        name = sha256_hex(body)
        barrier = threading.Barrier(6)
        codes: list[tuple[str, int]] = []
        # From deletes all before the uploads end to deletes after them.
        scale = (0.0, 0.005, 0.01, 0.02, 0.05)[round_ % 5]
        delays = [[rng.uniform(0, scale)] for _ in range(3)]

        def upload() -> None:
            conn = connect(daemon)
            conn.connect()
            barrier.wait(TIMEOUT)
            codes.append(("POST", call(conn, "POST", f"/r/snapshots/{name}", body)[0]))
            conn.close()

        def delete(pauses: list[float]) -> None:
            conn = connect(daemon)
            conn.connect()
            barrier.wait(TIMEOUT)
            for pause in pauses:
                time.sleep(pause)
                codes.append(("DELETE", call(conn, "DELETE", f"/r/snapshots/{name}")[0]))
            conn.close()

        threads = [threading.Thread(target=upload) for _ in range(3)]
        threads += [threading.Thread(target=delete, args=(d,)) for d in delays]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 2)
        assert sorted(codes) == [("DELETE", 200)] * 3 + [("POST", 200)] * 3, codes
        path = stored(daemon, "snapshots", name)
        if path.exists():
            assert path.read_bytes() == body, "a partial or mixed object"
            outcomes["present"] += 1
        else:
            outcomes["absent"] += 1
        assert daemon.wait_spool_empty() == []
        entries = os.listdir(path.parent)
        assert all(is_object_name(e) for e in entries), entries
    print(f"\nuploads racing deletes: {outcomes}")
    assert outcomes["present"] and outcomes["absent"], f"the race always ended the same way: {outcomes}"


def test_identical_upload_racing_a_delete_is_not_refused(tmp_path, monkeypatch):
    """
    An upload of an object that another client just stored, racing a delete
    of it (the delete lands between the upload finding the name taken and
    comparing the stored file), is answered 200: its content hashes to its
    name, so there is no "different object" to refuse, and restic takes a
    403 as final. (The race, pinned here deterministically, is what
    C{test_uploads_racing_deletes} meets now and then.)
    """
    server = make_server(str(tmp_path / "data"))
    server.store.create_repo(("r",))
    body = b"a snapshot uploaded twice"
    name = sha256_hex(body)
    request = b"POST /r/snapshots/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (name.encode(), len(body), body)
    first = Connection(server)
    first.send(request)
    assert first.transport.value().startswith(b"HTTP/1.1 200 ")
    first.lose()
    compare = server.store._same_content

    def deleted_meanwhile(path: str, spool: object, spooled: str) -> bool | None:
        os.unlink(path)  # the racing DELETE
        return compare(path, spool, spooled)  # type: ignore[arg-type]

    monkeypatch.setattr(server.store, "_same_content", deleted_meanwhile)
    second = Connection(server)
    second.send(request)
    answer = second.transport.value()
    second.lose()
    assert answer.startswith(b"HTTP/1.1 200 "), answer.split(b"\r\n")[0] + b" " + answer.rsplit(b"\r\n", 1)[-1]
    assert server.spool_files() == []


# -- file modes and secrets ---------------------------------------------------------


def _modes_after_use(daemon: Daemon) -> dict[str, int]:
    """
    Create repositories (the root one, one, a nested one), a config and
    objects of every type through the daemon, remove a data fan-out
    directory so that an upload makes it again, and catch a spool file in
    flight; the permission bits of each.
    """
    conn = connect(daemon)
    for repo in ("/", "/m/", "/m/n/"):
        assert call(conn, "POST", f"{repo}?create=true")[0] == 200, repo
        assert call(conn, "POST", f"{repo}config", b"config bytes")[0] == 200
    objects = {}
    for kind in HASHED_TYPES:
        body = f"an object of type {kind}".encode()
        objects[kind] = sha256_hex(body)
        assert call(conn, "POST", f"/m/{kind}/{objects[kind]}", body)[0] == 200
    # A fan-out directory removed by hand is made again by the next upload.
    body = b"into a fan-out directory made by an upload"
    fanout = daemon.data / "m" / "n" / "data" / sha256_hex(body)[:2]
    fanout.rmdir()
    assert call(conn, "POST", f"/m/n/data/{sha256_hex(body)}", body)[0] == 200
    sock = raw(daemon)
    sock.sendall(head("POST", f"/m/keys/{'0' * 64}", 2 * MIB) + b"x" * (MIB + 10))  # a piece is written
    # The mode is set right after the file is made, before its first write.
    assert wait_for(lambda: len(daemon.spool_files()) == 1, 5)
    spool_file = daemon.spool / daemon.spool_files()[0]
    assert wait_for(lambda: os.stat(spool_file).st_size > 0, 5)
    modes = {"spool file": stat.S_IMODE(os.stat(spool_file).st_mode)}
    sock.close()
    conn.close()
    data = daemon.data
    paths = {
        "data root (repository /)": data,
        "spool directory": data / ".spool",
        "repository /m/": data / "m",
        "nested repository /m/n/": data / "m" / "n",
        "config of /": data / "config",
        "config of /m/": data / "m" / "config",
        "config of /m/n/": data / "m" / "n" / "config",
        "fan-out directory made by an upload": fanout,
        "fan-out directory data/00 of /m/": data / "m" / "data" / "00",
        "object data": data / "m" / "data" / objects["data"][:2] / objects["data"],
    }
    for kind in HASHED_TYPES:
        paths[f"type directory {kind} of /"] = data / kind
        paths[f"type directory {kind} of /m/n/"] = data / "m" / "n" / kind
        if kind != "data":
            paths[f"object {kind}"] = data / "m" / kind / objects[kind]
    modes.update({what: stat.S_IMODE(os.stat(path).st_mode) for what, path in paths.items()})
    return modes


@pytest.mark.parametrize(
    "group, file_mode, dir_mode",
    [(False, 0o600, 0o700), (True, 0o660, 0o770)],
    ids=["private", "group-accessible"],
)
def test_file_and_directory_modes(tmp_path, group, file_mode, dir_mode):
    """
    Everything the daemon creates has the documented mode, whatever the
    umask it was started with (here the common 022): files 0600 and
    directories 0700, or 0660 and 0770 with C{--group-accessible-repos};
    repository, type, fan-out and spool directories, objects, configs and
    spool files alike.
    """
    old = os.umask(0o022)
    try:
        args = ["--group-accessible-repos"] if group else []
        with running(tmp_path, *args, tls=False) as d:
            modes = _modes_after_use(d)
    finally:
        os.umask(old)
    wrong = {
        what: f"{mode:o}"
        for what, mode in modes.items()
        if mode != (file_mode if "config" in what or "object" in what or what == "spool file" else dir_mode)
    }
    assert wrong == {}, f"expected files {file_mode:o}, directories {dir_mode:o}"


def test_warning_for_secrets_readable_by_others(tmp_path):
    """
    The daemon warns at startup, naming the file, when the htpasswd file or
    the TLS key is readable by every user; it says nothing of the kind when
    both are 0600.
    """
    for readable in (True, False):
        tls_dir = tmp_path / f"tls-{readable}"
        cert, key = write_self_signed(str(tls_dir))
        os.chmod(key, 0o644 if readable else 0o600)
        old = os.umask(0o022 if readable else 0o077)
        try:
            with running(tmp_path / f"run-{readable}", "--tls-cert", cert, "--tls-key", key, tls=False, auth={"u": "p"}) as d:
                htpasswd = d.args[d.args.index("--htpasswd-file") + 1]
                log = d.log()
        finally:
            os.umask(old)
        warnings = [line for line in log.splitlines() if "readable by every user" in line]
        if readable:
            assert any(htpasswd in line for line in warnings), log
            assert any(key in line for line in warnings), log
        else:
            assert stat.S_IMODE(os.stat(htpasswd).st_mode) == 0o600
            assert warnings == [], warnings


def test_aborted_downloads_leave_no_garbage_holding_memory(daemon):
    """
    Downloads that clients abort (200 of an 8 MiB object, read for 256 KiB
    then closed or reset, 16 at a time) do not leave their buffers in
    reference cycles that only a full garbage collection frees: the
    daemon's resident memory is within 16 MiB of what it is after one.
    (Python collects such cycles rarely; on a busy server the garbage piles
    up by about a MiB per aborted download in the meantime.)
    """
    big = random_body(8 * MIB, 11)
    name = sha256_hex(big)
    conn = connect(daemon)
    assert call(conn, "POST", f"/r/data/{name}", big)[0] == 200
    conn.close()
    baseline = rss(daemon, collect=True)

    def abort(number: int) -> None:
        sock = raw(daemon)
        sock.sendall(head("GET", f"/r/data/{name}", extra="Range: bytes=0-\r\n"))
        got = 0
        while got < 256 * 1024:
            data = sock.recv(65536)
            if not data:
                break
            got += len(data)
        (reset if number % 2 else socket.socket.close)(sock)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(abort, range(200)))
    time.sleep(0.5)
    uncollected = rss(daemon)
    collected = rss(daemon, collect=True)
    print(f"\n200 aborted downloads: RSS {baseline / MIB:.0f} -> {uncollected / MIB:.0f} MiB, {collected / MIB:.0f} MiB after a full collection")
    assert uncollected - collected <= 16 * MIB, f"{(uncollected - collected) / MIB:.0f} MiB of garbage"
