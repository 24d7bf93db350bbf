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
import functools
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from .logs import client_host, logger
from twisted.web import util
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import implementer

from .errors import (
    BadRequest,
    ErrorResource,
    Forbidden,
    ResticdError,
    TooManyRequests,
    Unauthorized,
)
from .threads import Runner

log = logger(__name__)

#: bcrypt reads at most this many bytes of a password.
BCRYPT_MAX_PASSWORD = 72

if TYPE_CHECKING:
    from passlib.context import CryptContext


@functools.cache
def hashes() -> CryptContext:
    """
    The schemes accepted in an htpasswd file; anything else (plaintext) is
    not. (passlib is loaded only when there is an htpasswd file.)
    """
    from passlib.context import CryptContext

    return CryptContext(schemes=["bcrypt", "apr_md5_crypt", "sha256_crypt", "sha512_crypt", "ldap_sha1"])


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
        if hashes().identify(hashed, required=False) is None:
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
        # A version that fails to load is reported once, not at every check.
        self._signature = signature
        with open(self.path, encoding="utf-8") as f:
            entries, warnings = parse_htpasswd(f.read())
        for warning in warnings:
            log.warn("{path}: {warning}", path=self.path, warning=warning)
        self.entries = entries
        log.info("loaded {count} users from {path}", count=len(entries), path=self.path)
        return True

    def verify(self, user: str, password: str) -> bool:
        """
        Whether C{password} is C{user}'s (blocking: bcrypt is slow on purpose).
        """
        hashed = self.entries.get(user)
        if hashed is None:
            return False
        secret = password.encode("utf-8")
        if hashes().identify(hashed) == "bcrypt":
            # bcrypt uses the first 72 bytes, as Apache's htpasswd does when
            # it makes the hash (the bcrypt library refuses longer ones).
            secret = secret[:BCRYPT_MAX_PASSWORD]
        try:
            return bool(hashes().verify(secret, hashed))
        except ValueError:
            return False


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


#: User names from a proxy header or a certificate: what htpasswd allows in a
#: name that is also safe in logs and as a repository name.
_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@-]{0,127}\Z")


def is_valid_user_name(name: str) -> bool:
    """
    Whether C{name} may name a user taken from a proxy header or a client
    certificate.
    """
    return _USER_NAME.match(name) is not None


def peer_common_name(request: IRequest) -> str | None:
    """
    The subject common name of the client's TLS certificate, if it sent one.
    """
    channel = request.channel  # type: ignore[attr-defined]
    # An HTTP/1.1 channel has the TLS transport; an HTTP/2 stream reaches it
    # through its connection.
    transport = getattr(channel, "transport", None) or getattr(getattr(channel, "_conn", None), "transport", None)
    get_certificate = getattr(transport, "getPeerCertificate", None)
    if get_certificate is None:
        return None
    certificate = get_certificate()
    if certificate is None:
        return None
    from cryptography.x509.oid import NameOID

    names = certificate.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


@dataclass
class Throttle:
    """
    Counts failed logins per client address; after C{limit} failures within
    C{window} seconds, the address is refused for C{backoff} seconds.
    """

    clock: IReactorTime
    limit: int = 10
    window: float = 60.0
    backoff: float = 300.0

    def __post_init__(self) -> None:
        self._failures: dict[str, list[float]] = {}
        self._blocked: dict[str, float] = {}

    def blocked(self, client: str) -> float | None:
        """
        Seconds until C{client} may try again, or L{None} if it may now.
        """
        until = self._blocked.get(client)
        if until is None:
            return None
        left = until - self.clock.seconds()
        if left <= 0:
            del self._blocked[client]
            return None
        return left

    def failed(self, client: str) -> bool:
        """
        Count one failure; whether C{client} is now blocked.
        """
        now = self.clock.seconds()
        recent = [t for t in self._failures.get(client, []) if t > now - self.window]
        recent.append(now)
        if len(recent) >= self.limit:
            self._failures.pop(client, None)
            self._blocked[client] = now + self.backoff
            if len(self._blocked) > 100_000:
                self._blocked = {c: t for c, t in self._blocked.items() if t > now}
            return True
        self._failures[client] = recent
        if len(self._failures) > 100_000:
            self._failures = {c: ts for c, ts in self._failures.items() if ts[-1] > now - self.window}
        return False


@implementer(IResource)
class AuthGate:
    """
    Finds out who sends a request and lets it through to the tree made for
    that user by C{tree_for}; answers the others 401 (or 429 while their
    address is throttled).

    The user comes from a reverse proxy's header (C{proxy_header}), or from
    HTTP Basic credentials checked by C{authenticator}, or from the client
    certificate's common name (C{client_cert}). With both credentials and a
    client certificate, the two must name the same user.

    It consumes no path segment: it is transparent to the tree below.
    """

    isLeaf = False

    def __init__(
        self,
        tree_for: Callable[[str | None], IResource],
        authenticator: Authenticator | None = None,
        proxy_header: bytes | None = None,
        client_cert: bool = False,
        throttle: Throttle | None = None,
    ) -> None:
        self.tree_for = tree_for
        self.authenticator = authenticator
        self.proxy_header = proxy_header
        self.client_cert = client_cert
        self.throttle = throttle

    def getChildWithDefault(self, path: bytes, request: IRequest) -> IResource:
        request.postpath.insert(0, request.prepath.pop())
        return self._gate(request)

    def render(self, request: IRequest) -> bytes | int:
        return self._gate(request).render(request)  # type: ignore[no-any-return]

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError("the tree is made per user")

    @staticmethod
    def _refuse(request: IRequest, error: ResticdError, reason: str, user: str | None = None) -> IResource:
        """
        Refuse C{request}, noting why authentication failed (the refusal is
        logged and counted when the request ends).
        """
        outcome = getattr(request, "outcome", None)
        if outcome is not None:
            outcome.auth_failure = reason
            outcome.user = user
        return ErrorResource(error)

    def _let_in(self, request: IRequest, user: str | None) -> IResource:
        outcome = getattr(request, "outcome", None)
        if outcome is not None:
            outcome.user = user
        return self.tree_for(user)

    def _gate(self, request: IRequest) -> IResource:
        client = client_host(request)
        if self.throttle is not None:
            wait = self.throttle.blocked(client)
            if wait is not None:
                return self._refuse(request, TooManyRequests(wait), "throttled")
        if self.proxy_header is not None:
            raw = request.getHeader(self.proxy_header)
            if not raw:
                return self._refuse(request, Unauthorized(), "missing")
            name = raw.decode("utf-8", "replace")
            if not is_valid_user_name(name):
                return self._refuse(request, BadRequest("invalid user name in the proxy's header"), "proxy_header")
            return self._let_in(request, name)
        cert_user = peer_common_name(request) if self.client_cert else None
        if self.client_cert and (cert_user is None or not is_valid_user_name(cert_user)):
            return self._refuse(request, Forbidden("a client certificate naming a user is required"), "certificate")
        if self.authenticator is None:
            return self._let_in(request, cert_user)
        credentials = parse_basic(request.getHeader(b"authorization"))
        if credentials is None:
            return self._refuse(request, Unauthorized(), "missing")
        user, password = credentials
        if cert_user is not None and cert_user != user:
            return self._refuse(
                request, Forbidden(f"the client certificate is for {cert_user}, not this user"), "certificate", user
            )
        if self.authenticator.cached(user, password):
            return self._let_in(request, user)
        checked = Deferred.fromCoroutine(self.authenticator.check(user, password))

        def decide(ok: bool) -> IResource:
            if ok:
                return self._let_in(request, user)
            if self.throttle is not None and self.throttle.failed(client):
                log.warn(
                    "blocking {client} for {seconds} s after repeated failed logins",
                    client=client,
                    seconds=self.throttle.backoff,
                )
            return self._refuse(request, Unauthorized("wrong user name or password"), "password", user)

        return util.DeferredResource(checked.addCallback(decide))
