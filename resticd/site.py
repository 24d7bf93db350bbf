"""
The HTTP site: the resource tree behind twisted.web's HTTP/1.1 and HTTP/2.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed

from twisted.web import http, resource, server
from twisted.web.resource import IResource

from .h2 import channel_for
from .request import RequestLimits, RequestObserver, SpoolingRequest
from .spool import Spool
from .usage import Quota
from .windows import UploadWindows

#: Idle keep-alive connections are closed after this many seconds; Go's client
#: pool keeps idle connections for 90 s, so this must be longer.
IDLE_TIMEOUT = 180


class QuietSite(server.Site):
    """
    A L{server.Site} that shows no tracebacks and leaves request logging to
    resticd's own observers (which know the authenticated user).
    """

    displayTracebacks = False

    def log(self, request: http.Request) -> None:
        pass


class ResticSite(QuietSite):
    """
    A L{server.Site} whose requests stream their bodies into C{spool} (their
    uploads checked early against C{quota}), and which offers HTTP/2 by ALPN
    only when C{http2} is true; its HTTP/2 connections' windows for uploads
    are lent from C{windows} (by default a pool that lends less while the
    spool's uploads wait for room).
    """

    #: HTTP/1.1, or HTTP/2 with working flow control.
    protocol = channel_for

    def __init__(
        self,
        resource: IResource,
        spool: Spool,
        quota: Quota | None = None,
        http2: bool = True,
        reactor: Any = None,
        limits: RequestLimits = RequestLimits(),
        windows: UploadWindows | None = None,
    ) -> None:
        super().__init__(
            resource, requestFactory=SpoolingRequest, timeout=IDLE_TIMEOUT, reactor=reactor
        )
        self.spool = spool
        self.quota = quota
        #: Told about every request as it starts and ends (metrics, logs).
        self.observers: list[RequestObserver] = []
        self.http2 = http2
        self.limits = limits
        self.upload_windows = windows or UploadWindows(held_back=lambda: self.spool.budget.holding_back())
        #: The open connections (for a graceful shutdown).
        self.connections: set[Any] = set()
        self._all_closed: list[Deferred[None]] = []

    def connection_opened(self, protocol: Any) -> None:
        self.connections.add(protocol)

    def connection_closed(self, protocol: Any) -> None:
        self.connections.discard(protocol)
        if not self.connections:
            waiting, self._all_closed = self._all_closed, []
            for d in waiting:
                d.callback(None)

    def close_connections(self) -> Deferred[None]:
        """
        Close every open connection once it has sent what it has queued; the
        Deferred fires when all are closed.
        """
        if not self.connections:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._all_closed.append(d)
        for protocol in list(self.connections):
            protocol.close()
        return d

    def acceptableProtocols(self) -> list[bytes]:
        protocols: list[bytes] = super().acceptableProtocols()
        if not self.http2:
            protocols = [p for p in protocols if p != b"h2"]
        return protocols


class SiteRoot(resource.Resource):
    """
    The root of a site: a few fixed children (health, metrics) and, for
    every other path, the repository tree (which sees the whole path, the
    root repository included).
    """

    def __init__(self, repos: IResource, fixed: dict[bytes, IResource]) -> None:
        super().__init__()
        self.repos = repos
        self.fixed = fixed

    def getChildWithDefault(self, path: bytes, request: server.Request) -> IResource:
        child = self.fixed.get(path)
        if child is not None:
            return child
        request.postpath.insert(0, request.prepath.pop())  # type: ignore[union-attr]
        return self.repos

    def render(self, request: server.Request) -> bytes | int:
        return self.repos.render(request)  # type: ignore[no-any-return]
