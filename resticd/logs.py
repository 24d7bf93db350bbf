"""
Logging: every resticd module logs through a L{twisted.logger.Logger} made
here, whose debug events pass only when the daemon runs with C{--debug}.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress
from twisted.web.iweb import IRequest
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogPublisher,
)

_levels = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_observer = FilteringLogObserver(globalLogPublisher, [_levels])


def logger(namespace: str) -> Logger:
    """
    A logger for one module.
    """
    return Logger(namespace=namespace, observer=_observer)


def set_debug(on: bool) -> None:
    """
    Let resticd's debug events through (C{--debug}), or not.
    """
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


def client_host(request: IRequest) -> str:
    """
    The client's address as shown in logs and used for throttling.
    """
    address = request.getClientAddress()
    return str(getattr(address, "host", None) or address)
