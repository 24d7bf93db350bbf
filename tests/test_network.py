"""
The real daemon over real sockets on 127.0.0.1: TLS, ALPN, HTTP/2 (uploads,
ranged reads, cancelled streams) and HTTP/1.1 framing, as clients see them.
"""

from __future__ import annotations

import http.client
import io
import os
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAckReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import StreamClosedError

from .daemon import Daemon, running, sha256_hex
from .tools import evict

pytestmark = pytest.mark.network

#: Seconds any one socket operation or wait may take.
TIMEOUT = 15.0
MIB = 1 << 20
#: A well-formed object name nothing is stored under.
MISSING = "0" * 64


def tls_context(
    cert: Path | None,
    alpn: Sequence[str] | None = None,
    maximum: ssl.TLSVersion | None = None,
    minimum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """
    A verifying TLS client context that trusts only C{cert}.
    """
    assert cert is not None, "the daemon does not serve TLS"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(cert))
    if alpn is not None:
        ctx.set_alpn_protocols(list(alpn))
    if maximum is not None:
        ctx.maximum_version = maximum
    if minimum is not None:
        ctx.minimum_version = minimum
    return ctx


def tls_connect(daemon: Daemon, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """
    A TLS connection to the daemon, handshake done (raises when refused).
    """
    raw = socket.create_connection((daemon.host, daemon.port), timeout=TIMEOUT)
    try:
        return ctx.wrap_socket(raw, server_hostname=daemon.host)
    except BaseException:
        raw.close()
        raise


def http1(daemon: Daemon, ctx: ssl.SSLContext | None = None) -> http.client.HTTPConnection:
    """
    An HTTP/1.1 connection to the daemon (HTTPS when C{ctx} is given).
    """
    if ctx is not None:
        return http.client.HTTPSConnection(daemon.host, daemon.port, timeout=TIMEOUT, context=ctx)
    return http.client.HTTPConnection(daemon.host, daemon.port, timeout=TIMEOUT)


def call(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, http.client.HTTPResponse, bytes]:
    """
    One request on an HTTP/1.1 connection: status, response, whole body.
    """
    conn.request(method, path, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})
    response = conn.getresponse()
    return response.status, response, response.read()


# -- a small synchronous HTTP/2 client ----------------------------------------


@dataclass
class H2Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class _Stream:
    headers: dict[str, str] | None = None
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None


class H2Client:
    """
    HTTP/2 over one TLS connection, driven synchronously: every wait reads
    from the socket (bounded by L{TIMEOUT}) and answers what the connection
    needs (settings, pings, window updates).
    """

    def __init__(self, daemon: Daemon, context: ssl.SSLContext | None = None) -> None:
        """
        Connect to C{daemon}, with C{context} (which must offer h2), or one
        that trusts the daemon's certificate.
        """
        self.authority = f"{daemon.host}:{daemon.port}"
        if context is None:
            context = tls_context(daemon.cert, alpn=["h2", "http/1.1"])
        self.sock = tls_connect(daemon, context)
        # Like Go: no Nagle delays on small frames.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.conn.initiate_connection()
        self.streams: dict[int, _Stream] = {}
        self.terminated: ConnectionTerminated | None = None
        #: DATA frames sent per stream.
        self.frames_sent: dict[int, int] = {}
        #: The stream of each DATA frame received, in order.
        self.data_order: list[int] = []
        #: Streams whose received data is not acknowledged (a stalled reader).
        self.no_ack: set[int] = set()
        self.pings_acked = 0
        self._flush()

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self._flush()
        except OSError:
            pass
        self.sock.close()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def _handle(self, event: Event) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, ConnectionTerminated):
            self.terminated = event
        if isinstance(event, PingAckReceived):
            self.pings_acked += 1
        if stream is None:
            return
        if isinstance(event, ResponseReceived):
            stream.headers = {bytes(k).decode().lower(): bytes(v).decode() for k, v in event.headers}
        elif isinstance(event, DataReceived):
            stream.data += event.data
            self.data_order.append(event.stream_id)
            if event.stream_id in self.no_ack:
                return
            try:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            except StreamClosedError:
                pass
        elif isinstance(event, StreamEnded):
            stream.ended = True
        elif isinstance(event, StreamReset):
            stream.reset = int(event.error_code)

    def read_once(self, deadline: float) -> None:
        """
        Read and handle what the server sent next (at least one byte).
        """
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("the server did not answer in time")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 16)
        except (socket.timeout, TimeoutError):
            raise AssertionError("the server did not answer in time") from None
        if not data:
            raise ConnectionError(f"the server closed the connection (GOAWAY: {self.terminated})")
        for event in self.conn.receive_data(data):
            self._handle(event)
        self._flush()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        """
        Read until C{predicate()} holds.
        """
        deadline = time.monotonic() + timeout
        while not predicate():
            self.read_once(deadline)

    def start(self, method: str, path: str, headers: Sequence[tuple[str, str]] = (), end_stream: bool = False) -> int:
        """
        Open a stream with a request's headers; its id.
        """
        sid = self.conn.get_next_available_stream_id()
        self.streams[sid] = _Stream()
        self.frames_sent[sid] = 0
        request_headers = [
            (":method", method),
            (":scheme", "https"),
            (":authority", self.authority),
            (":path", path),
            *headers,
        ]
        self.conn.send_headers(sid, [(k.encode(), v.encode()) for k, v in request_headers], end_stream=end_stream)
        self._flush()
        return sid

    def send_body(self, sid: int, body: bytes, end_stream: bool = True) -> None:
        """
        Send C{body} on stream C{sid} in DATA frames no bigger than the
        server's frame size and flow-control windows allow, waiting for window
        updates when they are used up.
        """
        view = memoryview(body)
        deadline = time.monotonic() + TIMEOUT
        while view:
            stream = self.streams[sid]
            if stream.reset is not None or stream.ended:
                raise AssertionError(f"the server ended stream {sid} before its body was sent: {stream}")
            size = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size, len(view))
            if size <= 0:
                self.read_once(deadline)
                continue
            self.conn.send_data(sid, view[:size].tobytes())
            self.frames_sent[sid] += 1
            view = view[size:]
            self._flush()
        if end_stream:
            self.conn.end_stream(sid)
            self._flush()

    def response(self, sid: int, timeout: float = TIMEOUT) -> H2Response:
        """
        Wait for the whole response on stream C{sid}.
        """
        stream = self.streams[sid]
        self.wait_for(lambda: stream.ended or stream.reset is not None, timeout)
        assert stream.reset is None, f"the server reset stream {sid} (error {stream.reset})"
        assert stream.headers is not None
        del self.streams[sid]
        return H2Response(int(stream.headers[":status"]), stream.headers, bytes(stream.data))

    def reset(self, sid: int) -> None:
        """
        Cancel stream C{sid} (RST_STREAM with CANCEL), as Go does when a
        request's context is cancelled, then read on until a PING comes back,
        as Go's always-running reader would: the cancelled stream's frames
        still in flight are dropped and their connection window handed back.
        """
        self.conn.reset_stream(sid, ErrorCodes.CANCEL)
        self.streams.pop(sid, None)
        self.ping()

    def ping(self) -> None:
        """
        Send a PING and read until it is answered.
        """
        expected = self.pings_acked + 1
        self.conn.ping(b"resticd!")
        self._flush()
        self.wait_for(lambda: self.pings_acked >= expected)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: Sequence[tuple[str, str]] = ()
    ) -> H2Response:
        """
        One whole request: headers, body (with its content-length), response.
        """
        hdrs = list(headers)
        if body is not None:
            hdrs.append(("content-length", str(len(body))))
        sid = self.start(method, path, hdrs, end_stream=not body)
        if body:
            self.send_body(sid, body)
        return self.response(sid)

# -- fixtures and helpers -----------------------------------------------------


@pytest.fixture(scope="module")
def tls_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """
    One daemon with default options over TLS, shared by the module's tests
    that only read from it or use their own repository.
    """
    with running(tmp_path_factory.mktemp("tls"), "--debug") as daemon:
        yield daemon


@pytest.fixture
def h2(tls_daemon: Daemon) -> Iterator[H2Client]:
    client = H2Client(tls_daemon)
    try:
        yield client
    finally:
        client.close()


def create_repo(client: H2Client, repo: str) -> None:
    reply = client.request("POST", f"/{repo}/?create=true")
    assert reply.status == 200, reply


def open_fds(daemon: Daemon) -> list[str]:
    """
    What the daemon's open file descriptors point at (Linux).
    """
    fd_dir = Path(f"/proc/{daemon.process.pid}/fd")
    targets = []
    for fd in fd_dir.iterdir():
        try:
            targets.append(os.readlink(fd))
        except FileNotFoundError:
            pass
    return targets


def wait_no_fd(daemon: Daemon, fragment: str, timeout: float = 5.0) -> list[str]:
    """
    Poll (bounded) until no open file of the daemon has C{fragment} in its
    path; the ones left.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = [t for t in open_fds(daemon) if fragment in t]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


# -- TLS ----------------------------------------------------------------------


def test_tls_handshake_with_generated_cert(tls_daemon: Daemon) -> None:
    """
    The daemon presents the certificate it was given: a client trusting just
    that certificate completes the handshake (host name 127.0.0.1 checked)
    and gets a plain 404 for a missing object, while a client trusting only
    the system CAs is refused.
    """
    assert tls_daemon.url.startswith("https://127.0.0.1:")
    assert tls_daemon.cert is not None
    conn = http1(tls_daemon, tls_context(tls_daemon.cert))
    try:
        status, _, _ = call(conn, "POST", "/tls/?create=true")
        assert status == 200
        status, response, body = call(conn, "GET", f"/tls/data/{MISSING}", Range="bytes=0-")
        assert status == 404
        assert b"<html" not in body.lower()
        assert isinstance(conn.sock, ssl.SSLSocket)
        expected = ssl.PEM_cert_to_DER_cert(tls_daemon.cert.read_text())
        assert conn.sock.getpeercert(binary_form=True) == expected
    finally:
        conn.close()
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_connect(tls_daemon, ssl.create_default_context()).close()


def test_tls12_accepted_by_default(tls_daemon: Daemon) -> None:
    """
    Without --tls-min-version, a client that speaks at most TLS 1.2 is served.
    """
    with tls_connect(tls_daemon, tls_context(tls_daemon.cert, maximum=ssl.TLSVersion.TLSv1_2)) as sock:
        assert sock.version() == "TLSv1.2"


def test_tls_min_version_13(tmp_path: Path) -> None:
    """
    With --tls-min-version 1.3 a client capped at TLS 1.2 cannot connect; a
    TLS 1.3 client can, and is answered.
    """
    with running(tmp_path, "--tls-min-version", "1.3") as daemon:
        with pytest.raises(ssl.SSLError):
            tls_connect(daemon, tls_context(daemon.cert, maximum=ssl.TLSVersion.TLSv1_2)).close()
        ctx = tls_context(daemon.cert, minimum=ssl.TLSVersion.TLSv1_3)
        with tls_connect(daemon, ctx) as sock:
            assert sock.version() == "TLSv1.3"
        conn = http1(daemon, ctx)
        try:
            status, _, _ = call(conn, "GET", f"/r/data/{MISSING}", Range="bytes=0-")
            assert status == 404
        finally:
            conn.close()


# -- ALPN -----------------------------------------------------------------------


def test_alpn_offers_h2_by_default(tls_daemon: Daemon) -> None:
    """
    A client offering h2 and http/1.1 (as Go's does) gets HTTP/2.
    """
    with tls_connect(tls_daemon, tls_context(tls_daemon.cert, alpn=["h2", "http/1.1"])) as sock:
        assert sock.selected_alpn_protocol() == "h2"


def test_alpn_no_http2(tmp_path: Path) -> None:
    """
    With --no-http2 the same client gets http/1.1, and is served over it.
    """
    with running(tmp_path, "--no-http2") as daemon:
        ctx = tls_context(daemon.cert, alpn=["h2", "http/1.1"])
        with tls_connect(daemon, ctx) as sock:
            assert sock.selected_alpn_protocol() == "http/1.1"
        conn = http1(daemon, ctx)
        try:
            status, response, _ = call(conn, "POST", "/r/?create=true")
            assert status == 200
            assert response.version == 11
            status, _, _ = call(conn, "HEAD", f"/r/data/{MISSING}")
            assert status == 404
        finally:
            conn.close()


# -- HTTP/2 ---------------------------------------------------------------------


def test_h2_upload_and_ranged_read(h2: H2Client) -> None:
    """
    Over HTTP/2, a few MiB uploaded in many DATA frames (flow control
    respected) are stored under their sha256 name: HEAD gives their size, a
    ranged GET the exact bytes with 206, Content-Range and Content-Length,
    and a whole-file GET all of them.
    """
    create_repo(h2, "h2")
    body = os.urandom(3 * MIB + 12345)
    name = sha256_hex(body)
    sid = h2.start("POST", f"/h2/data/{name}", [("content-length", str(len(body)))])
    h2.send_body(sid, body)
    assert h2.frames_sent[sid] > 10
    reply = h2.response(sid)
    assert reply.status == 200, reply

    head = h2.request("HEAD", f"/h2/data/{name}")
    assert head.status == 200
    assert head.headers["content-length"] == str(len(body))

    part = h2.request("GET", f"/h2/data/{name}", headers=[("range", "bytes=10-99")])
    assert part.status == 206
    assert part.body == body[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{len(body)}"
    assert part.headers["content-length"] == "90"

    whole = h2.request("GET", f"/h2/data/{name}", headers=[("range", "bytes=0-")])
    assert whole.status == 206
    assert whole.headers["content-range"] == f"bytes 0-{len(body) - 1}/{len(body)}"
    assert whole.headers["content-length"] == str(len(body))
    assert whole.body == body
    assert h2.terminated is None


def test_h2_empty_object(h2: H2Client) -> None:
    """
    Over HTTP/2 an empty object can be uploaded, has size 0, and reading it
    the way restic does (Range: bytes=0-) answers 200 with an empty body.
    """
    create_repo(h2, "h2empty")
    name = sha256_hex(b"")
    reply = h2.request("POST", f"/h2empty/data/{name}", b"")
    assert reply.status == 200, reply
    head = h2.request("HEAD", f"/h2empty/data/{name}")
    assert head.status == 200
    assert head.headers["content-length"] == "0"
    got = h2.request("GET", f"/h2empty/data/{name}", headers=[("range", "bytes=0-")])
    assert got.status == 200
    assert got.body == b""


def test_h2_upload_with_wrong_name_is_refused(h2: H2Client, tls_daemon: Daemon) -> None:
    """
    Over HTTP/2, a body that does not hash to its name is refused with 400,
    nothing is stored, and the spool is left empty.
    """
    create_repo(h2, "h2bad")
    body = os.urandom(100_000)
    wrong = sha256_hex(body + b"x")
    reply = h2.request("POST", f"/h2bad/data/{wrong}", body)
    assert reply.status == 400
    assert h2.request("HEAD", f"/h2bad/data/{wrong}").status == 404
    assert tls_daemon.wait_spool_empty() == []


def in_flight(metrics: bytes) -> float:
    """
    The C{resticd_requests_in_flight} gauge of a /metrics page.
    """
    text = metrics.decode()
    match = re.search(r"^resticd_requests_in_flight(?:\{[^}]*\})? (\S+)$", text, re.M)
    assert match is not None, text
    return float(match.group(1))


def in_flight_h2(client: H2Client) -> float:
    reply = client.request("GET", "/metrics")
    assert reply.status == 200, reply
    return in_flight(reply.body)


def in_flight_http1(daemon: Daemon) -> float:
    conn = http1(daemon)
    try:
        status, _, body = call(conn, "GET", "/metrics")
        assert status == 200, body
        return in_flight(body)
    finally:
        conn.close()


def test_h2_cancelled_upload(tmp_path: Path) -> None:
    """
    An HTTP/2 upload cancelled mid-body (RST_STREAM) stores nothing: the
    object does not exist or list, its spool file is removed and closed, the
    request no longer counts as in flight in /metrics, and the same
    connection (and a new one) keeps working.
    """
    with running(tmp_path, "--prometheus-no-auth") as daemon:
        client = H2Client(daemon)
        try:
            create_repo(client, "r")
            idle = in_flight_h2(client)
            body = os.urandom(8 * MIB)
            name = sha256_hex(body)
            sid = client.start("POST", f"/r/data/{name}", [("content-length", str(len(body)))])
            client.send_body(sid, body[: 2 * MIB], end_stream=False)
            # The server has taken part of the body (it opened its windows).
            deadline = time.monotonic() + 5
            while not daemon.spool_files() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert daemon.spool_files(), "the upload never reached the spool"
            client.reset(sid)

            assert daemon.wait_spool_empty() == []
            assert wait_no_fd(daemon, "/.spool/") == []
            assert client.request("HEAD", f"/r/data/{name}").status == 404
            listing = client.request(
                "GET", "/r/data/", headers=[("accept", "application/vnd.x.restic.rest.v2")]
            )
            assert listing.status == 200
            assert name not in listing.body.decode()
            assert in_flight_h2(client) == idle

            small = os.urandom(1000)
            assert client.request("POST", f"/r/data/{sha256_hex(small)}", small).status == 200
            assert client.terminated is None
        finally:
            client.close()
        again = H2Client(daemon)
        try:
            assert again.request("HEAD", f"/r/data/{sha256_hex(small)}").status == 200
            assert again.request("HEAD", f"/r/data/{name}").status == 404
        finally:
            again.close()
        assert daemon.wait_spool_empty() == []


def cancel_downloads(client: H2Client, path: str, times: int) -> None:
    """
    Start C{times} whole-file GETs of C{path} one after the other, and cancel
    each (RST_STREAM) once its first bytes arrived, while the server waits for
    flow-control credit to send the rest.
    """
    for _ in range(times):
        sid = client.start("GET", path, [("range", "bytes=0-")], end_stream=True)
        stream = client.streams[sid]
        client.wait_for(lambda: len(stream.data) > 0 or stream.ended or stream.reset is not None)
        assert not stream.ended and stream.reset is None, "the download was over before it could be cancelled"
        assert stream.headers is not None and stream.headers[":status"] == "206"
        client.reset(sid)


def test_h2_cancelled_download_keeps_connection_usable(tmp_path: Path) -> None:
    """
    After HTTP/2 downloads cancelled mid-body (RST_STREAM), the same
    connection still serves correct ranged reads, is not shut down (no
    GOAWAY), and a new connection works too.
    """
    with running(tmp_path) as daemon:
        client = H2Client(daemon)
        try:
            create_repo(client, "r")
            body = os.urandom(4 * MIB)
            name = sha256_hex(body)
            assert client.request("POST", f"/r/data/{name}", body).status == 200
            cancel_downloads(client, f"/r/data/{name}", 3)
            part = client.request("GET", f"/r/data/{name}", headers=[("range", "bytes=100-4195")])
            assert part.status == 206
            assert part.body == body[100:4196]
            whole = client.request("GET", f"/r/data/{name}", headers=[("range", "bytes=0-")])
            assert whole.body == body
            assert client.terminated is None
        finally:
            client.close()
        again = H2Client(daemon)
        try:
            head = again.request("HEAD", f"/r/data/{name}")
            assert head.status == 200
            assert head.headers["content-length"] == str(len(body))
        finally:
            again.close()


def test_h2_cancelled_download_closes_file(tmp_path: Path) -> None:
    """
    A cancelled HTTP/2 download releases the object's file: a few seconds
    after the RST_STREAM the daemon holds no descriptor of it open (else
    every cancelled read leaks a descriptor until the daemon runs out).
    """
    with running(tmp_path) as daemon:
        client = H2Client(daemon)
        try:
            create_repo(client, "r")
            body = os.urandom(4 * MIB)
            name = sha256_hex(body)
            assert client.request("POST", f"/r/data/{name}", body).status == 200
            cancel_downloads(client, f"/r/data/{name}", 3)
            left = wait_no_fd(daemon, name)
            assert left == [], f"{len(left)} descriptors of the object still open after 3 cancelled downloads"
        finally:
            client.close()
        left = wait_no_fd(daemon, name)
        assert left == [], f"{len(left)} descriptors still open after the connection closed"


def test_h2_concurrent_downloads_share_the_connection(h2: H2Client) -> None:
    """
    Several downloads in flight on one HTTP/2 connection each get exactly
    their own bytes, in DATA frames no larger than the client allows (its
    h2 state machine refuses larger ones), and take turns on the
    connection rather than waiting for each other to finish.
    """
    create_repo(h2, "turns")
    bodies = [os.urandom(MIB + 1000 * i) for i in range(3)]
    for body in bodies:
        assert h2.request("POST", f"/turns/data/{sha256_hex(body)}", body).status == 200
    h2.data_order.clear()
    sids = [
        h2.start("GET", f"/turns/data/{sha256_hex(body)}", [("range", "bytes=0-")], end_stream=True)
        for body in bodies
    ]
    replies = [h2.response(sid) for sid in sids]
    for reply, body in zip(replies, bodies):
        assert reply.status == 206
        assert reply.body == body
    # 1 MiB each in frames of at most 16 KiB: at least 64 frames per stream.
    order = h2.data_order
    assert all(order.count(sid) >= 64 for sid in sids)
    # Taking turns: every stream had frames sent before the first one ended.
    first_done = min(max(i for i, sid in enumerate(order) if sid == s) for s in sids)
    assert set(order[: first_done + 1]) == set(sids)
    assert h2.terminated is None


def test_h2_response_resumes_when_connection_window_opens(tmp_path: Path) -> None:
    """
    HTTP/2 flow control: a download that had to wait because the
    connection's window was used up (by another, unread download) gets its
    data as soon as the client opens the connection window again; it must
    not stall forever.
    """
    with running(tmp_path) as daemon:
        client = H2Client(daemon)
        try:
            create_repo(client, "r")
            body = os.urandom(1 * MIB)
            name = sha256_hex(body)
            assert client.request("POST", f"/r/data/{name}", body).status == 200
            # A reader that does not keep up: the server may send it one
            # initial window (65535 bytes), which also uses up the connection's.
            first = client.start("GET", f"/r/data/{name}", [("range", "bytes=0-")], end_stream=True)
            client.no_ack.add(first)
            stalled = client.streams[first]
            client.wait_for(lambda: len(stalled.data) >= 65535)
            # A second download: its headers come, its body must wait.
            second = client.start("GET", f"/r/data/{name}", [("range", "bytes=0-199999")], end_stream=True)
            waiting = client.streams[second]
            client.wait_for(lambda: waiting.headers is not None)
            assert waiting.headers is not None and waiting.headers[":status"] == "206"
            time.sleep(0.5)
            assert len(waiting.data) == 0
            # Open the connection window (not the first stream's).
            client.conn.increment_flow_control_window(1 << 20)
            client._flush()
            reply = client.response(second, timeout=5)
            assert reply.body == body[:200000]
            client.reset(first)
        finally:
            client.close()


def test_h2_response_after_a_late_read_is_not_stalled(tmp_path: Path) -> None:
    """
    HTTP/2 flow control: when a finished response used up the connection's
    window and the client reads it only later, the next response (whose
    headers came already) gets its body as soon as the client hands the
    window back; it must not hang forever.
    """
    with running(tmp_path) as daemon:
        client = H2Client(daemon)
        try:
            create_repo(client, "r")
            body = os.urandom(1 * MIB)
            name = sha256_hex(body)
            assert client.request("POST", f"/r/data/{name}", body).status == 200
            # Exactly one connection window (65535 bytes), not read yet.
            first = client.start("GET", f"/r/data/{name}", [("range", "bytes=0-65534")], end_stream=True)
            client.no_ack.add(first)
            done = client.streams[first]
            client.wait_for(lambda: done.ended)
            assert bytes(done.data) == body[:65535]
            second = client.start("GET", f"/r/data/{name}", [("range", "bytes=0-199999")], end_stream=True)
            waiting = client.streams[second]
            client.wait_for(lambda: waiting.headers is not None)
            time.sleep(0.5)
            assert len(waiting.data) == 0
            # The application reads the first body now: its window goes back.
            client.conn.acknowledge_received_data(65535, first)
            client._flush()
            reply = client.response(second, timeout=5)
            assert reply.status == 206
            assert reply.body == body[:200000]
        finally:
            client.close()


def cpu_seconds(pid: int) -> float:
    """
    The user and system CPU time process C{pid} used so far (Linux).
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_h2_stalled_reader_does_not_make_the_daemon_spin(tmp_path: Path) -> None:
    """
    While an HTTP/2 client does not read a download (its flow-control window
    is used up), the daemon waits idle instead of burning a CPU core.
    """
    with running(tmp_path) as daemon:
        client = H2Client(daemon)
        try:
            create_repo(client, "r")
            body = os.urandom(1 * MIB)
            name = sha256_hex(body)
            assert client.request("POST", f"/r/data/{name}", body).status == 200
            sid = client.start("GET", f"/r/data/{name}", [("range", "bytes=0-")], end_stream=True)
            client.no_ack.add(sid)
            stream = client.streams[sid]
            client.wait_for(lambda: len(stream.data) >= 65535)
            before = cpu_seconds(daemon.process.pid)
            time.sleep(2)
            used = cpu_seconds(daemon.process.pid) - before
            assert used < 0.5, f"the daemon used {used:.2f} s of CPU in 2 s waiting for a stalled reader"
            client.reset(sid)
        finally:
            client.close()


# -- HTTP/1.1 framing -------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with running(tmp_path_factory.mktemp("plain"), tls=False) as daemon:
        yield daemon


def test_http1_lengths_and_ranges(plain_daemon: Daemon) -> None:
    """
    Over plain HTTP/1.1: HEAD's Content-Length is the object's size; a 206's
    Content-Length is the length of the range; a range ending past the end is
    clipped; a range starting at the size answers 416 with
    Content-Range: bytes */size.
    """
    assert plain_daemon.url.startswith("http://127.0.0.1:")
    conn = http1(plain_daemon)
    try:
        body = os.urandom(1000)
        name = sha256_hex(body)
        assert call(conn, "POST", "/h1/?create=true")[0] == 200
        assert call(conn, "POST", f"/h1/data/{name}", body)[0] == 200

        status, response, got = call(conn, "HEAD", f"/h1/data/{name}")
        assert status == 200
        assert response.getheader("content-length") == "1000"
        assert got == b""

        status, response, got = call(conn, "GET", f"/h1/data/{name}", Range="bytes=10-99")
        assert status == 206
        assert response.getheader("content-length") == "90"
        assert response.getheader("content-range") == "bytes 10-99/1000"
        assert got == body[10:100]

        status, response, got = call(conn, "GET", f"/h1/data/{name}", Range="bytes=990-5000")
        assert status == 206
        assert response.getheader("content-length") == "10"
        assert response.getheader("content-range") == "bytes 990-999/1000"
        assert got == body[990:]

        status, response, _ = call(conn, "GET", f"/h1/data/{name}", Range="bytes=1000-")
        assert status == 416
        assert response.getheader("content-range") == "bytes */1000"
    finally:
        conn.close()


def test_http1_aborted_upload(tmp_path: Path) -> None:
    """
    An HTTP/1.1 upload whose client disconnects mid-body stores nothing,
    leaves no spool file behind, and no longer counts as in flight in
    /metrics.
    """
    with running(tmp_path, "--prometheus-no-auth", tls=False) as daemon:
        idle = in_flight_http1(daemon)
        conn = http1(daemon)
        try:
            assert call(conn, "POST", "/h1abort/?create=true")[0] == 200
        finally:
            conn.close()
        body = os.urandom(4 * MIB)
        name = sha256_hex(body)
        with socket.create_connection((daemon.host, daemon.port), timeout=TIMEOUT) as sock:
            head = f"POST /h1abort/data/{name} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            sock.sendall(head.encode() + body[:MIB])
            deadline = time.monotonic() + 5
            while not daemon.spool_files() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert daemon.spool_files(), "the upload never reached the spool"
        assert daemon.wait_spool_empty() == []
        conn = http1(daemon)
        try:
            assert call(conn, "HEAD", f"/h1abort/data/{name}")[0] == 404
        finally:
            conn.close()
        assert in_flight_http1(daemon) == idle


def test_http1_cancelled_download_closes_file(plain_daemon: Daemon) -> None:
    """
    An HTTP/1.1 download whose client disconnects mid-body releases the
    object's file: the daemon holds no descriptor of it open afterwards.
    """
    conn = http1(plain_daemon)
    body = os.urandom(8 * MIB)
    name = sha256_hex(body)
    try:
        assert call(conn, "POST", "/h1cancel/?create=true")[0] == 200
        assert call(conn, "POST", f"/h1cancel/data/{name}", body)[0] == 200
    finally:
        conn.close()
    for _ in range(3):
        with socket.create_connection((plain_daemon.host, plain_daemon.port), timeout=TIMEOUT) as sock:
            sock.sendall(f"GET /h1cancel/data/{name} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-\r\n\r\n".encode())
            assert sock.recv(1 << 16).startswith(b"HTTP/1.1 206")
    assert wait_no_fd(plain_daemon, name) == []


def read_responses(reader: BinaryIO, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """
    The next C{count} responses (status, headers, body) to GET requests
    pipelined on one connection, read from one buffered reader.
    """
    responses = []
    for _ in range(count):
        status_line = reader.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        headers: dict[str, str] = {}
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = reader.read(int(headers["content-length"]))
        responses.append((int(status_line.split()[1]), headers, body))
    return responses


def read_bytes_metric(daemon: Daemon) -> float:
    """
    C{rest_server_blob_read_bytes_total}, summed over its labels.
    """
    conn = http1(daemon)
    try:
        status, _, body = call(conn, "GET", "/metrics")
    finally:
        conn.close()
    assert status == 200
    return sum(float(v) for v in re.findall(rb"^rest_server_blob_read_bytes_total\{[^}]*\} (\S+)$", body, re.M))


def test_http1_large_downloads_whole_ranged_pipelined_and_slow(tmp_path: Path) -> None:
    """
    Over plain HTTP/1.1 (where objects are sent with sendfile), a 24 MiB
    object comes back byte for byte: whole (200), as restic asks for it
    (C{bytes=0-}, 206 with Content-Range), a range in the middle, three
    pipelined requests answered in order on one connection, and to a reader
    with a small receive buffer that reads slowly. The bytes sent are
    counted in the metrics and the access log.
    """
    access_log = tmp_path / "access.log"
    with running(tmp_path, "--prometheus-no-auth", "--log", str(access_log), tls=False) as daemon:
        body = os.urandom(24 * MIB)
        name = sha256_hex(body)
        path = f"/big/data/{name}"
        conn = http1(daemon)
        try:
            assert call(conn, "POST", "/big/?create=true")[0] == 200
            assert call(conn, "POST", path, body)[0] == 200
            status, response, got = call(conn, "GET", path)
            assert (status, response.getheader("content-length"), got == body) == (200, str(len(body)), True)
            status, response, got = call(conn, "GET", path, Range="bytes=0-")
            assert status == 206 and got == body
            assert response.getheader("content-range") == f"bytes 0-{len(body) - 1}/{len(body)}"
            status, response, got = call(conn, "GET", path, Range="bytes=5000000-5999999")
            assert status == 206 and got == body[5_000_000:6_000_000]
            assert response.getheader("content-type") == "application/octet-stream"
        finally:
            conn.close()
        sent = 2 * len(body) + 1_000_000

        with socket.create_connection((daemon.host, daemon.port), timeout=TIMEOUT) as sock:
            requests = [f"GET {path} HTTP/1.1\r\nHost: x\r\nRange: {r}\r\n\r\n" for r in ("bytes=0-", "bytes=0-9", "bytes=-10")]
            sock.sendall("".join(requests).encode())
            answers = read_responses(sock.makefile("rb"), 3)
        assert [(status, got) for status, _, got in answers] == [(206, body), (206, body[:10]), (206, body[-10:])]
        sent += len(body) + 20

        with socket.create_connection((daemon.host, daemon.port), timeout=TIMEOUT) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-\r\n\r\n".encode())
            reader = sock.makefile("rb", buffering=0)
            got_slowly = bytearray()
            header_end = -1
            while header_end < 0 or len(got_slowly) < header_end + 4 + len(body):
                chunk = reader.read(64 * 1024)
                assert chunk, "the connection closed before the whole body arrived"
                got_slowly += chunk
                if header_end < 0:
                    header_end = got_slowly.find(b"\r\n\r\n")
                if len(got_slowly) < 2 * MIB:
                    time.sleep(0.002)
        assert got_slowly.startswith(b"HTTP/1.1 206 ")
        assert bytes(got_slowly[header_end + 4 :]) == body
        sent += len(body)

        assert read_bytes_metric(daemon) == sent
    logged = re.findall(r'"GET /big/data/\S+ HTTP/1.1" (\d+) (\d+)', access_log.read_text())
    assert [int(size) for _, size in logged] == [len(body), len(body), 1_000_000, len(body), 10, 10, len(body)]


@pytest.mark.parametrize("tls", [False, True], ids=["sendfile", "tls"])
def test_objects_not_in_the_page_cache_come_back_whole(tmp_path: Path, tls: bool) -> None:
    """
    Objects whose bytes are not in the page cache (read by a worker thread
    first) come back byte for byte, whole and as ranges large and small,
    over plain HTTP/1.1 (sendfile) and TLS. A client that leaves in the
    middle of such an answer leaves no open file behind.
    """
    with running(tmp_path, tls=tls) as daemon:
        ctx = tls_context(daemon.cert) if tls else None
        conn = http1(daemon, ctx)
        try:
            body = os.urandom(12 * MIB + 5)
            name = sha256_hex(body)
            path = f"/cold/data/{name}"
            assert call(conn, "POST", "/cold/?create=true")[0] == 200
            assert call(conn, "POST", path, body)[0] == 200
            stored = daemon.data / "cold" / "data" / name[:2] / name
            for range_header, expected in [
                (None, body),
                ("bytes=0-", body),
                ("bytes=5000000-9999999", body[5_000_000:10_000_000]),
                ("bytes=7000000-7065535", body[7_000_000:7_065_536]),
            ]:
                evict(stored)
                headers = {} if range_header is None else {"Range": range_header}
                status, _, got = call(conn, "GET", path, None, **headers)
                assert status == (200 if range_header is None else 206) and got == expected, range_header
        finally:
            conn.close()
        evict(stored)
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        raw.settimeout(TIMEOUT)
        raw.connect((daemon.host, daemon.port))
        with raw if ctx is None else ctx.wrap_socket(raw, server_hostname=daemon.host) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(64 * 1024).startswith(b"HTTP/1.1 200 ")
        assert wait_no_fd(daemon, name) == []


def read_until_cut(stream: io.RawIOBase, expected: int, truncate: Callable[[], None]) -> int:
    """
    Read an answer's body of C{expected} bytes slowly from C{stream}; after
    the first MiB, C{truncate} the object on disk. How many body bytes came
    before the connection ended (raises on a timeout: a stalled answer).
    """
    got = 0
    truncated = False
    while True:
        try:
            chunk = stream.read(64 * 1024)
        except (ConnectionResetError, ssl.SSLError):
            return got
        if not chunk:
            return got
        got += len(chunk)
        assert got < expected, "the whole body arrived although the object was truncated"
        if got >= MIB and not truncated:
            truncate()
            truncated = True
        time.sleep(0.002)


@pytest.mark.parametrize("tls", [False, True], ids=["sendfile", "tls"])
def test_an_object_truncated_while_being_sent_cuts_the_connection(tmp_path: Path, tls: bool) -> None:
    """
    An object truncated on disk while it is being sent (whole, or as restic
    reads it with C{Range: bytes=0-}): the connection is cut short of the
    Content-Length, rather than the answer ending short (the client would
    take the next answer for the rest of it) or waiting forever; the daemon
    says so in its log and goes on serving.
    """
    with running(tmp_path, tls=tls) as daemon:
        ctx = tls_context(daemon.cert) if tls else None
        conn = http1(daemon, ctx)
        bodies = [os.urandom(24 * MIB) for _ in range(2)]
        try:
            assert call(conn, "POST", "/shrink/?create=true")[0] == 200
            for body in bodies:
                assert call(conn, "POST", f"/shrink/data/{sha256_hex(body)}", body)[0] == 200
        finally:
            conn.close()
        for body, range_header in zip(bodies, ["", "Range: bytes=0-\r\n"]):
            name = sha256_hex(body)
            stored = daemon.data / "shrink" / "data" / name[:2] / name
            raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            raw.settimeout(TIMEOUT)
            raw.connect((daemon.host, daemon.port))
            sock: socket.socket = raw if ctx is None else ctx.wrap_socket(raw, server_hostname=daemon.host)
            with sock:
                sock.sendall(f"GET /shrink/data/{name} HTTP/1.1\r\nHost: x\r\n{range_header}\r\n".encode())
                stream = sock.makefile("rb", buffering=0)
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    byte = stream.read(1)
                    assert byte, "the connection closed before the headers"
                    head += byte
                assert re.search(rb"(?i)content-length: %d\r\n" % len(body), head)
                got = read_until_cut(stream, len(body), lambda: os.truncate(stored, 2 * MIB))
            assert got < len(body)
        assert daemon.log().count("stored object shrank while being sent") == 2
        missing = http1(daemon, ctx)
        try:
            assert call(missing, "HEAD", f"/shrink/data/{MISSING}")[0] == 404
        finally:
            missing.close()


def test_an_object_truncated_while_being_sent_over_http2_resets_its_stream(tmp_path: Path) -> None:
    """
    Over HTTP/2, an object truncated on disk while restic reads it
    (C{Range: bytes=0-}) ends its stream with RST_STREAM short of its
    Content-Length, never with a clean end, and its request ends (it is no
    longer counted in flight); the connection's other streams go on.
    """

    def requests_in_flight() -> float:
        scrape = http1(daemon, tls_context(daemon.cert))
        try:
            status, _, text = call(scrape, "GET", "/metrics")
        finally:
            scrape.close()
        assert status == 200
        found = re.search(rb"^resticd_requests_in_flight (\S+)$", text, re.M)
        assert found is not None
        return float(found.group(1))

    with running(tmp_path, "--prometheus-no-auth") as daemon:
        body = os.urandom(8 * MIB)
        name = sha256_hex(body)
        conn = http1(daemon, tls_context(daemon.cert))
        try:
            assert call(conn, "POST", "/shrink/?create=true")[0] == 200
            assert call(conn, "POST", f"/shrink/data/{name}", body)[0] == 200
        finally:
            conn.close()
        client = H2Client(daemon)
        try:
            sid = client.start("GET", f"/shrink/data/{name}", [("range", "bytes=0-")], end_stream=True)
            stream = client.streams[sid]
            # The client's 64 KiB windows hold the server back until it reads.
            client.wait_for(lambda: len(stream.data) >= 64 * 1024)
            os.truncate(daemon.data / "shrink" / "data" / name[:2] / name, 2 * MIB)
            client.wait_for(lambda: stream.reset is not None or stream.ended)
            assert stream.reset is not None and not stream.ended
            assert stream.headers is not None and stream.headers["content-length"] == str(len(body))
            assert len(stream.data) < len(body)
            other = client.start("HEAD", f"/shrink/data/{MISSING}", end_stream=True)
            client.wait_for(lambda: client.streams[other].ended)
            answer = client.streams[other].headers
            assert answer is not None and answer[":status"] == "404"
            # Only the scrape itself is left in flight.
            deadline = time.monotonic() + TIMEOUT
            while requests_in_flight() != 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert requests_in_flight() == 1
        finally:
            client.close()
        assert "stored object shrank while being sent" in daemon.log()
