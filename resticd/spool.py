"""
Uploads in flight: the body is written, as it arrives, to a temp file in the
spool directory and hashed on the fly, so it is read from the network exactly
once and never copied again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile


class SpoolFile:
    """
    One upload's temp file and the running sha256 of what was written to it.

    A write error (a full disk) is kept in L{error} rather than raised, so the
    rest of the body is read and dropped and the request can be answered.
    """

    def __init__(self, directory: str, mode: int) -> None:
        fd, self.path = tempfile.mkstemp(dir=directory, prefix="upload-")
        if mode != 0o600:
            os.fchmod(fd, mode)
        self._fd: int | None = fd
        self._hash = hashlib.sha256()
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> None:
        """
        Append C{data} to the file and the digest.
        """
        if self.error is not None or self._fd is None:
            return
        self._hash.update(data)
        self.size += len(data)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as e:
            self.error = e

    def hexdigest(self) -> str:
        """
        The sha256 of everything written, as lowercase hex.
        """
        return self._hash.hexdigest()

    def sync(self) -> None:
        """
        Flush the file to stable storage and close it (blocking).
        """
        if self._fd is None:
            raise OSError("spool file already closed")
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def discard(self) -> None:
        """
        Close and remove the file; safe to call more than once.
        """
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Spool:
    """
    Makes L{SpoolFile}s in one directory with one file mode.
    """

    def __init__(self, directory: str, mode: int = 0o600) -> None:
        self.directory = directory
        self.mode = mode

    def open(self) -> SpoolFile:
        """
        A new, empty spool file.
        """
        return SpoolFile(self.directory, self.mode)

    def clean(self) -> int:
        """
        Remove every leftover spool file (of a crash); return how many were
        removed (blocking: call at startup, in a thread).
        """
        removed = 0
        with os.scandir(self.directory) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed += 1
        return removed
