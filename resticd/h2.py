"""
HTTP/2, as restic uses it over TLS: Twisted's H2 connection with fixes for
flow control.

Twisted's L{H2Connection} (up to at least 26.10) has two flow-control bugs that
a backup server meets:

 - a stream whose send window is used up but which still has data queued
   stays eligible in the priority tree, so the send loop reschedules itself
   forever, burning a core while a client is slow to read;
 - a window update unblocks a stream but does not restart a send loop that
   has gone to sleep, so a response can stall until some other stream wakes
   the loop.

L{ResticH2Connection} fixes both, and L{ResticChannel} makes the site use it
when a client negotiates C{h2} by ALPN. It is also tuned for uploads: it
accepts DATA frames of up to 256 KiB with large flow-control windows (so Go
sends a pack in a few dozen frames, not hundreds), it does not build a hex
dump of every DATA frame for h2's trace log, which is off, it sends several
DATA frames per reactor iteration instead of one and hands them to the
transport (TLS) in one write, and it keeps each stream's queued length
instead of summing the queue on every write. A stream it resets itself (an
answer that cannot be completed) ends its request, as a reset by the client
does. All this leans on Twisted internals
(C{_GenericHTTPChannelProtocol}, C{H2Connection.priority},
C{_outboundStreamQueues}, C{_sendingDeferred}, C{_requestReceived},
C{remainingOutboundWindow}); setup.py pins the Twisted versions they were
tested with.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import priority
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame
from twisted.internet.error import ConnectionAborted
from twisted.python.failure import Failure
from twisted.web._http2 import _END_STREAM_SENTINEL, H2Connection
from twisted.web.http import HTTPChannel, HTTPFactory, _GenericHTTPChannelProtocol

#: The largest DATA frame resticd accepts (HTTP/2 allows up to 16 MiB - 1).
MAX_FRAME_SIZE = 256 << 10
#: Each upload stream may have this much data in flight.
STREAM_WINDOW = 4 << 20
#: All streams of a connection together may have this much in flight.
CONNECTION_WINDOW = 16 << 20
#: Bytes read from a client's socket per system call.
SOCKET_READ_SIZE = 1 << 20
#: DATA frames sent per reactor turn, at most, before other work gets a turn.
FRAMES_PER_TURN = 16


class _Turn:
    """
    Stands in for the reactor during one turn of the send loop: a request to
    run the loop again "soon" (C{callLater(0, ...)}) is noted, so the loop can
    go on at once instead of waiting for the next reactor iteration.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.again = False

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if delay == 0 and not args and not kwargs:
            self.again = True
            return None
        return self.reactor.callLater(delay, f, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reactor, name)


class _GatheredWrites:
    """
    Stands in for the transport during one turn of the send loop: the
    frames it writes are gathered and handed to the transport together at
    the end of the turn (one TLS write instead of one per frame). Anything
    else asked of the transport first sends what was gathered.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._pieces: list[bytes] = []

    def write(self, data: bytes) -> None:
        if data:
            self._pieces.append(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self._pieces.extend(data)

    def flush(self) -> None:
        if self._pieces:
            pieces, self._pieces = self._pieces, []
            self._transport.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def __getattr__(self, name: str) -> Any:
        self.flush()
        return getattr(self._transport, name)


class _SizedQueue(deque):  # type: ignore[type-arg]
    """
    A stream's queue of outgoing data that keeps the total length of what it
    holds (Twisted recomputes it on every write).
    """

    size = 0

    def append(self, item: Any) -> None:
        if item is not _END_STREAM_SENTINEL:
            self.size += len(item)
        super().append(item)

    def appendleft(self, item: Any) -> None:
        if item is not _END_STREAM_SENTINEL:
            self.size += len(item)
        super().appendleft(item)

    def popleft(self) -> Any:
        item = super().popleft()
        if item is not _END_STREAM_SENTINEL:
            self.size -= len(item)
        return item

    def clear(self) -> None:
        self.size = 0
        super().clear()


class _QuietDataFrame(DataFrame):
    """
    A DATA frame whose repr does not hex-dump its payload.
    """

    def __repr__(self) -> str:
        return f"DataFrame(stream_id={self.stream_id}, flags={self.flags!r}, {len(self.data)} bytes)"


class _QuietConnection(h2.connection.H2Connection):
    """
    h2's connection state machine, without the cost of formatting each
    received DATA frame for a trace log nobody reads: h2 formats every
    received frame with repr(), and a DATA frame's repr hex-encodes its
    whole payload.
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self._frame_dispatch_table[_QuietDataFrame] = self._frame_dispatch_table[DataFrame]

    def _receive_frame(self, frame: Any) -> Any:
        if frame.__class__ is DataFrame:
            frame.__class__ = _QuietDataFrame
        return super()._receive_frame(frame)


class _SendablePriorityTree(priority.PriorityTree):
    """
    A priority tree that never yields a stream that cannot send now: one
    whose flow-control window is used up (unless all it has left is its end).
    Such streams are blocked, and unblocked again by the window update that
    lets them send.
    """

    def __init__(self, can_send: Callable[[int], bool]) -> None:
        super().__init__()
        self._can_send = can_send

    def __next__(self) -> int:
        while True:
            stream: int = super().__next__()
            if self._can_send(stream):
                return stream
            self.block(stream)


class ResticH2Connection(H2Connection):
    """
    Twisted's HTTP/2 connection with working flow control (see the module).
    """

    def __init__(self, reactor: Any = None) -> None:
        super().__init__(reactor)
        self.priority = _SendablePriorityTree(self._can_send)
        self.conn = _QuietConnection(h2.config.H2Configuration(client_side=False, header_encoding=None))

    def connectionMade(self) -> None:
        super().connectionMade()
        # Larger frames and windows than HTTP/2's defaults: new settings take
        # effect when the client acknowledges them; the connection window can
        # only be widened by a WINDOW_UPDATE.
        self.conn.update_settings(
            {SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE, SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW}
        )
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - self.conn.inbound_flow_control_window)
        transport: Any = self.transport
        transport.write(self.conn.data_to_send())

    def _can_send(self, stream: int) -> bool:
        queue = self._outboundStreamQueues.get(stream)
        if queue and queue[0] is _END_STREAM_SENTINEL:
            return True
        return bool(self.conn.local_flow_control_window(stream) > 0)

    def _sendPrioritisedData(self, *args: Any) -> None:
        """
        Twisted's send loop sends one DATA frame per reactor iteration; run up
        to L{FRAMES_PER_TURN} of its rounds per iteration instead (it stops
        early when every stream is blocked or the transport is full).
        """
        reactor = self._reactor
        turn = _Turn(reactor)
        self._reactor = turn
        transport = self.transport
        writes = _GatheredWrites(transport)
        self.transport = writes  # type: ignore[assignment]
        try:
            for _ in range(FRAMES_PER_TURN):
                turn.again = False
                super()._sendPrioritisedData()
                if not turn.again:
                    break
        finally:
            self._reactor = reactor
            self.transport = transport
            writes.flush()
        if turn.again:
            reactor.callLater(0, self._sendPrioritisedData)

    def abortRequest(self, streamID: int) -> None:
        # Twisted resets the stream but never tells its request, which then
        # stays in flight for good: its producer registered, its file open,
        # a shutdown waiting for it. Tell it first, as a reset by the client
        # does.
        stream = self.streams.get(streamID)
        if stream is not None:
            stream.connectionLost(Failure(ConnectionAborted("stream reset by the server")))
        super().abortRequest(streamID)

    def _requestReceived(self, event: Any) -> None:
        super()._requestReceived(event)
        queue = _SizedQueue()
        for item in self._outboundStreamQueues[event.stream_id]:
            queue.append(item)
        self._outboundStreamQueues[event.stream_id] = queue

    def remainingOutboundWindow(self, streamID: int) -> int:
        # Twisted sums the lengths of everything queued on every write.
        window: int = self.conn.local_flow_control_window(streamID)
        queued: int = self._outboundStreamQueues[streamID].size
        return window - queued

    def _handleWindowUpdate(self, event: Any) -> None:
        super()._handleWindowUpdate(event)
        sleeping = self._sendingDeferred
        if sleeping is not None:
            self._sendingDeferred = None
            sleeping.callback(None)


class ResticChannel(_GenericHTTPChannelProtocol):
    """
    The site's protocol: HTTP/1.1, or L{ResticH2Connection} when the client
    negotiated C{h2}. (Twisted's own switch, with the connection class
    replaced.)
    """

    def makeConnection(self, transport: Any) -> None:
        # Read up to 1 MiB per system call (Twisted reads 64 KiB): uploads
        # arrive in far fewer, larger pieces. With TLS the socket is below.
        for layer in (transport, getattr(transport, "transport", None)):
            if layer is not None and hasattr(layer, "bufferSize"):
                layer.bufferSize = SOCKET_READ_SIZE
        # The proxy hands makeConnection to the inner channel, which calls its
        # own connectionMade: note the connection here.
        super().makeConnection(transport)
        opened = getattr(self.factory, "connection_opened", None)
        if opened is not None:
            opened(self)

    def connectionLost(self, reason: Any) -> None:
        # What a closed connection could not send stays in its transport's
        # buffers, which live in reference cycles until a full garbage
        # collection: drop it now (an aborted download leaves up to a MiB).
        transport = getattr(self._channel, "transport", None)
        for layer in (transport, getattr(transport, "transport", None)):
            if layer is not None and hasattr(layer, "_tempDataBuffer"):
                layer.dataBuffer = b""
                layer._tempDataBuffer = []
                layer._tempDataLen = 0
        deadline = getattr(self._channel, "first_line_deadline", None)
        if deadline is not None and deadline.active():
            deadline.cancel()
        try:
            super().connectionLost(reason)
        finally:
            closed = getattr(self.factory, "connection_closed", None)
            if closed is not None:
                closed(self)

    def close(self) -> None:
        """
        Close the connection once what it has queued is sent.
        """
        transport = self._channel.transport
        if transport is not None:
            transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._negotiatedProtocol is None:
            negotiated = getattr(self._channel.transport, "negotiatedProtocol", None)
            if negotiated == b"h2":
                self._switch_to_h2()
                self._negotiatedProtocol = b"h2"  # type: ignore[assignment]
        if self._negotiatedProtocol != b"h2":
            self._watch_request_line()
        super().dataReceived(data)

    def _watch_request_line(self) -> None:
        """
        HTTP/1.1 makes a request only once its first line is complete: until
        then, bytes dripped slowly would each reset the idle timeout. Give
        the request line the request timeout (the request takes over when it
        exists; see L{resticd.request.SpoolingRequest}).
        """
        channel: Any = self._channel
        if getattr(channel, "requests", None) or getattr(channel, "first_line_deadline", None) is not None:
            return
        limits = getattr(self._site, "limits", None)
        reactor = getattr(self._site, "reactor", None)
        if limits is None or reactor is None or limits.header_timeout <= 0:
            return

        def too_slow() -> None:
            channel.first_line_deadline = None
            transport = channel.transport
            if transport is not None:
                transport.abortConnection()

        channel.first_line_deadline = reactor.callLater(limits.header_timeout, too_slow)

    def _switch_to_h2(self) -> None:
        old: Any = self._channel
        network_producer = old._networkProducer
        network_producer.unregisterProducer()
        old.setTimeout(None)
        transport = old.transport
        channel: Any = ResticH2Connection()
        channel.requestFactory = self._requestFactory
        channel.site = self._site
        channel.factory = self._factory
        channel.timeOut = self._timeOut
        channel.callLater = self._callLater
        self._channel = channel
        channel.makeConnection(transport)
        network_producer.registerProducer(channel, True)


class ResticHTTPChannel(HTTPChannel):
    """
    Twisted's HTTP/1.1 channel, answering an over-long request or header
    line with 431 before closing (Twisted closes without an answer), never
    answering again on a connection that was answered early and is closing
    (L{answered}), writing each response's headers as one string (joined
    with the body when the body comes at once), and looking up its local
    address once.
    """

    #: An answer was written before the request was complete, and the
    #: connection is closing: whatever else arrives is not answered.
    answered = False
    #: While true, response headers are kept for the first body bytes
    #: instead of being written (see L{write_with_headers}).
    _holding = False
    _held: bytes | None = None
    _host: Any = None

    def getHost(self) -> Any:
        # Asked for by every request; a TCP transport asks the kernel each
        # time (getsockname), though a connection's local address never changes.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        # Twisted hands the transport some 30 small strings, each checked
        # and queued on its own; one string is a fraction of the work.
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        transport: Any = self.transport
        if self._holding:
            self._held = b"".join(parts)
        else:
            transport.write(b"".join(parts))

    def write(self, data: bytes) -> None:
        held, self._held = self._held, None
        transport: Any = self.transport
        transport.write(data if held is None else held + data)

    def writeSequence(self, iovec: Any) -> None:
        held, self._held = self._held, None
        transport: Any = self.transport
        transport.writeSequence(iovec if held is None else [held, *iovec])

    def write_with_headers(self, write: Any, data: bytes) -> None:
        """
        Call C{write(data)}, the first write of a response, so that its
        headers and C{data} reach the transport as one write (over TLS, one
        record for a small answer rather than two).
        """
        self._holding = True
        try:
            write(data)
        finally:
            self._holding = False
            held, self._held = self._held, None
            if held is not None:  # no body went out after all
                transport: Any = self.transport
                transport.write(held)

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self.answered:
            transport: Any = self.transport
            transport.loseConnection()
            return
        super()._respondToBadRequestAndDisconnect()

    def lineLengthExceeded(self, line: bytes) -> None:
        transport: Any = self.transport
        body = b"request line or header line too long\n"
        # The method, from the request line already parsed or the long one.
        method = getattr(self, "_command", None) or line.split(b" ", 1)[0]
        transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (len(body), b"" if method == b"HEAD" else body)
        )
        self.answered = True
        transport.loseConnection()


def channel_for(factory: HTTPFactory) -> ResticChannel:
    """
    The protocol of a new connection to C{factory} (an HTTPFactory's
    C{protocol}).
    """
    return ResticChannel(ResticHTTPChannel())
