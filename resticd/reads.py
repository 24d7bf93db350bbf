"""
Reads of stored objects that never wait for the disk on the event loop.

What is in the page cache is read (or sent) at once; what is not is read by
a worker thread first, so that an object fetched from a slow disk delays
only its own answer, not every other connection. Whether bytes are cached
is asked with C{preadv2(RWF_NOWAIT)} (Linux), which reads only what needs
no disk access. Where that is not available (other systems, or a
filesystem without it such as tmpfs) reads are treated as not cached.
"""

from __future__ import annotations

import errno
import os

#: Only what is in the page cache (Linux 4.14 and later).
RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)
#: How far apart L{is_cached} looks.
PROBE_STEP = 1 << 20


def read_cached(fd: int, length: int, offset: int) -> bytearray | None:
    """
    The C{length} bytes of C{fd} at C{offset} if all of them are in the page
    cache; L{None} when some are not (or the file ends sooner, or the
    system cannot tell): read them in a worker thread then.
    """
    if length == 0:
        return bytearray()
    if RWF_NOWAIT is None:
        return None
    buffer = bytearray(length)
    try:
        n = os.preadv(fd, [buffer], offset, RWF_NOWAIT)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL):
            return None
        raise
    if n != length:
        return None
    return buffer


def is_cached(fd: int, offset: int, length: int) -> bool:
    """
    Whether the C{length} bytes of C{fd} at C{offset} look cached: the first
    byte of every L{PROBE_STEP} and the last byte are (a page evicted in
    between is not noticed; sending it then waits for the disk). Never
    raises: a file that cannot be read is left to the worker to report.
    """
    if RWF_NOWAIT is None or length <= 0:
        return False
    probe = bytearray(1)
    end = offset + length
    points = list(range(offset, end, PROBE_STEP))
    points.append(end - 1)
    try:
        for point in points:
            if os.preadv(fd, [probe], point, RWF_NOWAIT) != 1:
                return False
    except OSError:
        return False
    return True


def warm(fd: int, offset: int, length: int) -> None:
    """
    Bring the C{length} bytes of C{fd} at C{offset} into the page cache
    (blocking: for a worker thread); stops early at the end of the file.
    They are sent to C{/dev/null} with C{sendfile(2)}: read from the disk
    like any read, but never copied (a plain read through a scratch buffer
    where that is not possible).
    """
    end = offset + length
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        while offset < end:
            try:
                n = os.sendfile(null, fd, offset, end - offset)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                _read_through(fd, offset, end)
                return
            if n <= 0:
                return
            offset += n
    finally:
        os.close(null)


def _read_through(fd: int, offset: int, end: int) -> None:
    scratch = bytearray(min(end - offset, PROBE_STEP))
    while offset < end:
        n = os.preadv(fd, [memoryview(scratch)[: end - offset]], offset)
        if n <= 0:
            return
        offset += n


def pread_closing(fd: int, length: int, offset: int) -> bytes:
    """
    C{os.pread}, then close C{fd} (blocking: for a worker thread, which
    then owns the descriptor).
    """
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)
