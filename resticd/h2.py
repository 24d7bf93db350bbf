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
when a client negotiates C{h2} by ALPN. It is also tuned. For uploads, it
accepts DATA frames of up to 256 KiB with large flow-control windows (so Go
sends a pack in a few dozen frames, not hundreds), lent to each connection
from one pool for the site (L{resticd.windows}: up to what its uploads
announced, an equal share when many upload at once, and what its client
brings per round trip, timed with PINGs; h2 would widen each connection's
window on its own), it acknowledges what a stream that ended
left unread (Twisted never did, and the connection's window lost it), it
cuts the frames out of each read as it came (L{_FrameBuffer}: each frame's
bytes are copied once, where h2 copies them three times; an upload's bytes
are copies of their own, so that those kept for a slow disk do not keep
the whole read they came in) and it does not build a hex dump of every
DATA frame for h2's trace log, which is off. For downloads, it
sends up to 16 DATA frames per reactor iteration instead of one and hands them
to the transport (TLS) in one write, it sends each piece of a response as a
stream's frames in a row (the priority tree is asked once per piece, not
once per frame), it builds those frames itself around views of the
response's data (h2 would copy each payload four times), and it keeps each
stream's queued length instead of summing the queue on every write. A
stream it resets itself (an answer that cannot be completed) ends its request,
as a reset by the client does. An answer's producer is paused once a MiB of
it waits to be sent, or its share of 4 MiB among the answers the connection
is producing, whatever window the client grants (Twisted pauses it only at
the window's end, so a client that opened it wide and read nothing had
whole objects read into memory), and resumed as its queue drains; an
answer read whole and written at once is so only while it fits in those
4 MiB (L{reserve}). A client may have 32 requests at once on a connection
(h2's default is 100). All this leans on Twisted internals
(C{_GenericHTTPChannelProtocol}, C{H2Connection.priority},
C{_outboundStreamQueues}, C{_sendingDeferred}, C{_consumerBlocked},
C{_requestReceived}, C{_requestDataReceived}, C{_requestEnded},
C{_requestDone}, C{openStreamWindow}, C{remainingOutboundWindow},
C{_tryToWriteControlData}, C{_reactor}) and on h2's flow-control and state
attributes, its connection's C{WindowManager} and its C{FrameBuffer};
setup.py pins the Twisted and h2 versions they were tested with.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Any

import h2.config
import h2.connection
import h2.events
import priority
from h2.connection import ConnectionState
from h2.exceptions import FrameDataMissingError, ProtocolError
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes, Settings
from h2.stream import StreamState
from h2.windows import WindowManager
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import DataFrame, Frame
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web._http2 import _END_STREAM_SENTINEL, H2Connection
from twisted.web.http import HTTPChannel, HTTPFactory, _GenericHTTPChannelProtocol

from .deadlines import Deadline
from .sockets import write_now
from .windows import BASE_WINDOW, CONNECTION_WINDOW, PING_INTERVAL, RoundTrips, UploadWindows

#: The largest DATA frame resticd accepts (HTTP/2 allows up to 16 MiB - 1).
MAX_FRAME_SIZE = 256 << 10
#: Each upload stream may have this much data in flight (and all streams
#: of a connection together at most what L{UploadWindows} lends it,
#: L{CONNECTION_WINDOW} at most).
STREAM_WINDOW = 4 << 20
#: The least an upload whose client has not ended it is counted as still
#: to send (a Content-Length said nothing of padding, or there was none).
BODY_REST = 16 << 10
#: An answer's producer is paused once this much of it waits to be sent,
#: however far the client opens its window (a client that opened it wide
#: and read nothing had whole objects read into memory)...
STREAM_QUEUE = 1 << 20
#: ... or once its share of this much does, shared among the answers of a
#: connection being produced (each may go one read past its share).
CONNECTION_QUEUE = 4 << 20
#: Requests a client may have in flight on one connection (h2's default is
#: 100; restic runs 5 at once, and Go's client opens another connection
#: for more): each may hold up to a MiB of its answer.
MAX_STREAMS = 32
#: Bytes read from a client's plain socket per system call. What is read
#: there is what an upload holds until its piece is written, and a read is
#: allocated at this size and shrunk to what came: with 1 MiB, the leftover
#: pieces fragmented the heap, and long upload bursts over plain HTTP
#: reached 95 MiB resident; with half a MiB 81-87, and no slower.
SOCKET_READ_SIZE = 512 << 10
#: Bytes read per system call from a socket under TLS, whose reads are
#: decrypted and dropped at once: fewer trips through the TLS and HTTP
#: layers (half a MiB cost https uploads about 8 % more CPU).
TLS_SOCKET_READ_SIZE = 1 << 20
#: Bytes sent to a client's socket per system call at most.
SOCKET_SEND_SIZE = 1 << 20
#: How far into a large read that arrives while a request's headers are
#: parsed their end is looked for (see L{ResticChannel.dataReceived}).
HEADERS_SEARCH = 64 << 10
#: DATA frames sent per reactor turn, at most, before other work gets a turn.
FRAMES_PER_TURN = 16
#: What resticd's PINGs carry (HTTP/2 wants 8 bytes), to tell their
#: acknowledgements from those of anything else.
PING_DATA = b"resticd\x00"

#: An HTTP/2 frame header: length (24 bits), type, flags, stream.
_FRAME_HEADER = struct.Struct(">HBBBL")
#: The stream states in which sending DATA changes no state in h2.
_SENDING = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE})


class _SizedQueue(deque):  # type: ignore[type-arg]
    """
    A stream's queue of outgoing data that keeps the total length of what it
    holds (Twisted recomputes it on every write), and holds it as memory
    views, so that cutting it into frames copies nothing.
    """

    size = 0

    def append(self, item: Any) -> None:
        if item is not _END_STREAM_SENTINEL:
            item = memoryview(item)
            self.size += len(item)
        super().append(item)

    def appendleft(self, item: Any) -> None:
        if item is not _END_STREAM_SENTINEL:
            item = memoryview(item)
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


class _FrameBuffer(FrameBuffer):
    """
    h2's buffer of received bytes, cut into frames, with fewer copies: frames
    are parsed from a view of the data as it came (h2 appends all of it to
    one buffer, copies each frame out of it, then shifts the rest down), and
    only the start of a frame that has not fully arrived is kept for the next
    read, topped up with just the bytes that frame lacks. Each payload is a
    copy of its own (hyperframe's), not a view of the read: an upload's
    bytes kept for its writes would keep all of the read alive (up to a
    MiB, other streams' bytes too), uncounted by the write budget. A frame
    longer than allowed is refused on its header, not once all of it has
    arrived; allowed is what C{limit} says when the header is read, so that
    frames sent after the client acknowledged a larger size are taken even
    when the acknowledgement came in the same read (h2 compares with the
    size allowed when the read began).
    """

    def __init__(self, limit: Callable[[], int]) -> None:
        super().__init__(server=True)
        self._limit = limit
        self._view = memoryview(b"")
        self._at = 0

    def add_data(self, data: Any) -> None:
        if self._preamble_len:
            # The connection's first bytes: h2 checks the preamble and keeps
            # the rest in its buffer, where __next__ takes frames from first.
            super().add_data(data)
        else:
            self._view = memoryview(data)
            self._at = 0

    def _take(self, size: int) -> None:
        """
        Move up to C{size} bytes of the newly arrived data to the kept ones.
        """
        end = self._at + size
        self._data += self._view[self._at : end]
        self._at = min(end, len(self._view))

    def _header(self, header: memoryview) -> tuple[Frame, int]:
        try:
            frame, length = Frame.parse_frame_header(header)
        except (InvalidDataError, InvalidFrameError) as err:
            raise ProtocolError(f"Received frame with invalid header: {err!s}") from err
        self.max_frame_size = self._limit()
        self._validate_frame_length(length)
        return frame, length

    @staticmethod
    def _body(frame: Frame, body: memoryview) -> None:
        # Every frame copies what it keeps out of the view (hyperframe's
        # parse_body), so the view may be released after.
        try:
            frame.parse_body(body)
        except InvalidDataError as err:
            raise ProtocolError("Received frame with non-compliant data") from err
        except InvalidFrameError as err:
            raise FrameDataMissingError("Frame data missing or invalid") from err

    def _next_frame(self) -> Frame | None:
        """
        The next whole frame, or None when it has not fully arrived (its
        start is then kept).
        """
        kept = self._data
        if kept:
            if len(kept) < 9:
                self._take(9 - len(kept))
                if len(kept) < 9:
                    return None
            frame, length = self._header(memoryview(bytes(kept[:9])))
            if len(kept) < 9 + length:
                self._take(9 + length - len(kept))
                if len(kept) < 9 + length:
                    return None
            with memoryview(kept) as view:
                self._body(frame, view[9 : 9 + length])
            del kept[: 9 + length]
            return frame
        view, at = self._view, self._at
        if len(view) - at < 9:
            self._take(len(view) - at)
            return None
        frame, length = self._header(view[at : at + 9])
        if len(view) - at < 9 + length:
            self._take(len(view) - at)
            return None
        self._body(frame, view[at + 9 : at + 9 + length])
        self._at = at + 9 + length
        return frame

    def __next__(self) -> Frame:
        while (frame := self._next_frame()) is not None:
            # Header blocks in several frames are joined as h2 does.
            whole = self._update_header_buffer(frame)
            if whole is not None:
                return whole
        self._view = memoryview(b"")
        self._at = 0
        raise StopIteration


class _LentWindow(WindowManager):
    """
    h2's manager of a connection's receive window, which leaves widening it
    to resticd: the bytes taken in are handed to C{taken} (and from there to
    L{UploadWindows}), where h2 would decide on a window update itself.
    """

    def __init__(self, taken: Callable[[int], None]) -> None:
        super().__init__(max_window_size=BASE_WINDOW)
        self._taken = taken

    def process_bytes(self, size: int) -> None:
        self._taken(size)
        return None


class _QuietConnection(h2.connection.H2Connection):
    """
    h2's connection state machine, without the cost of formatting each
    received DATA frame for a trace log nobody reads (h2 formats every
    received frame with repr(), and a DATA frame's repr hex-encodes its
    whole payload), receiving through L{_FrameBuffer}, and allowing
    L{MAX_STREAMS} streams at once from the start (h2 enforces its 100 from
    the start, and a new limit only once the client acknowledges it, which
    a client that reads nothing never does), handing the bytes taken in to
    C{taken} rather than widening its receive window itself, and the data of
    each acknowledged PING to C{pinged} (Twisted ignores them).
    """

    def __init__(
        self, config: h2.config.H2Configuration, taken: Callable[[int], None], pinged: Callable[[bytes], None]
    ) -> None:
        super().__init__(config=config)
        self._pinged = pinged
        self._inbound_flow_control_window_manager = _LentWindow(taken)
        self.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                SettingCodes.MAX_HEADER_LIST_SIZE: self.DEFAULT_MAX_HEADER_LIST_SIZE,
            },
        )
        self._frame_dispatch_table[_QuietDataFrame] = self._frame_dispatch_table[DataFrame]
        self.incoming_buffer = _FrameBuffer(lambda: self.max_inbound_frame_size)

    def _receive_frame(self, frame: Any) -> Any:
        if frame.__class__ is DataFrame:
            frame.__class__ = _QuietDataFrame
        return super()._receive_frame(frame)

    def receive_data(self, data: Any) -> list[h2.events.Event]:
        events = super().receive_data(data)
        for event in events:
            if isinstance(event, h2.events.PingAckReceived):
                self._pinged(event.ping_data)
        return events


def announce_settings(conn: h2.connection.H2Connection) -> None:
    """
    Queue resticd's settings on a started server connection: larger frames
    and stream windows than HTTP/2's defaults. New settings take effect when
    the client acknowledges them. (The connection window is widened as
    uploads come: see L{resticd.windows}.)
    """
    conn.update_settings({SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE, SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})


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

    def __init__(self, reactor: Any = None, windows: UploadWindows | None = None) -> None:
        super().__init__(reactor)
        self.priority = _SendablePriorityTree(self._can_send)
        self.conn = _QuietConnection(
            h2.config.H2Configuration(client_side=False, header_encoding=None), self._taken, self._pinged
        )
        #: Where the connection's window for uploads is lent from (one pool
        #: for the whole site; see L{resticd.windows}).
        self.windows = windows if windows is not None else UploadWindows()
        #: What the client brings per round trip (how much of the pool the
        #: connection may use).
        self.round_trips = RoundTrips()
        #: When the PING under way was sent (None: none is), and the last one.
        self._ping_sent: float | None = None
        self._last_ping = float("-inf")
        self._bodies: dict[int, _Body] = {}
        self._receiving = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.windows.join(self)
        announce_settings(self.conn)
        self._ping()
        transport: Any = self.transport
        transport.write(self.conn.data_to_send())

    def loseConnection(self) -> None:
        """
        Tell the client that no new stream will be served (GOAWAY), and
        close the connection once what is queued is sent.
        """
        transport: Any = self.transport
        if transport is None:
            return
        self.conn.close_connection()
        transport.write(self.conn.data_to_send())
        # The connection is its transport's producer, and TLS closes only
        # once it has none (HTTPChannel.loseConnection does the same).
        transport.unregisterProducer()
        transport.loseConnection()

    def timeoutConnection(self) -> None:
        # Twisted's sends a GOAWAY, arms its abort timer and closes the
        # transport with the connection still its producer: over TLS nothing
        # closed until that timer aborted the connection, 15 s later.
        super().timeoutConnection()
        transport: Any = self.transport
        if transport is not None:
            transport.unregisterProducer()

    def connectionLost(self, reason: Failure = connectionDone, _cancelTimeouts: bool = True) -> None:
        # All the connection held goes back to the pool at once.
        self.windows.leave(self)
        super().connectionLost(reason, _cancelTimeouts)

    # -- the connection's window for uploads (see resticd.windows) ----------

    def wanted(self) -> int:
        """
        The upload bytes the client has still to send: what the bodies it
        has not ended announced and have not arrived (at least L{BODY_REST}
        each; L{CONNECTION_WINDOW} for one of unknown length).
        """
        wanted = 0
        for body in self._bodies.values():
            if not body.ended:
                rest = body.rest
                wanted += CONNECTION_WINDOW if rest is None else max(rest, BODY_REST)
        return wanted

    def widen(self, size: int) -> None:
        """
        Widen the connection's window by C{size} bytes (lent by the pool).
        """
        if self.conn.state_machine.state is ConnectionState.CLOSED:
            return  # (closing: the pool gets it back when it is closed)
        self.conn.increment_flow_control_window(size)
        self._send_control()

    def _send_control(self) -> None:
        """
        Send what h2 queued (window updates, PINGs) now, unless a read is
        being handled: Twisted sends it after.
        """
        if not self._receiving:
            self._tryToWriteControlData()

    def reach(self, floor: int) -> int:
        """
        The most window the client can use (see L{RoundTrips.reach}).
        """
        return self.round_trips.reach(floor)

    def _taken(self, size: int) -> None:
        # h2 counted C{size} bytes as taken in (acknowledged): their credit
        # goes back to the pool.
        self.round_trips.taken(size, self._reactor.seconds())
        self.windows.taken(self, size)
        self._measure_round_trip()

    def _measure_round_trip(self) -> None:
        """
        Time the round trip again if the connection has uploads and the
        last PING went out more than L{PING_INTERVAL} ago and was answered.
        """
        if self._ping_sent is not None or not self._bodies:
            return
        if self._reactor.seconds() - self._last_ping < PING_INTERVAL:
            return
        if self.conn.state_machine.state is not ConnectionState.CLOSED:
            self._ping()
            self._send_control()

    def _ping(self) -> None:
        """
        Queue a PING, whose answer times the round trip (see L{_pinged}).
        """
        self._ping_sent = self._last_ping = self._reactor.seconds()
        self.conn.ping(PING_DATA)

    def _pinged(self, data: bytes) -> None:
        sent = self._ping_sent
        if data != PING_DATA or sent is None:
            return
        self._ping_sent = None
        self.round_trips.measured(max(0.0, self._reactor.seconds() - sent))
        self.windows.update(self)  # it may use more now

    def dataReceived(self, data: bytes) -> None:
        self._receiving = True
        try:
            super().dataReceived(data)
        finally:
            self._receiving = False

    def _requestDataReceived(self, event: Any) -> None:
        body = self._bodies.get(event.stream_id)
        if body is not None:
            body.unacked += event.flow_controlled_length
            if body.rest is not None:
                body.rest = max(0, body.rest - len(event.data))
        super()._requestDataReceived(event)

    def _requestEnded(self, event: Any) -> None:
        body = self._bodies.get(event.stream_id)
        if body is not None:
            body.ended = True
        super()._requestEnded(event)
        if body is not None:
            self.windows.update(self)  # it wants less now

    def openStreamWindow(self, streamID: int, increment: int) -> None:
        # Twisted acknowledges what it handed to the request (each byte once,
        # counted here, so that what a stream leaves unread when it ends is
        # acknowledged once too: see _requestDone).
        body = self._bodies.get(streamID)
        if body is None:
            return
        size = min(increment, body.unacked)
        if size > 0:
            body.unacked -= size
            super().openStreamWindow(streamID, size)

    def _can_send(self, stream: int) -> bool:
        queue = self._outboundStreamQueues.get(stream)
        if queue and queue[0] is _END_STREAM_SENTINEL:
            return True
        return bool(self.conn.local_flow_control_window(stream) > 0)

    def _sendPrioritisedData(self, *args: Any) -> None:
        """
        The send loop (Twisted's, reworked): up to L{FRAMES_PER_TURN} DATA
        frames per reactor turn rather than one, handed to the transport in
        one write, and built here (L{_data_frames}) rather than by h2. A
        stream picked sends as many frames in a row as its next piece of
        data, its window and the turn allow (restic's Go client takes 16 KiB
        frames: a 256 KiB read of an object goes out as 16 frames of one
        stream, the priority tree asked once, not 16 times). Streams take
        turns as the priority tree says, a piece at a time; the loop sleeps
        when every stream is blocked and waits while the transport is full.
        """
        pieces: list[bytes | memoryview] = []
        frames = 0
        try:
            while frames < FRAMES_PER_TURN:
                if not self._stillProducing:
                    return
                try:
                    stream = next(self.priority)
                except priority.DeadlockError:
                    # Every stream is blocked: sleep until one is unblocked.
                    assert self._sendingDeferred is None
                    self._sendingDeferred = Deferred()
                    self._sendingDeferred.addCallback(self._sendPrioritisedData)
                    return
                if self._consumerBlocked is not None:
                    self._consumerBlocked.addCallback(self._sendPrioritisedData)
                    return
                if frames == 0:
                    self.resetTimeout()
                queue = self._outboundStreamQueues[stream]
                data = queue.popleft()
                if data is _END_STREAM_SENTINEL:
                    self.conn.end_stream(stream)
                    pieces.append(self.conn.data_to_send())
                    # What ending the request sets off writes on its own.
                    self._write(pieces)
                    self._requestDone(stream)
                    frames += 1
                    continue
                size = min(
                    len(data),
                    self.conn.local_flow_control_window(stream),
                    (FRAMES_PER_TURN - frames) * self.conn.max_outbound_frame_size,
                )
                if len(data) > size:
                    queue.appendleft(data[size:])
                    data = data[:size]
                frames += max(1, self._data_frames(stream, data, pieces))
                if not queue:
                    self.priority.block(stream)
                if self.remainingOutboundWindow(stream) <= 0:
                    self.streams[stream].flowControlBlocked()
                else:
                    # Its queue has room again (it may have been full).
                    self.streams[stream].windowUpdated()
        finally:
            self._write(pieces)
        self._reactor.callLater(0, self._sendPrioritisedData)

    def _data_frames(self, stream: int, data: bytes | memoryview, pieces: list[bytes | memoryview]) -> int:
        """
        Add to C{pieces} the DATA frames that carry C{data} on C{stream}, as
        many as the peer's largest frame size makes it: each frame's header
        and its part of C{data}, not copied; how many frames. For an open
        stream of an open connection whose windows take all of C{data}, all
        h2's C{send_data} does besides building the frames is to shrink the
        two flow-control windows by their length, which is done here; in any
        other case h2 builds them (or raises its error).
        """
        conn = self.conn
        state = conn.streams.get(stream)
        size = len(data)
        frame_size = conn.max_outbound_frame_size
        starts = range(0, size, frame_size)
        if (
            state is None
            or conn.state_machine.state is not ConnectionState.SERVER_OPEN
            or state.state_machine.state not in _SENDING
            or size > min(conn.outbound_flow_control_window, state.outbound_flow_control_window)
        ):
            for start in starts:
                conn.send_data(stream, data[start : start + frame_size])
            pieces.append(conn.data_to_send())
            return len(starts)
        conn.outbound_flow_control_window -= size
        state.outbound_flow_control_window -= size
        queued = conn.data_to_send()
        if queued:
            pieces.append(queued)
        pack = _FRAME_HEADER.pack
        kind = DataFrame.type
        stream_id = stream & 0x7FFFFFFF
        for start in starts:
            length = min(frame_size, size - start)
            pieces += (pack(length >> 8, length & 0xFF, kind, 0, stream_id), data[start : start + length])
        return len(starts)

    def _write(self, pieces: list[bytes | memoryview]) -> None:
        """
        Hand what the send loop gathered to the transport, in one write.
        """
        if pieces:
            data = b"".join(pieces)
            pieces.clear()
            transport: Any = self.transport
            transport.write(data)

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
        if event.stream_ended is None:
            self._bodies[event.stream_id] = _Body(content_length(event.headers))
            self.windows.update(self)
            self._measure_round_trip()

    def _requestDone(self, streamID: int) -> None:
        # What arrived for a stream that ended without reading it (reset,
        # refused, its connection lost) is acknowledged, so that the
        # connection's window gets it back (Twisted never did).
        body = self._bodies.pop(streamID, None)
        super()._requestDone(streamID)
        if body is not None and self._stillProducing:
            if body.unacked:
                self.conn.acknowledge_received_data(body.unacked, streamID)
                self._send_control()
            elif not body.ended:
                self.windows.update(self)

    #: Bytes of answers being read to be queued whole (see L{reserve}).
    reserved = 0

    def queued(self) -> int:
        """
        The bytes of answers waiting to be sent, on all streams, and of
        those being read to be.
        """
        queues: dict[int, _SizedQueue] = self._outboundStreamQueues
        return self.reserved + sum(queue.size for queue in queues.values())

    def remainingOutboundWindow(self, streamID: int) -> int:
        # What a stream's producer may still queue: up to the client's
        # window, and no more than STREAM_QUEUE or its share of
        # CONNECTION_QUEUE. (Twisted sums the lengths of everything queued
        # on every write.)
        producing = sum(1 for stream in self.streams.values() if stream.producer is not None)
        room = min(STREAM_QUEUE, CONNECTION_QUEUE // max(producing, 1))
        window: int = min(self.conn.local_flow_control_window(streamID), room)
        queued: int = self._outboundStreamQueues[streamID].size
        return window - queued

    def _handleWindowUpdate(self, event: Any) -> None:
        super()._handleWindowUpdate(event)
        sleeping = self._sendingDeferred
        if sleeping is not None:
            self._sendingDeferred = None
            sleeping.callback(None)


class _Body:
    """
    An upload stream's body, as far as the connection's window goes: the
    bytes still to come (L{None}: of unknown length), those that arrived and
    were not acknowledged, and whether the client ended it.
    """

    __slots__ = ("rest", "unacked", "ended")

    def __init__(self, rest: int | None) -> None:
        self.rest = rest
        self.unacked = 0
        self.ended = False


def content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """
    The Content-Length of a request's HTTP/2 headers, or L{None} when it has
    none (or one that is not a length: h2 refuses a body that disagrees with
    a valid one).
    """
    for name, value in headers:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None
            return length if length >= 0 else None
    return None


def _room_kept() -> None:
    pass


def reserve(channel: Any, length: int) -> Callable[[], None] | None:
    """
    Room for an answer of C{length} bytes to be read and queued whole on
    C{channel} (a request's): a function to call once it is queued (or
    will not be), or L{None} when there is none. Over HTTP/2 there is room
    while the connection's answers waiting to be sent, and those being
    read to be, stay within L{CONNECTION_QUEUE}; an answer that finds none
    goes through a producer, which waits its turn. Over HTTP/1.1 there
    always is (the next request waits for the client to take this answer).
    """
    conn = getattr(channel, "_conn", None)
    if not isinstance(conn, ResticH2Connection):
        return _room_kept
    if conn.queued() + length > CONNECTION_QUEUE:
        return None
    conn.reserved += length

    def release() -> None:
        nonlocal length
        conn.reserved -= length
        length = 0

    return release


class ResticChannel(_GenericHTTPChannelProtocol):
    """
    The site's protocol: HTTP/1.1, or L{ResticH2Connection} when the client
    negotiated C{h2}. (Twisted's own switch, with the connection class
    replaced.)
    """

    def makeConnection(self, transport: Any) -> None:
        # Read half a MiB per system call, a MiB under TLS (Twisted reads
        # 64 KiB): uploads arrive in far fewer, larger pieces; and send up to
        # 1 MiB per call (Twisted sends 128 KiB), which also lets writes of
        # up to 1 MiB (TLS output, answers) go out at once
        # (resticd.sockets.write_now). With TLS the socket is below.
        tls = ISSLTransport.providedBy(transport)
        socket = getattr(transport, "transport", None) if tls else transport
        # (A TLS layer hands unknown attributes on to the socket below, so it
        # is told apart by what it provides, not by what it has.)
        if socket is not None and hasattr(socket, "bufferSize"):
            socket.bufferSize = TLS_SOCKET_READ_SIZE if tls else SOCKET_READ_SIZE
        if socket is not None and hasattr(socket, "SEND_LIMIT"):
            socket.SEND_LIMIT = SOCKET_SEND_SIZE
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
        try:
            super().connectionLost(reason)
        finally:
            closed = getattr(self.factory, "connection_closed", None)
            if closed is not None:
                closed(self)

    def close(self) -> None:
        """
        Close the connection once what it has queued is sent (over HTTP/2,
        after a GOAWAY).
        """
        channel: Any = self._channel
        if channel.transport is not None:
            channel.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._negotiatedProtocol is None:
            negotiated = getattr(self._channel.transport, "negotiatedProtocol", None)
            if negotiated == b"h2":
                self._switch_to_h2()
                self._negotiatedProtocol = b"h2"  # type: ignore[assignment]
        if self._negotiatedProtocol != b"h2":
            self._watch_request_line()
            # Twisted's line parser cuts each header line off the front of
            # all that is buffered, copying the rest each time: a read that
            # brings an upload's headers and a MiB of its body (as one TLS
            # read does) had that MiB copied once per header line. The
            # headers go first, on their own, and the rest after them.
            if len(data) > HEADERS_SEARCH and getattr(self._channel, "line_mode", False):
                end = data.find(b"\r\n\r\n", 0, HEADERS_SEARCH)
                if end >= 0:
                    super().dataReceived(data[: end + 4])
                    data = data[end + 4 :]
        super().dataReceived(data)

    def _watch_request_line(self) -> None:
        """
        HTTP/1.1 makes a request only once its first line is complete: until
        then, bytes dripped slowly would each reset the idle timeout. Give
        the request line the request timeout (the request takes over when it
        exists; see L{resticd.request.SpoolingRequest}).
        """
        channel: Any = self._channel
        deadline = getattr(channel, "deadline", None)
        if deadline is None or channel.requests or deadline.armed_with(channel.request_line_too_slow):
            return
        limits = getattr(self._site, "limits", None)
        if limits is None or limits.header_timeout <= 0:
            return
        deadline.arm(limits.header_timeout, channel.request_line_too_slow)

    def _switch_to_h2(self) -> None:
        old: Any = self._channel
        network_producer = old._networkProducer
        network_producer.unregisterProducer()
        old.setTimeout(None)
        if old.deadline is not None:
            old.deadline.stop()
        transport = old.transport
        channel: Any = ResticH2Connection(windows=getattr(self._site, "upload_windows", None))
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
    with the body when the body comes at once), starting no pipelined
    request while the client is behind on the answers before it, and
    looking up its local address once.
    """

    #: An answer was written before the request was complete, and the
    #: connection is closing: whatever else arrives is not answered.
    answered = False
    #: While true, response headers are kept for the first body bytes
    #: instead of being written (see L{write_with_headers}).
    _holding = False
    _held: bytes | None = None
    _host: Any = None
    #: The connection's one deadline, from when it is made: idle between
    #: requests, then a request's header and body timeouts (see
    #: L{resticd.request.SpoolingRequest}). Twisted's own idle timeout
    #: (L{TimeoutMixin}) is replaced by it.
    deadline: Deadline | None = None

    def connectionMade(self) -> None:
        # (The site that made the channel set its site attribute.)
        self.deadline = Deadline(self.site.reactor)  # type: ignore[attr-defined]
        super().connectionMade()

    def setTimeout(self, period: int | None) -> int | None:
        # Twisted stops the idle timeout while a request is answered and
        # starts it again after: here that moves the deadline, and makes no
        # timer.
        previous = self.timeOut
        self.timeOut = period
        deadline = self.deadline
        if deadline is not None:
            if period is None:
                deadline.disarm(self.timeoutConnection)
            else:
                deadline.arm(period, self.timeoutConnection)
        return previous

    def resetTimeout(self) -> None:
        # Bytes arrived: an idle connection stays open. (A request's own
        # deadlines are moved by the request.)
        deadline = self.deadline
        if deadline is not None and self.timeOut is not None and deadline.armed_with(self.timeoutConnection):
            deadline.arm(self.timeOut, self.timeoutConnection)

    def request_line_too_slow(self) -> None:
        """
        A request line took longer than the request timeout: drop the
        connection.
        """
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            super().connectionLost(reason)
        finally:
            if self.deadline is not None:
                self.deadline.stop()

    def requestDone(self, request: Any) -> None:
        # Twisted goes on to the requests that came pipelined behind this
        # one at once, even while the client is behind on the answers so
        # far: answers written at once piled up in memory (200 pipelined
        # GETs of a MiB, read by nobody, took 200 MiB), and one sent by a
        # producer was never paused under TLS, where the transport says only
        # once that it is full. They wait until the client has caught up:
        # the line parser stops, keeping what it has not parsed.
        if self._waitingForTransport and self.persistent:
            self.paused = True
        super().requestDone(request)

    def resumeProducing(self) -> None:
        super().resumeProducing()
        if self.paused:
            # The client has caught up: on to the requests that waited.
            self.paused = False
            self.dataReceived(b"")

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
        if self._holding:
            self._held = b"".join(parts)
        else:
            write_now(self.transport, b"".join(parts))

    def write(self, data: bytes) -> None:
        held, self._held = self._held, None
        write_now(self.transport, data if held is None else held + data)

    def writeSequence(self, iovec: Any) -> None:
        held, self._held = self._held, None
        write_now(self.transport, b"".join(iovec if held is None else [held, *iovec]))

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
                write_now(self.transport, held)

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
