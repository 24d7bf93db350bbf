"""
Deadlines that are cheap to move: a connection's idle timeout, and its
requests' header and body timeouts.

Every request on a keep-alive connection starts and stops a few timeouts.
Scheduling each with C{callLater} and cancelling it makes and discards a
timer every time (several microseconds of the event loop per request). A
L{Deadline} instead keeps one timer and only notes the new expiry when it is
moved later: a timer that goes off early finds the expiry moved and waits
for the rest. A new timer is made only when the deadline is moved sooner
than the pending one, or there is none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadline:
    """
    At most one pending action: C{action(*args)} once the time given to
    L{arm} has passed, unless it was disarmed or armed again meanwhile.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        #: When the armed action is due; L{None} when disarmed.
        self._due: float | None = None
        self._action: Callable[..., object] | None = None
        self._args: tuple[Any, ...] = ()
        #: The one timer, which goes off at or before C{_due}.
        self._call: IDelayedCall | None = None

    def arm(self, seconds: float, action: Callable[..., object], *args: Any) -> None:
        """
        Call C{action(*args)} C{seconds} from now, instead of whatever was
        armed before.
        """
        due = self._clock.seconds() + seconds
        self._due = due
        self._action = action
        self._args = args
        call = self._call
        if call is not None:
            if call.getTime() <= due:
                return
            call.cancel()
        self._call = self._clock.callLater(seconds, self._expire)

    def armed_with(self, action: Callable[..., object]) -> bool:
        """
        Whether C{action} is what is armed (a bound method compares equal
        to the same method of the same object).
        """
        return self._due is not None and self._action == action

    def disarm(self, action: Callable[..., object] | None = None) -> None:
        """
        Call nothing (when C{action} is given: only if it is what is armed,
        so that one user of a shared deadline never disarms another's). The
        timer stays, for the next L{arm}.
        """
        if action is None or self.armed_with(action):
            self._due = None
            self._action = None
            self._args = ()

    def stop(self) -> None:
        """
        Disarm, and cancel the timer (when the connection or request that
        uses the deadline is gone).
        """
        self.disarm()
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _expire(self) -> None:
        self._call = None
        due = self._due
        if due is None:
            return
        left = due - self._clock.seconds()
        if left > 0:
            # Moved later since the timer was set: wait for the rest.
            self._call = self._clock.callLater(left, self._expire)
            return
        action, args = self._action, self._args
        self.disarm()
        assert action is not None
        action(*args)
