"""
The pure path rules: which URL segments name repositories and objects, and
where they live on disk.
"""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st

from resticd.paths import (
    HASHED_TYPES,
    Layout,
    data_subdirs,
    decode_segment,
    is_inside,
    is_object_name,
    is_repo_segment,
    repo_label,
)

ROOT = "/srv/restic"
HEX64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


def test_object_names_are_64_lowercase_hex() -> None:
    """
    Only 64 lowercase hex digits name an object; upper case, other lengths
    and trailing characters do not.
    """
    assert is_object_name("a" * 64)
    assert not is_object_name("A" * 64)
    assert not is_object_name("a" * 63)
    assert not is_object_name("a" * 65)
    assert not is_object_name("a" * 64 + "\n")
    assert not is_object_name("g" + "a" * 63)
    assert not is_object_name("")


def test_repo_segments() -> None:
    """
    Repository names are plain ASCII names; dot files, C{..}, C{-} (kept for
    health endpoints) and the type names are never repositories.
    """
    for good in ("alice", "laptop-1", "a.b", "_x", "0"):
        assert is_repo_segment(good), good
    for bad in ("", ".", "..", ".spool", "-", "-x", "a/b", "a\\b", "a b", "ü", *HASHED_TYPES, "config"):
        assert not is_repo_segment(bad), bad


def test_decode_segment_refuses_separators_and_nul() -> None:
    """
    A segment that decodes to a path separator, a backslash or NUL (for
    example from C{%2F}, C{%5C} or C{%00}) or is not UTF-8 is refused.
    """
    assert decode_segment(b"alice") == "alice"
    assert decode_segment("日本".encode()) == "日本"
    for bad in (b"a/b", b"a\\b", b"a\x00b", b"\xff\xfe"):
        assert decode_segment(bad) is None


def test_layout_is_restics_local_layout() -> None:
    """
    Data objects live under C{data/<first two hex digits>/}, other types
    directly in their type directory, the config beside them: the layout of
    C{restic -r /path} itself.
    """
    layout = Layout(ROOT)
    name = "ab" + "0" * 62
    assert layout.object_path(("alice",), "data", name) == f"{ROOT}/alice/data/ab/{name}"
    assert layout.object_path(("alice", "x"), "keys", name) == f"{ROOT}/alice/x/keys/{name}"
    assert layout.object_path((), "index", name) == f"{ROOT}/index/{name}"
    assert layout.config_path(("alice",)) == f"{ROOT}/alice/config"
    assert layout.spool_dir() == f"{ROOT}/.spool"


def test_data_subdirs() -> None:
    """
    There are 256 fan-out directories, C{00} to C{ff}.
    """
    subdirs = data_subdirs()
    assert len(subdirs) == 256 == len(set(subdirs))
    assert subdirs[0] == "00" and subdirs[-1] == "ff"


def test_is_inside() -> None:
    """
    A path is inside the root only below it, not beside it with a common
    prefix.
    """
    assert is_inside("/srv/restic", "/srv/restic")
    assert is_inside("/srv/restic", "/srv/restic/a/config")
    assert not is_inside("/srv/restic", "/srv/restic2/a")
    assert not is_inside("/srv/restic", "/srv")


def test_repo_label() -> None:
    """
    Repositories are shown as URL paths with a trailing slash.
    """
    assert repo_label(()) == "/"
    assert repo_label(("a", "b")) == "/a/b/"


segment_bytes = st.binary(max_size=12) | st.sampled_from([b"..", b".", b"", b"%2e%2e", b"../..", b"\\.."])


@given(
    st.lists(segment_bytes, max_size=2),
    st.sampled_from([*HASHED_TYPES, "config"]),
    st.binary(max_size=70) | HEX64.map(str.encode),
)
def test_accepted_paths_never_leave_the_root(repo_raw: list[bytes], kind: str, name_raw: bytes) -> None:
    """
    Whatever bytes a client puts in the URL, every repository and object
    path that the rules accept resolves to a place inside the data root.
    """
    repo = []
    for raw in repo_raw:
        segment = decode_segment(raw)
        if segment is None or not is_repo_segment(segment):
            return
        repo.append(segment)
    layout = Layout(ROOT)
    paths = [layout.repo_dir(tuple(repo)), layout.config_path(tuple(repo))]
    name = decode_segment(name_raw)
    if kind != "config" and name is not None and is_object_name(name):
        paths.append(layout.object_path(tuple(repo), kind, name))
    for path in paths:
        resolved = os.path.normpath(path)
        assert is_inside(ROOT, resolved), path
        assert "/.spool" not in resolved
