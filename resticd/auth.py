"""
HTTP Basic authentication against an htpasswd file.

The file may hold bcrypt (C{$2y$}, htpasswd -B), Apache MD5 (C{$apr1$}),
SHA-crypt (C{$5$}, C{$6$}) and C{{SHA}} entries. Verified credentials are
cached for a short while, so a backup does not pay bcrypt on every request;
the cache is emptied whenever the file is reloaded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from passlib.context import CryptContext
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from .logs import logger
from twisted.web import resource, util
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import implementer

from .errors import ResticdError, error_body
from .threads import Runner

log = logger(__name__)

#: The schemes accepted in an htpasswd file; anything else (plaintext) is not.
HASHES = CryptContext(
    schemes=["bcrypt", "apr_md5_crypt", "sha256_crypt", "sha512_crypt", "ldap_sha1"]
)


def parse_basic(header: bytes | None) -> tuple[str, str] | None:
    """
    The user name and password of an C{Authorization: Basic} header, or
    L{None} when there is none, it is malformed, or its user name is empty
    (restic's C{Og==} when it has no credentials).
    """
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    if not colon or not user:
        return None
    return user, password


def parse_htpasswd(text: str) -> tuple[dict[str, str], list[str]]:
    """
    The entries of an htpasswd file, and a warning for every line skipped
    (unsupported schemes such as plaintext, malformed lines).
    """
    entries: dict[str, str] = {}
    warnings: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, hashed = line.partition(":")
        if not colon or not user:
            warnings.append(f"line {number}: not of the form user:hash")
            continue
        if HASHES.identify(hashed, required=False) is None:
            warnings.append(f"line {number}: user {user!r}: unsupported or plaintext password, skipped")
            continue
        entries[user] = hashed
    return entries, warnings


class Htpasswd:
    """
    The users of one htpasswd file, re-read when the file changes.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.entries: dict[str, str] = {}
        self._signature: tuple[int, int, int] | None = None

    def refresh(self) -> bool:
        """
        Re-read the file if it changed since the last read; whether it did
        (blocking). A failed read raises and keeps the previous entries.
        """
        st = os.stat(self.path)
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if signature == self._signature:
            return False
        with open(self.path, encoding="utf-8") as f:
            entries, warnings = parse_htpasswd(f.read())
        for warning in warnings:
            log.warn("{path}: {warning}", path=self.path, warning=warning)
        self.entries = entries
        self._signature = signature
        log.info("loaded {count} users from {path}", count=len(entries), path=self.path)
        return True

    def verify(self, user: str, password: str) -> bool:
        """
        Whether C{password} is C{user}'s (blocking: bcrypt is slow on purpose).
        """
        hashed = self.entries.get(user)
        if hashed is None:
            return False
        return bool(HASHES.verify(password, hashed))


@dataclass
class Authenticator:
    """
    Checks credentials against an L{Htpasswd}, with a cache of verified ones
    that expires after C{ttl} seconds and on every reload.
    """

    htpasswd: Htpasswd
    run: Runner
    clock: IReactorTime
    ttl: float = 300.0

    def __post_init__(self) -> None:
        self._cache: dict[tuple[str, bytes], float] = {}

    @staticmethod
    def _key(user: str, password: str) -> tuple[str, bytes]:
        return user, hashlib.sha256(f"{user}:{password}".encode()).digest()

    def cached(self, user: str, password: str) -> bool:
        """
        Whether these credentials were verified recently.
        """
        key = self._key(user, password)
        expires = self._cache.get(key)
        if expires is None:
            return False
        if expires <= self.clock.seconds():
            del self._cache[key]
            return False
        return True

    async def check(self, user: str, password: str) -> bool:
        """
        Whether the credentials are valid, verifying them in the thread pool
        unless cached.
        """
        if self.cached(user, password):
            return True
        ok = await self.run(self.htpasswd.verify, user, password)
        if ok:
            now = self.clock.seconds()
            self._cache = {k: t for k, t in self._cache.items() if t > now}
            self._cache[self._key(user, password)] = now + self.ttl
        return ok

    async def reload(self) -> None:
        """
        Re-read the htpasswd file in the thread pool if it changed, and then
        forget every cached credential. A failed re-read keeps the old users.
        """
        try:
            changed = await self.run(self.htpasswd.refresh)
        except (OSError, ValueError) as e:
            log.error("cannot reload {path}: {why}; keeping the previous users", path=self.htpasswd.path, why=e)
            return
        if changed:
            self._cache.clear()


class Unauthorized(ResticdError):
    """No valid credentials."""

    status = 401


class UnauthorizedResource(resource.Resource):
    """
    401 with a Basic challenge, for any method and path.
    """

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        request.setHeader(b"www-authenticate", b'Basic realm="restic"')
        return error_body(request, Unauthorized("authentication required"))


@implementer(IResource)
class AuthGate:
    """
    Lets requests with valid Basic credentials through to the tree made for
    their user by C{tree_for}; answers the others 401.

    It consumes no path segment: it is transparent to the tree below.
    """

    isLeaf = False

    def __init__(self, authenticator: Authenticator, tree_for: Callable[[str], IResource]) -> None:
        self.authenticator = authenticator
        self.tree_for = tree_for

    def getChildWithDefault(self, path: bytes, request: IRequest) -> IResource:
        request.postpath.insert(0, request.prepath.pop())
        return self._gate(request)

    def render(self, request: IRequest) -> bytes | int:
        return self._gate(request).render(request)  # type: ignore[no-any-return]

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError("the tree is made per user")

    def _gate(self, request: IRequest) -> IResource:
        credentials = parse_basic(request.getHeader(b"authorization"))
        if credentials is None:
            return UnauthorizedResource()
        user, password = credentials
        if self.authenticator.cached(user, password):
            return self.tree_for(user)
        checked = Deferred.fromCoroutine(self.authenticator.check(user, password))

        def decide(ok: bool) -> IResource:
            if ok:
                return self.tree_for(user)
            log.warn(
                "authentication failed for user {user} from {client}",
                user=user,
                client=request.getClientAddress(),
            )
            return UnauthorizedResource()

        return util.DeferredResource(checked.addCallback(decide))
