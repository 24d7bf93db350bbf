"""
The event loop the daemon runs on, unless C{twistd --reactor} names another.

It is Twisted's epoll reactor, less the legacy log context Twisted sets up
around every event it hands out (C{twisted.python.log.callWithLogger}: the
selectable's log prefix, a copied context dictionary, a thread-local
lookup). That costs 3 to 5 microseconds of the event loop per event,
about 4 % of a HEAD answer's CPU time (Twisted's own issue #2534 measured
15 % for a UDP echo server). resticd logs through L{twisted.logger}, whose
events never read that context; only Twisted's legacy messages (an
unhandled error in a protocol) lose the connection's prefix, and an error
escaping a connection's handling is logged here, with it.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from twisted.internet.epollreactor import EPollReactor

from .logs import logger

log = logger(__name__)


class ResticReactor(EPollReactor):
    """
    Twisted's epoll reactor, dispatching events without the legacy log
    context.
    """

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # wait until something happens
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                dispatch(selectable, fd, event)
            except Exception:
                log.failure("handling an event of {selectable} failed", selectable=_prefix(selectable))

    doIteration = doPoll


def _prefix(selectable: Any) -> str:
    try:
        return str(selectable.logPrefix())
    except Exception:
        return repr(selectable)


def install() -> None:
    """
    Make resticd's reactor the global reactor, unless a reactor is
    installed already (C{twistd --reactor}, or an import of
    C{twisted.internet.reactor}).
    """
    if "twisted.internet.reactor" in sys.modules:
        return
    from twisted.internet.main import installReactor

    installReactor(ResticReactor())
