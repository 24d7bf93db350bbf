"""
Who may do what to which repository.

Rights are C{read} (read objects, configs and listings), C{append} (create
repositories, objects and configs, and remove locks), C{write} (C{append}
and also delete objects and configs: what C{restic prune} needs) and
C{admin} (C{write} and also delete whole repositories). C{read} is
independent of the others, so write-only (C{append}) and read-only users are
both possible.

The policy comes from the command-line flags (C{--append-only},
C{--private-repos}, C{--allow-repo-delete}) or from an access file
(C{--access-file}, TOML) with rules per user and repository pattern and
quotas. With an access file, its C{admin} right (not C{--allow-repo-delete})
decides who may delete repositories, and C{--append-only} and
C{--private-repos} still apply on top of it, as caps.
"""

from __future__ import annotations

import enum
import fnmatch
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .paths import Repo
from .usage import Limits


class Right(enum.Flag):
    """
    One or more rights.
    """

    NONE = 0
    READ = enum.auto()
    APPEND = enum.auto()
    DELETE = enum.auto()
    REPO_DELETE = enum.auto()

    @classmethod
    def parse(cls, names: Iterable[str]) -> Right:
        """
        The rights named in an access file: C{read}, C{append}, C{write}
        (append and delete), C{admin} (write and repository delete).

        @raise ValueError: for an unknown name.
        """
        rights = cls.NONE
        for name in names:
            try:
                rights |= _NAMED[name]
            except KeyError:
                raise ValueError(f"unknown right {name!r} (use read, append, write, admin)") from None
        return rights


_NAMED = {
    "read": Right.READ,
    "append": Right.APPEND,
    "write": Right.APPEND | Right.DELETE,
    "admin": Right.APPEND | Right.DELETE | Right.REPO_DELETE,
}

#: Everything a trusted user may do on a server without restrictions.
ALL = Right.READ | Right.APPEND | Right.DELETE
ALL_WITH_REPO_DELETE = ALL | Right.REPO_DELETE

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b?)?\s*\Z", re.IGNORECASE)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def parse_size(text: str | int) -> int:
    """
    Bytes from C{123}, C{500K}, C{500G}, C{2T}, C{1.5TiB} (binary units).

    @raise ValueError: for anything else.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError("a size cannot be negative")
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r} (e.g. 500G, 2T, 1048576)")
    number, unit, _ = match.groups()
    return int(float(number) * 1024 ** _UNITS[unit.lower()])


@dataclass(frozen=True)
class Pattern:
    """
    A repository path pattern: segments separated by C{/}, each a glob
    (C{*}, C{?}, C{[...]}) that may contain C{{user}}; a C{**} segment matches
    any number of segments. C{/} alone is the root repository.
    """

    text: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Pattern:
        stripped = text.strip("/")
        segments = tuple(stripped.split("/")) if stripped else ()
        if any(s == "" for s in segments):
            raise ValueError(f"bad repository pattern {text!r}")
        return cls(text, segments)

    def matches(self, repo: Repo, user: str | None) -> bool:
        """
        Whether C{repo} matches, with C{{user}} standing for C{user} (a
        pattern that uses C{{user}} never matches without a user).
        """
        segments = self.segments
        if user is None:
            if any("{user}" in s for s in segments):
                return False
        else:
            escaped = _escape_glob(user)
            segments = tuple(s.replace("{user}", escaped) for s in segments)
        return _match(segments, repo)


def _escape_glob(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _match(pattern: tuple[str, ...], repo: Repo) -> bool:
    if not pattern:
        return not repo
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match(rest, repo[i:]) for i in range(len(repo) + 1))
    return bool(repo) and fnmatch.fnmatchcase(repo[0], head) and _match(rest, repo[1:])


@dataclass(frozen=True)
class Rule:
    """
    Rights on the repositories that match a pattern.
    """

    pattern: Pattern
    rights: Right


@dataclass(frozen=True)
class AccessFile:
    """
    The content of an access file: rules per user and for everyone, and
    quotas per user and per repository pattern.
    """

    users: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict)
    default: tuple[Rule, ...] = ()
    user_quotas: Mapping[str, int] = field(default_factory=dict)
    repo_quotas: tuple[tuple[Pattern, int], ...] = ()

    def rights(self, user: str | None, repo: Repo) -> Right:
        """
        The rights of the first rule that matches: the user's own rules
        first, then the default ones; none when nothing matches.
        """
        own = self.users.get(user, ()) if user is not None else ()
        for rule in (*own, *self.default):
            if rule.pattern.matches(repo, user):
                return rule.rights
        return Right.NONE

    def repo_quota(self, repo: Repo) -> int | None:
        """
        The quota of the first repository pattern that matches C{repo}; in
        these patterns C{{user}} stands for the repository's first segment
        (its owner, as with C{--private-repos}).
        """
        owner = repo[0] if repo else None
        for pattern, limit in self.repo_quotas:
            if pattern.matches(repo, owner):
                return limit
        return None


def _rules(table: Any, where: str) -> tuple[Rule, ...]:
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a table of repository pattern = [rights]")
    rules = []
    for pattern, rights in table.items():
        if isinstance(rights, str):
            rights = [rights]
        if not isinstance(rights, list) or not all(isinstance(r, str) for r in rights):
            raise ValueError(f"{where}: {pattern!r} needs a list of rights")
        try:
            rules.append(Rule(Pattern.parse(pattern), Right.parse(rights)))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return tuple(rules)


def parse_access_file(text: str) -> AccessFile:
    """
    An L{AccessFile} from TOML text (see C{etc/access.toml}).

    @raise ValueError: with a message naming the offending entry.
    """
    import tomllib  # here: most daemons have no access file, and it takes ms to import

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"not valid TOML: {e}") from None
    unknown = set(data) - {"default", "users", "quota"}
    if unknown:
        raise ValueError(f"unknown section(s): {', '.join(sorted(unknown))}")
    default = _rules(data.get("default", {}), "[default]")
    users_table = data.get("users", {})
    if not isinstance(users_table, dict):
        raise ValueError("[users]: expected tables [users.NAME]")
    users = {name: _rules(table, f"[users.{name}]") for name, table in users_table.items()}
    quota = data.get("quota", {})
    if not isinstance(quota, dict) or set(quota) - {"users", "repos"}:
        raise ValueError("[quota]: expected [quota.users] and/or [quota.repos]")
    sizes: dict[str, dict[str, int]] = {}
    for scope in ("users", "repos"):
        table = quota.get(scope, {})
        if not isinstance(table, dict):
            raise ValueError(f"[quota.{scope}]: expected a table of name = size")
        sizes[scope] = {}
        for name, value in table.items():
            try:
                sizes[scope][name] = parse_size(value)
            except ValueError as e:
                raise ValueError(f"[quota.{scope}]: {name!r}: {e}") from None
    try:
        repo_quotas = tuple((Pattern.parse(p), v) for p, v in sizes["repos"].items())
    except ValueError as e:
        raise ValueError(f"[quota.repos]: {e}") from None
    return AccessFile(users, default, sizes["users"], repo_quotas)


@dataclass(frozen=True)
class Policy:
    """
    The whole access policy: the flags, and the access file if there is one.
    """

    append_only: bool = False
    private_repos: bool = False
    allow_repo_delete: bool = False
    verify_upload: bool = True
    access_file: AccessFile | None = None

    def rights(self, user: str | None, repo: Repo) -> Right:
        """
        What C{user} (L{None} without authentication) may do to C{repo}.
        """
        if self.private_repos and (user is None or not repo or repo[0] != user):
            return Right.NONE
        if self.access_file is not None:
            rights = self.access_file.rights(user, repo)
        else:
            rights = ALL_WITH_REPO_DELETE if self.allow_repo_delete else ALL
        if self.append_only:
            rights &= Right.READ | Right.APPEND
        return rights


class AccessFileSource:
    """
    An access file on disk, re-read when it changes.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.current = AccessFile()
        self._signature: tuple[int, int, int] | None = None

    def refresh(self) -> bool:
        """
        Re-read the file if it changed; whether it did (blocking). A file that
        cannot be read or parsed raises and the previous rules stay.
        """
        st = os.stat(self.path)
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if signature == self._signature:
            return False
        # A version that fails to load is reported once, not at every check.
        self._signature = signature
        with open(self.path, "rb") as f:
            self.current = parse_access_file(f.read().decode("utf-8"))
        return True


class Access:
    """
    The policy in force. With an access file, the policy is replaced whole
    whenever the file is reloaded; requests in flight keep the one they
    started with.
    """

    def __init__(self, policy: Policy, max_size: int | None = None, source: AccessFileSource | None = None) -> None:
        self.policy = policy
        self.max_size = max_size
        self.source = source

    def rights(self, user: str | None, repo: Repo) -> Right:
        """
        What C{user} may do to C{repo} under the current policy.
        """
        return self.policy.rights(user, repo)

    def limits(self) -> Limits:
        """
        The storage limits in force: C{--max-size} and the access file's
        quotas.
        """
        access_file = self.policy.access_file
        if access_file is None:
            return Limits(self.max_size)
        return Limits(self.max_size, dict(access_file.user_quotas), access_file.repo_quota)

    def refresh(self) -> bool:
        """
        Re-read the access file if it changed (blocking); whether it did.
        """
        if self.source is None or not self.source.refresh():
            return False
        self.policy = replace(self.policy, access_file=self.source.current)
        return True
