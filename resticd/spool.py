"""
Uploads in flight: the body is written, as it arrives, to a temp file in the
spool directory and hashed on the fly, so it is read from the network exactly
once and never copied again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from io import BytesIO
from typing import TYPE_CHECKING, Any, Protocol

from twisted.web import server

from .errors import InsufficientStorage
from .paths import parse_path

if TYPE_CHECKING:
    from .usage import Quota, Reservation


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


class _Site(Protocol):
    spool: Spool
    quota: Quota | None


def request_line(request: server.Request) -> tuple[bytes | None, bytes | None]:
    """
    The method and path of a request whose body has not arrived yet, from
    its channel: twisted.web sets C{request.method} and C{request.path} only
    once the whole body is in. (HTTP/2 streams keep them as C{command} and
    C{path}; HTTP/1.1 channels as C{_command} and C{_path} while parsing.)
    """
    channel = request.channel
    for method_name, path_name in (("command", "path"), ("_command", "_path")):
        method = getattr(channel, method_name, None)
        if isinstance(method, bytes):
            path = getattr(channel, path_name, None)
            return method, path if isinstance(path, bytes) else None
    return None, None


class SpoolingRequest(server.Request):
    """
    A L{server.Request} that streams its body into a L{SpoolFile} of the
    site's L{Spool} instead of buffering it in memory or C{$TMPDIR}.

    The site (the channel's C{site}) must have C{spool} and C{quota}
    attributes. An upload is checked against the quota as soon as its
    Content-Length is known and again as its body grows past it; a refused
    body is read and dropped, never written, and the refusal is kept in
    L{refusal} for the render to answer. The render takes the file with
    L{take_spool}; whatever is not taken is discarded, and the quota
    reservation released, when the request ends, however it ends.
    """

    spool_file: SpoolFile | None = None
    refusal: Exception | None = None
    reservation: Reservation | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # The body is never a form: keep twisted.web from parsing it.
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)
        self.notifyFinish().addBoth(self._finished)

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        if length == 0:
            return
        site: _Site = self.channel.site  # type: ignore[attr-defined]
        method, path = request_line(self)
        target = parse_path(path) if method == b"POST" and path is not None else None
        if site.quota is not None and target is not None and target.name is not None:
            try:
                self.reservation = site.quota.reserve(target.repo, length or 0)
            except InsufficientStorage as e:
                self.refusal = e
                return
        try:
            self.spool_file = site.spool.open()
        except OSError as e:
            self.refusal = e

    def handleContentChunk(self, data: bytes) -> None:
        spool = self.spool_file
        if spool is None:
            return
        reservation = self.reservation
        if reservation is not None and spool.size + len(data) > reservation.bytes:
            try:
                reservation.grow(spool.size + len(data) - reservation.bytes)
            except InsufficientStorage as e:
                self.refusal = e
                self.spool_file = None
                spool.discard()
                return
        spool.write(data)

    def take_spool(self) -> SpoolFile | None:
        """
        Hand the body's spool file to the caller, who must then sync or
        discard it; L{None} for an empty or refused body.
        """
        spool_file, self.spool_file = self.spool_file, None
        return spool_file

    def _finished(self, result: object) -> None:
        if self.spool_file is not None:
            self.spool_file.discard()
            self.spool_file = None
        if self.reservation is not None:
            self.reservation.release()
