"""
Memory: how resticd has glibc's allocator keep the large buffers of busy
moments, and hand their memory back to the system once things are quiet, or
once it keeps too much while they are not; and how the garbage collector
sits out the daemon's start.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from typing import Protocol

from twisted.internet.defer import maybeDeferred
from twisted.python.failure import Failure

from .logs import logger
from .threads import Runner

log = logger(__name__)


def resume_collection() -> None:
    """
    Let Python's cyclic garbage collector run again, after the daemon's
    start, having frozen every object made so far. The daemon starts with
    the collector off: importing Twisted, OpenSSL and resticd and building
    the site makes some 60,000 objects that live as long as the process,
    which the collector would walk again and again while they are made
    (about 16 ms of a start of some 230 ms on a small machine). Frozen,
    they are never walked again by later collections either.
    """
    gc.freeze()
    gc.enable()


#: glibc's mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: How often L{MemoryTrim.check} runs, in seconds: memory goes back to the
#: system at most about two of these after the last request ends.
TRIM_INTERVAL = 5.0

#: How much larger than when it was last idle the daemon may stay while
#: requests keep coming (the allocator keeping the large buffers of uploads
#: for the next ones); beyond it, each check trims even then. A burst of 8
#: concurrent uploads leaves some 25 MiB free.
BUSY_GROWTH_LIMIT = 16 << 20


def keep_large_buffers(mmap_threshold: int = 4 << 20, trim_threshold: int = 4 << 20) -> bool:
    """
    Have glibc's allocator reuse the memory of large buffers (socket reads of
    up to 1 MiB, 256 KiB HTTP/2 frames, decrypted TLS batches) instead of
    mapping fresh pages for many of them and handing the pages back when they
    are freed: it maps each block above a threshold that starts at 128 KiB on
    its own, and trims its heap once little is free at its top, and every
    fresh page costs a page fault and zeroing (a restic backup over https
    takes about 12 % less of the daemon's CPU time without them). Blocks of up
    to C{mmap_threshold} then come from the heap, which keeps up to
    C{trim_threshold} free at its top. Left as it is when the environment sets
    either threshold already (C{GLIBC_TUNABLES}, C{MALLOC_MMAP_THRESHOLD_},
    C{MALLOC_TRIM_THRESHOLD_}). Whether it was applied (glibc only).
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(name in tunables for name in ("mmap_threshold", "trim_threshold")) or any(
        name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    ):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def heap_trimmer() -> Callable[[], bool] | None:
    """
    A function that hands every free page of glibc's heaps back to the system
    (C{malloc_trim(0)}, which also releases free pages below blocks still in
    use, where the heap cannot shrink) and says whether any went back; L{None}
    where there is no glibc. Blocking (it takes the allocator's locks): for
    a worker thread.
    """
    import ctypes

    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int

    def trim() -> bool:
        return bool(malloc_trim(0))

    return trim


def resident_size() -> int:
    """
    The resident size of this process, in bytes (from C{/proc/self/statm};
    a small read of memory the kernel keeps, no disk).
    """
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class HeapTrim:
    """
    The heap trim, and the daemon's resident size after the last idle one
    (or at the start): L{idle} trims and takes the size again, L{busy}
    trims only while the daemon is more than C{limit} bytes larger than it
    (by what C{resident} says).
    """

    def __init__(self, trim: Callable[[], bool], limit: int, resident: Callable[[], int] = resident_size) -> None:
        self._trim = trim
        self._limit = limit
        self._resident = resident
        self._quiet = resident()

    def idle(self) -> bool:
        """
        Trim (the daemon is idle), and take its resident size afterwards as
        its size when quiet; whether memory went back.
        """
        try:
            return self._trim()
        finally:
            self._quiet = self._resident()

    def busy(self) -> bool:
        """
        Trim if the daemon is more than the limit larger than when it was
        last quiet; whether memory went back.
        """
        if self._resident() - self._quiet <= self._limit:
            return False
        return self._trim()


def each_of(trims: list[Callable[[], bool]]) -> Callable[[], bool]:
    """
    One trim that runs every one of C{trims} and says whether any of them
    handed memory back.
    """

    def trim() -> bool:
        return any([each() for each in trims])

    return trim


class Activity(Protocol):
    """
    What L{MemoryTrim} watches: the requests in flight now, and how many have
    started since the daemon did.
    """

    count: int
    started_total: int


class MemoryTrim:
    """
    Hands the memory the allocator keeps after a busy moment back to the
    system: L{keep_large_buffers} has freed buffers stay on the heap for the
    next ones (a burst of uploads leaves some 25 MiB there), which is right
    while uploads come and wasted once they stop.

    L{check} runs every L{TRIM_INTERVAL} seconds. When no request is in
    flight and none started since the previous check, but some did since
    the last such trim, C{idle} (everything that can go) runs once. While
    requests come, C{busy} runs at each check: it trims the heap while the
    daemon is more than L{BUSY_GROWTH_LIMIT} larger than when it was last
    idle (L{HeapTrim.busy}), so that a burst's memory goes back even when
    other requests never stop (clients that keep a server busy around the
    clock); its cost is at most one trim per check. Both run through C{run},
    a worker thread, one at a time.
    """

    def __init__(
        self, activity: Activity, run: Runner, idle: Callable[[], object], busy: Callable[[], object] | None = None
    ) -> None:
        self._activity = activity
        self._run = run
        self._idle = idle
        self._busy = busy
        self._seen = activity.started_total
        self._trimmed_at = activity.started_total
        self._trimming = False

    def check(self) -> None:
        started = self._activity.started_total
        quiet = started == self._seen and self._activity.count == 0
        self._seen = started
        if self._trimming:
            return
        if quiet:
            if started == self._trimmed_at:
                return
            self._trimmed_at = started
            trim, when = self._idle, "idle"
        elif self._busy is not None:
            trim, when = self._busy, "busy"
        else:
            return
        self._trimming = True
        # A runner that refuses the call (its threads stopped) fails it here
        # too, rather than stop the timer that calls this.
        maybeDeferred(self._run, trim).addCallbacks(self._trimmed, self._failed, (when,))

    def _trimmed(self, released: object, when: str) -> None:
        self._trimming = False
        if released:
            log.debug("{when}: handed free memory back to the system", when=when)

    def _failed(self, failure: Failure) -> None:
        self._trimming = False
        log.failure("handing free memory back to the system failed", failure)
