"""
Domain errors and the one place that maps them to HTTP answers.
"""

from __future__ import annotations

import errno
from typing import ClassVar

from .logs import logger
from twisted.python.failure import Failure
from twisted.web import http, resource
from twisted.web.iweb import IRequest

log = logger(__name__)


class ResticdError(Exception):
    """
    An error the client is told about; C{status} is its HTTP status code,
    C{headers} any headers that go with it.
    """

    status: ClassVar[int] = http.INTERNAL_SERVER_ERROR

    def __init__(self, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ResticdError):
    """The request is malformed: a wrong query, a body that fails its name."""

    status = http.BAD_REQUEST


class VerificationFailed(BadRequest):
    """An upload's sha256 is not its name."""


class PayloadTooLarge(ResticdError):
    """The body is larger than the server accepts."""

    status = http.REQUEST_ENTITY_TOO_LARGE


class RangeNotSatisfiable(ResticdError):
    """The requested range starts beyond the end of the object."""

    status = http.REQUESTED_RANGE_NOT_SATISFIABLE


class Forbidden(ResticdError):
    """The request is well-formed but not allowed (e.g. an overwrite)."""

    status = http.FORBIDDEN


class NotFound(ResticdError):
    """No such repository, type or object."""

    status = http.NOT_FOUND


class Unauthorized(ResticdError):
    """No valid credentials: asks for HTTP Basic authentication."""

    status = http.UNAUTHORIZED

    def __init__(self, message: str = "authentication required") -> None:
        super().__init__(message, {b"www-authenticate": b'Basic realm="restic"'})


class TooManyRequests(ResticdError):
    """Too many failed logins from one address; try again later."""

    status = 429

    def __init__(self, retry_after: float) -> None:
        super().__init__(
            "too many failed logins; try again later",
            {b"retry-after": b"%d" % max(1, round(retry_after))},
        )


class Conflict(ResticdError):
    """The repository already exists."""

    status = http.CONFLICT


class InsufficientStorage(ResticdError):
    """The disk is full (restic treats 507 as final)."""

    status = 507


#: errno values that mean "out of space" rather than "server fault".
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def classify(failure: Failure) -> ResticdError:
    """
    Turn any failure into the L{ResticdError} the client is told about.

    Domain errors pass through; running out of space is 507; anything else
    is a server fault (500).
    """
    error = failure.value
    if isinstance(error, ResticdError):
        return error
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return InsufficientStorage("insufficient storage")
    return ResticdError("internal server error")


def error_body(request: IRequest, error: ResticdError) -> bytes:
    """
    Set the status and headers of C{request} for C{error} and return its
    short plain-text body (empty for C{HEAD}, which sends headers only).
    """
    outcome = getattr(request, "outcome", None)
    if outcome is not None:
        outcome.error = error
    body = error.message.encode("utf-8") + b"\n"
    request.setResponseCode(error.status)
    for name, value in error.headers.items():
        request.setHeader(name, value)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"content-length", b"%d" % len(body))
    return b"" if request.method == b"HEAD" else body


class ErrorResource(resource.Resource):
    """
    The same error for any method and any path below.
    """

    isLeaf = True

    def __init__(self, error: ResticdError) -> None:
        super().__init__()
        self.error = error

    def render(self, request: IRequest) -> bytes:
        return error_body(request, self.error)


class MethodNotAllowed(ResticdError):
    """The resource exists but does not answer this method."""

    status = http.NOT_ALLOWED


def allowed_methods(resource: object) -> tuple[bytes, ...]:
    """
    The methods a resource answers: one per C{render_*} method, and C{HEAD}
    only where there is a C{GET} (worked out once per class).
    """
    cls = type(resource)
    allowed = _ALLOWED.get(cls)
    if allowed is None:
        methods = {name[len("render_") :] for name in dir(cls) if name.startswith("render_")}
        if "GET" not in methods:
            methods.discard("HEAD")
        allowed = _ALLOWED[cls] = tuple(sorted(m.encode("ascii") for m in methods))
    return allowed


_ALLOWED: dict[type, tuple[bytes, ...]] = {}


class PlainResource(resource.Resource):
    """
    A resource that answers every method it does not serve, known or not,
    with a plain-text 405 and an C{Allow} header (never twisted.web's HTML
    pages).
    """

    def render(self, request: IRequest) -> bytes | int:
        allowed = allowed_methods(self)
        if request.method not in allowed:
            request.setHeader(b"allow", b", ".join(allowed))
            return error_body(request, MethodNotAllowed("method not allowed"))
        return super().render(request)  # type: ignore[no-any-return]


def render_failure(request: IRequest, failure: Failure) -> None:
    """
    Answer C{request} with the status C{failure} maps to, logging server
    faults once, and finish it, unless the client has gone already.
    """
    error = classify(failure)
    if error.status >= 500 and error.status != 507:
        log.failure(
            "{method} {uri} failed",
            failure,
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("ascii", "replace"),
        )
    if getattr(request, "_disconnected", False) or getattr(request, "finished", False):
        return
    request.write(error_body(request, error))
    request.finish()
