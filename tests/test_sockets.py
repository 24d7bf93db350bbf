"""
Writing to a socket at once (L{resticd.sockets.write_now}): real TCP
connections on 127.0.0.1 under Twisted's own socket transport, driven by a memory
reactor so that what waits for the event loop stays visible.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport

from resticd.sockets import buffered, write_now
from tests.tools import drain, transport_over
from tests.web import make_server


@pytest.fixture
def pair() -> Iterator[tuple[tcp.Server, socket.socket, MemoryReactor]]:
    reactor = MemoryReactor()
    transport, peer = transport_over(Protocol(), reactor)
    yield transport, peer, reactor
    transport.socket.close()
    peer.close()


def test_a_write_with_nothing_queued_is_sent_at_once(pair: tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    """
    With nothing queued, the bytes are in the socket when C{write_now}
    returns, and the event loop is not asked to watch for writability.
    """
    transport, peer, reactor = pair
    write_now(transport, b"HTTP/1.1 200 OK\r\n\r\n")
    assert drain(peer) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert not buffered(transport)
    assert transport not in reactor.getWriters()


def test_a_write_behind_queued_bytes_keeps_its_place(pair: tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    """
    Bytes already queued go first: C{write_now} queues behind them, and
    the event loop sends both in order.
    """
    transport, peer, reactor = pair
    transport.write(b"first ")
    write_now(transport, b"second")
    assert drain(peer) == b""
    assert transport in reactor.getWriters()
    transport.doWrite()
    assert drain(peer) == b"first second"


def test_what_the_socket_cannot_take_is_queued_in_order(pair: tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    """
    When the socket takes only part of a write (its buffer is full), the
    rest is queued and follows; the peer gets every byte once, in order.
    """
    transport, peer, _ = pair
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = bytes(range(256)) * 400  # 100 KiB, within one SEND_LIMIT
    write_now(transport, data)
    assert buffered(transport)
    received = drain(peer)
    for _ in range(1000):
        if not buffered(transport):
            break
        transport.doWrite()
        received += drain(peer)
    assert received == data


def test_a_buffer_reused_after_the_write_changes_nothing_sent(
    pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    """
    Given a view of a buffer that is reused as soon as C{write_now}
    returns (as the TLS layer does), what the socket could not take is
    queued as a copy: the peer gets the bytes as they were when written.
    """
    transport, peer, _ = pair
    transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    buffer = bytearray(bytes(range(256)) * 400)
    expected = bytes(buffer)
    write_now(transport, memoryview(buffer))
    assert buffered(transport)
    buffer[:] = b"\0" * len(buffer)
    received = drain(peer)
    for _ in range(1000):
        if not buffered(transport):
            break
        transport.doWrite()
        received += drain(peer)
    assert received == expected


def test_large_writes_and_closing_connections_are_queued(pair: tuple[tcp.Server, socket.socket, MemoryReactor]) -> None:
    """
    A write over the transport's SEND_LIMIT is queued whole (sending part
    of it would mean copying the rest), and so is one on a connection
    that is closing; both still reach the peer.
    """
    transport, peer, _ = pair
    big = b"x" * (transport.SEND_LIMIT + 1)
    write_now(transport, big)
    assert drain(peer) == b""
    transport.doWrite()
    received = drain(peer)
    while buffered(transport):
        transport.doWrite()
        received += drain(peer)
    assert received == big
    transport.loseConnection()
    write_now(transport, b"last words")
    assert drain(peer) == b""
    transport.doWrite()
    assert drain(peer) == b"last words"


def test_a_write_to_a_peer_that_is_gone_is_left_to_the_transport(
    pair: tuple[tcp.Server, socket.socket, MemoryReactor],
) -> None:
    """
    When the peer has gone, C{write_now} raises nothing: the bytes are
    queued and the transport meets the error when it sends them.
    """
    transport, peer, _ = pair
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # with a reset
    write_now(transport, b"anyone there?")
    assert buffered(transport)
    assert isinstance(transport.doWrite(), ConnectionLost)


def test_other_transports_get_a_plain_write() -> None:
    """
    Anything that is not Twisted's socket transport (TLS above it, a test
    transport) gets the bytes through its own C{write}.
    """
    transport = StringTransport()
    write_now(transport, b"hello")
    assert transport.value() == b"hello"


def test_an_answer_leaves_in_the_turn_that_made_it(tmp_path: Path) -> None:
    """
    The whole answer to a small request (a HEAD, a 16 KiB range) is in the
    client's socket once the request has been handled, without a turn of
    the event loop in between.
    """
    server = make_server(str(tmp_path))
    reactor = MemoryReactor()
    channel = server.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    assert channel is not None
    transport, peer = transport_over(channel, reactor)
    try:
        channel.dataReceived(b"POST /r?create=true HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert drain(peer).startswith(b"HTTP/1.1 200 ")
        body = bytes(range(256)) * 256
        name = hashlib.sha256(body).hexdigest().encode()
        channel.dataReceived(b"POST /r/data/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (name, len(body), body))
        assert drain(peer).startswith(b"HTTP/1.1 200 ")
        channel.dataReceived(b"HEAD /r/data/%s HTTP/1.1\r\nHost: x\r\n\r\n" % name)
        answer = drain(peer)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n")
        assert b"Content-Length: 65536" in answer
        channel.dataReceived(b"GET /r/data/%s HTTP/1.1\r\nHost: x\r\nRange: bytes=100-16483\r\n\r\n" % name)
        answer = drain(peer)
        assert answer.startswith(b"HTTP/1.1 206 ")
        assert answer.endswith(body[100:16484])
        assert transport not in reactor.getWriters()
    finally:
        transport.socket.close()
        peer.close()


def test_the_site_sends_up_to_a_mebibyte_per_system_call(tmp_path: Path) -> None:
    """
    On the site's connections a write of up to 1 MiB (a TLS layer's
    encrypted output, a large answer) goes to the socket in one call when
    the socket has room, not in Twisted's 128 KiB steps through its queue.
    """
    server = make_server(str(tmp_path))
    reactor = MemoryReactor()
    channel = server.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    assert channel is not None
    transport, peer = transport_over(channel, reactor)
    try:
        transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        data = b"y" * (512 << 10)
        write_now(transport, data)
        assert not buffered(transport)
        assert transport not in reactor.getWriters()
        peer.settimeout(10)
        received = b""
        while len(received) < len(data):
            chunk = peer.recv(1 << 20)
            assert chunk, "the peer got less than was sent"
            received += chunk
        assert received == data
    finally:
        transport.socket.close()
        peer.close()
