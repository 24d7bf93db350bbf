"""
Objects sent with C{sendfile(2)} over plain TCP and unix sockets.

The kernel copies from the page cache to the socket; nothing passes through
Python. Used for answers larger than a MiB (whole objects and ranges) over
HTTP/1.x without TLS; TLS and HTTP/2 keep L{twisted.web.static}'s producers,
and smaller answers are read at once (see L{resticd.resources.StoredFile}).

What of the object is not in the page cache is first read into it by a
worker thread, a turn's worth at a time, and once that was needed, workers
read ahead while the event loop sends: C{sendfile} never waits for the disk
on the event loop.

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
from typing import IO, Any, TypeVar

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web import server
from zope.interface import implementer

from .logs import logger
from .reads import is_cached, warm
from .request import abort, shrank
from .sockets import buffered
from .threads import Runner

log = logger(__name__)
T = TypeVar("T")


#: Bytes handed to one sendfile call; also what one reactor turn sends at
#: most, so that other connections get their turn.
TURN_BYTES = 4 << 20
#: How far ahead of what is sent workers read an object that was not in
#: the page cache.
READ_AHEAD = 16 << 20


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
        self,
        request: server.Request,
        transport: tcp.Connection,
        file: IO[bytes],
        start: int,
        length: int,
        run: Runner,
    ) -> None:
        self.request = request
        self.transport: Any = transport
        self.file: IO[bytes] | None = file
        self.offset = start
        self.end = start + length
        self.run = run
        #: Up to where the file is known to be in the page cache.
        self._cached_to = start
        #: Up to where workers have been asked to read the file ahead.
        self._ahead_to = start
        #: Some of the file was not cached: read each next turn ahead.
        self._cold = False
        #: Waiting for a worker to read the current turn.
        self._waiting = False
        #: Worker calls using the file (closed once they are done).
        self._busy = 0
        self._stopped = False

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

    def _wait_for_socket(self) -> None:
        """
        Be resumed once the transport has flushed its buffer and the socket
        is writable.
        """
        t = self.transport
        t.producerPaused = True
        t.startWriting()

    def resumeProducing(self) -> None:
        if self.file is None or self._waiting:
            return
        if buffered(self.transport):
            self._wait_for_socket()
            return
        sent_this_turn = 0
        while self.offset < self.end:
            if sent_this_turn >= TURN_BYTES:
                self._wait_for_socket()
                return
            count = min(self.end - self.offset, TURN_BYTES)
            if self._cached_to < self.offset + count:
                if not is_cached(self.file.fileno(), self.offset, count):
                    self._cold = True
                    self._waiting = True
                    self._warm(self.offset, count).addCallbacks(
                        self._warmed, self._not_warmed, (self.offset + count,)
                    )
                    self._read_ahead(self.offset + count)
                    return
                self._cached_to = self.offset + count
            if self._cold:
                self._read_ahead(self.offset + count)
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

    def _warm(self, start: int, count: int) -> Deferred[None]:
        """
        Have a worker read C{count} bytes from C{start} into the page cache.
        """
        assert self.file is not None
        self._busy += 1
        self._ahead_to = max(self._ahead_to, start + count)
        d: Deferred[None] = self.run(warm, self.file.fileno(), start, count)
        return d.addBoth(self._let_go)

    def _let_go(self, result: T) -> T:
        self._busy -= 1
        if self._stopped:
            self._close()
        return result

    def _read_ahead(self, start: int) -> None:
        """
        Keep workers reading up to L{READ_AHEAD} bytes beyond C{start}, in
        calls of at least a turn (their errors show when those bytes are
        sent).
        """
        ahead = min(start + READ_AHEAD, self.end)
        start = max(start, self._ahead_to)
        if ahead - start >= TURN_BYTES or (start < ahead == self.end):
            self._warm(start, ahead - start).addErrback(lambda _: None)

    def _warmed(self, _: object, upto: int) -> None:
        self._waiting = False
        if self._stopped:
            return
        self._cached_to = max(self._cached_to, upto)
        self.resumeProducing()

    def _not_warmed(self, failure: Failure) -> None:
        self._waiting = False
        if self._stopped:
            return
        log.failure("reading {uri} failed", failure, uri=self.request.uri)
        self._fail()

    def pauseProducing(self) -> None:
        # Nothing is written unless the transport resumes us.
        pass

    def stopProducing(self) -> None:
        self._close()

    def _gone(self, failure: Failure) -> None:
        self._close()

    def _close(self) -> None:
        self._stopped = True
        if self._busy:
            # A worker is reading it: closed when the last one is done.
            return
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
