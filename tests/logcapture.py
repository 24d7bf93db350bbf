"""
Capturing what the daemon logs, for tests that check its log lines.
"""

from __future__ import annotations

from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent
from zope.interface import implementer


@implementer(ILogObserver)
class LogCapture:
    """
    Collects the events of the global log publisher.
    """

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def texts(self, level: LogLevel | None = None, since: int = 0) -> list[str]:
        """
        The formatted events from number C{since} on, of one level only when
        C{level} is given.
        """
        return [formatEvent(e) for e in self.events[since:] if level is None or e.get("log_level") == level]
