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
when a client negotiates C{h2} by ALPN. Both lean on Twisted internals
(C{_GenericHTTPChannelProtocol}, C{H2Connection.priority},
C{_outboundStreamQueues}, C{_sendingDeferred}); setup.py pins the Twisted
versions they were tested with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import priority
from twisted.web._http2 import _END_STREAM_SENTINEL, H2Connection
from twisted.web.http import HTTPChannel, HTTPFactory, _GenericHTTPChannelProtocol


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

    def _can_send(self, stream: int) -> bool:
        queue = self._outboundStreamQueues.get(stream)
        if queue and queue[0] is _END_STREAM_SENTINEL:
            return True
        return bool(self.conn.local_flow_control_window(stream) > 0)

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

    def dataReceived(self, data: bytes) -> None:
        if self._negotiatedProtocol is None:
            negotiated = getattr(self._channel.transport, "negotiatedProtocol", None)
            if negotiated == b"h2":
                self._switch_to_h2()
                self._negotiatedProtocol = b"h2"  # type: ignore[assignment]
        super().dataReceived(data)

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


def channel_for(factory: HTTPFactory) -> ResticChannel:
    """
    The protocol of a new connection to C{factory} (an HTTPFactory's
    C{protocol}).
    """
    return ResticChannel(HTTPChannel())
