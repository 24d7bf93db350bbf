"""
Adversarial input against the real site, in memory: a hypothesis fuzz target
over the request method, the raw bytes of the request target (percent-encoded
junk, dot segments in every encoding, NUL, backslashes, overlong segments,
unicode), the query, the headers (Range, Content-Length, Accept,
Authorization, Transfer-Encoding and random ones) and the body, plus
concrete cases for every escape the fuzz is meant to catch.

Requests are raw bytes fed to the site's own protocol (L{ResticSite.buildProtocol}:
the HTTP/1.1 channel, L{SpoolingRequest}, the spool, the resource tree), its
blocking work done inline and its file producers driven by a private
cooperator, so a case costs about half a millisecond of server time and no
reactor turn; with hypothesis drawing the cases, about 500 cases a second
in all. (The treq client of L{tests.web} manages about 800 simple requests
a second, and cannot send malformed requests at all.)

Every case must keep these properties:
  - no answer is a 5xx;
  - no answer is HTML (no C{text/html}, no markup in a body the server
    wrote), none carries a traceback, and the server logs no failure;
  - no answer is cut short (every body as long as its framing says), a
    HEAD answer has no body, and nothing follows an answer that closes the
    connection;
  - nothing outside the data root is created, changed or removed (a sibling
    directory is watched, and symlinks planted inside the root point into
    it), and the planted symlinks still point where they did;
  - an upload answered 200 left a regular file under its name whose sha256
    is that name (when uploads are verified), and a ranged read returned
    exactly the bytes on disk;
  - once the connection is gone, no spool file and no timer is left.

L{cases} (the strategy), L{Arena} (a data root, its watched surroundings and
the site) and L{run_case} are meant to be reused by C{bench/soak.py}:

    arena = Arena.create(Path(tmp), "auth")      # or "open", "noverify"

    @settings(max_examples=1_000_000, deadline=None)
    @given(cases())
    def soak(case): run_case(arena, case)        # AssertionError: a failure
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import _producer_helpers
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from resticd.auth import Authenticator, Htpasswd
from resticd.paths import HASHED_TYPES, SPOOL_DIR, parse_path
from resticd.threads import run_inline

from .daemon import write_htpasswd
from .web import V2, Server, make_server, name_of


# -- the world the fuzz plays in ----------------------------------------------

#: The largest body the fuzzed sites accept (small, so 413 is reachable).
MAX_BLOB = 4096
#: Users of the sites with authentication, and their passwords.
USERS = {"alice": "alice-password", "bob": "bob-password"}
#: Bodies whose names are worth guessing: uploads of these can succeed.
BODIES = (b"", b"x", b"hello restic", bytes(range(256)), b"\x00" * 100)
#: What the file outside the data root holds (a planted symlink inside the
#: root is named after its sha256, so a verified upload can reach it).
SECRET = b"the secret outside the data root\n"
#: The content of the outside file a planted config symlink points to.
OUTSIDE_CONFIG = b"outside config\n"
#: A stored object of every fuzzed site: /r/keys/<sha256(STORED)>.
STORED = b"a stored key object, long enough for ranges: " + bytes(range(200))

#: Object names the fuzz draws from: real ones, the planted symlinks, the
#: names under a symlinked fan-out directory, malformed ones.
KEYLINK = name_of(SECRET)
LOCKLINK = name_of(b"lock link")
AB_NAME = "ab" + name_of(b"under ab")[2:]
#: Object names that exist only outside the data root (and are never asked
#: for): no answer may ever carry them.
OUTSIDE_NAMES = ("ab" + name_of(b"only outside, under ab")[2:], name_of(b"only outside"))
NAMES = (
    *(name_of(b) for b in BODIES),
    name_of(STORED),
    KEYLINK,
    LOCKLINK,
    AB_NAME,
    "0" * 64,
    "A" * 64,
    "0" * 63,
    "0" * 65,
    "g" * 64,
)

#: Symlinks planted inside the data root, all leading out of it: path
#: relative to the root -> link target (absolute unless it starts with ..).
#: Filled in by L{Arena.create} with the outside directory.
PLANTED: dict[str, str] = {
    "link": "{outside}",  # a repository that is a symlink
    "link2": "../outside",  # the same, relative
    "r/nest": "{outside}",  # a nested repository
    "r/keys/" + KEYLINK: "{outside}/secret",  # an object
    "r/locks/" + LOCKLINK: "{outside}/ab",  # an object that is a directory
    "s/config": "{outside}/config",  # a config
    "t/data/ab": "{outside}/ab",  # a data fan-out directory
    "u/index": "{outside}",  # a type directory
}

#: The repositories every fuzzed site starts with.
REPOS = (("r",), ("s",), ("t",), ("u",), ("r", "deep"))

#: How each fuzzed site is configured.
VARIANTS: dict[str, dict[str, Any]] = {
    # No authentication, uploads verified.
    "open": {},
    # Basic authentication and an access file: alice may do anything to r,
    # s, t and u (repository deletes included), bob may read r; everybody
    # may read "link".
    "auth": {"auth": True},
    # Unverified uploads (any body under any name: writes through the
    # planted symlinks become reachable), group-accessible modes, repository
    # deletes allowed.
    "noverify": {"verify_upload": False, "group_accessible": True, "allow_repo_delete": True},
}

ACCESS = """
[users.alice]
"**" = ["read", "admin"]
[users.bob]
"r" = ["read"]
"r/*" = ["read"]
[default]
"link" = ["read"]
"""


class _Ticks:
    """
    A scheduler for a private L{Cooperator}: steps wait here until
    L{run} runs them, instead of on the global reactor.
    """

    def __init__(self) -> None:
        self.queue: list[Callable[[], object]] = []

    def __call__(self, step: Callable[[], object]) -> Any:
        self.queue.append(step)
        return self

    def cancel(self) -> None:
        self.queue.clear()

    def run(self, limit: int = 100_000) -> None:
        for _ in range(limit):
            if not self.queue:
                return
            self.queue.pop(0)()
        raise AssertionError("the response producers never finished")


@contextmanager
def _driven_producers(ticks: _Ticks) -> Iterator[None]:
    """
    While the block runs, the pull producers of responses (Twisted's
    static files) are driven by C{ticks} rather than the global reactor.
    """
    cooperator = Cooperator(scheduler=ticks, terminationPredicateFactory=lambda: lambda: True)
    saved = _producer_helpers.cooperate  # type: ignore[attr-defined]
    _producer_helpers.cooperate = cooperator.cooperate  # type: ignore[attr-defined]
    try:
        yield
    finally:
        _producer_helpers.cooperate = saved  # type: ignore[attr-defined]


def _tree(top: Path) -> dict[str, tuple[Any, ...]]:
    """
    Everything below C{top} (C{top} included), without following symlinks:
    type, mode, size, mtime, inode, and the sha256 of each file.
    """
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            if name == "." and dirpath != str(top):
                continue
            st = os.lstat(path)
            digest = None
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(path, top.parent)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, digest)
    return out


@dataclass
class Arena:
    """
    A fuzzed site over a data root at C{base/data}, with its surroundings
    watched: C{base/outside} (where the planted symlinks lead), the
    htpasswd and access files, and any new entry of C{base}.
    """

    base: Path
    variant: str
    server: Server
    planted: dict[str, str]
    #: Authorization header values: valid ones for each user, then others.
    credentials: dict[str, str]
    verify: bool
    ticks: _Ticks = field(default_factory=_Ticks)
    #: How many cases ran, and the statuses they were answered with.
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    seconds: float = 0.0
    _snapshot: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    @classmethod
    def create(cls, base: Path, variant: str) -> Arena:
        options = dict(VARIANTS[variant])
        base.mkdir(parents=True, exist_ok=True)
        root = base / "data"
        outside = base / "outside"
        (outside / "ab").mkdir(parents=True)
        (outside / "secret").write_bytes(SECRET)
        (outside / "config").write_bytes(OUTSIDE_CONFIG)
        (outside / "ab" / AB_NAME).write_bytes(b"outside object")
        # What a listing that followed a planted symlink would show.
        (outside / "ab" / OUTSIDE_NAMES[0]).write_bytes(b"outside object")
        for kind in ("", "keys", "index", "data"):
            (outside / kind).mkdir(exist_ok=True)
            (outside / kind / OUTSIDE_NAMES[1]).write_bytes(b"outside object")
        authenticator = None
        if options.pop("auth", False):
            htpasswd = Htpasswd(str(write_htpasswd(base / "htpasswd", USERS)))
            htpasswd.refresh()
            authenticator = Authenticator(htpasswd, run_inline, Clock())
            access = base / "access.toml"
            access.write_text(ACCESS)
            options["access_file"] = str(access)
        server = make_server(str(root), authenticator=authenticator, max_blob_size=MAX_BLOB, **options)
        planted = {rel: target.format(outside=outside) for rel, target in PLANTED.items()}
        credentials = {user: basic(user, password) for user, password in USERS.items()}
        arena = cls(base, variant, server, planted, credentials, options.get("verify_upload", True))
        arena.replant()
        arena._snapshot = arena.surroundings()
        return arena

    @property
    def root(self) -> str:
        return self.server.layout.root

    def replant(self) -> None:
        """
        Make the starting repositories, the stored object and the planted
        symlinks again where a fuzzed request (a repository delete, an
        object delete) removed them.
        """
        store = self.server.store
        for repo in REPOS:
            if all(os.path.isdir(os.path.join(self.root, *repo, kind)) for kind in HASHED_TYPES):
                continue
            if os.path.isdir(os.path.join(self.root, *repo)):
                # Deleted, its directory kept for a nested repository, then
                # partly made again by uploads (a pipelined upload to
                # r/keys/ after a delete of r makes r/keys/ alone).
                store.delete_repo(repo)
            store.create_repo(repo)
        for kind, body in [("keys", STORED), *(("data", body) for body in BODIES)]:
            stored = self.server.layout.object_path(("r",), kind, name_of(body))
            if not os.path.exists(stored):
                Path(stored).write_bytes(body)
        for rel, target in self.planted.items():
            path = os.path.join(self.root, rel)
            if os.path.islink(path):
                assert os.readlink(path) == target, f"the planted symlink {rel} was changed"
                continue
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
            os.symlink(target, path)

    def recover(self) -> None:
        """
        Start afresh after a failed case: no spool files, the starting
        repositories and symlinks in place, the surroundings as they are now.
        """
        spool = self.server.layout.spool_dir()
        for name in os.listdir(spool):
            os.unlink(os.path.join(spool, name))
        for rel, target in self.planted.items():
            path = os.path.join(self.root, rel)
            if os.path.islink(path) and os.readlink(path) != target:
                os.unlink(path)
        self.replant()
        self._snapshot = self.surroundings()

    def surroundings(self) -> dict[str, tuple[Any, ...]]:
        """
        What must never change: everything in C{base} but the data root.
        """
        out: dict[str, tuple[Any, ...]] = {}
        for entry in os.scandir(self.base):
            if entry.name == "data":
                continue
            if entry.is_dir(follow_symlinks=False):
                out.update(_tree(Path(entry.path)))
            else:
                st = entry.stat(follow_symlinks=False)
                out[entry.name] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, None)
        return out

    def check_surroundings(self) -> None:
        now = self.surroundings()
        if now != self._snapshot:
            changed = sorted(k for k in set(now) | set(self._snapshot) if now.get(k) != self._snapshot.get(k))
            raise AssertionError(f"files outside the data root changed: {changed}")


def basic(user: str, password: str) -> str:
    """
    An C{Authorization: Basic} header value.
    """
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- one case -----------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """
    One request as bytes on the wire: the request line, the headers, the
    body, whatever follows it (a pipelined request or garbage), fed to the
    server C{piece} bytes at a time (all at once for 0).
    """

    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    trailer: bytes = b""
    version: bytes = b"HTTP/1.1"
    piece: int = 0

    def wire(self) -> bytes:
        head = b"%s %s %s\r\n" % (self.method, self.target, self.version)
        head += b"".join(name + b": " + value + b"\r\n" for name, value in self.headers)
        return head + b"\r\n" + self.body + self.trailer


@dataclass
class Response:
    """
    One response read off the wire.
    """

    code: int
    headers: dict[bytes, list[bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?\Z")


def parse_responses(data: bytes, first_method: bytes) -> list[Response]:
    """
    The responses in C{data}, in order. The first answers C{first_method};
    any later one (to pipelined bytes) is assumed not to answer a HEAD.

    @raise AssertionError: when the bytes are not well-framed responses, or
        one is cut short.
    """
    responses: list[Response] = []
    at = 0
    while at < len(data):
        end = data.find(b"\r\n\r\n", at)
        assert end >= 0, f"a response head is cut short: {data[at:at + 300]!r}"
        lines = data[at:end].split(b"\r\n")
        match = _STATUS_LINE.match(lines[0])
        assert match, f"not a status line: {lines[0][:200]!r}"
        code = int(match.group(1))
        headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            assert colon, f"a malformed response header line: {line[:200]!r}"
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        at = end + 4
        if code < 200:
            continue  # 100 Continue
        method = first_method if not responses else b"GET"
        body = b""
        if method == b"HEAD" and at < len(data):
            assert data.startswith(b"HTTP/", at), f"a body after the {code} answer to a HEAD: {data[at:at + 100]!r}"
        if method != b"HEAD" and code not in (204, 304):
            if b"chunked" in b",".join(headers.get(b"transfer-encoding", [])).lower():
                body, at = _dechunk(data, at)
            elif b"content-length" in headers:
                length = int(headers[b"content-length"][-1])
                body = data[at : at + length]
                assert len(body) == length, f"a {code} body is cut short: {len(body)} of {length} bytes"
                at += length
            else:
                body, at = data[at:], len(data)
        responses.append(Response(code, headers, body))
    return responses


def _dechunk(data: bytes, at: int) -> tuple[bytes, int]:
    body = b""
    while True:
        end = data.find(b"\r\n", at)
        assert end >= 0, "a chunked response is cut short"
        size = int(data[at:end].split(b";")[0], 16)
        at = end + 2
        if size == 0:
            end = data.find(b"\r\n", at)
            while end != at:  # trailers
                assert end >= 0, "a chunked response is cut short"
                at = end + 2
                end = data.find(b"\r\n", at)
            return body, at + 2
        assert len(data) >= at + size + 2, "a chunked response is cut short"
        body += data[at : at + size]
        at += size + 2


class _Wire(StringTransport):
    """
    A transport that keeps what is written to it, as a TCP transport sends
    it: data written after C{loseConnection} still goes out (pausing and
    resuming are allowed then too: lenient), data written after
    C{abortConnection} does not.
    """

    def write(self, data: bytes) -> None:
        if not self.disconnected:
            super().write(data)

    def writeSequence(self, data: Any) -> None:
        if not self.disconnected:
            super().writeSequence(data)

    def lose(self, protocol: Any, reason: Failure | None = None) -> None:
        """
        The connection is gone: stop the producer registered with the
        transport (the HTTP channel), then tell the protocol, as TCP
        transports do.
        """
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        protocol.connectionLost(reason or Failure(ConnectionDone("the client closed the connection")))


@implementer(ILogObserver)
class _Failures:
    """
    What is logged as a failure (a traceback) or an error: the log text and
    the traceback.
    """

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            failure = event.get("log_failure")
            text = formatEvent(event) or ""
            if isinstance(failure, Failure):
                text += "\n" + failure.getTraceback()
            self.seen.append(text)


@contextmanager
def _failures_logged() -> Iterator[list[str]]:
    """
    Collect what is logged as a failure while the block runs.
    """
    observer = _Failures()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer.seen
    finally:
        globalLogPublisher.removeObserver(observer)


_MARKUP = re.compile(rb"<\s*(html|head|body|title|!doctype|h1|p)\b", re.IGNORECASE)
_TRACEBACK = re.compile(rb"Traceback \(most recent call last\)|File \"[^\"]+\", line \d+")


def run_case(arena: Arena, case: Case) -> list[Response]:
    """
    Send C{case} on a new connection to the arena's site, read the answers,
    close the connection, and check every property of the module's
    docstring; the responses.

    @raise AssertionError: naming the property that failed.
    """
    server = arena.server
    started = time.perf_counter()
    transport = _Wire(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000), lenient=True)
    protocol = server.site.buildProtocol(transport.getPeer())
    assert protocol is not None
    wire = case.wire()
    with _failures_logged() as failures, _driven_producers(arena.ticks):
        protocol.makeConnection(transport)
        step = case.piece or len(wire) or 1
        for i in range(0, len(wire), step):
            if transport.disconnecting:
                break
            protocol.dataReceived(wire[i : i + step])
            arena.ticks.run()
        arena.ticks.run()
        output = transport.value()
        transport.lose(protocol)
        arena.ticks.run()
    arena.cases += 1
    arena.seconds += time.perf_counter() - started

    assert not failures, "the server logged a failure:\n" + "\n".join(failures)
    responses = parse_responses(output, case.method)
    for earlier in responses[:-1]:
        assert b"close" not in (earlier.header(b"connection") or b"").lower(), (
            f"more was sent after a {earlier.code} answer that closed the connection: {[r.code for r in responses]}"
        )
    for response in responses:
        arena.statuses[response.code] += 1
        check_response(arena, case, response)
    if responses:
        check_effects(arena, case, responses[0])
    left = os.listdir(server.layout.spool_dir())
    assert left == [], f"spool files left after the connection closed: {left}"
    timers = [call for call in server.reactor.getDelayedCalls() if call.active()]
    assert timers == [], f"timers left after the connection closed: {timers}"
    arena.check_surroundings()
    arena.replant()
    return responses


def check_response(arena: Arena, case: Case, response: Response) -> None:
    """
    The properties of every single response.
    """
    assert response.code < 500, f"a server error: {response.code} {response.body[:300]!r}"
    content_type = (response.header(b"content-type") or b"").lower()
    assert b"html" not in content_type, f"an HTML answer ({content_type!r}): {response.body[:300]!r}"
    assert not re.search(rb"^rclone/", response.header(b"server") or b""), "a Server: rclone header"
    for name in OUTSIDE_NAMES:
        assert name.encode() not in response.body, f"an answer names {name}, which is only outside the data root"
    # Stored objects hold whatever clients uploaded: only bodies the server
    # wrote itself are checked for markup and tracebacks.
    if content_type != b"application/octet-stream" and not content_type.startswith(b"multipart/byteranges"):
        assert not _MARKUP.search(response.body), f"markup in a {response.code} body: {response.body[:300]!r}"
        assert not _TRACEBACK.search(response.body), f"a traceback in a body: {response.body[:500]!r}"
    assert response.code not in (301, 302, 303, 307, 308), "a redirect"


def check_effects(arena: Arena, case: Case, response: Response) -> None:
    """
    What the first response says must match the disk: an acknowledged
    upload is a regular file named by its hash; a read returns the bytes on
    disk.
    """
    target = parse_path(case.target) if case.target.startswith(b"/") else None
    if target is None or target.kind is None or target.name is None:
        return
    layout = arena.server.layout
    if target.kind == "config":
        path = layout.config_path(target.repo)
    else:
        path = layout.object_path(target.repo, target.kind, target.name)
    if case.method == b"POST" and response.code == 200:
        assert not os.path.islink(path), f"an upload was acknowledged while {path} is a symlink"
        assert os.path.isfile(path), f"an upload was acknowledged but {path} is not a file"
        if arena.verify and target.kind != "config":
            with open(path, "rb") as f:
                assert name_of(f.read()) == target.name, f"{path} does not hash to its name"
    if case.method == b"GET" and response.code in (200, 206):
        content_type = response.header(b"content-type") or b""
        if content_type.startswith(b"multipart/"):
            return
        assert not os.path.islink(path), f"a read was answered from the symlink {path}"
        with open(path, "rb") as f:
            stored = f.read()
        if response.code == 200:
            assert response.body == stored, "a 200 read did not return the whole object"
            return
        content_range = response.header(b"content-range") or b""
        match = re.fullmatch(rb"bytes (\d+)-(\d+)/(\d+)", content_range)
        assert match, f"a 206 without a valid Content-Range: {content_range!r}"
        first, last, size = (int(g) for g in match.groups())
        assert size == len(stored) and first <= last < size, f"a wrong Content-Range {content_range!r}"
        assert response.body == stored[first : last + 1], "a 206 body is not the bytes on disk"


# -- the strategy -------------------------------------------------------------
#
# Hypothesis costs about 45 us per value drawn, far more than the server
# spends on a request, so a case is drawn in about a dozen values: one
# integer of flags for the shape, the path as a few bytes decoded by a small
# language (L{decode_path}), and a value for each header present. Every
# strategy is built once, here: strategies made inside a composite are
# validated again on every draw.

_TCHAR = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_METHODS = (b"GET", b"HEAD", b"POST", b"DELETE")
_ODD_METHODS = (b"PUT", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT", b"PROPFIND", b"get", b"Post", b"", b"GET\x00", b"G\xc3\xa9T")

#: Methods of odd requests: the four restic uses, others, and junk tokens.
odd_methods = st.one_of(
    st.sampled_from(_METHODS + _ODD_METHODS),
    st.text(_TCHAR, min_size=1, max_size=12).map(str.encode),
)

#: Segments that mean something to the server.
_KNOWN = (
    b"r", b"s", b"t", b"u", b"deep", b"nest", b"link", b"link2", b"newrepo", b"alice", b"bob",
    b"data", b"keys", b"locks", b"snapshots", b"index", b"config", b"ab", b"",
    b"-", b"healthy", b"ready", b"metrics", SPOOL_DIR.encode(),
)  # fmt: skip
#: Ways out of a directory, in every encoding that could decode to one.
ESCAPES = (
    b"..", b".", b"%2e%2e", b"%2E%2E", b".%2e", b"%2e.", b"%2e", b"...",
    b"..%2f", b"..%2F..%2F", b"%2f", b"%2F", b"%5c", b"..%5c..", b"..\\..", b"\\", b"\\\\",
    b"%00", b"\x00", b"..%00", b"%252e%252e", b"%252f", b"%c0%ae%c0%ae", b"%c0%af", b"%e0%80%ae",
    b"%ef%bc%8f", b"%ef%bc%8e%ef%bc%8e", b"\xef\xbc\x8e\xef\xbc\x8e", b"%u002e%u002e", b"..;", b";",
    b"%2e%2e%2f%2e%2e%2fetc%2fpasswd", b"~", b"~root", b"%7e", b"/", b"//", b"?", b"#",
    b"%", b"%g0", b"%2", b"%%32%65", b"\xff\xfe", b"\xc3\xa9", "\u202e".encode(), b"%e2%80%ae",
)  # fmt: skip
_NAME_BYTES = tuple(n.encode() for n in NAMES)
#: The segments L{decode_path} picks from by index.
SEGMENTS = _KNOWN + _NAME_BYTES + ESCAPES


def _percent_all(raw: bytes) -> bytes:
    return b"".join(b"%%%02X" % b for b in raw)


def _quote_odd(raw: bytes) -> bytes:
    return b"".join(bytes([b]) if 0x21 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b for b in raw)


def decode_path(code: bytes) -> bytes:
    """
    A path from a few bytes, so that one drawn value makes a whole path
    (and shrinking it makes a shorter, simpler one). Each byte C{b}:
      - C{b < len(SEGMENTS)}: the segment C{SEGMENTS[b]};
      - C{0xE0..0xEF}: the next C{b - 0xE0} bytes as a segment, those
        outside printable ASCII percent-encoded;
      - C{0xF7}: the next such segment as raw bytes;
      - C{0xF0}: the next segment percent-encoded byte by byte;
      - C{0xF1}: the next segment with its dots as C{%2e};
      - C{0xF2}: the next separator is C{%2F}; C{0xF3}: a backslash;
        C{0xF4}: C{//};
      - C{0xF5}: an overlong segment (100 times the next byte, at least 100);
      - C{0xF6}: the next segment three times over;
      - others: a trailing C{/}.
    """
    out = b""
    encode: Callable[[bytes], bytes] | None = None
    separator = b"/"
    times = 1
    raw = False
    i = 0
    while i < len(code):
        b = code[i]
        i += 1
        segment: bytes | None = None
        if b < len(SEGMENTS):
            segment = SEGMENTS[b]
        elif 0xE0 <= b <= 0xEF:
            segment = code[i : i + b - 0xE0]
            i += b - 0xE0
            if not raw:
                segment = _quote_odd(segment)
        elif b == 0xF7:
            raw = True
        elif b == 0xF0:
            encode = _percent_all
        elif b == 0xF1:
            encode = lambda s: s.replace(b".", b"%2e")  # noqa: E731
        elif b in (0xF2, 0xF3, 0xF4):
            separator = {0xF2: b"%2F", 0xF3: b"\\", 0xF4: b"//"}[b]
        elif b == 0xF5:
            segment = b"a" * (100 * max(1, code[i] if i < len(code) else 1))
            i += 1
        elif b == 0xF6:
            times = 3
        else:
            out += b"/"
        if segment is not None:
            segment = segment * times
            out += separator + (encode(segment) if encode else segment)
            encode, separator, times, raw = None, b"/", 1, False
    return out or b"/"


#: Paths restic itself sends, as bytes: repository, type, name, slash.
RESTIC_PATHS = tuple(
    b"/" + repo + kind + name + slash
    for repo in (b"", b"r/", b"s/", b"t/", b"u/", b"r/deep/", b"link/", b"link2/", b"r/nest/", b"newrepo/")
    for kind, name in [(b"", b""), (b"config", b"")]
    + [(k, n) for k in (b"data/", b"keys/", b"locks/", b"snapshots/", b"index/") for n in (b"",) + _NAME_BYTES]
    for slash in (b"", b"/")
)
_prefixes = (b"", b"", b"", b"", b"/", b"http://resticd.test", b"/.", b"/..")
_queries = (
    b"?create=true", b"?create=false", b"?create", b"?create=true&create=true", b"?CREATE=TRUE",
    b"?create=%74rue", b"?", b"?%00", b"??create=true", b"?create=true#frag", b"#x", b"?\xff",
)  # fmt: skip
_ODD_TARGETS = (b"*", b"", b"/" * 300, b"/r/keys/" + b"%2e" * 3000, b"resticd.test:80", b"/r/keys/ x", b"/r/keys/\tx")

#: Paths where something is: stored objects, planted symlinks, a nested
#: repository, the health endpoints.
HOT_PATHS = (
    b"/r/keys/" + name_of(STORED).encode(),
    *(b"/r/data/" + name_of(body).encode() for body in BODIES),
    b"/r/keys/" + KEYLINK.encode(),
    b"/r/locks/" + LOCKLINK.encode(),
    b"/t/data/" + AB_NAME.encode(),
    b"/t/data/",
    b"/u/index/",
    b"/s/config",
    b"/r/config",
    b"/link/config",
    b"/link/keys/",
    b"/r/nest/config",
    b"/r/deep/keys/",
    b"/-/healthy",
    b"/-/ready",
    b"/-/",
    b"/metrics",
)

#: Request targets: where something is, restic's own paths, decoded junk
#: paths, odd forms.
targets = st.one_of(
    st.sampled_from(HOT_PATHS),
    st.sampled_from(HOT_PATHS),
    st.sampled_from(RESTIC_PATHS),
    st.builds(lambda prefix, code: prefix + decode_path(code), st.sampled_from(_prefixes), st.binary(max_size=16)),
    st.builds(lambda path, query: path + query, st.sampled_from(RESTIC_PATHS), st.sampled_from(_queries)),
    st.sampled_from(_ODD_TARGETS),
)

_number = st.one_of(
    st.integers(-5, 300),
    st.sampled_from((2**31, 2**63, 2**64, 10**20, 10**40, -(10**20))),
).map(lambda n: str(n).encode())
_maybe_number = st.one_of(st.just(b""), _number)
_single_range = st.builds(lambda a, b: a + b"-" + b, _maybe_number, _maybe_number)
#: Range header values: restic's, absurd numbers, several ranges, junk.
_restic_range = st.builds(lambda first, length: b"bytes=%d-%d" % (first, first + length), st.integers(0, 300), st.integers(0, 300))
ranges = st.one_of(
    _restic_range,
    _restic_range,
    _restic_range,
    st.sampled_from(
        (b"bytes=0-", b"bytes=99999999999999999999-", b"bytes=0-99999999999999999999",
         b"bytes=-99999999999999999999", b"bytes=", b"bytes=-", b"bytes=--1", b"bits=0-1",
         b"bytes 0-1", b"bytes=0-0,-1", b"bytes=1-0", b"bytes=0x10-", b"bytes=\xff-", b"bytes=0-1,5-6")
    ),
    _single_range.map(lambda r: b"bytes=" + r),
    st.lists(_single_range, min_size=2, max_size=3).map(lambda rs: b"bytes=" + b",".join(rs)),
    st.binary(max_size=30),
)  # fmt: skip
#: Header values without CR or LF (those are framing, drawn on purpose elsewhere).
_header_value = st.binary(max_size=40).map(lambda v: v.replace(b"\r", b"").replace(b"\n", b""))
authorizations = st.one_of(
    st.sampled_from(tuple(basic(u, p).encode() for u, p in USERS.items())),
    st.sampled_from(
        (b"Basic Og==", b"Basic", b"Basic ", b"Basic !!!", b"Basic YWxpY2U=", b"Bearer abc",
           b"basic " + base64.b64encode(b"alice:alice-password"), basic("alice", "wrong").encode(),
           basic("alice", "alice-password" + "x" * 100).encode(), basic("../alice", "x").encode(),
           basic("alice\x00", "alice-password").encode())
    ),
    st.binary(max_size=60).map(lambda b: b"Basic " + base64.b64encode(b)),
    _header_value,
)  # fmt: skip
accepts = st.one_of(
    st.sampled_from((V2.encode(), b"application/vnd.x.restic.rest.v1", b"*/*", b"text/html", V2.encode() + b"; q=1")),
    _header_value,
)
bodies = st.one_of(
    st.sampled_from(BODIES + (SECRET, STORED, OUTSIDE_CONFIG)),
    st.binary(max_size=64),
    st.integers(MAX_BLOB - 2, MAX_BLOB + 2).map(lambda n: b"b" * n),
)
_bogus_lengths = st.sampled_from(
    (b"-1", b"+5", b"0x10", b"1e3", b"", b" ", b"5, 5", b"99999999999999999999999", b"%d" % (MAX_BLOB + 1),
     b"%d" % (1 << 40), b"\xff", b"5 5", b"00000000000000000000001", b" 5", b"5 ")
)  # fmt: skip
#: How the body relates to its Content-Length, by four bits of the shape.
_FRAMINGS = ("exact",) * 10 + ("none", "short", "long", "chunked", "bogus", "double")
_next_requests = st.sampled_from((b"garbage\r\n\r\n", b"GET /r/keys/ HTTP/1.1\r\n\r\n", b"\r\n", b"x", b"POST /r/keys/" + _NAME_BYTES[1] + b" HTTP/1.1\r\nContent-Length: 1\r\n\r\nx"))
_chunk_ends = st.sampled_from((b"0\r\n\r\n", b"", b"zz\r\n", b"0\r\nX-Trailer: 1\r\n\r\n", b"ffffffffffffffffff\r\n", b"-1\r\n"))
_transfer_encodings = st.sampled_from((b"chunked", b"gzip, chunked", b"Chunked", b"chunked, chunked", b"identity"))
_odd_headers = st.one_of(
    st.tuples(st.text(_TCHAR, min_size=1, max_size=20).map(str.encode), _header_value),
    st.tuples(st.binary(max_size=10), _header_value),
    st.sampled_from(
        ((b"X-Long", b"v" * 20000), (b" folded", b"x"), (b"X-Many", b"m" * 5000), (b"Expect", b"100-continue"),
         (b"Connection", b"close"), (b"Connection", b"Upgrade"), (b"Upgrade", b"h2c"), (b"Content-Type", b"text/html"),
         (b"Transfer-Encoding", b"chunked"), (b"Host", b"other.test"), (b"Content-Length", b"0"))
    ),
)  # fmt: skip
_odd_versions = (b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"http/1.1", b"", b"HTTP/1.1 junk", b"HTTP/0.9", b"HTTP/1.10")
_PIECES = (0, 0, 0, 0, 0, 1, 3, 64)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """
    One fuzzed request: method, target, headers (Host, Range,
    Content-Length in every relation to the body, Transfer-Encoding,
    Accept, Authorization, random and over-long ones), body, and what
    follows it on the connection. One in eight is odd (odd method, version,
    extra headers); the others are well-framed, so that the site's
    resources, not only the HTTP parser, see the junk.
    """
    shape = draw(st.integers(0, (1 << 24) - 1))

    def bits(at: int, width: int) -> int:
        return (shape >> at) & ((1 << width) - 1)

    odd = bits(0, 3) == 7
    method = draw(odd_methods) if odd else _METHODS[bits(3, 2)]
    target = draw(targets)
    headers: list[tuple[bytes, bytes]] = []
    if not (odd and bits(5, 1)):
        headers.append((b"Host", b"resticd.test"))
    if bits(6, 1):
        headers.append((b"Authorization", draw(authorizations)))
    if bits(7, 1):
        headers.append((b"Accept", draw(accepts)))
    if bits(8, 2) == 3 or (method == b"GET" and bits(8, 2)):
        headers.append((b"Range", draw(ranges)))
    body = draw(bodies) if method in (b"POST", b"PUT") or bits(10, 3) == 7 else b""
    trailer = b""
    framing = _FRAMINGS[bits(13, 4)]
    if framing == "exact":
        headers.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "short":
        # More declared than sent: the connection closes mid-body.
        headers.append((b"Content-Length", b"%d" % (len(body) + draw(st.integers(1, 10**6)))))
    elif framing == "long":
        # Less declared than sent: the rest is the next request.
        headers.append((b"Content-Length", b"%d" % (len(body) // 2)))
        trailer = draw(_next_requests)
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", draw(_transfer_encodings)))
        pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + draw(_chunk_ends)
        if bits(17, 1):
            headers.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "bogus":
        headers.append((b"Content-Length", draw(_bogus_lengths)))
    elif framing == "double":
        headers.append((b"Content-Length", b"%d" % len(body)))
        headers.append((b"Content-Length", b"%d" % (len(body) + bits(17, 1))))
    version = b"HTTP/1.1"
    if odd:
        for _ in range(bits(18, 2)):
            headers.append(draw(_odd_headers))
        if bits(20, 1):
            version = _odd_versions[bits(21, 3)]
    case = Case(method, target, tuple(headers), body, trailer, version, _PIECES[bits(21, 3)])
    if case.piece == 1 and len(case.wire()) > 500:
        case = Case(method, target, tuple(headers), body, trailer, version, 0)
    return case


# -- the fuzz tests -----------------------------------------------------------

#: Fuzz cases per variant per run; three variants make at least 20,000
#: (about 40 s: hypothesis spends some 1.5 ms drawing a case, the server
#: well under half a millisecond answering it).
EXAMPLES = int(os.environ.get("RESTICD_FUZZ_EXAMPLES", "7000"))


@pytest.fixture(scope="module")
def arenas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Arena]]:
    """
    One arena per variant, shared by the module's tests (each test that
    uses one starts with L{Arena.recover}); their case counts are printed at
    the end.
    """
    made = {variant: Arena.create(tmp_path_factory.mktemp(f"fuzz-{variant}"), variant) for variant in VARIANTS}
    yield made
    for a in made.values():
        rate = a.cases / a.seconds if a.seconds else 0.0
        print(f"\n{a.variant}: {a.cases} cases, {rate:.0f} cases/s of server time, answers {dict(sorted(a.statuses.items()))}")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fuzzed_requests_keep_every_property(arenas, variant):
    """
    Thousands of fuzzed requests per site configuration (open, with Basic
    authentication and an access file, unverified group-accessible uploads):
    none is answered with a 5xx, HTML or a traceback, none is cut short,
    none creates or changes a file outside the data root or follows a
    symlink planted inside it, acknowledged uploads are intact, and no
    spool file or timer outlives its connection. The fuzz must also reach
    the interesting answers (uploads, ranged reads, 413, 404, 400, 405,
    401 with authentication): a strategy that only produced garbage would
    pass vacuously.
    """
    arena = arenas[variant]
    arena.recover()
    started = time.perf_counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=os.environ.get("CI") == "true",
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases())
    def fuzz(case: Case) -> None:
        run_case(arena, case)

    fuzz()
    elapsed = time.perf_counter() - started
    print(f"\n{variant}: {arena.cases} cases in {elapsed:.1f} s ({arena.cases / elapsed:.0f}/s)")
    if EXAMPLES >= 1000:
        expected = {200, 400, 404, 405, 413}
        # Ranged reads need a read of a stored object; with authentication,
        # valid credentials too, which makes them rare.
        expected |= {401, 403} if variant == "auth" else {206}
        missing = expected - set(arena.statuses)
        assert not missing, f"the fuzz never got these answers: {sorted(missing)}; it got {dict(arena.statuses)}"


# -- concrete cases -----------------------------------------------------------


@pytest.fixture
def arena(arenas: dict[str, Arena]) -> Arena:
    """
    The open arena (no authentication, verified uploads), recovered from
    whatever the previous test did to it.
    """
    arenas["open"].recover()
    return arenas["open"]


@pytest.fixture
def unverified(arenas: dict[str, Arena]) -> Arena:
    """
    The arena whose uploads are not verified (any body under any name) and
    where repositories may be deleted: writes through the planted symlinks
    are reachable.
    """
    arenas["noverify"].recover()
    return arenas["noverify"]


def ask(arena: Arena, method: str, target: bytes | str, body: bytes = b"", *headers: tuple[str, str | bytes]) -> Response:
    """
    One well-framed request through L{run_case} (so every property is
    checked); its only response.
    """
    raw_target = target.encode() if isinstance(target, str) else target
    hdrs = [(b"Host", b"resticd.test")]
    hdrs += [(name.encode(), value if isinstance(value, bytes) else value.encode()) for name, value in headers]
    hdrs.append((b"Content-Length", b"%d" % len(body)))
    responses = run_case(arena, Case(method.encode(), raw_target, tuple(hdrs), body))
    assert len(responses) == 1, f"expected one answer, got {[r.code for r in responses]}"
    return responses[0]


#: Request targets that try to leave the data root (or reach a file outside
#: it by name), in every encoding: each must be refused or not found.
ESCAPE_TARGETS = (
    "/../outside/secret",
    "/%2e%2e/outside/secret",
    "/%2E%2E/outside/secret",
    "/.%2e/outside/secret",
    "/%2e./outside/secret",
    "/..%2foutside%2fsecret",
    "/..%2Foutside%2Fsecret",
    "/%2e%2e%2foutside%2fsecret",
    "/r/keys/..%2f..%2f..%2foutside%2fsecret",
    "/r/keys/%2e%2e/%2e%2e/%2e%2e/outside/secret",
    "/r/../../outside/config",
    "/r/%2e%2e/%2e%2e/outside/config",
    "/%252e%252e/outside/secret",
    "/%c0%ae%c0%ae/outside/secret",
    "/%e0%80%ae%e0%80%ae/outside/secret",
    "/%c0%af..%c0%afoutside/secret",
    "/..%5coutside%5csecret",
    "/..%5C..%5Coutside%5Cconfig",
    "/r/keys/..\\..\\..\\outside\\secret",
    "/%ef%bc%8e%ef%bc%8e/outside/secret",
    "/..%00/outside/secret",
    "/r%00/config",
    "/r/config%00",
    "/r/keys/" + KEYLINK + "%00",
    "//outside/secret",
    "/%2foutside/secret",
    "/link/config",
    "/link2/config",
    "/link/ab/" + AB_NAME,
    "/link/keys/",
    "/r/nest/config",
    "/u/index/",
    "/r/keys/" + KEYLINK,
    "/r/locks/" + LOCKLINK,
    "/s/config",
    "/t/data/" + AB_NAME,
    "http://resticd.test/../outside/secret",
    "/./../outside/secret",
    "/.spool/x",
)


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "DELETE"])
def test_path_escapes_are_refused_in_every_encoding(unverified, method):
    """
    Dot segments, encoded dots and slashes (single, double and overlong
    UTF-8), backslashes, NUL bytes, fullwidth dots, and paths through the
    symlinks planted inside the root: every one is answered with a 4xx by
    every method (or, for a listing through a symlink, an empty one), no
    answer carries what lies outside the root (its files' content or
    names), and nothing there is created, changed or removed (uploads are
    unverified here, so a write could only fail for being outside).
    """
    for target in ESCAPE_TARGETS:
        if method == "POST" and target == "/r/keys/" + KEYLINK:
            continue  # test_upload_onto_a_symlinked_name_is_not_acknowledged
        body = SECRET if method == "POST" else b""
        reply = ask(unverified, method, target, body, ("Range", "bytes=0-"), ("Accept", V2))
        assert SECRET not in reply.body and OUTSIDE_CONFIG not in reply.body, f"{method} {target} read outside"
        if reply.code == 200 and method in ("GET", "HEAD") and target.endswith("/"):
            # A listing that does not follow the link: empty.
            assert reply.body in (b"[]", b""), f"{method} {target}: {reply.body[:200]!r}"
            continue
        assert 400 <= reply.code < 500, f"{method} {target}: {reply.code}"


def test_symlinked_repository_cannot_be_created_or_deleted(unverified):
    """
    A repository path that is a symlink out of the root (or leads through
    one) cannot be created, nor deleted: 4xx, and the outside directory is
    untouched.
    """
    for target in ("/link/?create=true", "/link2/?create=true", "/r/nest/?create=true", "/link/sub/?create=true"):
        assert 400 <= ask(unverified, "POST", target).code < 500, target
    for target in ("/link/", "/link2/", "/r/nest/"):
        assert 400 <= ask(unverified, "DELETE", target).code < 500, target


def test_upload_onto_a_symlinked_name_is_not_acknowledged(arena):
    """
    An object name taken by a symlink that points out of the root is not
    "already stored": an upload under that name, even of the very bytes the
    outside file holds (so that it verifies), must not be answered 200, since
    the object could never be read back (reads do not follow the link).
    """
    reply = ask(arena, "POST", "/r/keys/" + KEYLINK, SECRET)
    assert reply.code != 200, "the upload was acknowledged, but GET of it answers " + str(
        ask(arena, "GET", "/r/keys/" + KEYLINK, b"", ("Range", "bytes=0-")).code
    )


def test_listing_skips_a_symlinked_fanout_directory(arena):
    """
    A data fan-out directory (C{data/ab/}) that is a symlink out of the root
    is not followed by a listing: the listing still completes (200, valid
    JSON) without the outside entries, and no failure is logged.
    """
    reply = ask(arena, "GET", "/t/data/", b"", ("Accept", V2))
    assert reply.code == 200
    assert AB_NAME.encode() not in reply.body
    assert isinstance(json.loads(reply.body), list)


def test_repository_delete_with_a_symlinked_type_directory(unverified):
    """
    Deleting a repository (allowed here) whose C{index/} is a symlink out of
    the root neither follows the link nor fails with a server error: the
    answer is 200 or a 4xx, and the outside directory is untouched.
    """
    reply = ask(unverified, "DELETE", "/u/")
    assert reply.code < 500


@pytest.mark.parametrize(
    "target",
    [
        "/r/keys/" + "0" * 65,
        "/r/keys/" + "0" * 63,
        "/r/keys/" + "0" * 640,
        "/r/data/" + "ab" * 2500,
        "/" + "a" * 129 + "/config",
        "/" + "a" * 5000 + "/keys/",
        "/r/" + "b" * 200 + "/config",
        "/r/" + "%41" * 3000 + "/config",
        "/" + "/".join(["r"] * 1000),
    ],
)
def test_overlong_names_are_4xx(arena, target):
    """
    Over-long object names, repository names and paths (up to 8 KiB) are
    answered with a 4xx, for reads and writes alike.
    """
    for method in ("GET", "HEAD", "POST", "DELETE"):
        reply = ask(arena, method, target, b"x" if method == "POST" else b"")
        assert 400 <= reply.code < 500, f"{method} {target[:40]}...: {reply.code}"


def test_overlong_lines_are_answered_4xx(arena):
    """
    A request line or a header line longer than the server accepts (20,000
    bytes: a path, a random header, an Authorization header) is answered
    with a 4xx (414, 431 or 400) before the connection is closed, rather
    than dropped without an answer (which a client reports as a network
    error and retries).
    """
    host = (b"Host", b"resticd.test")
    dropped = []
    for what, case in (
        ("a 20,000-byte request line", Case(b"GET", b"/r/keys/" + b"a" * 20000, (host,))),
        ("a 20,000-byte header line", Case(b"GET", b"/r/keys/", (host, (b"X-Long", b"v" * 20000)))),
        ("a 20,000-byte Authorization", Case(b"GET", b"/r/keys/", (host, (b"Authorization", b"Basic " + b"A" * 20000)))),
    ):
        responses = run_case(arena, case)
        if not responses:
            dropped.append(what)
        else:
            assert 400 <= responses[0].code < 500, f"{what}: {responses[0].code}"
    assert not dropped, f"closed without an answer: {dropped}"


def test_too_many_headers_are_answered_4xx(arena):
    """
    Too many headers, or too many bytes of them, get a 4xx answer.
    """
    host = (b"Host", b"resticd.test")
    for headers in (tuple((b"X-%d" % i, b"v" * 100) for i in range(300)), tuple((b"X-%d" % i, b"v") for i in range(600))):
        responses = run_case(arena, Case(b"GET", b"/r/keys/", (host, *headers)))
        assert responses and 400 <= responses[0].code < 500


_STORED_NAME = name_of(STORED)
_SIZE = len(STORED)


#: What may answer a Range: the whole object (200: the header ignored),
#: unsatisfiable (416), or one range (206, first, last).
WHOLE = (200, 0, _SIZE - 1)
UNSATISFIABLE = (416, None, None)


@pytest.mark.parametrize(
    "value, answers",
    [
        # restic's own ranges
        ("bytes=0-", [(206, 0, _SIZE - 1)]),
        ("bytes=10-19", [(206, 10, 19)]),
        # an end beyond the end is clipped
        ("bytes=0-99999999999999999999", [(206, 0, _SIZE - 1)]),
        ("bytes=10-18446744073709551616", [(206, 10, _SIZE - 1)]),
        # a start beyond the end is unsatisfiable
        ("bytes=99999999999999999999-", [UNSATISFIABLE]),
        ("bytes=18446744073709551616-18446744073709551617", [UNSATISFIABLE]),
        (f"bytes={_SIZE}-", [UNSATISFIABLE]),
        ("bytes=-0", [UNSATISFIABLE]),
        # suffix ranges: the last N bytes, the whole object when N is larger
        ("bytes=-10", [(206, _SIZE - 10, _SIZE - 1)]),
        (f"bytes=-{_SIZE + 1}", [(206, 0, _SIZE - 1)]),
        ("bytes=-99999999999999999999", [(206, 0, _SIZE - 1)]),
        # malformed: ignored (RFC 9110), or refused as unsatisfiable
        ("bytes=5-1", [WHOLE, UNSATISFIABLE]),
        ("bytes=--1", [WHOLE, UNSATISFIABLE]),
        ("bytes=a-b", [WHOLE, UNSATISFIABLE]),
        ("bits=0-1", [WHOLE]),
        # several ranges, none of them satisfiable: 416, or ignored
        ("bytes=1000-2000,3000-", [UNSATISFIABLE, WHOLE]),
        ("bytes=-0,99999999999999999999-", [UNSATISFIABLE, WHOLE]),
    ],
)
def test_absurd_ranges(arena, value, answers):
    """
    Absurd Range values on a stored object get a well-formed answer, never a
    5xx: clipped (206 with the exact bytes and C{Content-Range}),
    unsatisfiable (416 with C{Content-Range: bytes */SIZE}), or ignored
    (200 with the whole object), whichever the standard allows.
    """
    reply = ask(arena, "GET", "/r/keys/" + _STORED_NAME, b"", ("Range", value))
    assert reply.code in [code for code, _, _ in answers], f"Range: {value}: {reply.code} {reply.body[:100]!r}"
    code, first, last = next(answer for answer in answers if answer[0] == reply.code)
    if code == 416:
        assert reply.header(b"content-range") == b"bytes */%d" % _SIZE
        return
    assert first is not None and last is not None
    assert reply.body == STORED[first : last + 1]
    if code == 206:
        assert reply.header(b"content-range") == b"bytes %d-%d/%d" % (first, last, _SIZE)


def test_range_that_is_not_utf8_is_ignored(arena):
    """
    A Range header that is not even text is ignored like any malformed one
    (200, the whole object), not a server error.
    """
    for value in (b"\xff", b"bytes=\xff-", b"bytes=0-\xed\xa0\x80"):
        reply = ask(arena, "GET", "/r/keys/" + _STORED_NAME, b"", ("Range", value))
        assert (reply.code, reply.body) == (200, STORED), value


def test_content_length_above_max_blob_size_is_413_before_the_body(tmp_path):
    """
    With the default C{--max-blob-size} (1 GiB), an upload declaring one
    byte more is answered 413 as soon as its headers are in, before any of
    its body is sent; the connection is closed and nothing is spooled. One
    declaring exactly 1 GiB is not refused: the server waits for its body.
    """
    server = make_server(str(tmp_path / "data"))
    name = "0" * 64
    for declared, refused in ((1 << 30) + 1, True), (1 << 30, False), (10**30, True):
        transport = _Wire(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000), lenient=True)
        protocol = server.site.buildProtocol(transport.getPeer())
        assert protocol is not None
        protocol.makeConnection(transport)
        protocol.dataReceived(b"POST /r/data/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (name.encode(), declared))
        if refused:
            assert transport.value().startswith(b"HTTP/1.1 413 "), (declared, transport.value()[:100])
            assert transport.disconnecting, "the connection stays open after a 413"
            assert server.spool_files() == []
        else:
            assert transport.value() == b"" and not transport.disconnecting
        transport.lose(protocol)
        assert server.spool_files() == []


def test_body_growing_past_max_blob_size_is_413_and_discarded(arena):
    """
    A chunked body (no Content-Length to refuse up front) that grows past
    C{--max-blob-size} is answered 413 once it does, exactly once, and its
    spool file is removed.
    """
    body = b"x" * (MAX_BLOB + 1)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    case = Case(b"POST", b"/r/keys/" + name_of(body).encode(), ((b"Host", b"x"), (b"Transfer-Encoding", b"chunked")), chunked)
    responses = run_case(arena, case)
    assert [r.code for r in responses] == [413]


def test_head_refused_for_its_size_has_no_body(arena):
    """
    A HEAD request declaring a body over C{--max-blob-size} is answered 413
    without a body (a HEAD answer never has one: the bytes would be taken
    for the next answer).
    """
    responses = run_case(arena, Case(b"HEAD", b"/r/keys/", ((b"Host", b"x"), (b"Content-Length", b"%d" % (MAX_BLOB + 1)))))
    assert [r.code for r in responses] == [413]


def test_health_endpoints_refuse_other_methods_in_plain_text(arena):
    """
    The health endpoints answer methods other than GET and HEAD with a
    plain-text 405, like the rest of the API: not Twisted's HTML pages, and
    never 501.
    """
    answers = {}
    for path in ("/-/healthy", "/-/ready"):
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"):
            try:
                answers[f"{method} {path}"] = ask(arena, method, path).code
            except AssertionError as e:
                answers[f"{method} {path}"] = str(e).split(":")[0]  # type: ignore[assignment]
                arena.recover()
    assert set(answers.values()) == {405}, answers


def test_the_checks_catch_what_they_are_for(arena):
    """
    The properties the fuzz relies on can fail: a file changed outside the
    root, a spool file left behind, a 5xx, HTML and a cut-short body are
    each reported.
    """
    (arena.base / "outside" / "secret").write_bytes(b"changed")
    with pytest.raises(AssertionError, match="outside the data root"):
        ask(arena, "GET", "/r/keys/")
    (arena.base / "outside" / "secret").write_bytes(SECRET)
    arena._snapshot = arena.surroundings()
    leftover = Path(arena.server.layout.spool_dir()) / "upload-leftover"
    leftover.write_bytes(b"x")
    with pytest.raises(AssertionError, match="spool files left"):
        ask(arena, "GET", "/r/keys/")
    leftover.unlink()
    case = Case(b"GET", b"/")
    with pytest.raises(AssertionError, match="server error"):
        check_response(arena, case, Response(500, {}, b"internal server error"))
    with pytest.raises(AssertionError, match="HTML"):
        check_response(arena, case, Response(404, {b"content-type": [b"text/html"]}, b""))
    with pytest.raises(AssertionError, match="markup"):
        check_response(arena, case, Response(404, {}, b"<html><body>no</body></html>"))
    with pytest.raises(AssertionError, match="cut short"):
        parse_responses(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", b"GET")
