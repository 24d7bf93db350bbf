"""
Storage usage and quotas.

L{Usage} keeps the bytes and object counts of every repository and type,
counted once at startup and then kept up to date by every upload and delete.
L{Quota} checks uploads against the limits that apply to a repository (the
whole data directory, its owner, the repository itself) and holds the bytes
of uploads in flight as reservations, so concurrent uploads cannot overshoot
a limit together.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, succeed

from .errors import InsufficientStorage
from .paths import HASHED_TYPES, MAX_REPO_DEPTH, Repo, Target, is_repo_segment, repo_label
from .store import Store

#: Where a limit applies: the whole data directory, one user's repositories
#: (those below C{/<user>/}), or one repository.
Scope = tuple[str, ...]
ALL: Scope = ("all",)


def scopes_of(repo: Repo) -> list[Scope]:
    """
    Every scope an object of C{repo} counts in.
    """
    scopes = [ALL, ("repo", *repo)]
    if repo:
        scopes.append(("user", repo[0]))
    return scopes


@dataclass
class Counts:
    """
    Bytes and number of objects.
    """

    bytes: int = 0
    objects: int = 0


class Usage:
    """
    Stored bytes and object counts per repository and object type (C{config}
    included), with running totals per L{Scope}.
    """

    def __init__(self) -> None:
        self.repos: dict[Repo, dict[str, Counts]] = {}
        self._totals: dict[Scope, int] = {}
        #: When each repository was last written to, and got its last snapshot
        #: (Unix time).
        self.last_write: dict[Repo, float] = {}
        self.last_snapshot: dict[Repo, float] = {}

    def _count(self, repo: Repo, size: int) -> None:
        for scope in scopes_of(repo):
            self._totals[scope] = self._totals.get(scope, 0) + size

    def touch(self, repo: Repo, kind: str, when: float) -> None:
        """
        The repository was written to at C{when} (a snapshot, for kind
        C{snapshots}).
        """
        if when > self.last_write.get(repo, 0.0):
            self.last_write[repo] = when
        if kind == "snapshots" and when > self.last_snapshot.get(repo, 0.0):
            self.last_snapshot[repo] = when

    def add(self, repo: Repo, kind: str, size: int, when: float | None = None) -> None:
        """
        One object of C{size} bytes was stored (at C{when}, if given).
        """
        counts = self.repos.setdefault(repo, {}).setdefault(kind, Counts())
        counts.bytes += size
        counts.objects += 1
        self._count(repo, size)
        if when is not None:
            self.touch(repo, kind, when)

    def remove(self, repo: Repo, kind: str, size: int, when: float | None = None) -> None:
        """
        One object of C{size} bytes was deleted (at C{when}, if given: a
        write, never a new snapshot).
        """
        if when is not None:
            self.touch(repo, "", when)
        counts = self.repos.get(repo, {}).get(kind)
        if counts is None or counts.objects == 0:
            return
        size = min(size, counts.bytes)
        counts.bytes -= size
        counts.objects -= 1
        self._count(repo, -size)

    def drop(self, repo: Repo) -> None:
        """
        The whole repository was deleted.
        """
        self._count(repo, -self.repo_bytes(repo))
        self.repos.pop(repo, None)
        self.last_write.pop(repo, None)
        self.last_snapshot.pop(repo, None)

    def load(self, other: Usage) -> None:
        """
        Take over the counts of C{other} (a fresh tally).
        """
        self.repos = other.repos
        self._totals = other._totals
        self.last_write = other.last_write
        self.last_snapshot = other.last_snapshot

    def repo_bytes(self, repo: Repo) -> int:
        """
        The bytes stored in one repository.
        """
        return sum(c.bytes for c in self.repos.get(repo, {}).values())

    def scope_bytes(self, scope: Scope) -> int:
        """
        The bytes stored in one scope.
        """
        return self._totals.get(scope, 0)


class Gate:
    """
    Open or closed; L{wait} fires once it is open.
    """

    def __init__(self, opened: bool = True) -> None:
        self.opened = opened
        self._waiting: list[Deferred[None]] = []

    def open(self) -> None:
        self.opened = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def close(self) -> None:
        self.opened = False

    def wait(self) -> Deferred[None]:
        """
        A Deferred that fires when the gate is open (at once if it is).
        """
        if self.opened:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d


def find_repos(root: str) -> Iterator[Repo]:
    """
    The repositories below C{root} (blocking): directories up to the nesting
    limit with a valid name that hold a config or a type directory.
    """

    def walk(repo: Repo) -> Iterator[Repo]:
        path = os.path.join(root, *repo)
        try:
            names = os.listdir(path)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        if "config" in names or any(kind in names for kind in HASHED_TYPES):
            yield repo
        if len(repo) < MAX_REPO_DEPTH:
            for name in sorted(names):
                if is_repo_segment(name) and os.path.isdir(os.path.join(path, name)):
                    yield from walk((*repo, name))

    yield from walk(())


def tally(store: Store) -> Usage:
    """
    Count what is stored under the data directory (blocking: run it in the
    thread pool).
    """
    usage = Usage()
    for repo in find_repos(store.layout.root):
        usage.repos.setdefault(repo, {})
        for kind in HASHED_TYPES:
            for directory in store.list_dirs(repo, kind):
                for _, size in store.list_dir(directory):
                    usage.add(repo, kind, size)
                # A directory's mtime is when an entry was last added or
                # removed: the last write to it.
                try:
                    usage.touch(repo, "", os.stat(directory).st_mtime)
                except FileNotFoundError:
                    pass
        for name, _ in store.list_dir(store.layout.type_dir(repo, "snapshots")):
            try:
                usage.touch(repo, "snapshots", os.stat(store.layout.object_path(repo, "snapshots", name)).st_mtime)
            except FileNotFoundError:
                pass
        try:
            st = os.stat(store.layout.config_path(repo))
        except FileNotFoundError:
            pass
        else:
            usage.add(repo, "config", st.st_size, st.st_mtime)
    return usage


class Reservation:
    """
    Bytes of one authorized upload, held against every scope its repository
    counts in; released when the upload ends, however it ends.
    """

    def __init__(self, quota: Quota, repo: Repo) -> None:
        self.quota = quota
        self.scopes = scopes_of(repo)
        self.bytes = 0

    def release(self) -> None:
        """
        Let go of everything held (idempotent).
        """
        self.quota.free(self)


@dataclass
class Limits:
    """
    The limits in force: for the whole data directory, per user (their
    repositories below C{/<user>/}) and per repository.
    """

    total: int | None = None
    users: dict[str, int] = field(default_factory=dict)
    repo: Callable[[Repo], int | None] = lambda repo: None

    def of(self, scope: Scope) -> int | None:
        """
        The limit of one scope, if any.
        """
        if scope == ALL:
            return self.total
        if scope[0] == "user":
            return self.users.get(scope[1])
        return self.repo(scope[1:])


class Quota:
    """
    Checks uploads against L{Limits} using a L{Usage} and the reservations of
    uploads in flight.

    While a body arrives (from a client not yet authenticated), it is only
    checked; once the request is authorized, its bytes are reserved until it
    ends, so that concurrent uploads cannot overshoot a limit together. An
    upload whose object is already stored (C{stored}) adds nothing and is
    never refused for space.
    """

    def __init__(
        self,
        usage: Usage,
        limits: Callable[[], Limits],
        stored: Callable[[Target], bool] = lambda target: False,
    ) -> None:
        self.usage = usage
        self.limits = limits
        self.stored = stored
        self._held: dict[Scope, int] = {}

    def _limited(self, repo: Repo) -> list[tuple[Scope, int]]:
        """
        The scopes of C{repo} that have a limit, with their limits.
        """
        limits = self.limits()
        found = []
        for scope in scopes_of(repo):
            limit = limits.of(scope)
            if limit is not None:
                found.append((scope, limit))
        return found

    def check(self, target: Target, size: int) -> InsufficientStorage | None:
        """
        Why C{size} more bytes for C{target} would not fit, or L{None} if they
        would (nothing is reserved). Without limits, nothing is looked up.
        """
        limited = self._limited(target.repo)
        if not limited or self.stored(target):
            return None
        return self._refusal(limited, size)

    def _refusal(self, limited: list[tuple[Scope, int]], size: int) -> InsufficientStorage | None:
        for scope, limit in limited:
            if self.usage.scope_bytes(scope) + self._held.get(scope, 0) + size > limit:
                if scope == ALL:
                    where = "the server"
                elif scope[0] == "user":
                    where = f"user {scope[1]}"
                else:
                    where = f"repository {repo_label(scope[1:])}"
                return InsufficientStorage(f"quota of {where} exceeded ({limit} bytes)")
        return None

    def reserve(self, target: Target, size: int) -> Reservation:
        """
        Hold C{size} bytes for an upload to C{target} until the reservation is
        released (nothing, when the object is stored already or no limit
        applies).

        @raise InsufficientStorage: when a limit would be exceeded.
        """
        reservation = Reservation(self, target.repo)
        limited = self._limited(target.repo)
        if not limited or self.stored(target):
            return reservation
        refusal = self._refusal(limited, size)
        if refusal is not None:
            raise refusal
        for scope in reservation.scopes:
            self._held[scope] = self._held.get(scope, 0) + size
        reservation.bytes = size
        return reservation

    def free(self, reservation: Reservation) -> None:
        for scope in reservation.scopes:
            left = self._held.get(scope, 0) - reservation.bytes
            if left > 0:
                self._held[scope] = left
            else:
                self._held.pop(scope, None)
        reservation.bytes = 0

    def held(self, scope: Scope) -> int:
        """
        The bytes of uploads in flight in one scope.
        """
        return self._held.get(scope, 0)
