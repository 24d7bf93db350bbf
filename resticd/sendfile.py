"""
Objects sent with C{sendfile(2)} over plain TCP and unix sockets.

The kernel copies from the page cache to the socket; nothing passes through
Python. Used for answers larger than a MiB (whole objects and ranges) over
HTTP/1.x without TLS; TLS and HTTP/2 keep L{twisted.web.static}'s producers,
and smaller answers are read at once (see L{resticd.resources.StoredFile}).

The producer writes straight to the socket, so it only does so when the
transport's own buffer is empty (the response headers are sent first), and
it waits for the socket to become writable by asking the transport to call
it back: the transport treats it as a paused producer and resumes it once
its (empty) buffer is flushed, which is exactly when the socket can take
more. This leans on L{twisted.internet.abstract.FileDescriptor}'s buffer
attributes (C{dataBuffer}, C{offset}, C{_tempDataLen}, C{producerPaused}).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import IO, Any

from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web import server
from zope.interface import implementer

from .request import abort, shrank


#: Bytes handed to one sendfile call; also what one reactor turn sends at
#: most, so that other connections get their turn.
TURN_BYTES = 4 << 20


def sendfile_transport(request: server.Request) -> tcp.Connection | None:
    """
    The plain socket transport C{request} can be answered on with
    C{sendfile(2)}, or L{None} (TLS, HTTP/2, or something else in between).
    """
    channel = request.channel
    if channel is None or hasattr(channel, "_conn"):
        return None
    transport = getattr(channel, "transport", None)
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return None
    if request.clientproto != b"HTTP/1.1" and request.clientproto != b"HTTP/1.0":
        return None
    return transport


@implementer(IPushProducer)
class SendfileProducer:
    """
    Send C{length} bytes of C{file} from C{start} as the body of C{request}
    and finish it; the file is closed in every case.
    """

    def __init__(
        self, request: server.Request, transport: tcp.Connection, file: IO[bytes], start: int, length: int
    ) -> None:
        self.request = request
        self.transport: Any = transport
        self.file: IO[bytes] | None = file
        self.offset = start
        self.end = start + length

    def start(self) -> None:
        """
        Send the headers (into the transport's buffer), then the body as
        the socket takes it.
        """
        self.request.notifyFinish().addErrback(self._gone)
        self.request.registerProducer(self, True)
        self.request.write(b"")
        if self.offset == self.end:
            self._done()
            return
        self.resumeProducing()

    def _buffered(self) -> bool:
        t = self.transport
        return bool(len(t.dataBuffer) - t.offset or t._tempDataLen)

    def _wait_for_socket(self) -> None:
        """
        Be resumed once the transport has flushed its buffer and the socket
        is writable.
        """
        t = self.transport
        t.producerPaused = True
        t.startWriting()

    def resumeProducing(self) -> None:
        if self.file is None:
            return
        if self._buffered():
            self._wait_for_socket()
            return
        sent_this_turn = 0
        while self.offset < self.end:
            if sent_this_turn >= TURN_BYTES:
                self._wait_for_socket()
                return
            count = min(self.end - self.offset, TURN_BYTES)
            try:
                n = os.sendfile(self.transport.fileno(), self.file.fileno(), self.offset, count)
            except BlockingIOError:
                self._wait_for_socket()
                return
            except InterruptedError:
                continue
            except OSError:
                # The client went away (EPIPE, ECONNRESET) or the file cannot
                # be read: the transport notices and ends the request.
                self._fail()
                return
            if n == 0:
                # The file is shorter than when it was opened.
                self._fail(shrank)
                return
            self.offset += n
            sent_this_turn += n
            self.request.sentLength += n
        self._done()

    def pauseProducing(self) -> None:
        # Nothing is written unless the transport resumes us.
        pass

    def stopProducing(self) -> None:
        self._close()

    def _gone(self, failure: Failure) -> None:
        self._close()

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _done(self) -> None:
        self._close()
        request = self.request
        request.unregisterProducer()
        if not request.finished and not request._disconnected:
            request.finish()

    def _fail(self, cut: Callable[[server.Request], None] = abort) -> None:
        self._close()
        self.request.unregisterProducer()
        cut(self.request)
