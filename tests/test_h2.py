"""
resticd's HTTP/2 framing, checked against the h2 library without sockets.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, Event, PingReceived, ResponseReceived
from h2.exceptions import FrameTooLargeError, ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, PingFrame
from hypothesis import given, settings
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from hypothesis import strategies as st

from resticd.h2 import (
    MAX_FRAME_SIZE,
    MAX_STREAMS,
    PING_DATA,
    STREAM_WINDOW,
    ResticH2Connection,
    announce_settings,
    reserve,
)
from resticd.site import IDLE_TIMEOUT
from resticd.spool import BACKLOG, BUDGET, PIECE, Spool, WriteBudget
from resticd.windows import (
    BASE_WINDOW,
    CONNECTION_WINDOW,
    FLOOR,
    HELD_BACK_FLOOR,
    PING_INTERVAL,
    RoundTrips,
    UploadWindows,
)

from .web import HeldWrites, http2_connection, make_server, name_of


def opened_stream(server: H2Connection) -> H2Connection:
    """
    A client whose request on stream 1 C{server} has answered with headers.
    """
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    request = [(":method", "GET"), (":path", "/r/data/x"), (":scheme", "https"), (":authority", "h")]
    client.send_headers(1, request, end_stream=True)
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200")])
    client.receive_data(server.data_to_send())
    server.data_to_send()
    return client


def test_data_frames_are_what_h2_would_send() -> None:
    """
    The DATA frames resticd builds itself are byte for byte those h2 builds,
    as many as the peer's largest frame size makes of the data (h2 is
    handed one frame's worth at a time), leave both flow-control windows
    where h2 leaves them, and reach the client as the response's bytes.
    """
    ours = ResticH2Connection()
    ours.conn = H2Connection(H2Configuration(client_side=False))
    client = opened_stream(ours.conn)
    theirs = H2Connection(H2Configuration(client_side=False))
    opened_stream(theirs)
    frame_size = theirs.max_outbound_frame_size
    payload = os.urandom(2 * frame_size + 123)
    cases: list[tuple[bytes | memoryview, int]] = [
        (memoryview(payload)[:frame_size], 1),
        (memoryview(payload)[:1000], 1),
        (b"x", 1),
        (memoryview(payload), 3),
    ]
    for piece, count in cases:
        pieces: list[bytes | memoryview] = []
        assert ours._data_frames(1, piece, pieces) == count
        for start in range(0, len(piece), frame_size):
            theirs.send_data(1, bytes(piece[start : start + frame_size]))
        assert b"".join(pieces) == theirs.data_to_send()
        assert ours.conn.streams[1].outbound_flow_control_window == theirs.streams[1].outbound_flow_control_window
        assert ours.conn.outbound_flow_control_window == theirs.outbound_flow_control_window
        events = client.receive_data(b"".join(pieces))
        received = [bytes(e.data) for e in events if isinstance(e, DataReceived)]
        assert len(received) == count and b"".join(received) == bytes(piece)
        client.acknowledge_received_data(len(piece), 1)
        update = client.data_to_send()
        ours.conn.receive_data(update)
        theirs.receive_data(update)


def test_data_frame_on_a_closed_stream_is_h2s_error() -> None:
    """
    On a stream that is no longer open, resticd leaves the frame to h2,
    which refuses it as it always did.
    """
    ours = ResticH2Connection()
    ours.conn = H2Connection(H2Configuration(client_side=False))
    opened_stream(ours.conn)
    ours.conn.end_stream(1)
    with pytest.raises(StreamClosedError):
        ours._data_frames(1, memoryview(b"late"), [])


def configured(server: H2Connection) -> H2Connection:
    """
    C{server} started with the settings resticd's connection announces
    (sent: see L{opening}), and the connection window an uploading client
    is lent.
    """
    server.initiate_connection()
    announce_settings(server)
    server.increment_flow_control_window(CONNECTION_WINDOW - server.inbound_flow_control_window)
    return server


def opening(client: H2Connection) -> bytes:
    """
    What C{client} sends to open a connection to resticd once it has read
    resticd's settings: its preamble and settings, then the acknowledgement
    of resticd's (from then on it sends frames of up to 256 KiB).
    """
    client.initiate_connection()
    sent = client.data_to_send()
    client.receive_data(configured(H2Connection(H2Configuration(client_side=False))).data_to_send())
    sent += client.data_to_send()
    assert client.max_outbound_frame_size == MAX_FRAME_SIZE
    return sent


def described(event: object) -> tuple[str, dict[str, object]]:
    """
    An h2 event as plain values, to compare events of two connections.
    """
    fields: dict[str, object] = {}
    for name, value in vars(event).items():
        if isinstance(value, Event):
            value = described(value)
        elif isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value)
        elif not isinstance(value, (int, str, list, tuple, type(None))):
            value = repr(value)
        fields[name] = value
    return type(event).__name__, fields


@st.composite
def client_bytes(draw: st.DrawFn) -> bytes:
    """
    What a client sends on a connection: requests with headers (some long
    enough to need CONTINUATION frames), bodies in DATA frames of many sizes,
    some padded, some up to the largest frame resticd accepts, and PINGs.
    """
    client = H2Connection(H2Configuration(client_side=True))
    if draw(st.booleans()):
        wire = bytearray(opening(client))
    else:
        # A client that has not read resticd's settings yet: frames of up
        # to 16 KiB, long header blocks in CONTINUATION frames.
        client.initiate_connection()
        wire = bytearray(client.data_to_send())
    for stream in range(1, 2 * draw(st.integers(1, 3)), 2):
        filler = "x" * draw(st.sampled_from([0, 100, 20_000, 40_000]))
        headers = [(":method", "POST"), (":path", "/r/data/x"), (":scheme", "https"), (":authority", "h"), ("x-filler", filler)]
        client.send_headers(stream, headers)
        wire += client.data_to_send()
        for size in draw(st.lists(st.integers(0, 300_000), max_size=4)):
            padding = draw(st.sampled_from([None, 0, 7, 255]))
            while size and client.local_flow_control_window(stream) > 300:
                piece = min(size, client.max_outbound_frame_size - 256, client.local_flow_control_window(stream) - 256)
                client.send_data(stream, os.urandom(piece), pad_length=padding)
                size -= piece
            wire += client.data_to_send()
        if draw(st.booleans()):
            client.ping(os.urandom(8))
        client.end_stream(stream)
        wire += client.data_to_send()
    return bytes(wire)


@given(client_bytes(), st.lists(st.one_of(st.integers(1, 20), st.integers(1, 400_000)), max_size=16))
@settings(max_examples=60, deadline=None)
def test_received_frames_are_what_h2_makes_of_them_however_the_bytes_arrive(wire: bytes, reads: list[int]) -> None:
    """
    However a client's bytes are split into reads (a frame across several
    reads, several frames in one, a read ending inside a frame header), the
    requests, headers, bodies, pings and settings resticd's HTTP/2
    connection sees are exactly those h2's own would see, in the same order,
    and it answers with the same bytes. (h2 is given the client's
    acknowledgement of the larger frame size at the end of a read: it
    refuses larger frames that come in the same read, see below.)
    """
    ours = configured(ResticH2Connection().conn)
    theirs = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    # (resticd allows fewer streams at once than h2: see the test of that)
    theirs.local_settings = Settings(
        client=False,
        initial_values={
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
            SettingCodes.MAX_HEADER_LIST_SIZE: theirs.DEFAULT_MAX_HEADER_LIST_SIZE,
        },
    )
    theirs = configured(theirs)
    cuts = list(itertools.accumulate(reads))
    ack = wire.find(SETTINGS_ACK)
    seen = []
    for server, reads in ((ours, cuts), (theirs, cuts + [ack + len(SETTINGS_ACK)] if ack >= 0 else cuts)):
        events: list[object] = []
        sent = server.data_to_send()
        for chunk in split(wire, reads):
            events += [described(e) for e in server.receive_data(chunk)]
            sent += server.data_to_send()
        seen.append((events, sent))
    assert seen[0] == seen[1]


#: A SETTINGS frame acknowledging the other side's settings.
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """
    C{data} cut at each of C{cuts} (beyond its end: not cut).
    """
    ends = sorted({cut for cut in cuts if 0 < cut < len(data)} | {len(data)})
    return [data[start:end] for start, end in zip([0, *ends], ends)]


def test_frames_as_large_as_just_acknowledged_are_taken_in_the_same_read() -> None:
    """
    A client that acknowledges resticd's larger frame size and sends a
    256 KiB DATA frame right after, both arriving in one read (TLS records
    decrypted together), has its upload taken, not its connection ended.
    """
    server = configured(ResticH2Connection().conn)
    server.data_to_send()
    client = H2Connection(H2Configuration(client_side=True))
    wire = opening(client)
    client.send_headers(1, [(":method", "POST"), (":path", "/r/data/x"), (":scheme", "https"), (":authority", "h")])
    payload = os.urandom(MAX_FRAME_SIZE)
    client.send_data(1, payload, end_stream=True)
    events = server.receive_data(wire + client.data_to_send())
    assert b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived)) == payload


def started(server: H2Connection) -> H2Connection:
    """
    A client that has opened a request on stream 1 of C{server}.
    """
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    request = [(":method", "POST"), (":path", "/r/data/x"), (":scheme", "https"), (":authority", "h")]
    client.send_headers(1, request)
    server.receive_data(client.data_to_send())
    server.data_to_send()
    return client


def test_an_overlong_frame_is_refused_on_its_header() -> None:
    """
    A frame announcing more than the largest frame allowed ends the
    connection (GOAWAY, FRAME_SIZE_ERROR) as soon as its 9-byte header
    arrives: resticd does not wait for, and hold, the megabytes announced.
    """
    server = configured(ResticH2Connection().conn)
    started(server)
    header = (1 << 20).to_bytes(3, "big") + bytes([DataFrame.type, 0]) + (1).to_bytes(4, "big")
    with pytest.raises(FrameTooLargeError):
        server.receive_data(header)
    goaway = [f for f in frames(server.data_to_send()) if isinstance(f, GoAwayFrame)]
    assert [f.error_code for f in goaway] == [ErrorCodes.FRAME_SIZE_ERROR]


def test_a_read_is_not_held_once_handled() -> None:
    """
    Nothing refers to a read's buffer once the connection has handled it:
    the caller may reuse it at once, and the start of a frame that has not
    fully arrived, kept for the next read, is kept as it was received.
    """
    server = configured(ResticH2Connection().conn)
    client = started(server)
    payload = os.urandom(10_000)
    client.send_data(1, payload, end_stream=True)
    wire = client.data_to_send()
    first = bytearray(wire[:5000])
    assert server.receive_data(first) == []
    first[:] = bytes(len(first))  # reused for something else
    first.clear()  # would raise BufferError if still referred to
    events = server.receive_data(wire[5000:])
    assert b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived)) == payload


def test_a_wrong_preamble_is_a_protocol_error() -> None:
    """
    A connection that does not start with HTTP/2's preamble is refused.
    """
    server = configured(ResticH2Connection().conn)
    with pytest.raises(ProtocolError, match="preamble"):
        server.receive_data(b"GET / HTTP/1.1\r\n\r\n")


def frames(data: bytes) -> list[Frame]:
    """
    The frames in C{data}, which holds whole frames.
    """
    found = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        found.append(frame)
        view = view[9 + length :]
    return found


class _Waiting(Request):
    """
    A request that takes in none of its body (as an upload whose writes are
    behind): its stream is paused from the start.
    """

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        channel.pauseProducing()


def waiting_connection() -> tuple[ResticH2Connection, H2Connection, StringTransport]:
    """
    A connection whose requests take in none of their bodies (L{_Waiting}),
    its client (which has read the server's settings) and its transport.
    """
    server = ResticH2Connection(MemoryReactorClock())
    made: Any = server  # what the channel that switches to HTTP/2 sets
    made.site = Site(Resource())
    made.requestFactory = _Waiting
    made.factory = None
    transport = StringTransport()
    server.makeConnection(transport)
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    client.receive_data(transport.value())
    transport.clear()
    return server, client, transport


def send_what_the_window_allows(client: H2Connection, stream: int) -> None:
    """
    Have C{client} send zeros on C{stream}, in frames as large as allowed,
    until a window is used up.
    """
    while (room := min(client.local_flow_control_window(stream), client.max_outbound_frame_size)) > 0:
        client.send_data(stream, bytes(room))


def test_a_new_connection_offers_large_frames_and_lends_windows_to_uploads() -> None:
    """
    On a new connection resticd tells the client it may send frames of up
    to 256 KiB and 4 MiB per upload stream (HTTP/2's defaults, 16 KiB and
    64 KiB, would have Go send a restic pack in hundreds of frames and stall
    on each window). The connection's window stays HTTP/2's 64 KiB while
    the client only asks for things; an upload has it widened as far as its
    Content-Length, a further one up to 1 MiB until the connection's round
    trip is timed.
    """
    channel, client, transport = waiting_connection()
    assert client.max_outbound_frame_size == MAX_FRAME_SIZE == 256 << 10
    asked = [(":method", "GET"), (":path", "/r/data/x"), (":scheme", "https"), (":authority", "h")]
    client.send_headers(1, asked, end_stream=True)
    for stream, length, window in ((3, 512 << 10, 512 << 10), (5, 64 << 20, FLOOR)):
        transport.clear()
        channel.dataReceived(client.data_to_send())
        assert client.outbound_flow_control_window == BASE_WINDOW if stream == 3 else window
        upload = [(":method", "POST"), (":path", "/r/data/y"), (":scheme", "https"), (":authority", "h")]
        client.send_headers(stream, upload + [("content-length", str(length))])
        channel.dataReceived(client.data_to_send())
        client.receive_data(transport.value())
        assert client.outbound_flow_control_window == window
    assert FLOOR == 1 << 20
    assert client.remote_settings.initial_window_size == STREAM_WINDOW == 4 << 20
    channel.connectionLost(Failure(ConnectionDone()))


def test_what_a_reset_upload_left_unread_goes_back_to_the_connections_window() -> None:
    """
    The bytes of an upload that was reset before they were taken in count
    as taken in: the connection's window gets them back, and the next upload
    may send as much as the first could.
    """
    server, client, transport = waiting_connection()
    upload = [(":method", "POST"), (":path", "/r/data/y"), (":scheme", "https"), (":authority", "h")]
    client.send_headers(1, upload + [("content-length", str(8 << 20))])
    server.dataReceived(client.data_to_send())
    client.receive_data(transport.value())
    assert client.outbound_flow_control_window == FLOOR
    send_what_the_window_allows(client, 1)
    server.dataReceived(client.data_to_send())
    assert client.outbound_flow_control_window == 0  # all sent, left unread
    client.reset_stream(1)
    client.send_headers(3, upload + [("content-length", str(8 << 20))])
    transport.clear()
    server.dataReceived(client.data_to_send())
    client.receive_data(transport.value())
    assert client.outbound_flow_control_window == FLOOR
    assert server.windows.held(server) == FLOOR
    server.connectionLost(Failure(ConnectionDone()))


def pings(client: H2Connection, transport: StringTransport) -> list[bytes]:
    """
    The data of the PINGs the server sent C{client} (which answers them).
    """
    events = client.receive_data(transport.value())
    transport.clear()
    return [event.ping_data for event in events if isinstance(event, PingReceived)]


def test_a_connection_has_its_round_trip_timed_as_it_starts_and_while_it_uploads() -> None:
    """
    A new connection has resticd send its client a PING, whose answer times
    the connection's round trip; later ones go out as uploads come, once a
    second at most and never while one is under way, and none while the
    client only asks for things; a PING answer resticd did not ask for is
    not taken for one.
    """
    server, client, transport = waiting_connection()  # the client read the PING
    clock: Any = server._reactor
    clock.advance(0.01)
    server.dataReceived(PingFrame(0, b"another!", flags=["ACK"]).serialize())
    assert server.round_trips.rtt is None
    upload = [(":method", "POST"), (":path", "/r/data/y"), (":scheme", "https"), (":authority", "h")]
    client.send_headers(1, upload + [("content-length", str(8 << 20))])
    clock.advance(0.03)
    server.dataReceived(client.data_to_send())  # the answer, and an upload
    assert server.round_trips.rtt == pytest.approx(0.04)
    assert pings(client, transport) == []
    clock.advance(0.5)
    server.dataReceived(PingFrame(0, PING_DATA, flags=["ACK"]).serialize())
    assert server.round_trips.rtt == pytest.approx(0.04)
    clock.advance(PING_INTERVAL)
    asked = [(":method", "GET"), (":path", "/r/data/x"), (":scheme", "https"), (":authority", "h")]
    client.send_headers(3, asked, end_stream=True)
    server.dataReceived(client.data_to_send())
    assert pings(client, transport) == []
    client.send_headers(5, upload + [("content-length", str(8 << 20))])
    server.dataReceived(client.data_to_send())
    assert pings(client, transport) == [PING_DATA]
    server.connectionLost(Failure(ConnectionDone()))


def test_bytes_kept_for_a_waiting_upload_do_not_hold_the_read_they_came_in() -> None:
    """
    What arrives for an upload that waits (its stream paused) is kept as a
    copy of its own, not as a view of the read it came in, which would stay
    in memory whole (up to a MiB, most of it other streams' bytes) for as
    long as the upload waits.
    """
    server, client, transport = waiting_connection()
    upload = [(":method", "POST"), (":path", "/r/data/y"), (":scheme", "https"), (":authority", "h")]
    client.send_headers(1, upload + [("content-length", str(1 << 20))])
    server.dataReceived(client.data_to_send())
    client.receive_data(transport.value())
    payload = os.urandom(100_000)
    client.send_data(1, payload)
    read = bytes(client.data_to_send())
    server.dataReceived(read)
    kept = [chunk for chunk, _ in server.streams[1]._inboundDataBuffer]
    assert [bytes(chunk) for chunk in kept] == [payload]
    assert not any(isinstance(chunk, memoryview) and chunk.obj is read for chunk in kept)
    server.connectionLost(Failure(ConnectionDone()))


def test_answers_read_whole_share_the_connections_room() -> None:
    """
    Over HTTP/2, answers read whole to be queued at once take room from
    the connection's 4 MiB until given back (once, however often): one that
    would go past it gets none (and goes through a producer). Over HTTP/1.1
    there is always room.
    """
    connection = ResticH2Connection(MemoryReactorClock())

    class Stream:
        _conn = connection

    first = reserve(Stream(), 3 << 20)
    assert first is not None
    assert reserve(Stream(), 2 << 20) is None
    small = reserve(Stream(), 1 << 20)
    assert small is not None
    first()
    first()
    assert connection.queued() == 1 << 20
    assert reserve(Stream(), 3 << 20) is not None
    assert reserve(object(), 1 << 30) is not None


@pytest.mark.parametrize("asked", [32, 33])
def test_a_client_may_have_32_requests_at_once_on_a_connection(asked: int) -> None:
    """
    A new connection lets the client have 32 requests in flight at once
    (h2's default is 100, and each may hold up to a MiB of its answer),
    from its very first requests: 32 sent at once, before the client has
    even read the server's settings, are all answered; a 33rd ends the
    connection with a protocol error.
    """
    clock = Turns()
    server = ResticH2Connection(clock)
    made: Any = server  # what the channel that switches to HTTP/2 sets
    made.site = Site(_Answer(b"answer", 6))
    made.requestFactory = Request
    made.factory = None
    transport = StringTransport()
    server.makeConnection(transport)
    preamble = transport.value()
    announced = H2Connection(H2Configuration(client_side=True))
    announced.receive_data(preamble)
    assert announced.remote_settings.max_concurrent_streams == 32
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    request = [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "h")]
    for stream in range(asked):
        client.send_headers(1 + 2 * stream, request, end_stream=True)
    server.dataReceived(client.data_to_send())
    for _ in range(10):
        clock.turn()
    sent = frames(transport.value()[len(preamble) :])
    goaway = [f.error_code for f in sent if isinstance(f, GoAwayFrame)]
    if asked == 32:
        assert goaway == [] and not transport.disconnecting
        assert sum(1 for f in sent if isinstance(f, DataFrame) and f.data == b"answer") == 32
        server.connectionLost(Failure(ConnectionDone()))
    else:
        assert goaway == [ErrorCodes.PROTOCOL_ERROR] and transport.disconnecting


class _Answer(Resource):
    """
    Answers every GET with C{body}, written C{piece} bytes at a time before
    the render returns (as static's producers write a read each).
    """

    isLeaf = True

    def __init__(self, body: bytes, piece: int) -> None:
        super().__init__()
        self.body = body
        self.piece = piece

    def render_GET(self, request: Request) -> int:
        for start in range(0, len(self.body), self.piece):
            request.write(self.body[start : start + self.piece])
        request.finish()
        return NOT_DONE_YET


class Turns(Clock):
    """
    A clock that runs the calls due now one reactor turn at a time: what
    they schedule for now waits for the next L{turn}.
    """

    def turn(self) -> None:
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


def answered(
    body: bytes, piece: int, streams: int, window: int = 1 << 24
) -> tuple[ResticH2Connection, H2Connection, StringTransport, Turns]:
    """
    A connection whose C{streams} GETs, sent at once, L{_Answer} answers;
    its client (16 KiB frames, as restic's Go client takes, and a window of
    C{window} bytes per stream), the server's transport and its clock.
    """
    return h2_requests(Site(_Answer(body, piece)), ["/"] * streams, window)


def h2_requests(
    site: Site, paths: list[str], window: int = 1 << 24, headers: list[tuple[str, str]] | None = None
) -> tuple[ResticH2Connection, H2Connection, StringTransport, Turns]:
    """
    A connection to C{site} with a GET of each of C{paths} (with
    C{headers}), sent at once on streams 1, 3, ...; its client (16 KiB
    frames, as restic's Go client takes, and a window of C{window} bytes
    per stream), the server's transport and its clock.
    """
    clock = Turns()
    server = ResticH2Connection(clock)
    made: Any = server  # what the channel that switches to HTTP/2 sets
    made.site = site
    made.requestFactory = site.requestFactory
    made.factory = None
    transport = StringTransport()
    server.makeConnection(transport)
    clock.turn()  # the send loop starts, and sleeps: nothing to send
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
    client.increment_flow_control_window(1 << 28)
    client.receive_data(transport.value())
    transport.clear()
    for stream, path in enumerate(paths):
        request = [(":method", "GET"), (":path", path), (":scheme", "https"), (":authority", "h")]
        client.send_headers(1 + 2 * stream, request + (headers or []), end_stream=True)
    server.dataReceived(client.data_to_send())
    return server, client, transport, clock


def data_frames(client: H2Connection, transport: StringTransport) -> list[tuple[int, bytes]]:
    """
    The stream and payload of each DATA frame the server sent since the
    last call, in order.
    """
    events = client.receive_data(transport.value())
    transport.clear()
    return [(e.stream_id, bytes(e.data)) for e in events if isinstance(e, DataReceived) and e.data]


@pytest.mark.parametrize("piece", [256 << 10, 1 << 20])
def test_an_answer_goes_out_in_turns_of_at_most_16_frames(piece: int) -> None:
    """
    A MiB answer, written in pieces of 256 KiB or a whole MiB, reaches a
    client that takes 16 KiB frames as 64 frames, 16 per reactor turn, so
    that other connections get their turns between; all of it arrives, in
    order.
    """
    body = os.urandom(1 << 20)
    server, client, transport, clock = answered(body, piece, streams=1)
    turns = [data_frames(client, transport)]
    while len(turns) < 20 and clock.calls:
        clock.turn()
        turns.append(data_frames(client, transport))
    sent = [turn for turn in turns if turn]
    assert [len(turn) for turn in sent] == [16, 16, 16, 16]
    assert all(stream == 1 and len(data) == 16384 for turn in sent for stream, data in turn)
    assert b"".join(data for turn in sent for _, data in turn) == body


def test_two_answers_on_one_connection_take_turns() -> None:
    """
    Two answers of a MiB on one connection, written 256 KiB at a time,
    progress together: the send loop's turns alternate between them, each
    turn 16 frames (one written piece), and both arrive whole, in order.
    """
    body = os.urandom(1 << 20)
    server, client, transport, clock = answered(body, 256 << 10, streams=2)
    turns = [data_frames(client, transport)]
    while len(turns) < 20 and clock.calls:
        clock.turn()
        turns.append(data_frames(client, transport))
    sent = [turn for turn in turns if turn]
    assert [len(turn) for turn in sent] == [16] * 8
    assert [{stream for stream, _ in turn} for turn in sent] == [{1}, {3}] * 4
    for stream in (1, 3):
        assert b"".join(data for turn in sent for number, data in turn if number == stream) == body


def test_frames_stop_at_the_streams_window_and_go_on_when_it_opens() -> None:
    """
    A written piece larger than what the client's window allows is sent up
    to the window (the last frame shorter), and the rest once the client
    opens the window again; nothing is lost or sent twice.
    """
    body = os.urandom(64 << 10)
    server, client, transport, clock = answered(body, 64 << 10, streams=1, window=40 << 10)
    first = data_frames(client, transport)
    assert [len(data) for _, data in first] == [16384, 16384, 8192]
    client.acknowledge_received_data(40 << 10, 1)
    transport.clear()
    server.dataReceived(client.data_to_send())
    rest = []
    for _ in range(5):
        rest += data_frames(client, transport)
        clock.turn()
    assert [len(data) for _, data in rest] == [16384, 8192]
    assert b"".join(data for _, data in first + rest) == body


class Uploader:
    """
    A client uploading C{bodies} (path, body) on a connection of its own to
    C{site}, one stream each, in frames as large as allowed.
    """

    def __init__(self, site: Any, clock: Turns, bodies: list[tuple[str, bytes]]) -> None:
        self.server = ResticH2Connection(clock, windows=site.upload_windows)
        made: Any = self.server  # what the channel that switches to HTTP/2 sets
        made.site = site
        made.requestFactory = site.requestFactory
        made.factory = None
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)
        self.client = H2Connection(H2Configuration(client_side=True))
        self.client.initiate_connection()
        self.bodies = {1 + 2 * i: body for i, (_, body) in enumerate(bodies)}
        self.sent = dict.fromkeys(self.bodies, 0)
        self.statuses: list[bytes] = []
        #: The PINGs the server sent (the client answers them).
        self.pings = 0
        for stream, (path, body) in zip(self.bodies, bodies):
            request = [(":method", "POST"), (":path", path), (":scheme", "https"), (":authority", "h")]
            self.client.send_headers(stream, request + [("content-length", str(len(body)))])
        self.deliver()

    def step(self) -> int:
        """
        Read what the server sent, send what the windows allow: the bytes
        sent.
        """
        self.read()
        sent = sum(self.send(stream) for stream in self.bodies)
        self.server.dataReceived(self.client.data_to_send())
        return sent

    def read(self) -> None:
        """
        Read what the server sent.
        """
        self.receive(self.transport.value())
        self.transport.clear()

    def receive(self, data: bytes) -> None:
        """
        Read C{data}, sent by the server.
        """
        for event in self.client.receive_data(data):
            if isinstance(event, ResponseReceived):
                self.statuses.append(dict(event.headers)[b":status"])
            elif isinstance(event, PingReceived):
                self.pings += 1

    def send(self, stream: int, most: int = 1 << 40) -> int:
        """
        Queue up to C{most} bytes of C{stream}'s body, as far as the windows
        allow: the bytes queued (see L{deliver}).
        """
        body = self.bodies[stream]
        start = self.sent[stream]
        end = min(len(body), start + most)
        while self.sent[stream] < end:
            room = min(self.client.local_flow_control_window(stream), self.client.max_outbound_frame_size)
            if room <= 0:
                break
            sent = self.sent[stream]
            piece = body[sent : min(end, sent + room)]
            self.sent[stream] = sent + len(piece)
            self.client.send_data(stream, piece, end_stream=self.sent[stream] == len(body))
        return self.sent[stream] - start

    def deliver(self) -> None:
        """
        Hand what the client queued to the server.
        """
        self.server.dataReceived(self.client.data_to_send())

    def done(self) -> bool:
        return all(self.sent[stream] == len(body) for stream, body in self.bodies.items())


def assert_stored_whole(server: Any, bodies: list[bytes]) -> None:
    """
    Every one of C{bodies} is stored, whole, as a data object of repository
    C{r}.
    """
    for body in bodies:
        name = name_of(body)
        with open(os.path.join(server.layout.root, "r", "data", name[:2], name), "rb") as f:
            assert f.read() == body


def test_upload_bytes_waiting_for_the_writes_do_not_hold_the_read_they_came_in(tmp_path) -> None:
    """
    An upload's bytes kept for its writes (the disk slower than the
    network) are copies of their own, not views of the read they came in:
    a read (up to a MiB of decrypted TLS, frames of several streams) is
    freed once handled, so that what uploads keep in memory is what the
    write budget counts.
    """
    runner = HeldWrites()
    server = make_server(str(tmp_path / "data"), run=runner)
    server.store.create_repo(("r",))
    body = os.urandom(2 << 20)
    uploader = Uploader(server.site, Turns(), [(f"/r/data/{name_of(body)}", body)])
    uploader.read()
    assert uploader.send(1) == FLOOR  # the window lent to a connection nearby
    read = uploader.client.data_to_send()
    uploader.server.dataReceived(read)
    assert len(runner.queued) == 1  # a piece waits for its write
    assert sys.getrefcount(read) == 2  # this name and the call's argument
    while runner.queued or not uploader.done():
        runner.release_all()
        uploader.step()
    assert uploader.statuses == [b"200"]
    assert_stored_whole(server, [body])


class FarAway(RoundTrips):
    """
    A client whose round trips are long enough for it to use all the window
    it is lent.
    """

    def reach(self, floor: int = FLOOR) -> int:
        return CONNECTION_WINDOW


@pytest.mark.parametrize("far", [True, False], ids=["far-away", "nearby"])
def test_uploads_on_many_connections_while_the_writes_are_behind_hold_no_more_than_the_pool(tmp_path, far) -> None:
    """
    Uploads on many HTTP/2 connections (three each, as restic runs several
    at once) while resticd's writes wait (a disk slower than the network):
    their clients together get to send no more than the pool lends (clients
    far away) or a MiB each (clients nearby, whose bytes a MiB of window
    per round trip brings faster than the disk takes them), beyond HTTP/2's
    initial 64 KiB each, and what the writes may have queued, where each
    connection's own window let its client send up to 16 MiB into memory.
    Once the writes go on, every upload is answered 200 and stored whole.
    """
    runner = HeldWrites()
    server = make_server(str(tmp_path / "data"), run=runner)
    server.store.create_repo(("r",))
    site: Any = server.site
    if far:
        site.upload_windows = UploadWindows(limit=8 << 20)
    clock = Turns()
    base = os.urandom(6 << 20)
    bodies = [base[:-1] + bytes([i]) for i in range(12)]
    named = [(f"/r/data/{name_of(body)}", body) for body in bodies]
    uploaders = [Uploader(site, clock, named[i : i + 3]) for i in range(0, len(named), 3)]
    if far:
        for uploader in uploaders:
            uploader.server.round_trips = FarAway()
            site.upload_windows.update(uploader.server)
    while sum(uploader.step() for uploader in uploaders):
        clock.advance(0.001)
        clock.turn()
    lent = site.upload_windows.limit if far else len(uploaders) * FLOOR
    queued = site.spool.budget.limit + len(bodies) * PIECE
    sent = sum(sum(uploader.sent.values()) for uploader in uploaders)
    assert sent <= lent + len(uploaders) * BASE_WINDOW + queued
    while runner.queued or not all(uploader.done() for uploader in uploaders):
        runner.release_all()
        for uploader in uploaders:
            uploader.step()
        clock.turn()
    for _ in range(5):
        runner.release_all()
        clock.turn()
        for uploader in uploaders:
            uploader.step()
    assert [uploader.statuses for uploader in uploaders] == [[b"200"] * 3] * len(uploaders)
    assert_stored_whole(server, bodies)


def test_a_connection_that_starts_uploading_while_uploads_wait_for_the_disk_is_lent_a_quarter_mib(tmp_path) -> None:
    """
    A client nearby that starts an upload while those of others wait for
    the disk (their writes held, enough of them to fill the write budget,
    each up to BACKLOG bytes behind) is lent a quarter MiB of window rather
    than a MiB: what it sent beyond would wait in memory. Once the writes go
    on, its connection is lent the MiB again, and every upload is answered
    200 and stored whole.
    """
    runner = HeldWrites()
    server = make_server(str(tmp_path / "data"), run=runner)
    server.store.create_repo(("r",))
    site: Any = server.site
    clock = Turns()
    waiting = BUDGET // BACKLOG + 1
    base = os.urandom(6 << 20)
    bodies = [base[:-1] + bytes([i]) for i in range(waiting + 1)]
    named = [(f"/r/data/{name_of(body)}", body) for body in bodies]
    first = [Uploader(site, clock, [upload]) for upload in named[:waiting]]
    while sum(uploader.step() for uploader in first):
        clock.turn()
    assert site.spool.budget.holding_back()
    late = Uploader(site, clock, named[waiting:])
    late.read()
    assert late.client.outbound_flow_control_window == HELD_BACK_FLOOR
    uploaders = [*first, late]
    lent = [site.upload_windows.held(late.server)]
    while runner.queued or not all(uploader.done() for uploader in uploaders):
        runner.release_all()
        for uploader in uploaders:
            uploader.step()
        clock.turn()
        lent.append(site.upload_windows.held(late.server))
    assert max(lent) == FLOOR
    for _ in range(5):
        runner.release_all()
        clock.turn()
        for uploader in uploaders:
            uploader.step()
    assert [uploader.statuses for uploader in uploaders] == [[b"200"]] * len(bodies)
    assert_stored_whole(server, bodies)


def test_a_client_far_away_is_lent_what_it_brings_per_round_trip(tmp_path) -> None:
    """
    A client 100 ms away (HTTP/2 frames delayed 50 ms each way) uploading
    32 MiB on four streams, the disk keeping up: once its round trip is
    timed, its connection is lent four round trips' worth of the rate its
    bytes come at, which grows with the window, up to 16 MiB. Its uploads
    take less than 16 round trips, where a window of a MiB, what a client
    nearby gets, would take 32, and are stored whole.
    """
    server = make_server(str(tmp_path / "data"))
    server.store.create_repo(("r",))
    site: Any = server.site
    clock = Turns()
    base = os.urandom(8 << 20)
    bodies = [base[:-1] + bytes([i]) for i in range(4)]
    uploader = Uploader(site, clock, [(f"/r/data/{name_of(body)}", body) for body in bodies])
    delay, tick = 0.05, 0.005
    to_server: list[tuple[float, bytes]] = []
    to_client: list[tuple[float, bytes]] = []
    lent = 0
    while uploader.statuses != [b"200"] * 4 and clock.seconds() < 5:
        now = clock.seconds()
        while to_client and to_client[0][0] <= now:
            uploader.receive(to_client.pop(0)[1])
        for stream in uploader.bodies:
            uploader.send(stream)
        if sent := uploader.client.data_to_send():
            to_server.append((now + delay, sent))
        while to_server and to_server[0][0] <= now:
            uploader.server.dataReceived(to_server.pop(0)[1])
        if answered := uploader.transport.value():
            to_client.append((now + delay, answered))
        uploader.transport.clear()
        lent = max(lent, site.upload_windows.held(uploader.server))
        clock.advance(tick)
        clock.turn()
    assert uploader.statuses == [b"200"] * 4
    assert uploader.server.round_trips.rtt == pytest.approx(2 * delay, abs=2 * tick)
    assert lent > 8 * FLOOR
    assert clock.seconds() < 16 * 2 * delay
    assert_stored_whole(server, bodies)


def test_an_upload_under_way_has_its_round_trip_timed_again_once_a_second(tmp_path) -> None:
    """
    While an upload goes on, without new requests, its connection's round
    trip is timed again about once a second (an upload of four seconds: a
    PING as the connection starts and three or four more), so that the
    window follows a client whose path changes.
    """
    server = make_server(str(tmp_path / "data"))
    server.store.create_repo(("r",))
    site: Any = server.site
    clock = Turns()
    body = os.urandom(16 * (256 << 10))
    uploader = Uploader(site, clock, [(f"/r/data/{name_of(body)}", body)])
    while not uploader.done():
        uploader.read()
        uploader.send(1, 256 << 10)
        uploader.deliver()
        clock.advance(0.25)
        clock.turn()
    uploader.step()
    assert uploader.statuses == [b"200"]
    assert 4 <= uploader.pings <= 5
    assert_stored_whole(server, [body])


def test_uploads_sharing_a_connection_go_on_when_others_on_it_wait_for_the_writes(tmp_path) -> None:
    """
    Two uploads on one HTTP/2 connection, the writes slower than the client:
    one got most of a piece and keeps it for its next, the other went past
    the write budget and waits, keeping what arrives for it, the whole
    connection window. Once the budget is exceeded, what every upload keeps
    goes to the workers, so the waiting one goes on and both are answered
    200, rather than the first waiting for bytes its client cannot send and
    the second for writes of bytes kept for more that cannot come.
    """
    runner = HeldWrites()
    server = make_server(str(tmp_path / "data"), run=runner)
    server.store.create_repo(("r",))
    site: Any = server.site
    site.spool = Spool(server.layout.spool_dir(), 0o600, runner, WriteBudget(limit=3 * PIECE // 2))
    site.upload_windows = UploadWindows(limit=2 * PIECE, per_connection=2 * PIECE)
    clock = Turns()
    base = os.urandom(3 * PIECE)
    bodies = [base[:-1] + bytes([i]) for i in range(2)]
    uploader = Uploader(site, clock, [(f"/r/data/{name_of(body)}", body) for body in bodies])
    uploader.read()
    uploader.send(1, 900 << 10)
    uploader.deliver()
    for _ in range(4):
        uploader.read()
        uploader.send(3)
        uploader.deliver()
    for _ in range(100):
        if uploader.done() and uploader.statuses == [b"200"] * 2:
            break
        runner.release_all()
        uploader.step()
        clock.turn()
    assert uploader.statuses == [b"200"] * 2


@given(st.integers(0, 2**32))
@settings(max_examples=25, deadline=None)
def test_uploads_waiting_for_the_writes_all_go_on_in_any_order_their_frames_come(tmp_path_factory, seed) -> None:
    """
    Four HTTP/2 clients with four uploads each, sending pieces of their
    bodies in any order while the disk writes a piece per turn and the
    write budget (2 MiB) and the pool (2 MiB) are small: every upload is
    answered 200 and stored whole. An upload that goes on over HTTP/2 with
    nothing arrived for it is not counted as a read to come: before, two
    such uploads, whose connections' windows were taken by uploads still
    waiting, had the budget hold back the very uploads that would free
    those windows, until the clients gave up.
    """
    order = random.Random(seed)
    tmp_path = tmp_path_factory.mktemp("data")
    runner = HeldWrites()
    server = make_server(str(tmp_path / "data"), run=runner)
    server.store.create_repo(("r",))
    site: Any = server.site
    site.spool = Spool(server.layout.spool_dir(), 0o600, runner, WriteBudget(limit=2 * PIECE))
    site.upload_windows = UploadWindows(limit=2 * PIECE, per_connection=PIECE // 2)
    clock = Turns()
    base = os.urandom(PIECE)
    bodies = [base[:-1] + bytes([i]) for i in range(16)]
    named = [(f"/r/data/{name_of(body)}", body) for body in bodies]
    uploaders = [Uploader(site, clock, named[i : i + 4]) for i in range(0, len(named), 4)]
    for _ in range(300):
        if all(len(uploader.statuses) == 4 for uploader in uploaders):
            break
        for uploader in order.sample(uploaders, len(uploaders)):
            uploader.read()
            for stream in order.sample(list(uploader.bodies), len(uploader.bodies)):
                uploader.send(stream, order.choice([16 << 10, 256 << 10, PIECE]))
            uploader.deliver()
        if runner.queued:
            runner.release()
        clock.turn()
    assert [uploader.statuses for uploader in uploaders] == [[b"200"] * 4] * len(uploaders)
    assert_stored_whole(server, bodies)


@pytest.mark.parametrize("http2", [True, False])
def test_closing_the_sites_connections_lets_go_of_them_and_tells_http2_clients(tmp_path: Any, http2: bool) -> None:
    """
    A stopping daemon's close of its connections (the site's
    C{close_connections}) stops each channel being its transport's
    producer (TLS sends its close alert only then) and closes the
    transport; an HTTP/2 client is first told, with a GOAWAY carrying no
    error, that no new request will be served. The closes complete as the
    connections go.
    """
    server = make_server(str(tmp_path / "data"))
    transport = StringTransport()
    if http2:
        transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
    protocol = server.site.buildProtocol(transport.getPeer())
    assert protocol is not None
    protocol.makeConnection(transport)
    if http2:
        client = H2Connection(H2Configuration(client_side=True))
        client.initiate_connection()
        protocol.dataReceived(client.data_to_send())
        client.receive_data(transport.value())
        transport.clear()
    else:
        protocol.dataReceived(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 200 ")
        transport.clear()
    assert transport.producer is not None
    closed = server.site.close_connections()
    assert transport.producer is None
    assert transport.disconnecting
    if http2:
        goaway = [f for f in frames(transport.value()) if isinstance(f, GoAwayFrame)]
        assert [f.error_code for f in goaway] == [ErrorCodes.NO_ERROR]
    else:
        assert transport.value() == b""
    assert not closed.called
    protocol.connectionLost(Failure(ConnectionDone()))
    assert closed.called


def test_an_idle_http2_connection_is_closed_at_its_timeout_not_left_to_the_abort_timer(tmp_path: Any) -> None:
    """
    An HTTP/2 connection idle for L{IDLE_TIMEOUT} seconds is told GOAWAY
    (no error), stops being its transport's producer (TLS sends its close
    alert only then) and is closed; Twisted's abort timer, armed for a
    client that does not go, does not outlive the connection. (Twisted's
    own timeout left the connection the producer: over TLS it stayed open
    until that timer aborted it, 15 s later.)
    """
    server = make_server(str(tmp_path / "data"))
    transport = StringTransport()
    protocol, client = http2_connection(server, transport)
    protocol.dataReceived(client.data_to_send())
    transport.clear()
    server.reactor.advance(IDLE_TIMEOUT - 1)
    assert not transport.disconnecting
    assert transport.producer is not None
    server.reactor.advance(1)
    goaway = [f for f in frames(transport.value()) if isinstance(f, GoAwayFrame)]
    assert [f.error_code for f in goaway] == [ErrorCodes.NO_ERROR]
    assert transport.producer is None
    assert transport.disconnecting

    def abort_timers() -> list[Any]:
        return [c for c in server.reactor.getDelayedCalls() if c.active() and "Abort" in c.func.__name__]

    assert len(abort_timers()) == 1  # armed for a client that does not go
    protocol.connectionLost(Failure(ConnectionDone()))
    assert abort_timers() == []
