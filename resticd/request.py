"""
The request class of the site: streams upload bodies into the spool, checks
them against quotas as they arrive, and records what became of each request
(L{Outcome}) for the access log and the metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote_to_bytes

from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import RESPONSES

from .deadlines import Deadline
from .errors import PayloadTooLarge, ResticdError
from .h2 import ResticHTTPChannel
from .headers import DATE, SERVER, http_date, response_headers
from .logs import client_host, logger
from .paths import Target, parse_path
from .spool import Spool, SpoolFile

if TYPE_CHECKING:
    from .usage import Quota, Reservation

log = logger(__name__)


@dataclass
class Outcome:
    """
    What a request was and what became of it, filled in as it is served.
    """

    #: The authenticated user, if any.
    user: str | None = None
    #: The repository, type and object it addressed, once routed.
    target: Target | None = None
    #: The error it was answered with, if any.
    error: ResticdError | None = None
    #: Why authentication failed: missing, password, certificate, proxy_header, throttled.
    auth_failure: str | None = None
    #: For uploads: whether the object was stored (False: an identical one was there).
    stored: bool | None = None
    #: Bytes uploaded or deleted.
    size: int = 0


class RequestObserver(Protocol):
    """
    Told about every request when it starts and when it ends.
    """

    def started(self, request: SpoolingRequest) -> None: ...

    def finished(self, request: SpoolingRequest, completed: bool) -> None: ...


class _Site(Protocol):
    spool: Spool
    quota: Quota | None
    observers: list[RequestObserver]
    limits: RequestLimits
    reactor: Any


@dataclass(frozen=True)
class RequestLimits:
    """
    Limits that keep a misbehaving client from holding resources: the
    largest body accepted, how long a request's headers may take to arrive,
    and how long its body may stall.
    """

    max_body: int = 1 << 30
    header_timeout: float = 60.0
    body_stall_timeout: float = 60.0


DEFAULT_LIMITS = RequestLimits()


def request_line(request: server.Request) -> tuple[bytes | None, bytes | None]:
    """
    The method and path of a request whose body has not arrived yet, from
    its channel: twisted.web sets C{request.method} and C{request.path} only
    once the whole body is in. (HTTP/2 streams keep them as C{command} and
    C{path}; HTTP/1.1 channels as C{_command} and C{_path} while parsing.)
    """
    channel = request.channel
    for method_name, path_name in (("command", "path"), ("_command", "_path")):
        method = getattr(channel, method_name, None)
        if isinstance(method, bytes):
            path = getattr(channel, path_name, None)
            return method, path if isinstance(path, bytes) else None
    return None, None


class SpoolingRequest(server.Request):
    """
    A L{server.Request} that streams its body into a L{SpoolFile} of the
    site's L{Spool} instead of buffering it in memory or C{$TMPDIR}.

    The site (the channel's C{site}) must have C{spool} and C{quota}
    attributes. An upload is checked against the quota as soon as its
    Content-Length is known and again as its body grows past it; a refused
    body is read and dropped, never written, and the refusal is kept in
    L{refusal} for the render to answer. The render takes the file with
    L{take_spool} and, once the request is authorized, reserves its bytes in
    L{reservation}; whatever is not taken is discarded, and the reservation
    released, when the request ends, however it ends.
    """

    spool_file: SpoolFile | None = None
    refusal: Exception | None = None
    reservation: Reservation | None = None
    _upload_target: Target | None = None
    _checked = 0
    _paused = False
    _end_observed = False
    _deadline: Deadline | None = None
    _own_deadline = False
    #: Answered (and its connection closed) before its body: never render.
    answered_early = False
    #: Its answer could not be completed and its connection (or stream) is
    #: being dropped: it ends when the connection does, never by L{finish}.
    dropped = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The body is never a form: keep twisted.web from parsing it.
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)
        self.outcome = Outcome()
        self.observers: list[RequestObserver] = list(getattr(getattr(self.channel, "site", None), "observers", ()))
        for observer in self.observers:
            try:
                observer.started(self)
            except Exception:
                log.failure("observing the start of a request failed")
        # The request line is in (its own deadline is over); its headers must
        # all arrive within the header timeout (a slowloris drips them).
        # (An HTTP/2 request arrives with all its headers.)
        self._limits: RequestLimits = getattr(self._site, "limits", DEFAULT_LIMITS)
        if not hasattr(self.channel, "_conn"):
            self._set_deadline(self._limits.header_timeout, "headers")

    @property
    def _site(self) -> Any:
        return getattr(self.channel, "site", None)

    def _deadline_for_request(self) -> Deadline | None:
        """
        The deadline this request's timeouts move: its HTTP/1.1 connection's
        (one request at a time uses it), or its own (HTTP/2 streams run side
        by side).
        """
        deadline = self._deadline
        if deadline is None:
            deadline = getattr(self.channel, "deadline", None)
            if deadline is None:
                reactor = getattr(self._site, "reactor", None)
                if reactor is None:
                    return None
                deadline = Deadline(reactor)
                self._own_deadline = True
            self._deadline = deadline
        return deadline

    def _set_deadline(self, seconds: float, what: str) -> None:
        if seconds <= 0:
            self._clear_deadline()
            return
        deadline = self._deadline_for_request()
        if deadline is not None:
            deadline.arm(seconds, self._too_slow, what, seconds)

    def _clear_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.disarm(self._too_slow)

    def _too_slow(self, what: str, seconds: float) -> None:
        log.info(
            "closing the connection of {client}: its request {what} stalled for {seconds} s",
            client=client_host(self),
            what=what,
            seconds=seconds,
        )
        abort(self)

    def _refuse_body(self, error: ResticdError) -> None:
        """
        Refuse an upload before reading its body: over HTTP/1.1, answer at once
        and close the connection (the body is never read); over HTTP/2, drop
        the body as it comes and answer at its end.
        """
        self.refusal = error
        self.outcome.error = error
        method, path = request_line(self)
        if method is not None and path is not None:
            # For the logs: twisted.web sets these only once a body is in.
            self.method, self.uri, self.path = method, path, path.split(b"?", 1)[0]
        channel = self.channel
        if hasattr(channel, "_conn") or channel is None or channel.transport is None:
            return
        body = error.message.encode("utf-8") + b"\n"
        channel.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s"
            % (
                error.status,
                RESPONSES.get(error.status, b"Error"),
                len(body),
                b"" if method == b"HEAD" else body,
            )
        )
        self.code = error.status
        self.answered_early = True
        # Parse nothing more from this connection, and answer nothing more.
        channel.paused = True
        channel.answered = True  # type: ignore[attr-defined]
        channel.transport.loseConnection()

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        self._clear_deadline()
        if length is not None and length > self._limits.max_body:
            self._refuse_body(PayloadTooLarge(f"body larger than the limit of {self._limits.max_body} bytes"))
            return
        if length == 0:
            return
        self._set_deadline(self._limits.body_stall_timeout, "body")
        site: _Site = self.channel.site  # type: ignore[attr-defined]
        method, path = request_line(self)
        target = parse_path(path) if method == b"POST" and path is not None else None
        if site.quota is not None and target is not None and target.name is not None:
            self._upload_target = target
            self._checked = length or 0
            self.refusal = site.quota.check(target, self._checked)
            if self.refusal is not None:
                return
        self.spool_file = site.spool.open()

    def handleContentChunk(self, data: bytes) -> None:
        if self._deadline is not None and self._deadline.armed_with(self._too_slow):
            self._set_deadline(self._limits.body_stall_timeout, "body")
        spool = self.spool_file
        if spool is None:
            return
        if spool.size + len(data) > self._limits.max_body:
            self.spool_file = None
            spool.discard()
            self._refuse_body(PayloadTooLarge(f"body larger than the limit of {self._limits.max_body} bytes"))
            return
        target = self._upload_target
        if target is not None and spool.size + len(data) > self._checked:
            # Longer than declared (or no length declared): check as it grows.
            site: _Site = self.channel.site  # type: ignore[attr-defined]
            assert site.quota is not None
            self._checked = spool.size + len(data)
            self.refusal = site.quota.check(target, self._checked)
            if self.refusal is not None:
                self.spool_file = None
                spool.discard()
                return
        spool.write(data)
        if not self._paused and self._wait_for_writes(spool):
            self._pause_body()

    def _wait_for_writes(self, spool: SpoolFile) -> bool:
        """
        Whether the body must stop coming in until the writes catch up: all
        uploads together are too far behind (the spool's L{WriteBudget}), or
        this one is (L{resticd.spool.BACKLOG}); if so, L{_resume_body} is
        called once they have caught up.
        """
        budget = spool.budget
        if budget is not None and budget.exceeded:
            budget.when_room(self._resume_body, spool)
            return True
        if spool.backlogged:
            spool.when_caught_up(self._resume_body)
            return True
        return False

    def _body_producer(self) -> Any:
        """
        What to pause to stop receiving this request's body: the HTTP/2
        stream (which then stops opening its flow-control window), or the
        HTTP/1.1 connection's transport.
        """
        channel = self.channel
        if hasattr(channel, "_conn"):
            return channel
        return getattr(channel, "_networkProducer", None)

    def _pause_body(self) -> None:
        producer = self._body_producer()
        if producer is not None:
            self._paused = True
            # Waiting for the disk is not the client stalling.
            self._clear_deadline()
            producer.pauseProducing()

    def _resume_body(self) -> bool:
        """
        Go on receiving the body, if it still waits and is still wanted;
        whether it went on reading its own socket, so that a read of up to
        a MiB may come for it (HTTP/1.1). An HTTP/2 stream that goes on
        hands over at once what arrived for it meanwhile, and what more its
        client sends is bounded by the connection windows lent from the
        pool (L{resticd.windows}): counting it as a read to come could have
        the budget wait for bytes that its client cannot send, its
        connection's window filled by uploads still waiting.
        """
        if not self._paused:
            return False
        spool = self.spool_file
        gone = self.finished or self._disconnected
        if spool is not None and not gone and self._wait_for_writes(spool):
            return False  # caught up on one count, still behind on the other
        self._paused = False
        if gone:
            # Answered meanwhile (twisted.web has let go of its channel,
            # which may serve another request by now) or gone.
            return False
        producer = self._body_producer()
        if producer is None:
            return False
        self._set_deadline(self._limits.body_stall_timeout, "body")
        producer.resumeProducing()
        return producer is not self.channel

    def take_spool(self) -> SpoolFile | None:
        """
        Hand the body's spool file to the caller, who must then sync or
        discard it; L{None} for an empty or refused body.
        """
        spool_file, self.spool_file = self.spool_file, None
        return spool_file

    def write(self, data: bytes) -> None:
        channel = self.channel
        if not self.startedWriting and data and isinstance(channel, ResticHTTPChannel):
            channel.write_with_headers(super().write, data)
        else:
            super().write(data)

    def process(self) -> None:
        # twisted.web.server.Request.process, with the Date header formatted
        # once a second rather than for every request (from the site's
        # reactor's clock), and no look for content encoders (none of
        # resticd's resources has one).
        site = self.site = self.channel.site  # type: ignore[attr-defined]
        reactor = getattr(site, "reactor", None)
        headers = response_headers(self)
        headers[SERVER] = [server.version]
        headers[DATE] = [http_date(reactor.seconds() if reactor is not None else time.time())]
        self.prepath = []
        self.postpath = [unquote_to_bytes(segment) for segment in self.path[1:].split(b"/")]
        if self.path == b"*":
            self._handleStar()
            return
        try:
            self.render(site.getResourceFor(self))
        except BaseException:
            self.processingFailed(Failure())

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._clear_deadline()
        if self.answered_early:
            return
        super().requestReceived(command, path, version)

    def finish(self) -> None:
        if self.dropped:
            # A producer that ran out of data early finishes as usual; the
            # client must see a cut connection, not a complete answer.
            return
        # Observe the end before twisted.web hands the connection to the next
        # pipelined request (it fires notifyFinish only after that), so that
        # access-log lines come in the order the answers were sent.
        if not self.finished and not self._disconnected:
            self._finished(None)
        super().finish()

    def connectionLost(self, reason: Failure) -> None:
        # Its connection (or HTTP/2 stream) went away before the answer was
        # complete (a completed answer was observed by finish).
        super().connectionLost(reason)
        self._finished(None, completed=False)

    def _finished(self, result: object, completed: bool = True) -> None:
        if self._end_observed:
            return
        self._end_observed = True
        self._clear_deadline()
        if self._own_deadline and self._deadline is not None:
            self._deadline.stop()
        if self.spool_file is not None:
            self.spool_file.discard()
            self.spool_file = None
        if self.reservation is not None:
            self.reservation.release()
        for observer in self.observers:
            try:
                observer.finished(self, completed)
            except Exception:
                log.failure("observing the end of {uri} failed", uri=self.uri)


def abort(request: server.Request) -> None:
    """
    Drop the connection (or HTTP/2 stream: only that) of a request whose
    answer cannot be completed, so the client sees an error instead of a
    short body; the request then ends when its connection does.
    """
    if isinstance(request, SpoolingRequest):
        request.dropped = True
    channel: Any = request.channel
    if channel is None:
        return
    if hasattr(channel, "_conn"):
        channel.abortConnection()
    elif channel.transport is not None:
        channel.transport.abortConnection()


def shrank(request: server.Request) -> None:
    """
    Drop the answer of a stored object that turned out shorter than when it
    was opened (see L{abort}), and say so.
    """
    log.warn("stored object shrank while being sent: {uri}", uri=request.uri)
    abort(request)
