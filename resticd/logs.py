"""
Logging: every resticd module logs through a L{twisted.logger.Logger} made
here, whose debug events pass only when the daemon runs with C{--debug}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.web.iweb import IRequest
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogPublisher,
)

if TYPE_CHECKING:
    from .request import SpoolingRequest

_levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_levels])


class _Logger(Logger):
    """
    A L{Logger} whose debug events are dropped at the call unless debugging
    is on (a filtered event costs as much as a logged one to build and
    route, and some are emitted for every request).
    """

    debugging = False

    def debug(self, format: str | None = None, **kwargs: object) -> None:
        if _Logger.debugging:
            super().debug(format, **kwargs)


def logger(namespace: str) -> Logger:
    """
    A logger for one module.
    """
    return _Logger(namespace=namespace, observer=_observer)


def set_debug(on: bool) -> None:
    """
    Let resticd's debug events through (C{--debug}), or not.
    """
    _Logger.debugging = on
    _levels.setLogLevelForNamespace("resticd", LogLevel.debug if on else LogLevel.info)


def describe_address(address: IAddress, scheme: str = "http") -> str:
    """
    An address as people write it: C{https://127.0.0.1:8000},
    C{http://[::1]:8000}, C{unix:/run/resticd.sock}.
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}"
    name = getattr(address, "name", None)
    if name is not None:
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    return str(address)


def printable(value: bytes | str | None) -> str:
    """
    A client-supplied value made safe for a log line: non-printable bytes,
    quotes and backslashes escaped, so that a client cannot forge lines.
    """
    if value is None:
        return "-"
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
    out = []
    for byte in raw:
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out)


def client_host(request: IRequest) -> str:
    """
    The client's address as shown in logs and used for throttling.
    """
    address = request.getClientAddress()
    return str(getattr(address, "host", None) or address)


#: Statuses that refuse a request: each is logged once, with the reason.
REFUSALS = frozenset({400, 401, 403, 413, 429, 507})


class RequestLogger:
    """
    Logs every refused request once (user, client address, method, path,
    status and reason; the C{refused 401 ...} lines suit fail2ban) and, with
    C{--debug}, one line for every request.
    """

    def __init__(self, clock: IReactorTime, debug: bool = False) -> None:
        self.clock = clock
        self.debug = debug
        self.log = logger("resticd.requests")
        self._starts: dict[int, float] = {}

    def started(self, request: SpoolingRequest) -> None:
        if self.debug:
            self._starts[id(request)] = self.clock.seconds()

    def finished(self, request: SpoolingRequest, completed: bool) -> None:
        started = self._starts.pop(id(request), None)
        outcome = request.outcome
        refused = outcome.error.status if outcome.error is not None else request.code
        is_refusal = (completed or outcome.error is not None) and refused in REFUSALS
        if not (is_refusal or self.debug):
            return
        fields = dict(
            method=printable(request.method),
            path=printable(request.path),
            status=request.code,
            user=printable(outcome.user),
            client=client_host(request),
        )
        if is_refusal:
            reason = outcome.error.message if outcome.error is not None else "refused"
            fields["status"] = refused
            self.log.warn("refused {status} {method} {path} for user {user} from {client}: {reason}", reason=reason, **fields)
        else:
            duration = self.clock.seconds() - started if started is not None else 0.0
            self.log.info(
                '"{method} {uri} {protocol}" {status} {bytes} bytes for user {user} from {client}'
                " in {duration:.3f} s{aborted}",
                uri=printable(request.uri),
                protocol=printable(request.clientproto),
                bytes=request.sentLength,
                duration=duration,
                aborted="" if completed else " (client went away)",
                **fields,
            )
