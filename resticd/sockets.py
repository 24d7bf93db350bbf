"""
Writing to a connection's socket without waiting for the event loop.

Twisted's socket transports queue every write and send it on a later turn
of the event loop, once the socket is reported writable: for each answer,
two C{epoll_ctl} calls (watch for writability, stop watching) and a loop
turn. L{write_now} sends at once what the socket takes when nothing is
queued before it, and queues only the rest, so a small answer leaves in
the turn that made it. This leans on L{twisted.internet.abstract.FileDescriptor}'s
buffer attributes (C{dataBuffer}, C{offset}, C{_tempDataLen}) and on
L{twisted.internet.tcp.Connection.writeSomeData}, within the pinned Twisted.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def buffered(transport: Any) -> bool:
    """
    Whether the socket transport C{transport} has bytes queued that it has
    not sent yet.
    """
    return bool(len(transport.dataBuffer) - transport.offset or transport._tempDataLen)


def write_now(transport: Any, data: bytes | memoryview) -> None:
    """
    Write C{data} to C{transport}: on a plain socket with nothing queued,
    send what the socket takes (up to the transport's C{SEND_LIMIT}) at
    once and queue the rest; otherwise (TLS or anything else above the
    socket, queued bytes, a closing connection, larger writes) queue it
    all, as C{transport.write} does. What is queued is copied when C{data}
    is a memoryview, which may be reused once this returns.
    """
    if (
        isinstance(transport, tcp.Connection)
        and 0 < len(data) <= transport.SEND_LIMIT
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not getattr(transport, "TLS", False)
        and not buffered(transport)
    ):
        sent = transport.writeSomeData(data)  # type: ignore[arg-type]  # (any buffer: it takes a memoryview of it)
        # A lost connection (an exception returned, not raised) is left to
        # the transport, which meets it again when it sends what is queued.
        if isinstance(sent, int) and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data if isinstance(data, bytes) else bytes(data))
