"""
The access log (C{--log FILE}, or C{-} for standard output): one line per
request in Apache's combined format, with the authenticated user name in the
user field. The file is reopened on SIGHUP, so logrotate can move it away.
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.internet.interfaces import IReactorTime
from twisted.web.http import datetimeToLogString

from .logs import client_host, printable
from .request import SpoolingRequest


def combined_line(request: SpoolingRequest, now: float) -> str:
    """
    The combined-format line for a finished request.
    """
    user = request.outcome.user
    return '{host} - {user} {time} "{method} {uri} {proto}" {code} {size} "{referer}" "{agent}"'.format(
        host=client_host(request),
        user=printable(user) if user else "-",
        time=datetimeToLogString(now),
        method=printable(request.method),
        uri=printable(request.uri),
        proto=printable(request.clientproto),
        code=request.code,
        size=request.sentLength or "-",
        referer=printable(request.getHeader(b"referer")),
        agent=printable(request.getHeader(b"user-agent")),
    )


class AccessLog:
    """
    Writes a combined-format line for every request that ends.
    """

    def __init__(self, path: str, clock: IReactorTime) -> None:
        self.path = path
        self.clock = clock
        self._file: IO[str] | None = None
        self.reopen()

    def reopen(self) -> None:
        """
        (Re)open the file; standard output stays as it is.
        """
        if self.path == "-":
            self._file = sys.stdout
            return
        old, self._file = self._file, open(self.path, "a", encoding="utf-8", buffering=1)
        if old is not None:
            old.close()

    def close(self) -> None:
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        self._file = None

    def started(self, request: SpoolingRequest) -> None:
        pass

    def finished(self, request: SpoolingRequest, completed: bool) -> None:
        if self._file is not None:
            self._file.write(combined_line(request, self.clock.seconds()) + "\n")
