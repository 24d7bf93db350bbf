"""
resticd's HTTP/2 framing, checked against the h2 library without sockets.
"""

from __future__ import annotations

import os

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived
from h2.exceptions import StreamClosedError

from resticd.h2 import ResticH2Connection


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
    leave both flow-control windows where h2 leaves them, and reach the
    client as the response's bytes.
    """
    ours = ResticH2Connection()
    ours.conn = H2Connection(H2Configuration(client_side=False))
    client = opened_stream(ours.conn)
    theirs = H2Connection(H2Configuration(client_side=False))
    opened_stream(theirs)
    payload = os.urandom(16384)
    for piece in (memoryview(payload), memoryview(payload)[:1000], b"x"):
        frame = b"".join(ours._data_frame(1, piece))
        theirs.send_data(1, bytes(piece))
        assert frame == theirs.data_to_send()
        assert ours.conn.streams[1].outbound_flow_control_window == theirs.streams[1].outbound_flow_control_window
        assert ours.conn.outbound_flow_control_window == theirs.outbound_flow_control_window
        events = client.receive_data(frame)
        assert [bytes(e.data) for e in events if isinstance(e, DataReceived)] == [bytes(piece)]


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
        ours._data_frame(1, memoryview(b"late"))
