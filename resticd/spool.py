"""
Uploads in flight: the body is written, as it arrives, to a temp file in the
spool directory and hashed on the fly, so it is read from the network exactly
once.

A body larger than L{SMALL_BODY} is written with C{O_DIRECT} where the
filesystem takes it: copied once into a page-aligned staging buffer and
written from there straight to the disk, rather than copied into the page
cache and written back from it later. Uploads are data written once and
rarely read soon (restic reads packs back in a check, a restore or a
prune), so they no longer push what is read often out of the page cache,
and the kernel's page-cache work for them (allocating pages, writing them
back, reclaiming them) is saved: measured on a 2-core VM, 8 concurrent
8 MiB uploads went from about 580 to 830 MiB/s over plain HTTP (450 to 565
over TLS), with about 13 % less of the daemon's CPU time.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import mmap
import os
import threading
import time
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from .logs import logger
from .threads import Runner, Stopped

log = logger(__name__)


#: Body bytes are hashed and written in pieces of about this size.
PIECE = 1 << 20

#: What an upload that goes on reading its socket after waiting for the
#: L{WriteBudget} (HTTP/1.1) is counted as bringing before it has: a socket
#: read (a MiB under TLS). Over HTTP/2 what comes is bounded by the windows
#: lent to the connections (L{resticd.windows}) and is not counted ahead.
RESUME_STEP = 1 << 20

#: What goes through the page cache (small bodies, and every body where the
#: filesystem refuses direct writes) is handed to write(2) this much at a
#: time, the size Go's io.Copy uses. Seen on a virtual machine that hands
#: freed memory back to its host (free page reporting): once memory has
#: been free for a few seconds, 1 MiB writes into the page cache cost five
#: times the kernel time of 32 KiB ones (larger writes get larger page-cache
#: folios, apparently from the memory the host has taken back); uploads took
#: 3.2-3.6 CPU-s per GiB with 1 MiB writes, 2.7-2.8 with 32 KiB (before
#: large bodies were written with O_DIRECT). Elsewhere the extra calls cost
#: little.
WRITE_SIZE = 32 << 10

#: What L{WriteBudget} lets all uploads together hold, received and not yet
#: written, at the least (while the disk takes them slowly: more would only
#: hold more memory, not write sooner) and at the most (while the worker
#: threads write them fast); in between, what they wrote in
#: L{BUDGET_TIME} at their rate over the last L{RATE_WINDOW} or more.
BUDGET = 12 << 20
BUDGET_MOST = 20 << 20
BUDGET_TIME = 0.04
RATE_WINDOW = 0.05

#: Bytes of one upload received but not yet written, beyond which it stops
#: reading from its client until its writes are down to half of it: a piece
#: being written while the next one gathers keeps its writes going, and a
#: single big upload (restic's packs reach 128 MiB) holds no more memory
#: than that, however far the disk falls behind (the L{WriteBudget} caps all
#: uploads together). Measured on a 2-core VM: a 128 MiB upload raised the
#: daemon's peak resident size by 4 MiB over plain HTTP (median; 3-6) with
#: two pieces, 6.2 (5-8) with four, and over TLS by 5.5 (4.7-6.4) against
#: 7.5 (7.3-8.5), at the same speed.
BACKLOG = 2 * PIECE

#: A whole body at most this long is hashed on the reactor thread (tens of
#: microseconds) and written by L{SpoolFile.sync}, in the same worker call as
#: the fsync: one trip to the worker threads per small upload instead of two.
SMALL_BODY = 64 << 10


#: Direct writes need their buffer, file offset and length aligned to the
#: disk's logical block size; the page size is a multiple of all of them.
ALIGN = mmap.PAGESIZE

#: Bytes per direct write: one system call (one trip of the worker thread
#: away from the interpreter) per half MiB, where the page cache took one
#: per L{WRITE_SIZE}. Each write running at once has a staging buffer this
#: large (see L{DirectWrites}).
STAGING = 512 << 10


def write_all(fd: int, data: bytes) -> None:
    """
    Write all of C{data} to C{fd}, L{WRITE_SIZE} bytes per call (blocking).
    """
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view[:WRITE_SIZE]) :]


_numbers = itertools.count()


def create_unique(directory: str, mode: int, flags: int = 0) -> tuple[int, str]:
    """
    Create a new, empty file in C{directory} with C{mode} under a name no
    other file there has, opened for writing with C{flags} besides: its
    descriptor and path (blocking). The names
    hold the process id and a counter (a daemon's spool is emptied when it
    starts); should one be taken all the same, the next number is tried.
    """
    while True:
        path = os.path.join(directory, f"upload-{os.getpid()}-{next(_numbers)}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | flags, 0o600)
        except FileExistsError:
            continue
        if mode != 0o600:
            os.fchmod(fd, mode)
        return fd, path


def resume_one(resume: Callable[[], object]) -> bool:
    """
    Call C{resume} (an upload waiting for writes to catch up); whether it
    says it went on. One that fails is logged (and did not go on), and is
    not reported as the writer's error.
    """
    try:
        return bool(resume())
    except Exception:
        log.failure("resuming an upload failed")
        return False


def resume_all(waiting: list[Callable[[], object]]) -> None:
    """
    Call each of C{waiting}; one that fails does not stop the others.
    """
    for resume in waiting:
        resume_one(resume)


class WriteBudget:
    """
    A cap on body bytes received but not yet written, across all uploads,
    what an upload keeps for its next piece included: when it is exceeded,
    uploads stop reading from their clients until the worker threads have
    caught up to half the cap.

    The cap (L{limit}) follows how fast the workers drain it: C{limit} bytes
    while the disk takes them slowly, up to C{most} while the workers write
    what they hold within L{BUDGET_TIME}. Held that briefly, more bytes cost
    little memory, and each upload's next piece is there when a worker is
    free for it instead of waiting for room. Measured with 8 concurrent
    8 MiB uploads, the default's 12 to 20 MiB against a fixed 12: 2 % faster
    over plain TCP and 4 % over TLS (medians of 12 rounds), 8-12 % over TLS
    where memory was not warmed first, the peak resident size 7-10 MiB
    higher; 16 restic clients backing up over HTTP/2 to a disk writing
    30 MiB/s, for which more room would only mean more memory, keep the 12.

    While uploads wait for room, what the others keep for their next piece
    stays within a quarter of the cap (those keeping the most hand it to
    the workers): the room must not wait for bytes kept until more of a
    body comes, which its client may be unable to send (over HTTP/2 all of
    a connection's window can be taken by uploads that wait). And they go
    on in turn, as many as the room left takes a read each
    (L{RESUME_STEP}), more as those reads come: all at once, each brought a
    read (a MiB under TLS), and forty uploads waiting took the backlog to
    40 MiB. (Over HTTP/2 there are no such reads: what a stream that goes on
    brings is what waited for it, counted at once, and what its client may
    send, bounded by the connection windows; and counting it ahead could
    hold back the very uploads whose bytes take its connection's window.)
    """

    def __init__(self, limit: int = BUDGET, most: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        #: The cap now, from C{limit} (and fixed there without C{most}) to
        #: C{most}.
        self.limit = limit
        self.least = limit
        self.most = limit if most is None else max(most, limit)
        self._clock = clock
        #: Bytes given back since L{_since}.
        self._drained = 0
        self._since = clock()
        self.used = 0
        self._waiting: list[tuple[Callable[[], object], SpoolFile]] = []
        self._keeping: dict[SpoolFile, None] = {}
        #: Uploads that went on reading their sockets (HTTP/1.1) and have not
        #: brought anything yet: each is counted as a read on its way.
        self._coming: set[SpoolFile] = set()
        self._resuming = False

    def take(self, size: int, spool: SpoolFile | None = None) -> None:
        self.used += size
        if spool is not None and spool in self._coming:
            # The read it was counted as has come.
            self._coming.discard(spool)
            self._resume()

    def give(self, size: int) -> None:
        self.used -= size
        if self.most > self.least:
            self._drained_by(size)
        self._resume()

    def _drained_by(self, size: int) -> None:
        """
        Count C{size} bytes given back (written, or dropped with their
        upload); once L{RATE_WINDOW} has passed, make the cap what is given
        back in L{BUDGET_TIME} at the rate since then (after a pause, that
        rate is low: the cap starts from the least).
        """
        self._drained += size
        now = self._clock()
        elapsed = now - self._since
        if elapsed >= RATE_WINDOW:
            rate = self._drained / elapsed
            self.limit = min(self.most, max(self.least, int(rate * BUDGET_TIME)))
            self._drained = 0
            self._since = now

    @property
    def exceeded(self) -> bool:
        return self.used > self.limit

    def holding_back(self) -> bool:
        """
        Whether uploads wait for room now (the workers' writes behind what
        the clients send).
        """
        return bool(self._waiting)

    def when_room(self, resume: Callable[[], object], spool: SpoolFile) -> None:
        """
        Call C{resume} (which says whether the upload of C{spool} went on
        reading its socket, so that a read may come) once the backlog is
        down to half the cap and there is room for a read of its.
        """
        self._waiting.append((resume, spool))
        self._hand_over_kept()

    def keeping(self, spool: SpoolFile) -> None:
        """
        C{spool} keeps bytes for its next piece.
        """
        self._keeping[spool] = None
        if self._waiting:
            self._hand_over_kept()

    def kept_none(self, spool: SpoolFile) -> None:
        """
        C{spool} keeps nothing for its next piece any more.
        """
        self._keeping.pop(spool, None)

    def ended(self, spool: SpoolFile) -> None:
        """
        The upload of C{spool} takes nothing more: a read expected of it
        will not come.
        """
        if spool in self._coming:
            self._coming.discard(spool)
            self._resume()

    def _hand_over_kept(self) -> None:
        """
        Have the uploads that keep the most for their next piece hand it to
        the workers until all that is kept is within a quarter of the cap.
        """
        kept = sum(keeper.kept for keeper in self._keeping)
        if kept <= self.limit // 4:
            return
        for keeper in sorted(self._keeping, key=lambda keeper: keeper.kept, reverse=True):
            if kept <= self.limit // 4:
                break
            kept -= keeper.kept
            keeper.submit()

    def _resume(self) -> None:
        """
        Let uploads waiting for room go on, in turn, while there is room
        for a read of each and of those already on their way.
        """
        if self._resuming or not self._waiting or self.used > self.limit // 2:
            return
        self._resuming = True
        try:
            while self._waiting and self.used + RESUME_STEP * len(self._coming) < self.limit:
                resume, spool = self._waiting.pop(0)
                self._coming.add(spool)  # (it may bring something at once)
                if not resume_one(resume):
                    self._coming.discard(spool)
        finally:
            self._resuming = False


class DirectWrites:
    """
    Whether the files of one spool directory are written with C{O_DIRECT}:
    yes until its filesystem refuses it once (C{EINVAL}: tmpfs before Linux
    6.6, ramfs, some FUSE filesystems, disks with blocks larger than a page),
    then never again, which is logged once. And the page-aligned staging
    buffers they are written through: one is lent to each write while it
    runs (as many as run at once: at most one per worker thread), and those
    not lent are handed back to the system by L{release}.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.enabled = True
        self._refusal: str | None = None
        self._reported = False
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []

    def take(self) -> mmap.mmap:
        """
        A staging buffer of L{STAGING} bytes, lent until L{give} (any thread;
        anonymous memory is page-aligned).
        """
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, STAGING)

    def give(self, buffer: mmap.mmap) -> None:
        """
        Take back a buffer lent by L{take}.
        """
        with self._lock:
            self._free.append(buffer)

    def release(self) -> bool:
        """
        Hand the memory of the staging buffers not lent back to the system
        (when the daemon is idle); whether there was any.
        """
        with self._lock:
            free, self._free = self._free, []
        kept = []
        for buffer in free:
            try:
                buffer.close()
            except BufferError:  # still looked at (a traceback's view): later
                kept.append(buffer)
        with self._lock:
            self._free.extend(kept)
        return len(kept) < len(free)

    def refused(self, error: OSError) -> None:
        """
        The filesystem refused a direct write (in any thread): no more.
        """
        self.enabled = False
        if self._refusal is None:
            self._refusal = error.strerror or str(error)

    def report(self) -> None:
        """
        Log the refusal, once (in the reactor thread).
        """
        if self._refusal is not None and not self._reported:
            self._reported = True
            log.info(
                "uploads to {directory} are written through the page cache: its filesystem refuses direct writes ({error})",
                directory=self.directory,
                error=self._refusal,
            )


class SpoolFile:
    """
    One upload's temp file and the running sha256 of what was written to it
    (unless made with C{hashed=False}: uploads that are not verified are not
    hashed either).

    With a L{Runner}, pieces of about L{PIECE} bytes are hashed and written in
    the worker threads, one after another, while the reactor goes on reading
    (sha256 and write release the GIL, so this uses a second core); without
    one, each write happens at once. L{flush} waits for the writes so far.
    Those pieces are written with C{O_DIRECT} unless C{direct} says the
    filesystem refuses it (see the module's docstring); a small body is
    written through the page cache by L{sync}.

    A write error (a full disk) is kept in L{error} rather than raised, so the
    rest of the body is read and dropped and the request can be answered.
    """

    def __init__(
        self,
        directory: str,
        mode: int,
        run: Runner | None = None,
        budget: WriteBudget | None = None,
        hashed: bool = True,
        direct: DirectWrites | None = None,
    ) -> None:
        self.directory = directory
        self.mode = mode
        #: The file's path once it exists: it is made by the first write, in
        #: a worker thread (creating a file can wait for the disk), or, for a
        #: small body, by L{sync} together with its fsync.
        self.path: str | None = None
        self._fd: int | None = None
        self._closed = False
        self._hash = hashlib.sha256() if hashed else None
        self._run = run
        self.budget = budget
        self._pending: list[bytes] = []
        self._pending_size = 0
        #: Bytes handed to the workers and not written yet.
        self._writing = 0
        self._caught_up: list[Callable[[], object]] = []
        self._tail: Deferred[None] = succeed(None)
        self._submitted = False
        self._unwritten: bytes | None = None
        self._dropped = False
        self._direct_writes = direct or DirectWrites(directory)
        #: Whether the file is open with O_DIRECT.
        self._direct = False
        #: What was written after the last whole block while the file is
        #: open with O_DIRECT: kept for the next piece or for L{sync}.
        self._carry = b""
        self.size = 0
        self.error: OSError | None = None

    def _open(self, direct: bool = False) -> int:
        """
        The file's descriptor, creating the file first if need be (blocking),
        with C{O_DIRECT} when C{direct} and the filesystem takes it.
        """
        if self._fd is not None:
            return self._fd
        if self._closed:
            raise OSError("spool file already closed")
        self._direct = direct and self._direct_writes.enabled
        try:
            fd, self.path = create_unique(self.directory, self.mode, os.O_DIRECT if self._direct else 0)
        except OSError as e:
            if not self._direct or e.errno != errno.EINVAL:
                raise
            self._direct_writes.refused(e)
            self._direct = False
            fd, self.path = create_unique(self.directory, self.mode)
        self._fd = fd
        return fd

    def write(self, data: bytes) -> None:
        """
        Append C{data} to the file and the digest.
        """
        if self.error is not None or self._dropped:
            return
        self.size += len(data)
        if self._run is None:
            self._write_now(data)
            self._direct_writes.report()
            return
        self._pending.append(data)
        self._pending_size += len(data)
        budget = self.budget
        if budget is not None:
            budget.take(len(data), self)
        if self._pending_size >= PIECE:
            self.submit()
        elif budget is not None:
            budget.keeping(self)

    @property
    def kept(self) -> int:
        """
        The bytes kept for the next piece.
        """
        return self._pending_size

    def _take_pending(self) -> tuple[list[bytes], int]:
        """
        What is kept for the next piece, and its length, no longer kept.
        """
        pieces, size = self._pending, self._pending_size
        self._pending = []
        self._pending_size = 0
        if self.budget is not None:
            self.budget.kept_none(self)
        return pieces, size

    def submit(self) -> None:
        """
        Hand what is kept for the next piece to the worker threads now, however
        little.
        """
        if not self._pending:
            return
        # The network's pieces go to the worker as they came: joining them
        # would copy every byte once more, into freshly allocated memory.
        pieces, size = self._take_pending()
        self._submitted = True
        run = self._run
        assert run is not None
        budget = self.budget
        self._writing += size

        def write(ignored: object) -> Deferred[None]:
            return run(self._write_now, *pieces)

        def written(result: object) -> None:
            self._direct_writes.report()
            self._writing -= size
            if budget is not None:
                budget.give(size)
            if isinstance(result, Failure) and self.error is None:
                self.error = OSError(f"writing the upload failed: {result.getErrorMessage()}")
            if self._caught_up and self.backlog <= BACKLOG // 2:
                waiting, self._caught_up = self._caught_up, []
                resume_all(waiting)

        self._tail = self._tail.addCallback(write).addBoth(written)

    @property
    def backlog(self) -> int:
        """
        Bytes written to this file that are not in it yet (kept for the
        next piece, or handed to the workers).
        """
        return self._pending_size + self._writing

    @property
    def backlogged(self) -> bool:
        """
        Whether the writes are more than L{BACKLOG} bytes behind.
        """
        return self.backlog > BACKLOG

    def when_caught_up(self, resume: Callable[[], object]) -> None:
        """
        Call C{resume} once the writes are no more than half of L{BACKLOG}
        behind (after L{backlogged}: a piece is being written, whose end
        comes back to the reactor thread).
        """
        self._caught_up.append(resume)

    def _write_now(self, *pieces: bytes) -> None:
        """
        Hash and write some pieces (in a worker thread when there is a
        runner), making the file with the first; none of an upload dropped
        meanwhile (its file is removed anyway).
        """
        if self.error is not None or self._closed or self._dropped:
            return
        try:
            fd = self._open(direct=True)
            if self._direct:
                self._write_direct(fd, pieces)
                return
            for data in pieces:
                if self._hash is not None:
                    self._hash.update(data)
                write_all(fd, data)
        except OSError as e:
            self.error = e

    def _write_direct(self, fd: int, pieces: tuple[bytes, ...]) -> None:
        """
        Hash and write C{pieces} through a staging buffer lent for the call.
        """
        buffer = self._direct_writes.take()
        try:
            self._stage(fd, memoryview(buffer), pieces)
        finally:
            self._direct_writes.give(buffer)

    def _stage(self, fd: int, staging: memoryview, pieces: tuple[bytes, ...]) -> None:
        """
        Hash C{pieces} and write them, after what was carried over, through
        C{staging}, whole blocks at a time; carry over what does not fill a
        block. Should the filesystem refuse a direct write, the rest goes
        through the page cache.
        """
        filled = len(self._carry)
        staging[:filled] = self._carry
        for data in pieces:
            if self._hash is not None:
                self._hash.update(data)
            source = memoryview(data)
            while source:
                count = min(len(source), STAGING - filled)
                staging[filled : filled + count] = source[:count]
                filled += count
                source = source[count:]
                if filled == STAGING:
                    self._write_staged(fd, staging)
                    filled = 0
        whole = filled - filled % ALIGN
        self._write_staged(fd, staging[:whole])
        self._carry = bytes(staging[whole:filled])
        if self._carry and not self._direct:  # refused: no need to wait for a whole block
            self._write_staged(fd, staging[whole:filled])
            self._carry = b""

    def _write_staged(self, fd: int, data: memoryview) -> None:
        """
        Write all of C{data} (blocking), through the page cache from the
        first direct write the filesystem refuses on.
        """
        while data:
            try:
                data = data[os.write(fd, data) :]
            except OSError as e:
                if not self._direct or e.errno != errno.EINVAL:
                    raise
                self._direct_writes.refused(e)
                self._stop_direct(fd)

    def _stop_direct(self, fd: int) -> None:
        """
        Write C{fd} through the page cache from now on.
        """
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self._direct = False

    def flush(self) -> Deferred[None]:
        """
        A Deferred that fires once everything written so far is hashed and in
        the file, but for the end of a direct write that does not fill a
        block, or, for a small body, hashed and kept for L{sync} to write
        (not yet on stable storage: see L{sync}).
        """
        if self.budget is not None:
            self.budget.ended(self)  # its body is all there
        if self._run is not None and not self._submitted and self._pending_size <= SMALL_BODY:
            # Nothing was handed to the workers yet, and all there is is small.
            pieces, size = self._take_pending()
            if self.budget is not None:
                self.budget.give(size)
            piece = b"".join(pieces)
            if self._hash is not None:
                self._hash.update(piece)
            self._unwritten = piece
            self._submitted = True
            return succeed(None)
        self.submit()
        done: Deferred[None] = Deferred()
        self._tail.addBoth(lambda ignored: done.callback(None))
        return done

    def hexdigest(self) -> str | None:
        """
        The sha256 of everything written, as lowercase hex (after L{flush});
        L{None} when the file was not hashed.
        """
        return None if self._hash is None else self._hash.hexdigest()

    def sync(self) -> str:
        """
        Write what L{flush} left to write (making the file first when
        nothing was written before), flush the file to stable storage and
        close it (blocking; after L{flush}); the file's path.
        """
        fd = self._open()
        self._fd, self._closed = None, True
        try:
            unwritten, self._unwritten = self._unwritten, None
            if self._carry:
                # The end that does not fill a block: through the page cache.
                self._stop_direct(fd)
                unwritten, self._carry = self._carry, b""
            if unwritten:
                write_all(fd, unwritten)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert self.path is not None
        return self.path

    def remove(self) -> None:
        """
        Close and remove the file at once (blocking; no writes may be queued).
        Safe to call more than once.
        """
        self._closed = True
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        path, self.path = self.path, None
        if path is not None:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def discard(self) -> None:
        """
        Drop what is queued and remove the file (in a worker thread when
        there is a runner) once the worker threads are done with it. Safe to
        call more than once, from the reactor thread.
        """
        self._dropped = True
        self._unwritten = None
        _, size = self._take_pending()
        if self.budget is not None:
            self.budget.give(size)
            self.budget.ended(self)

        def remove(ignored: object) -> Deferred[None]:
            if self.path is None and self._fd is None:
                self._closed = True  # nothing was made, and nothing will be
                return succeed(None)
            if self._run is not None:
                try:
                    return self._run(self.remove)
                except Stopped:  # a connection closed late in a shutdown
                    pass
            self.remove()
            return succeed(None)

        def failed(failure: Failure) -> None:
            log.failure("removing a spool file failed", failure)

        self._tail = self._tail.addBoth(remove).addErrback(failed)


class Spool:
    """
    Makes L{SpoolFile}s in one directory with one file mode, written by
    C{run} (inline when L{None}) within one L{WriteBudget} (by default from
    L{BUDGET} to L{BUDGET_MOST}), and hashed unless C{hashed} is false.
    """

    def __init__(
        self,
        directory: str,
        mode: int = 0o600,
        run: Runner | None = None,
        budget: WriteBudget | None = None,
        hashed: bool = True,
    ) -> None:
        self.directory = directory
        self.mode = mode
        self.run = run
        self.budget = budget or WriteBudget(BUDGET, BUDGET_MOST)
        self.hashed = hashed
        self.direct = DirectWrites(directory)

    def open(self) -> SpoolFile:
        """
        A new spool file; the file itself is made by its first write.
        """
        return SpoolFile(self.directory, self.mode, self.run, self.budget, self.hashed, self.direct)

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
