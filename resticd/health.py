"""
Health endpoints, outside every repository and without authentication:
C{GET /-/healthy} (the process answers) and C{GET /-/ready} (it can take
backups: the data directory is writable, has free space, and the stored
objects have been counted).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from twisted.web import resource, server

from .access import parse_size
from .errors import ErrorResource, NotFound, PlainResource

_PERCENT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*\Z")


@dataclass(frozen=True)
class MinFree:
    """
    The least free space for readiness: a fraction of the filesystem or a
    number of bytes.
    """

    fraction: float = 0.0
    bytes: int = 0

    @classmethod
    def parse(cls, text: str) -> MinFree:
        """
        C{1%}, C{0.5%} or a size such as C{10G}.

        @raise ValueError: for anything else.
        """
        match = _PERCENT.match(text)
        if match:
            value = float(match.group(1))
            if value > 100:
                raise ValueError(f"more than 100%: {text!r}")
            return cls(fraction=value / 100)
        return cls(bytes=parse_size(text))

    def required(self, total: int) -> int:
        """
        The free bytes needed on a filesystem of C{total} bytes.
        """
        return max(self.bytes, int(total * self.fraction))


def readiness_problems(root: str, min_free: MinFree, counted: bool) -> list[str]:
    """
    Why the server cannot take backups now; empty when it can.
    """
    problems = []
    if not counted:
        problems.append("still counting stored objects")
    if not os.access(root, os.W_OK):
        problems.append(f"data directory {root} is not writable")
    try:
        fs = os.statvfs(root)
    except OSError as e:
        problems.append(f"cannot stat data directory: {e.strerror}")
    else:
        free = fs.f_bavail * fs.f_frsize
        needed = min_free.required(fs.f_blocks * fs.f_frsize)
        if free < needed:
            problems.append(f"{free} bytes free, less than the {needed} required")
    return problems


def _json(request: server.Request, code: int, body: dict[str, object]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode() + b"\n"


class Healthy(PlainResource):
    """
    C{/-/healthy}: 200 whenever the process answers.
    """

    isLeaf = True

    def render_GET(self, request: server.Request) -> bytes:
        return _json(request, 200, {"status": "ok"})


class Ready(PlainResource):
    """
    C{/-/ready}: 200, or 503 with the reasons.
    """

    isLeaf = True

    def __init__(self, problems: Callable[[], list[str]]) -> None:
        super().__init__()
        self.problems = problems

    def render_GET(self, request: server.Request) -> bytes:
        problems = self.problems()
        if problems:
            return _json(request, 503, {"status": "unavailable", "reasons": problems})
        return _json(request, 200, {"status": "ready"})


class Health(resource.Resource):
    """
    C{/-/}: the health endpoints.
    """

    def __init__(self, problems: Callable[[], list[str]]) -> None:
        super().__init__()
        self.putChild(b"healthy", Healthy())
        self.putChild(b"ready", Ready(problems))

    def getChild(self, path: bytes, request: server.Request) -> resource.IResource:
        return ErrorResource(NotFound("not found"))

    def render(self, request: server.Request) -> bytes:
        return ErrorResource(NotFound("not found")).render(request)
