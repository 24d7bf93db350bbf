"""
Pure path rules: how a request path names a repository, an object type and an
object, and where each of those lives on disk.

Nothing here touches the filesystem; every function is a plain function of its
arguments, so the rules can be tested exhaustively.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_to_bytes

#: Object types whose files are named by the sha256 of their content.
HASHED_TYPES: Final = ("data", "keys", "locks", "snapshots", "index")
#: Every name that ends the repository part of a URL.
RESERVED: Final = frozenset((*HASHED_TYPES, "config"))
#: Repositories may be nested this deep below the root (``/a/b/``).
MAX_REPO_DEPTH: Final = 2
#: The hidden directory under the data root that holds uploads in flight.
SPOOL_DIR: Final = ".spool"

_NAME = re.compile(r"[0-9a-f]{64}\Z")
_REPO = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@-]{0,127}\Z")

Repo = tuple[str, ...]


def is_object_name(name: str) -> bool:
    """
    Whether C{name} is a valid object name: 64 lowercase hex digits.
    """
    return _NAME.match(name) is not None


def is_repo_segment(segment: str) -> bool:
    """
    Whether C{segment} may name one level of a repository path.

    Allowed are ASCII letters, digits, C{_}, C{-}, C{.} and C{@} (so that
    user names such as C{alice@example.org} can own repositories), not as the
    first character for the last three (so C{.}, C{..}, hidden names and C{-} are
    never repositories), and never an object type or C{config}.
    """
    return _REPO.match(segment) is not None and segment not in RESERVED


def decode_segment(raw: bytes) -> str | None:
    """
    Decode one already percent-decoded URL path segment, or L{None} when it
    is not valid UTF-8 or holds a character no segment may contain.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if "/" in text or "\\" in text or "\x00" in text:
        return None
    return text


@dataclass(frozen=True)
class Layout:
    """
    Where repositories and their objects live below the data root C{root}.

    This is restic's own local layout, so a repository served here can be used
    directly as C{restic -r ROOT/REPO}.
    """

    root: str

    def repo_dir(self, repo: Repo) -> str:
        """
        The directory of a repository (the root itself for C{()}).
        """
        return os.path.join(self.root, *repo)

    def type_dir(self, repo: Repo, kind: str) -> str:
        """
        The directory that holds objects of type C{kind}.
        """
        return os.path.join(self.root, *repo, kind)

    def object_path(self, repo: Repo, kind: str, name: str) -> str:
        """
        The file of one object: in C{data/<first two hex>/} for data, in the
        type directory otherwise.
        """
        if kind == "data":
            return os.path.join(self.root, *repo, kind, name[:2], name)
        return os.path.join(self.root, *repo, kind, name)

    def config_path(self, repo: Repo) -> str:
        """
        The file of a repository's config.
        """
        return os.path.join(self.root, *repo, "config")

    def spool_dir(self) -> str:
        """
        The directory for uploads in flight; on the same filesystem as the
        repositories, so that a finished upload is published by a link.
        """
        return os.path.join(self.root, SPOOL_DIR)


@dataclass(frozen=True)
class Target:
    """
    What a request path names: a repository (C{kind} L{None}), a type
    listing (C{name} L{None}), an object, or a config (C{kind} and C{name}
    both C{"config"}).
    """

    repo: Repo
    kind: str | None = None
    name: str | None = None


def step(target: Target, raw: bytes) -> Target | None:
    """
    Where one more (percent-decoded) path segment leads from C{target}, or
    L{None} when nothing is there. An empty segment (a trailing slash) stays
    in place.
    """
    if target.name is not None:
        return None
    if raw == b"":
        return target
    segment = decode_segment(raw)
    if segment is None:
        return None
    if target.kind is not None:
        return Target(target.repo, target.kind, segment) if is_object_name(segment) else None
    if segment == "config":
        return Target(target.repo, "config", "config")
    if segment in HASHED_TYPES:
        return Target(target.repo, segment)
    if len(target.repo) < MAX_REPO_DEPTH and is_repo_segment(segment):
        return Target((*target.repo, segment))
    return None


def parse_path(path: bytes) -> Target | None:
    """
    What a whole request path (as sent, percent-encoded, query allowed)
    names, by the same rules as the resource tree; L{None} for nothing.
    """
    path = path.split(b"?", 1)[0]
    if not path.startswith(b"/"):
        return None
    target: Target | None = Target(())
    for raw in path[1:].split(b"/"):
        assert target is not None
        target = step(target, unquote_to_bytes(raw))
        if target is None:
            return None
    return target


def data_subdirs() -> list[str]:
    """
    The 256 fan-out directories of C{data/}: C{00} to C{ff}.
    """
    return [f"{i:02x}" for i in range(256)]


def is_inside(root: str, path: str) -> bool:
    """
    Whether the (already resolved) C{path} is C{root} or below it.
    """
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def repo_label(repo: Repo) -> str:
    """
    The repository as shown in logs and metrics: C{/}, C{/a/}, C{/a/b/}.
    """
    return "/" + "".join(part + "/" for part in repo)
