"""
How far HTTP/2 clients may send upload bytes ahead of resticd: the
connection-level flow-control windows, lent from one pool shared by every
connection.

An HTTP/2 client sends as much as its connection's window allows, whether
or not resticd takes it in: the bytes of an upload that waits (its writes
behind, the disk slower than the network) stay in memory until it goes on.
Over HTTP/1.1 the socket buffers them, in the kernel, and the client stops;
over HTTP/2 only the window stops it. So the windows are lent from a pool
(L{UploadWindows}), only to connections with upload bytes still to come, no
further than those bytes (a body's C{Content-Length}), at most
L{CONNECTION_WINDOW} each and an equal share of the pool when many
connections upload at once, and no further than its client can bring in
four round trips at the rate resticd took its bytes in lately
(L{RoundTrips}; L{FLOOR} at least, L{HELD_BACK_FLOOR} while uploads wait
for the disk): a client nearby whose uploads wait for the disk needs little
window, one far away as much as the bytes it can have under way. Credit
comes back as resticd takes the bytes in. Every connection keeps HTTP/2's
initial window (L{BASE_WINDOW}, which cannot be taken back) outside the
pool, so none is ever starved, however many connections share it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

#: HTTP/2's initial connection window (RFC 9113, 6.9.2): what every client
#: may send before any window update.
BASE_WINDOW = 65_535
#: The most one connection may have in flight (a lone restic client far
#: enough away gets all of it; Go's HTTP/2 server lends 1 MiB).
CONNECTION_WINDOW = 16 << 20
#: What all connections together may have in flight beyond their
#: L{BASE_WINDOW}s: a single client gets L{CONNECTION_WINDOW}, two get as
#: much each, eight a quarter of it.
UPLOAD_WINDOWS = 32 << 20
#: The least window a connection with uploads is aimed at, however little
#: its client brings per round trip (what Go's HTTP/2 server, and so
#: rest-server, lends every connection).
FLOOR = 1 << 20
#: The least window while uploads wait for room in the write budget (the
#: disk slower than the clients): what a client sends then waits in memory,
#: and four round trips at the rate its bytes are taken in already carry
#: its share of what the disk takes. Measured with 16 restic clients over
#: HTTP/2 to a disk writing 30 MiB/s: peak resident size 92-98 MiB against
#: 99-107 with L{FLOOR}, the backups as fast.
HELD_BACK_FLOOR = 256 << 10
#: A connection's window aims at this many round trips' worth of what its
#: client brought lately: room to go faster, should the window have been
#: what held it back.
GAIN = 4
#: Seconds between two measures of a connection's round trip while it
#: uploads (an HTTP/2 PING, 17 bytes each way).
PING_INTERVAL = 1.0
#: The shortest time over which what a client brought is measured, in
#: seconds (a connection nearby has round trips of a fraction of one).
RATE_INTERVAL = 0.01
#: What each new measure of a client's rate keeps of the previous one, when
#: the new one is lower (uploads come in bursts: the window follows the
#: highest rate of the last few measures).
RATE_DECAY = 0.75


class Borrower(Protocol):
    """
    A connection that borrows from L{UploadWindows}.
    """

    def wanted(self) -> int:
        """
        The upload bytes its client has still to send (0 when it sends none).
        """

    def widen(self, size: int) -> None:
        """
        Widen the connection's window by C{size} bytes (a WINDOW_UPDATE).
        """

    def reach(self, floor: int) -> int:
        """
        The most window its client can use, C{floor} at least: see
        L{RoundTrips.reach}.
        """


class RoundTrips:
    """
    What one connection's client brings per round trip: its round-trip time
    (from HTTP/2 PINGs, smoothed as TCP does) and the rate at which resticd
    took its upload bytes in (the highest of the last few measures, each
    over a round trip or L{RATE_INTERVAL}, whichever is longer).
    """

    def __init__(self) -> None:
        #: The smoothed round-trip time, in seconds (None: not measured).
        self.rtt: float | None = None
        #: Bytes per second.
        self.rate = 0.0
        self._since: float | None = None
        self._bytes = 0

    def measured(self, seconds: float) -> None:
        """
        A round trip took C{seconds}.
        """
        self.rtt = seconds if self.rtt is None else self.rtt + (seconds - self.rtt) / 8

    def taken(self, size: int, now: float) -> None:
        """
        C{size} bytes of the client's were taken in at time C{now}.
        """
        if self._since is None:
            self._since = now
            return
        self._bytes += size
        elapsed = now - self._since
        if elapsed >= max(self.rtt or 0.0, RATE_INTERVAL):
            self.rate = max(self._bytes / elapsed, self.rate * RATE_DECAY)
            self._since = now
            self._bytes = 0

    def reach(self, floor: int = FLOOR) -> int:
        """
        The window that lets the client bring L{GAIN} round trips' worth of
        bytes at its recent rate, and at least C{floor}; C{floor} until a
        round trip has been timed (a client that answers no PING).
        """
        if self.rtt is None:
            return floor
        return max(floor, int(GAIN * self.rate * self.rtt))


def grant(held: int, wanted: int, share: int, room: int) -> int:
    """
    By how much to widen a connection's window. C{held} is what its client
    may send now plus what has arrived and not been taken in yet; it aims at
    C{wanted}, the bytes still to come, but no higher than C{share}; C{room}
    is as high as the pool lets C{held} go. Nothing while it lacks less than
    half its aim (window updates go out in a few large steps, not one per
    frame taken in), else as much as it lacks and the pool allows.
    """
    aim = min(wanted, share)
    lacking = aim - held
    if lacking <= 0 or 2 * lacking < aim:
        return 0
    return max(0, min(aim, room) - held)


def _charge(held: int) -> int:
    """
    What a connection holding C{held} bytes of window takes from the pool.
    """
    return max(0, held - BASE_WINDOW)


class UploadWindows:
    """
    The pool that HTTP/2 connections' windows for uploads are lent from (see
    the module): C{limit} bytes beyond every connection's L{BASE_WINDOW}, at
    most C{per_connection} to one. A connection that could not get all it
    lacked waits, in turn, for credit to come back. C{held_back} says
    whether uploads wait for the disk now (the floor of what a connection is
    aimed at is L{HELD_BACK_FLOOR} then, L{FLOOR} otherwise).
    """

    def __init__(
        self,
        limit: int = UPLOAD_WINDOWS,
        per_connection: int = CONNECTION_WINDOW,
        held_back: Callable[[], bool] = lambda: False,
    ) -> None:
        self.limit = limit
        self.per_connection = per_connection
        self.held_back = held_back
        #: What the connections take from the pool now.
        self.used = 0
        self._held: dict[Borrower, int] = {}
        self._uploading: set[Borrower] = set()
        self._waiting: dict[Borrower, None] = {}

    def join(self, borrower: Borrower) -> None:
        """
        A new connection, with HTTP/2's initial window.
        """
        self._held[borrower] = BASE_WINDOW

    def leave(self, borrower: Borrower) -> None:
        """
        A connection closed: all it held goes back to the pool.
        """
        held = self._held.pop(borrower, None)
        if held is None:
            return
        self.used -= _charge(held)
        self._uploading.discard(borrower)
        self._waiting.pop(borrower, None)
        self._serve_waiting()

    def held(self, borrower: Borrower) -> int:
        """
        What C{borrower}'s client may send now plus what it sent that has not
        been taken in yet.
        """
        return self._held.get(borrower, 0)

    def share(self) -> int:
        """
        The most one connection may hold while as many as now upload.
        """
        return min(self.per_connection, self.limit // max(1, len(self._uploading)))

    def taken(self, borrower: Borrower, size: int) -> None:
        """
        C{size} bytes that C{borrower}'s client sent were taken in: their
        credit comes back, to connections waiting for it first.
        """
        held = self._held.get(borrower)
        if held is None:
            return
        rest = max(0, held - size)
        self._held[borrower] = rest
        self.used += _charge(rest) - _charge(held)
        self._serve_waiting()
        self.update(borrower)

    def update(self, borrower: Borrower) -> None:
        """
        Widen C{borrower}'s window if it lacks enough of what it wants (its
        uploads started, or its credit came back).
        """
        if borrower not in self._held:
            return
        wanted = borrower.wanted()
        if wanted > 0:
            self._uploading.add(borrower)
        else:
            self._uploading.discard(borrower)
        self._top_up(borrower, wanted)

    def _top_up(self, borrower: Borrower, wanted: int) -> None:
        held = self._held[borrower]
        share = min(self.share(), borrower.reach(HELD_BACK_FLOOR if self.held_back() else FLOOR))
        room = BASE_WINDOW + self.limit - self.used + _charge(held)
        size = grant(held, wanted, share, room)
        if size:
            self._held[borrower] = held + size
            self.used += _charge(held + size) - _charge(held)
            borrower.widen(size)
        if wanted > 0 and min(wanted, share) > room:
            self._waiting.setdefault(borrower)
        else:
            self._waiting.pop(borrower, None)

    def _serve_waiting(self) -> None:
        for borrower in list(self._waiting):
            if self.used >= self.limit:
                return
            self._top_up(borrower, borrower.wanted())
