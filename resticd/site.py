"""
The HTTP site: the resource tree behind twisted.web's HTTP/1.1 and HTTP/2.
"""

from __future__ import annotations

from typing import Any

from twisted.web import http, server
from twisted.web.resource import IResource

from .spool import Spool, SpoolingRequest
from .usage import Quota

#: Idle keep-alive connections are closed after this many seconds; Go's client
#: pool keeps idle connections for 90 s, so this must be longer.
IDLE_TIMEOUT = 180


class ResticSite(server.Site):
    """
    A L{server.Site} whose requests stream their bodies into C{spool} (their
    uploads checked early against C{quota}), which
    offers HTTP/2 by ALPN only when C{http2} is true, logs a line per request
    only when C{debug} is true, and never shows tracebacks to clients.
    """

    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        spool: Spool,
        quota: Quota | None = None,
        http2: bool = True,
        debug: bool = False,
        reactor: Any = None,
    ) -> None:
        super().__init__(
            resource, requestFactory=SpoolingRequest, timeout=IDLE_TIMEOUT, reactor=reactor
        )
        self.spool = spool
        self.quota = quota
        self.http2 = http2
        self.debug = debug

    def log(self, request: http.Request) -> None:
        if self.debug:
            super().log(request)

    def acceptableProtocols(self) -> list[bytes]:
        protocols: list[bytes] = super().acceptableProtocols()
        if not self.http2:
            protocols = [p for p in protocols if p != b"h2"]
        return protocols
