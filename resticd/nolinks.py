"""
Opening a file whose path has no symbolic link in it, in one system call.

Linux's C{openat2(2)} with C{RESOLVE_NO_SYMLINKS} opens a path only if none
of its components is a symbolic link, and fails with C{ELOOP} otherwise. For
a path made of the data root's resolved name and names resticd checked
itself (none of them C{.} or C{..}), that alone shows that the file lies
inside the root, without reading its name back from C{/proc/self/fd}
afterwards: one system call instead of two on every read of an object (see
L{resticd.store.Store.open_contained}, which still does that for paths with
links, and everywhere C{openat2} is missing: kernels before 5.6, other
systems, sandboxes that refuse it).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import sys
from typing import Any

#: C{openat2}'s number: the same on the architectures listed (system calls
#: added since Linux 5.1 are numbered alike there).
SYS_OPENAT2 = 437
ARCHITECTURES = frozenset(
    ("x86_64", "amd64", "i386", "i686", "aarch64", "arm64", "armv6l", "armv7l", "armv8l")
    + ("riscv64", "ppc64le", "ppc64", "s390x", "loongarch64")
)
AT_FDCWD = -100
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04


class _OpenHow(ctypes.Structure):
    """C{struct open_how} (linux/openat2.h)."""

    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class Openat2:
    """
    C{openat2(2)} through libc's C{syscall(2)}, resolving no symbolic link.
    Its arguments are passed as C values made once (converting Python values
    on every call, as C{argtypes} would, costs about as much as the call).
    """

    _number = ctypes.c_long(SYS_OPENAT2)
    _directory = ctypes.c_int(AT_FDCWD)
    _size = ctypes.c_size_t(ctypes.sizeof(_OpenHow))

    def __init__(self, syscall: Any) -> None:
        self._syscall = syscall
        #: One C{open_how} per set of open flags, passed by reference.
        self._hows: dict[int, Any] = {}

    def open(self, path: str, flags: int) -> int | None:
        """
        A descriptor of C{path} opened with C{flags} (C{O_CLOEXEC} added),
        or L{None} when a component of C{path} is a symbolic link; raises
        L{OSError} (its subclass for the error) as C{os.open} would.
        """
        how = self._hows.get(flags)
        if how is None:
            how = self._hows[flags] = ctypes.byref(
                _OpenHow(flags | os.O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
            )
        fd: int = self._syscall(self._number, self._directory, os.fsencode(path), how, self._size)
        if fd >= 0:
            return fd
        error = ctypes.get_errno()
        if error == errno.ELOOP:
            return None
        raise OSError(error, os.strerror(error), path)


def working_openat2(syscall: Any) -> Openat2 | None:
    """
    An L{Openat2} over C{syscall} (libc's, or one that behaves like it) if
    it opens C{/}; L{None} if it fails (C{ENOSYS} before Linux 5.6,
    C{EPERM} or C{ENOSYS} from a seccomp filter that does not know it).
    """
    opener = Openat2(syscall)
    try:
        fd = opener.open("/", os.O_PATH)
    except OSError:
        return None
    if fd is None:
        return None
    os.close(fd)
    return opener


@functools.cache
def system_openat2() -> Openat2 | None:
    """
    This system's C{openat2}, or L{None} where there is none that works.
    """
    if sys.platform != "linux" or platform.machine() not in ARCHITECTURES:
        return None
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    return working_openat2(syscall)


def never_link_free(path: str, flags: int) -> None:
    """
    Where there is no C{openat2}: never tell whether a path has links.
    """
    return None
