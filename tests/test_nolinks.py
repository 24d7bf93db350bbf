"""
Stored objects are opened in one system call where their path has no
symbolic link (C{openat2} with C{RESOLVE_NO_SYMLINKS}), and the slower way
(open, then read the opened file's name back) everywhere else: the opener
against real files and links, the store's containment with and without it,
and repositories reached through links inside the data root.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import sys
from pathlib import Path

import pytest
import pytest_twisted

from resticd.errors import NotFound
from resticd.nolinks import ARCHITECTURES, Openat2, never_link_free, system_openat2, working_openat2
from resticd.paths import Layout
from resticd.store import Store

from .web import make_server, name_of

ensure = pytest_twisted.ensureDeferred


def kernel_has_openat2() -> bool:
    """
    Whether this system should have a working C{openat2}: Linux 5.6 or
    later on a common architecture.
    """
    if sys.platform != "linux" or platform.machine() not in ARCHITECTURES:
        return False
    match = re.match(r"(\d+)\.(\d+)", platform.release())
    assert match, platform.release()
    return (int(match[1]), int(match[2])) >= (5, 6)


def opener() -> Openat2:
    """
    This system's C{openat2}, which the tests of the opener itself need
    (Linux 5.6 or later, as CI has).
    """
    found = system_openat2()
    assert found is not None, "Linux 5.6 or later has openat2; a sandbox here refuses it"
    return found


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """
    A data root with one object, C{r/data/ab/<name>}; beside it, outside
    the root, a directory with a file of the same name.
    """
    root = tmp_path / "root"
    (root / "r" / "data" / "ab").mkdir(parents=True)
    (root / "r" / "data" / "ab" / "ab00").write_bytes(b"inside")
    (tmp_path / "outside" / "data" / "ab").mkdir(parents=True)
    (tmp_path / "outside" / "data" / "ab" / "ab00").write_bytes(b"outside")
    return root


def test_the_system_has_openat2_where_the_kernel_does() -> None:
    """
    On Linux 5.6 and later the fast open is used (where it is missing,
    objects are still served, the slower way: see the store tests).
    """
    assert (system_openat2() is not None) == kernel_has_openat2()


def test_a_path_without_links_is_opened(tree: Path) -> None:
    """
    A path with no symbolic link in it is opened, read-only, with
    close-on-exec, and is the file the path names.
    """
    path = tree / "r" / "data" / "ab" / "ab00"
    fd = opener().open(str(path), os.O_RDONLY)
    assert fd is not None
    try:
        assert os.fstat(fd).st_ino == path.stat().st_ino
        assert os.read(fd, 100) == b"inside"
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("link", ["directory", "file", "absolute"])
def test_a_path_with_a_link_is_not_opened(tree: Path, link: str) -> None:
    """
    A path through a symbolic link (to a directory on the way, or as its
    last component, relative or absolute, even one that stays inside) is
    not opened: the caller is told so, and no descriptor is left open.
    """
    if link == "directory":
        (tree / "s").symlink_to("r")
        path = tree / "s" / "data" / "ab" / "ab00"
    elif link == "file":
        (tree / "r" / "data" / "ab" / "ab01").symlink_to("ab00")
        path = tree / "r" / "data" / "ab" / "ab01"
    else:
        (tree / "t").symlink_to(tree / "r")
        path = tree / "t" / "data" / "ab" / "ab00"
    before = open_fds()
    assert opener().open(str(path), os.O_RDONLY) is None
    assert open_fds() == before


def test_errors_are_raised_as_open_raises_them(tree: Path) -> None:
    """
    A missing file, or a file where a directory is expected, raises the
    same exceptions as C{os.open}.
    """
    with pytest.raises(FileNotFoundError):
        opener().open(str(tree / "r" / "data" / "ab" / "missing"), os.O_RDONLY)
    with pytest.raises(NotADirectoryError):
        opener().open(str(tree / "r" / "data" / "ab" / "ab00" / "below"), os.O_RDONLY)


@pytest.mark.parametrize("error", [errno.ENOSYS, errno.EPERM])
def test_an_openat2_that_fails_is_not_used(error: int) -> None:
    """
    Where C{openat2} fails (an old kernel: ENOSYS; a seccomp filter that
    does not know it: EPERM or ENOSYS), it is not used at all.
    """

    def refusing(*args: object) -> int:
        ctypes.set_errno(error)
        return -1

    assert working_openat2(refusing) is None


def stores(root: Path) -> list[tuple[str, Store]]:
    """
    A store of C{root} with this system's fast open and one without it.
    """
    return [("openat2", Store(Layout(str(root)))), ("no openat2", Store(Layout(str(root)), open_link_free=never_link_free))]


def read_contained(store: Store, path: Path | str) -> bytes:
    fd = store.open_contained(str(path))
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


def test_containment_with_and_without_the_fast_open(tree: Path) -> None:
    """
    With or without C{openat2}, the store opens what lies inside the data
    root (through links that stay inside, relative or absolute, too), and
    refuses as not found what is missing or reached through a link that
    leads outside.
    """
    (tree / "rel").symlink_to("r")
    (tree / "abs").symlink_to(tree / "r")
    (tree / "out").symlink_to(tree.parent / "outside")
    (tree / "r" / "data" / "ab" / "ab02").symlink_to(tree.parent / "outside" / "data" / "ab" / "ab00")
    for label, store in stores(tree):
        for repo in ("r", "rel", "abs"):
            assert read_contained(store, tree / repo / "data" / "ab" / "ab00") == b"inside", (label, repo)
        before = open_fds()
        for path in (tree / "out" / "data" / "ab" / "ab00", tree / "r" / "data" / "ab" / "ab02", tree / "r" / "data" / "ab" / "ab03"):
            with pytest.raises(NotFound):
                store.open_contained(str(path))
        assert open_fds() == before, label


def test_only_plain_names_below_the_root_take_the_fast_open(tree: Path) -> None:
    """
    Only a path that is the root's resolved name followed by plain names
    is given to the one-call open: one that climbs out with C{..}, or has
    a C{.} or hidden name, or lies elsewhere, is opened the slower way (and
    refused when it leads outside, though it has no link).
    """
    asked: list[str] = []

    def recording(path: str, flags: int) -> int | None:
        asked.append(path)
        return None

    store = Store(Layout(str(tree)), open_link_free=recording)
    plain = tree / "r" / "data" / "ab" / "ab00"
    assert read_contained(store, plain) == b"inside"
    assert asked == [str(plain)]
    asked.clear()
    climbing = f"{tree}/r/../../outside/data/ab/ab00"
    with pytest.raises(NotFound):
        store.open_contained(climbing)
    assert read_contained(store, f"{tree}/./r/data/ab/ab00") == b"inside"
    (tree / ".hidden").mkdir()
    (tree / ".hidden" / "f").write_bytes(b"hidden")
    assert read_contained(store, tree / ".hidden" / "f") == b"hidden"
    (tree.parent / "rootx").mkdir()
    (tree.parent / "rootx" / "f").write_bytes(b"beside")
    with pytest.raises(NotFound):
        store.open_contained(str(tree.parent / "rootx" / "f"))
    assert asked == []


def test_a_data_root_that_is_a_link_is_served(tree: Path) -> None:
    """
    A data root given as a symbolic link to the real directory works (its
    paths have a link, so they are opened the slower way).
    """
    link = tree.parent / "root-link"
    link.symlink_to(tree)
    assert read_contained(Store(Layout(str(link))), link / "r" / "data" / "ab" / "ab00") == b"inside"


@ensure
async def test_repositories_reached_through_links_inside_the_root_are_served(tmp_path: Path) -> None:
    """
    A repository whose directory is a symbolic link to another one inside
    the data root (relative or absolute) is read like the one it points to:
    GET, a range and HEAD of an object.
    """
    server = make_server(str(tmp_path / "data"))
    c = server.client
    assert (await c.post("/alice/?create=true")).code == 200
    body = os.urandom(5000)
    assert (await c.post(f"/alice/data/{name_of(body)}", body)).code == 200
    root = Path(server.layout.root)
    (root / "bob").symlink_to("alice")
    (root / "carol").symlink_to(root / "alice")
    for repo in ("alice", "bob", "carol"):
        whole = await c.get(f"/{repo}/data/{name_of(body)}")
        assert (whole.code, whole.body) == (200, body), repo
        piece = await c.get(f"/{repo}/data/{name_of(body)}", range="bytes=100-199")
        assert (piece.code, piece.body) == (206, body[100:200]), repo
        head = await c.head(f"/{repo}/data/{name_of(body)}")
        assert (head.code, head.header("content-length")) == (200, "5000"), repo

