"""
The server's TLS layer: what it hands the HTTP layers above it and what it
sends, in memory and once over a real TCP connection on 127.0.0.1.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient

from resticd.certs import write_self_signed
from resticd.h2 import SOCKET_SEND_SIZE
from tests.web import make_server
from resticd.tls import CLOSE_WAIT, BatchingTLSFactory, ReloadingTLS
from tests.tools import transport_over


class Recorder(Protocol):
    """
    Keeps every C{dataReceived} call and how the connection ended.
    """

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


def tls_pair(tmp_path: Path, clock: Clock | None = None) -> tuple[Recorder, Recorder, object]:
    """
    A server behind L{BatchingTLSFactory} (waiting on C{clock}, if given)
    and a TLS client, connected in memory; the handshake is done. Returns
    both protocols and the pump.
    """
    cert, key = write_self_signed(str(tmp_path))
    server = Recorder()
    client = Recorder()
    server_factory = BatchingTLSFactory(ReloadingTLS(cert, key), False, Factory.forProtocol(lambda: server), clock)
    with open(cert, "rb") as f:
        trust = Certificate.loadPEM(f.read())
    client_factory = TLSMemoryBIOFactory(
        optionsForClientTLS("localhost", trust), True, Factory.forProtocol(lambda: client)
    )
    server_tls, client_tls, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None)
    )
    pump.flush()
    return server, client, pump


def test_decrypted_records_reach_the_protocol_together(tmp_path: Path) -> None:
    """
    What one socket read brings is decrypted and handed to the protocol
    above in pieces of up to a MiB, not one call per 16 KiB TLS record,
    and byte for byte in order.
    """
    server, client, pump = tls_pair(tmp_path)
    body = os.urandom(3 * (1 << 20) + 12345)
    assert client.transport is not None
    client.transport.write(body)
    pump.flush()  # type: ignore[attr-defined]
    assert b"".join(server.chunks) == body
    # 3 MiB is 193 records; a read delivers its records in at most a MiB.
    assert len(server.chunks) <= 5, [len(c) for c in server.chunks]


def test_data_before_close_notify_is_delivered_then_connection_ends(tmp_path: Path) -> None:
    """
    Data that arrives together with the client's TLS close is delivered
    before the protocol learns the connection has ended, and the end is
    clean.
    """
    server, client, pump = tls_pair(tmp_path)
    assert client.transport is not None
    client.transport.write(b"last words")
    client.transport.loseConnection()
    pump.flush()  # type: ignore[attr-defined]
    assert b"".join(server.chunks) == b"last words"
    assert server.lost is not None


def test_a_close_the_client_answers_ends_the_connection_at_once(tmp_path: Path) -> None:
    """
    When the server closes a connection, its TLS close alert goes out; a
    client that answers it with its own has the connection end at once,
    cleanly on both sides, and no timer is left behind.
    """
    clock = Clock()
    server, client, pump = tls_pair(tmp_path, clock)
    assert server.transport is not None
    server.transport.loseConnection()
    pump.flush()  # type: ignore[attr-defined]
    assert server.lost is not None and server.lost.check(ConnectionDone)
    assert client.lost is not None and client.lost.check(ConnectionDone)
    assert clock.getDelayedCalls() == []


def test_a_client_that_does_not_answer_the_close_is_closed_a_moment_later(tmp_path: Path) -> None:
    """
    A client that does not answer the server's close alert (an idle client
    that reads nothing, a host gone from the network) has its socket
    closed L{CLOSE_WAIT} seconds after the alert went out, not sooner, and
    not only when the client goes (Twisted would wait for its alert as
    long as the connection lasts): a stopping daemon is not held up. The
    client, once it reads, sees a clean end.
    """
    clock = Clock()
    server, client, pump = tls_pair(tmp_path, clock)
    tls: Any = server.transport
    socket_below = tls.transport
    tls.loseConnection()
    assert socket_below.stream, "the close alert was not sent"
    clock.advance(CLOSE_WAIT - 0.01)
    assert not socket_below.disconnecting
    clock.advance(0.01)
    assert socket_below.disconnecting
    assert clock.getDelayedCalls() == []
    pump.flush()  # type: ignore[attr-defined]
    assert server.lost is not None
    assert client.lost is not None and client.lost.check(ConnectionDone)


def test_large_writes_reach_the_client_intact(tmp_path: Path) -> None:
    """
    A large answer written in one call (as downloads are) is encrypted in
    large pieces and reaches the client byte for byte, in order, along with
    small writes around it.
    """
    server, client, pump = tls_pair(tmp_path)
    body = os.urandom(5 * (1 << 20) + 777)
    assert server.transport is not None
    server.transport.write(b"head")
    server.transport.write(body)
    server.transport.writeSequence([b"tail", b"!"])
    pump.flush()  # type: ignore[attr-defined]
    assert b"".join(client.chunks) == b"head" + body + b"tail!"


class _CountingConnection:
    """
    A pyOpenSSL connection that counts the calls of C{send}.
    """

    def __init__(self, connection: object) -> None:
        self._connection = connection
        self.sends = 0

    def send(self, data: bytes) -> int:
        self.sends += 1
        return self._connection.send(data)  # type: ignore[attr-defined, no-any-return]

    def __getattr__(self, name: str) -> object:
        return getattr(self._connection, name)


def test_a_large_write_is_encrypted_in_pieces_and_sent_in_chunks(tmp_path: Path) -> None:
    """
    OpenSSL encrypts an answer 64 KiB at a time, as many records as it
    takes (a MiB in 16 calls, not 64 of one 16 KiB record, nor one call
    that would leave its output buffer a MiB large for the connection's
    life), what it encrypted goes to the socket in 256 KiB chunks (4
    writes), and the client gets every byte in order.
    """
    server, client, pump = tls_pair(tmp_path)
    tls: Any = server.transport
    counting = _CountingConnection(tls._tlsConnection)
    tls._tlsConnection = counting
    writes: list[int] = []
    write = tls.transport.write

    def counted(data: bytes) -> None:
        writes.append(len(data))
        write(data)

    tls.transport.write = counted
    body = os.urandom(1 << 20)
    tls.write(body)
    pump.flush()  # type: ignore[attr-defined]
    assert counting.sends == 16
    assert len(writes) == 4 and min(writes) >= 256 << 10, writes
    assert b"".join(client.chunks) == body


def test_encrypted_output_larger_than_the_output_buffer_is_all_sent(tmp_path: Path) -> None:
    """
    When OpenSSL holds more encrypted bytes than the shared output buffer
    (a write encrypted in one call, outside the usual pieces), all of them
    are sent in one flush, buffer after buffer, and the client gets every
    byte in order.
    """
    server, client, pump = tls_pair(tmp_path)
    tls: Any = server.transport
    body = os.urandom(600 << 10)
    view = memoryview(body)
    done = 0
    while done < len(body):
        done += tls._tlsConnection.send(view[done:])
    tls._flushSendBIO()
    pump.flush()  # type: ignore[attr-defined]
    assert b"".join(client.chunks) == body


class _FailingConnection(_CountingConnection):
    """
    A pyOpenSSL connection whose third C{send} fails.
    """

    def send(self, data: bytes) -> int:
        if self.sends == 2:
            raise SSL.Error([("SSL routines", "", "bad write retry")])
        return super().send(data)


def test_what_was_encrypted_before_a_failing_write_is_sent(tmp_path: Path) -> None:
    """
    A write that OpenSSL fails part-way (after two of its 64 KiB pieces)
    ends the connection with the error; the pieces encrypted before it
    still reach the client, in order.
    """
    server, client, pump = tls_pair(tmp_path)
    tls: Any = server.transport
    tls._tlsConnection = _FailingConnection(tls._tlsConnection)
    body = os.urandom(1 << 20)
    tls.write(body)
    pump.flush()  # type: ignore[attr-defined]
    assert b"".join(client.chunks) == body[: 128 << 10]
    assert server.lost is not None and server.lost.check(SSL.Error) is not None, server.lost


def test_a_damaged_record_ends_the_connection_after_what_came_before(tmp_path: Path) -> None:
    """
    Records decrypted before a damaged one (its MAC does not check) reach
    the protocol intact; the damaged record ends the connection with an
    error, and nothing it held is delivered.
    """
    server, client, pump = tls_pair(tmp_path)
    assert client.transport is not None
    body = os.urandom(1 << 17)  # large enough to be encrypted at once
    client.transport.write(body)
    sent: bytes = pump.clientIO.getOutBuffer()  # type: ignore[attr-defined]
    # An application-data record of 64 bytes that no key produced.
    damaged = b"\x17\x03\x03\x00\x40" + os.urandom(64)
    tls: Any = server.transport
    tls.dataReceived(sent + damaged)
    pump.flush()  # type: ignore[attr-defined]
    assert b"".join(server.chunks) == body
    assert server.lost is not None
    assert server.lost.check(SSL.Error) is not None, server.lost


def test_a_large_answer_reaches_a_real_socket_intact_when_it_fills(tmp_path: Path) -> None:
    """
    Over a real TCP connection whose send buffer is small, several MiB
    written through the TLS layer reach a TLS client intact and in order:
    what the socket takes leaves at once, and the rest waits in the
    transport's queue as a copy, while the buffer the encrypted bytes came
    from is reused for the records after them.
    """
    cert, key = write_self_signed(str(tmp_path))
    server = Recorder()
    factory = BatchingTLSFactory(ReloadingTLS(cert, key), False, Factory.forProtocol(lambda: server))
    reactor = MemoryReactor()
    transport, peer = transport_over(factory.buildProtocol(None), reactor)
    transport.SEND_LIMIT = SOCKET_SEND_SIZE  # as on the site's connections
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    context = ssl.create_default_context(cafile=cert)
    client = context.wrap_socket(peer, server_hostname="localhost", do_handshake_on_connect=False)
    deadline = time.monotonic() + 20

    def pump() -> None:
        assert time.monotonic() < deadline, "the exchange did not finish in time"
        writing = transport in reactor.getWriters()
        select.select([transport.socket, client], [transport.socket] if writing else [], [], 0.1)
        if transport in reactor.getReaders():
            transport.doRead()
        if transport in reactor.getWriters():
            transport.doWrite()

    try:
        while True:
            try:
                client.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump()
        tls: Any = server.transport
        while not tls._handshakeDone:  # the client's last handshake message
            pump()
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        body = os.urandom(5 * (1 << 20) + 99)
        tls.write(body)
        assert transport in reactor.getWriters(), "the socket took it all: nothing was queued"
        received = bytearray()
        while len(received) < len(body):
            try:
                chunk = client.recv(1 << 20)
            except ssl.SSLWantReadError:
                pump()
                continue
            assert chunk, "the connection ended early"
            received += chunk
        assert received == body
    finally:
        client.close()
        transport.socket.close()


def test_site_connections_read_half_a_mib_on_plain_sockets_and_a_mib_under_tls(tmp_path: Path) -> None:
    """
    The site's connections over real sockets read half a MiB per system call
    over plain TCP (what an upload reads there it holds until its piece is
    written: 1 MiB reads shrunk to what came fragmented the heap) and a MiB
    under TLS (reads are decrypted and dropped at once); both send up to a
    MiB per call.
    """
    cert, key = write_self_signed(str(tmp_path))
    site = make_server(str(tmp_path / "data")).site
    reactor = MemoryReactor()
    plain, plain_peer = transport_over(site.buildProtocol(None), reactor)
    under_tls, tls_peer = transport_over(BatchingTLSFactory(ReloadingTLS(cert, key), False, site).buildProtocol(None), reactor)
    try:
        assert (plain.bufferSize, plain.SEND_LIMIT) == (512 << 10, 1 << 20)
        assert (under_tls.bufferSize, under_tls.SEND_LIMIT) == (1 << 20, 1 << 20)
    finally:
        for transport, peer in ((plain, plain_peer), (under_tls, tls_peer)):
            transport.socket.close()
            peer.close()
