"""
The resource tree: repository folders, object types, objects and configs.

C{/}, C{/a/} and C{/a/b/} are repositories; below each, C{config}, the type
listings C{data/}, C{keys/}, ... and the objects C{data/<sha256>}. Every answer
is plain text or JSON, never HTML, and never a redirect.
"""

from __future__ import annotations

import os
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar

from twisted.internet.defer import Deferred
from .logs import logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server, static
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from .errors import (
    BadRequest,
    Forbidden,
    NotFound,
    ResticdError,
    error_body,
    render_failure,
)
from .listing import content_type, format_entries, wants_v2
from .paths import (
    HASHED_TYPES,
    MAX_REPO_DEPTH,
    Repo,
    decode_segment,
    is_object_name,
    is_repo_segment,
    repo_label,
)
from .spool import SpoolingRequest
from .store import Store
from .threads import Runner

log = logger(__name__)

OCTET_STREAM = b"application/octet-stream"


@dataclass(frozen=True)
class Policy:
    """
    What the server allows, instance-wide.
    """

    verify_upload: bool = True
    allow_repo_delete: bool = False


@dataclass(frozen=True)
class Context:
    """
    What every resource of the tree shares.
    """

    store: Store
    run: Runner
    policy: Policy = Policy()


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
    request.setResponseCode(http.OK)
    request.setHeader(b"content-length", b"%d" % len(body))
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


class MethodNotAllowed(ResticdError):
    """The resource exists but does not answer this method."""

    status = http.NOT_ALLOWED


def allowed_methods(resource: object) -> list[bytes]:
    """
    The methods a resource answers: one per C{render_*} method, and C{HEAD}
    only where there is a C{GET} or a C{HEAD} of its own.
    """
    methods = {name[len("render_") :] for name in dir(resource) if name.startswith("render_")}
    if "GET" not in methods:
        methods.discard("HEAD")
    return sorted(m.encode("ascii") for m in methods)


class ApiResource(resource.Resource):
    """
    A resource that answers unsupported methods with a plain-text 405 and an
    C{Allow} header, and unknown children with a plain-text 404.
    """

    def render(self, request: server.Request) -> bytes | int:
        allowed = allowed_methods(self)
        if request.method not in allowed:
            request.setHeader(b"allow", b", ".join(allowed))
            return error_body(request, MethodNotAllowed("method not allowed"))
        return super().render(request)  # type: ignore[no-any-return]

    def getChild(self, path: bytes, request: server.Request) -> IResource:
        return NOT_FOUND


class ErrorResource(resource.Resource):
    """
    The same error for any method and any path below.
    """

    isLeaf = True

    def __init__(self, error: ResticdError) -> None:
        super().__init__()
        self.error = error

    def render(self, request: server.Request) -> bytes:
        return error_body(request, self.error)


NOT_FOUND = ErrorResource(NotFound("not found"))


class RepoResource(ApiResource):
    """
    A repository folder: C{POST ?create=true} creates it, C{DELETE} removes
    it; its children are C{config}, the type listings and nested repositories.
    """

    def __init__(self, ctx: Context, repo: Repo = (), user: str | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.repo = repo
        self.user = user

    def getChild(self, path: bytes, request: server.Request) -> IResource:
        if path == b"":
            return self
        segment = decode_segment(path)
        if segment is None:
            return NOT_FOUND
        if segment == "config":
            return StoredFile(self.ctx, self.repo, "config", "config")
        if segment in HASHED_TYPES:
            return TypeResource(self.ctx, self.repo, segment)
        if len(self.repo) < MAX_REPO_DEPTH and is_repo_segment(segment):
            return RepoResource(self.ctx, (*self.repo, segment), self.user)
        return NOT_FOUND

    def render_POST(self, request: server.Request) -> int:
        return serve(request, self._create(request))

    async def _create(self, request: server.Request) -> bytes:
        if request.args.get(b"create") != [b"true"]:
            raise BadRequest("POST on a repository needs ?create=true")
        await self.ctx.run(self.ctx.store.create_repo, self.repo)
        log.info("created repository {repo}", repo=repo_label(self.repo), user=self.user)
        return b""

    def render_DELETE(self, request: server.Request) -> int:
        return serve(request, self._delete(request))

    async def _delete(self, request: server.Request) -> bytes:
        if not self.ctx.policy.allow_repo_delete:
            raise Forbidden("repository deletion is disabled (see --allow-repo-delete)")
        await self.ctx.run(self.ctx.store.delete_repo, self.repo)
        log.info("deleted repository {repo}", repo=repo_label(self.repo), user=self.user)
        return b""


class TypeResource(ApiResource):
    """
    The objects of one type in a repository: C{GET} lists them, its children
    are the objects.
    """

    def __init__(self, ctx: Context, repo: Repo, kind: str) -> None:
        super().__init__()
        self.ctx = ctx
        self.repo = repo
        self.kind = kind

    def getChild(self, path: bytes, request: server.Request) -> IResource:
        if path == b"":
            return self
        name = decode_segment(path)
        if name is None or not is_object_name(name):
            return NOT_FOUND
        return StoredFile(self.ctx, self.repo, self.kind, name)

    def render_GET(self, request: server.Request) -> int:
        v2 = wants_v2(request.getHeader(b"accept"))
        request.setHeader(b"content-type", content_type(v2))
        d = Deferred.fromCoroutine(self._stream(request, v2))
        d.addErrback(self._failed, request)
        return server.NOT_DONE_YET

    async def _stream(self, request: server.Request, v2: bool) -> None:
        """
        Send the listing one directory at a time, as each is read in the
        thread pool; stop reading when the client goes away.
        """
        store = self.ctx.store
        directories = list(store.list_dirs(self.repo, self.kind))
        started = False
        first = True
        for directory in directories:
            entries = await self.ctx.run(store.list_dir, directory)
            if is_gone(request):
                return
            if not started:
                request.write(b"[")
                started = True
            piece = format_entries(entries, v2, first)
            if piece:
                request.write(piece)
                first = False
        if not started:
            request.write(b"[")
        request.write(b"]")
        request.finish()

    def _failed(self, failure: Failure, request: server.Request) -> None:
        if is_gone(request):
            return
        if not request.startedWriting:
            render_failure(request, failure)
            return
        log.failure("listing {kind} of {repo} failed", failure, kind=self.kind, repo=repo_label(self.repo))
        abort(request)


def abort(request: server.Request) -> None:
    """
    Drop the connection (or HTTP/2 stream) of a response that cannot be
    completed, so the client sees an error instead of a short body.
    """
    channel = request.channel
    abort_stream = getattr(channel, "abortConnection", None)
    if abort_stream is None:
        abort_stream = channel.transport.abortConnection  # type: ignore[union-attr]
    abort_stream()


class BlobFile(static.File):
    """
    A L{static.File} for one stored object: binary type, plain-text errors.
    """

    childNotFound = NOT_FOUND  # type: ignore[assignment]
    forbidden = ErrorResource(ResticdError("cannot read the stored object"))  # type: ignore[assignment]

    def __init__(self, path: str) -> None:
        super().__init__(path, defaultType="application/octet-stream")


class StoredFile(ApiResource):
    """
    One object (or a repository's config): C{HEAD}, C{GET} (ranges
    included), C{POST} (upload), C{DELETE}.
    """

    isLeaf = False
    #: Uploads of these kinds must hash to their name.
    verified_kinds: ClassVar[frozenset[str]] = frozenset(HASHED_TYPES)

    def __init__(self, ctx: Context, repo: Repo, kind: str, name: str) -> None:
        super().__init__()
        self.ctx = ctx
        self.repo = repo
        self.kind = kind
        self.name = name
        layout = ctx.store.layout
        if kind == "config":
            self.path = layout.config_path(repo)
        else:
            self.path = layout.object_path(repo, kind, name)

    def _stat(self) -> os.stat_result:
        try:
            st = os.stat(self.ctx.store.contained(self.path))
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound("not found") from None
        if not os.path.isfile(self.path):
            raise NotFound("not found")
        return st

    def render_HEAD(self, request: server.Request) -> bytes:
        try:
            st = self._stat()
        except ResticdError as e:
            return error_body(request, e)
        request.setHeader(b"content-type", OCTET_STREAM)
        request.setHeader(b"content-length", b"%d" % st.st_size)
        request.setHeader(b"accept-ranges", b"bytes")
        return b""

    def render_GET(self, request: server.Request) -> bytes | int:
        try:
            st = self._stat()
        except ResticdError as e:
            return error_body(request, e)
        if st.st_size == 0:
            # static.File answers "Range: bytes=0-" on an empty file with 416;
            # restic reads whole files that way and needs an empty 200.
            request.setHeader(b"content-type", OCTET_STREAM)
            return b""
        return BlobFile(self.path).render(request)  # type: ignore[no-any-return]

    def render_POST(self, request: server.Request) -> int:
        return serve(request, self._upload(request))

    async def _upload(self, request: server.Request) -> bytes:
        spool = None
        if isinstance(request, SpoolingRequest):
            if request.spool_error is not None:
                raise request.spool_error
            spool = request.take_spool()
        if spool is None:
            spool = request.channel.site.spool.open()  # type: ignore[attr-defined]
        try:
            if spool.error is not None:
                raise spool.error
            declared = request.getHeader(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) != spool.size:
                raise BadRequest("body is shorter than its Content-Length")
            if (
                self.ctx.policy.verify_upload
                and self.kind in self.verified_kinds
                and spool.hexdigest() != self.name
            ):
                raise BadRequest("body does not match its name (sha256)")
        except BaseException:
            spool.discard()
            raise
        try:
            stored = await self.ctx.run(self.ctx.store.publish, spool, self.repo, self.kind, self.name)
        finally:
            # publish removes it in every case; this covers a failure to run
            # publish at all. The worker is done with the file by now.
            spool.discard()
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
        return serve(request, self._delete())

    async def _delete(self) -> bytes:
        await self.ctx.run(self.ctx.store.delete, self.path)
        log.debug("deleted {kind}/{name} in {repo}", kind=self.kind, name=self.name, repo=repo_label(self.repo))
        return b""
