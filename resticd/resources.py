"""
The resource tree: repository folders, object types, objects and configs.

C{/}, C{/a/} and C{/a/b/} are repositories; below each, C{config}, the type
listings C{data/}, C{keys/}, ... and the objects C{data/<sha256>}. Every answer
is plain text or JSON, never HTML, and never a redirect. Each resource knows
the user it serves and checks that user's rights before doing anything.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web import server, static
from twisted.web.http import OK, PARTIAL_CONTENT
from twisted.web.resource import IResource
from zope.interface import implementer

from .access import Access, Policy, Right
from .errors import (
    BadRequest,
    ErrorResource,
    PlainResource,
    RangeNotSatisfiable,
    Forbidden,
    NotFound,
    ResticdError,
    VerificationFailed,
    error_body,
    render_failure,
)
from .h2 import reserve
from .headers import ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, not_modified, response_headers
from .listing import ListingReader, content_type, wants_v2
from .logs import logger
from .paths import Target, repo_label, step
from .ranges import parse_range
from .reads import is_cached, pread_closing, read_cached, warm
from .request import SpoolingRequest, abort, shrank
from .sendfile import SendfileProducer, sendfile_transport
from .store import Store
from .threads import Runner
from .usage import Gate, Quota, Usage

log = logger(__name__)

OCTET_STREAM = b"application/octet-stream"
#: Bytes read from an object at a time when sending it over HTTP/1.1; also
#: the largest answer read in one go.
READ_SIZE = 1 << 20
#: Bytes read from an object at a time when sending it over HTTP/2: each
#: read is a trip through Twisted's producer, the request and the stream
#: (with static's 64 KiB, a quarter more of the daemon's CPU time per
#: GiB); the stream's flow-control window, not the read, bounds what waits
#: to be sent.
H2_READ_SIZE = 256 << 10
#: Of an object not in the page cache and sent through static's producers,
#: what is read from the disk before the answer starts; the rest is read
#: meanwhile, this much per worker call.
READ_AHEAD_FIRST = 4 << 20
#: Opens a file only to look at it (Linux); a plain read-only open elsewhere.
O_PATH = getattr(os, "O_PATH", os.O_RDONLY)


@dataclass
class Context:
    """
    What every resource of the tree shares.
    """

    store: Store
    run: Runner
    access: Access = field(default_factory=lambda: Access(Policy()))
    usage: Usage = field(default_factory=Usage)
    quota: Quota | None = None
    #: Open once the usage is counted; changes to storage wait for it.
    ready: Gate = field(default_factory=Gate)
    #: The wall clock, for the times of last writes.
    now: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        if self.quota is None:
            self.quota = Quota(self.usage, self.access.limits, self.store.is_stored)


def needed_right(method: bytes, target: Target) -> Right:
    """
    The right a request needs: reading needs C{read}; creating a repository,
    an object or a config needs C{append}; deleting needs C{delete}, except
    locks, which C{append} may remove (restic must unlock after a backup);
    deleting a repository needs C{admin}.
    """
    if method in (b"GET", b"HEAD"):
        return Right.READ
    if method == b"POST":
        return Right.APPEND
    if target.kind is None:
        return Right.REPO_DELETE
    return Right.APPEND if target.kind == "locks" else Right.DELETE


def authorize(ctx: Context, request: server.Request, user: str | None, target: Target) -> None:
    """
    Raise L{Forbidden} unless C{user} has the right C{request} needs on
    C{target}'s repository (the refusal is logged when the request ends).
    """
    needed = needed_right(request.method, target)
    # On their values: a Flag's & makes a new member (about a µs each time).
    if ctx.access.rights(user, target.repo).value & needed.value:
        return
    raise Forbidden(f"{(needed.name or '').lower().replace('_', ' ')} access to {repo_label(target.repo)} denied")


def is_gone(request: server.Request) -> bool:
    """
    Whether C{request} must not be written to any more: it was answered, or
    its client went away.
    """
    return bool(getattr(request, "finished", False) or getattr(request, "_disconnected", False))


def finish_ok(request: server.Request, body: bytes = b"") -> None:
    """
    Answer C{request} with 200 and a short body, unless it is gone.
    """
    if is_gone(request):
        return
    request.setResponseCode(OK)
    response_headers(request)[CONTENT_LENGTH] = [b"%d" % len(body)]
    if body and request.method != b"HEAD":
        request.write(body)
    request.finish()


def serve(request: server.Request, work: Coroutine[Any, Any, bytes]) -> int:
    """
    Render C{request} from the coroutine C{work}: its result is the body of a
    200 answer, its failure is mapped to a status by
    L{resticd.errors.render_failure}.
    """
    d: Deferred[bytes] = Deferred.fromCoroutine(work)
    d.addCallbacks(lambda body: finish_ok(request, body), lambda f: render_failure(request, f))
    return server.NOT_DONE_YET


NOT_FOUND = ErrorResource(NotFound("not found"))


class ApiResource(PlainResource):
    """
    A resource whose unknown children are a plain-text 404.
    """

    def getChild(self, path: bytes, request: server.Request) -> IResource:
        return NOT_FOUND




def resource_for(ctx: Context, target: Target | None, user: str | None) -> IResource:
    """
    The resource that serves C{target} for C{user}.
    """
    if target is None:
        return NOT_FOUND
    if target.kind is None:
        return RepoResource(ctx, target, user)
    if target.name is None:
        return TypeResource(ctx, target, user)
    return StoredFile(ctx, target, user)


class TargetResource(ApiResource):
    """
    A resource for one L{Target}, served to one user.
    """

    def __init__(self, ctx: Context, target: Target, user: str | None) -> None:
        super().__init__()
        self.ctx = ctx
        self.target = target
        self.user = user

    @property
    def repo(self) -> tuple[str, ...]:
        return self.target.repo

    def getChildWithDefault(self, path: bytes, request: server.Request) -> IResource:
        # The rest of the path is walked here at once, so that a request
        # makes one resource (the one that serves it), not one per segment.
        target = step(self.target, path)
        postpath: list[bytes] = request.postpath  # type: ignore[assignment]
        while postpath and target is not None:
            segment = postpath.pop(0)
            request.prepath.append(segment)  # type: ignore[union-attr]
            target = step(target, segment)
        if target == self.target:
            return self
        return resource_for(self.ctx, target, self.user)

    def authorize(self, request: server.Request) -> None:
        outcome = getattr(request, "outcome", None)
        if outcome is not None:
            outcome.user = self.user
            outcome.target = self.target
        authorize(self.ctx, request, self.user, self.target)


class RepoResource(TargetResource):
    """
    A repository folder: C{POST ?create=true} creates it, C{DELETE} removes
    it; its children are C{config}, the type listings and nested repositories.
    """

    def render_POST(self, request: server.Request) -> int:
        return serve(request, self._create(request))

    async def _create(self, request: server.Request) -> bytes:
        self.authorize(request)
        if request.args.get(b"create") != [b"true"]:
            raise BadRequest("POST on a repository needs ?create=true")
        await self.ctx.ready.wait()
        await self.ctx.run(self.ctx.store.create_repo, self.repo)
        self.ctx.usage.repos.setdefault(self.repo, {})
        log.info("created repository {repo}", repo=repo_label(self.repo), user=self.user)
        return b""

    def render_DELETE(self, request: server.Request) -> int:
        return serve(request, self._delete(request))

    async def _delete(self, request: server.Request) -> bytes:
        self.authorize(request)
        await self.ctx.ready.wait()
        await self.ctx.run(self.ctx.store.delete_repo, self.repo)
        self.ctx.usage.drop(self.repo)
        log.info("deleted repository {repo}", repo=repo_label(self.repo), user=self.user)
        return b""


@implementer(IPushProducer)
class SendRoom:
    """
    The producer of an answer written piece by piece: its connection (or
    HTTP/2 stream) pauses it while the client is behind, so that L{wait}
    holds the next piece back until the client has caught up.
    """

    def __init__(self, request: server.Request) -> None:
        self._request: server.Request | None = request
        self._room = Gate()
        request.registerProducer(self, True)
        # However the answer ends, nothing waits for the client any more.
        request.notifyFinish().addBoth(lambda result: self._room.open())

    def wait(self) -> Deferred[None]:
        """
        Fires once the client has caught up (at once if it has, or if the
        answer has ended).
        """
        return self._room.wait()

    def release(self) -> None:
        """
        Stop being the request's producer (before it finishes); safe to
        call more than once.
        """
        request, self._request = self._request, None
        if request is not None and not is_gone(request):
            request.unregisterProducer()

    def pauseProducing(self) -> None:
        self._room.close()

    def resumeProducing(self) -> None:
        self._room.open()

    def stopProducing(self) -> None:
        # The client went away: whoever waits finds the request gone.
        self._room.open()


class TypeResource(TargetResource):
    """
    The objects of one type in a repository: C{GET} lists them, its children
    are the objects.
    """

    def render_GET(self, request: server.Request) -> int | bytes:
        assert self.target.kind is not None
        try:
            self.authorize(request)
            # A type directory that leads out of the root is not found (a
            # data/xx directory that does is skipped while listing).
            self.ctx.store.contained(self.ctx.store.layout.type_dir(self.repo, self.target.kind))
        except ResticdError as e:
            return error_body(request, e)
        v2 = wants_v2(request.getHeader(b"accept"))
        request.setHeader(b"content-type", content_type(v2))
        d = Deferred.fromCoroutine(self._stream(request, v2))
        d.addErrback(self._failed, request)
        return server.NOT_DONE_YET

    async def _stream(self, request: server.Request, v2: bool) -> None:
        """
        Send the listing piece by piece as it is read in the thread pool
        (L{ListingReader}), reading no further while the client is behind
        (its connection, or HTTP/2 stream, has no room), and none once it
        has gone away.
        """
        assert self.target.kind is not None
        store = self.ctx.store
        reader = ListingReader(store.list_dir, store.list_dirs(self.repo, self.target.kind), v2)
        room = SendRoom(request)
        first = True
        try:
            while not reader.done:
                piece = await self.ctx.run(reader.read)
                if is_gone(request):
                    return
                if not request.startedWriting:
                    request.write(b"[")
                if piece:
                    request.write(piece if first else b"," + piece)
                    first = False
                await room.wait()
                if is_gone(request):
                    return
            if not request.startedWriting:
                request.write(b"[")
            room.release()
            request.write(b"]")
            request.finish()
        finally:
            room.release()

    def _failed(self, failure: Failure, request: server.Request) -> None:
        if is_gone(request):
            return
        if not request.startedWriting:
            render_failure(request, failure)
            return
        log.failure(
            "listing {kind} of {repo} failed", failure, kind=self.target.kind, repo=repo_label(self.repo)
        )
        abort(request)


def static_producer(request: server.Request, file: IO[bytes], start: int, length: int, whole: bool) -> Any:
    """
    One of L{twisted.web.static}'s producers for C{length} bytes of C{file}
    from C{start} (TLS and HTTP/2, where the bytes must pass through
    Python anyway).
    """
    producer: Any
    exact = ExactReads(request, file, length)
    if whole:
        producer = static.NoRangeStaticProducer(request, exact)
    else:
        producer = static.SingleRangeStaticProducer(request, exact, start, length)
    # Fewer, larger reads and writes than static's 64 KiB: over HTTP/1.1
    # (TLS) a MiB at a time; HTTP/2 cuts what it sends into frames anyway.
    producer.bufferSize = H2_READ_SIZE if hasattr(request.channel, "_conn") else READ_SIZE
    # When the client goes away mid-read, close the file (Twisted's HTTP/2
    # streams do not stop their producer when they are reset) and let go of
    # the producer, so that what it buffered is freed at once rather than by
    # the next full garbage collection.
    request.notifyFinish().addErrback(_abandoned, request, producer)
    return producer


class ExactReads:
    """
    A stored object's file as static's producers read it: C{length} bytes
    and no more. Should it end early (truncated on disk while being sent),
    the connection is dropped: static's producers would otherwise finish
    the answer short of its Content-Length (the client then reads the next
    answer as the rest of this one) or, for a range, wait forever.
    """

    def __init__(self, request: server.Request, file: IO[bytes], length: int) -> None:
        self._request = request
        self._file = file
        self._left = length
        self._cut = False

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def read(self, size: int) -> bytes:
        data = self._file.read(min(size, self._left))
        self._left -= len(data)
        if not data and self._left > 0 and not self._cut:
            self._cut = True
            shrank(self._request)
        return data

    def close(self) -> None:
        self._file.close()


def _released(result: Any, release: Callable[[], None]) -> Any:
    release()
    return result


def _abandoned(failure: Failure, request: server.Request, producer: Any) -> None:
    producer.stopProducing()
    if request.channel is not None:
        try:
            request.channel.unregisterProducer()
        except Exception:
            pass


class StoredFile(TargetResource):
    """
    One object (or a repository's config): C{HEAD}, C{GET} (ranges
    included), C{POST} (upload), C{DELETE}.
    """

    def __init__(self, ctx: Context, target: Target, user: str | None) -> None:
        super().__init__(ctx, target, user)
        assert target.kind is not None and target.name is not None
        self.kind = target.kind
        self.name = target.name
        layout = ctx.store.layout
        if self.kind == "config":
            self.path = layout.config_path(self.repo)
        else:
            self.path = layout.object_path(self.repo, self.kind, self.name)

    def _stat(self) -> os.stat_result:
        """
        The stored file's status, without opening it for reading (see
        L{_open}).
        """
        fd, st = self._open(O_PATH)
        os.close(fd)
        return st

    def render_HEAD(self, request: server.Request) -> bytes:
        try:
            self.authorize(request)
            st = self._stat()
        except ResticdError as e:
            return error_body(request, e)
        headers = response_headers(request)
        headers[CONTENT_TYPE] = [OCTET_STREAM]
        headers[CONTENT_LENGTH] = [b"%d" % st.st_size]
        headers[ACCEPT_RANGES] = [b"bytes"]
        return b""

    def _open(self, flags: int = os.O_RDONLY) -> tuple[int, os.stat_result]:
        """
        A descriptor of the stored file, opened with C{flags}, and its
        status; L{NotFound} when it is missing, not a regular file, or
        outside the data root.
        """
        try:
            fd = self.ctx.store.open_contained(self.path, flags)
        except IsADirectoryError:
            raise NotFound("not found") from None
        except OSError:
            raise ResticdError("cannot read the stored object") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise NotFound("not found")
        return fd, st

    def render_GET(self, request: server.Request) -> bytes | int:
        """
        The object, or the one byte range asked for (206): small answers
        are read at once; larger ones are sent with C{sendfile(2)} on plain
        sockets and by L{twisted.web.static}'s producers otherwise. What is
        not in the page cache is read by a worker thread first (see
        L{resticd.reads}), so that the event loop never waits for the disk.
        """
        try:
            self.authorize(request)
            fd, st = self._open()
        except ResticdError as e:
            return error_body(request, e)
        size = st.st_size
        # One range, clipped to the object; absurd values never reach a
        # seek. An empty object is always a 200 with no body: restic reads
        # whole files with "Range: bytes=0-".
        wanted = parse_range(request.getHeader(b"range"), size) if size else None
        if isinstance(wanted, str):
            os.close(fd)
            request.setHeader(b"content-range", b"bytes */%d" % size)
            return error_body(request, RangeNotSatisfiable("range not satisfiable"))
        headers = response_headers(request)
        headers[ACCEPT_RANGES] = [b"bytes"]
        headers[CONTENT_TYPE] = [OCTET_STREAM]
        if not_modified(request, st.st_mtime):
            os.close(fd)
            return b""
        start, length = 0, size
        if wanted is not None:
            start, end = wanted
            length = end - start + 1
            request.setResponseCode(PARTIAL_CONTENT)
            headers[CONTENT_RANGE] = [b"bytes %d-%d/%d" % (start, end, size)]
        headers[CONTENT_LENGTH] = [b"%d" % length]
        whole = wanted is None
        # A small answer is read whole and queued at once, where there is
        # room for it (over HTTP/2, see resticd.h2.reserve).
        release = reserve(request.channel, length) if length <= READ_SIZE else None
        if release is not None:
            try:
                data = read_cached(fd, length, start)
            except OSError:
                release()
                os.close(fd)
                raise
            if data is None:
                # Not (all) in the page cache: a worker waits for the disk.
                read = self.ctx.run(pread_closing, fd, length, start)
                read.addBoth(_released, release)
                read.addCallbacks(self._answer, self._failed, (request, length), errbackArgs=(request,))
                return server.NOT_DONE_YET
            release()
            os.close(fd)
            if hasattr(request.channel, "_conn"):
                return bytes(data)  # HTTP/2 queues what it is given
            # Written as read (returned, it would have to be copied to bytes).
            request.write(data)
            request.finish()
            return server.NOT_DONE_YET
        file = os.fdopen(fd, "rb")
        transport = sendfile_transport(request)
        if transport is not None:
            # Reads what is not cached a turn at a time.
            SendfileProducer(request, transport, file, start, length, self.ctx.run).start()
        elif is_cached(fd, start, length):
            self._send(request, file, start, length, whole)
        else:
            # The first piece before the answer starts, the rest meanwhile
            # (through a descriptor of its own, which the worker closes).
            first = min(length, READ_AHEAD_FIRST)
            ahead = os.dup(fd)
            self.ctx.run(warm, fd, start, first).addCallbacks(
                lambda _: self._send(request, file, start, length, whole), self._not_warmed, errbackArgs=(request, file)
            )
            self._read_ahead(request, ahead, start + first, start + length)
        return server.NOT_DONE_YET

    def _read_ahead(self, request: server.Request, fd: int, offset: int, end: int) -> None:
        """
        Have workers read C{fd} from C{offset} to C{end} into the page cache
        while C{request} is answered, L{READ_AHEAD_FIRST} bytes per call, so
        that other work queued for the workers meanwhile gets its turn; stop
        when the request is gone or a read fails (the answer then reads the
        rest itself). C{fd} is this read's own, closed at the end.
        """
        if offset >= end or is_gone(request):
            os.close(fd)
            return
        count = min(end - offset, READ_AHEAD_FIRST)
        self.ctx.run(warm, fd, offset, count).addCallbacks(
            lambda _: self._read_ahead(request, fd, offset + count, end), lambda _: os.close(fd)
        )

    def _not_warmed(self, failure: Failure, request: server.Request, file: IO[bytes]) -> None:
        file.close()
        self._failed(failure, request)

    def _answer(self, data: bytes, request: server.Request, length: int) -> None:
        """
        Answer C{request} with C{data}, read by a worker, unless it is gone.
        """
        if is_gone(request):
            return
        if len(data) != length:
            shrank(request)
            return
        request.write(data)
        request.finish()

    def _send(self, request: server.Request, file: IO[bytes], start: int, length: int, whole: bool) -> None:
        """
        Send C{length} bytes of C{file} from C{start} as the answer to
        C{request} with one of static's producers, unless it is gone (then
        just close the file).
        """
        if is_gone(request):
            file.close()
            return
        static_producer(request, file, start, length, whole).start()

    def _failed(self, failure: Failure, request: server.Request) -> None:
        """
        A read in a worker failed (the disk): a 500 answer, logged once.
        """
        request.responseHeaders.removeHeader(b"content-range")
        render_failure(request, failure)

    def render_POST(self, request: server.Request) -> int:
        return serve(request, self._upload(request))

    async def _upload(self, request: server.Request) -> bytes:
        spool = None
        if isinstance(request, SpoolingRequest):
            spool = request.take_spool()
        try:
            self.authorize(request)
            if isinstance(request, SpoolingRequest) and request.refusal is not None:
                raise request.refusal
            if spool is None:
                spool = request.channel.site.spool.open()  # type: ignore[attr-defined]
            await spool.flush()
            if spool.error is not None:
                raise spool.error
            if isinstance(request, SpoolingRequest) and self.ctx.quota is not None:
                request.reservation = self.ctx.quota.reserve(self.target, spool.size)
            declared = request.getHeader(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) != spool.size:
                raise BadRequest("body is shorter than its Content-Length")
            if (
                self.ctx.access.policy.verify_upload
                and self.kind != "config"
                and spool.hexdigest() != self.name
            ):
                raise VerificationFailed("body does not match its name (sha256)")
            await self.ctx.ready.wait()
            stored = await self.ctx.run(self.ctx.store.publish, spool, self.repo, self.kind, self.name)
        finally:
            # publish removes it in every case; this covers every failure
            # before it. The worker is done with the file by now.
            if spool is not None:
                spool.discard()
        if isinstance(request, SpoolingRequest):
            request.outcome.stored = stored
            request.outcome.size = spool.size
        if stored:
            self.ctx.usage.add(self.repo, self.kind, spool.size, self.ctx.now())
        log.debug(
            "{what} {kind}/{name} in {repo} ({size} bytes)",
            what="saved" if stored else "kept identical",
            kind=self.kind,
            name=self.name,
            repo=repo_label(self.repo),
            size=spool.size,
        )
        return b""

    def render_DELETE(self, request: server.Request) -> int:
        return serve(request, self._delete(request))

    async def _delete(self, request: server.Request) -> bytes:
        self.authorize(request)
        await self.ctx.ready.wait()
        size = await self.ctx.run(self.ctx.store.delete, self.path)
        if size is not None:
            self.ctx.usage.remove(self.repo, self.kind, size, self.ctx.now())
            if isinstance(request, SpoolingRequest):
                request.outcome.size = size
        log.debug("deleted {kind}/{name} in {repo}", kind=self.kind, name=self.name, repo=repo_label(self.repo))
        return b""
