"""
Object listings in the two formats of restic's REST protocol.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Final

V1: Final = b"application/vnd.x.restic.rest.v1"
V2: Final = b"application/vnd.x.restic.rest.v2"

#: Entries a listing reads (and formats) per call in a worker thread, from
#: as many directories as it takes (data/ has 256). Calls in parallel only
#: contend for the GIL (a 50,000-object listing: 220 ms one directory per
#: call, 170-180 ms with 1,024 to 16,384 entries per call, slower with two
#: calls at once).
PIECE_ENTRIES = 1024

Entry = tuple[str, int]


def wants_v2(accept: bytes | None) -> bool:
    """
    Whether the client asked for the v2 format (names with sizes): only when
    its C{Accept} header is exactly the v2 media type, as restic sends it.
    """
    return accept is not None and accept.strip() == V2


def content_type(v2: bool) -> bytes:
    """
    The C{Content-Type} of a listing, with no parameters (restic compares it
    exactly).
    """
    return V2 if v2 else V1


def format_entries(entries: Iterable[Entry], v2: bool) -> bytes:
    """
    A piece of a JSON array of listing entries: names (v1) or
    C{{"name", "size"}} objects (v2), without brackets.

    Non-empty pieces joined by commas between C{[} and C{]} form the whole
    listing, so a listing can be sent while it is still being read from
    disk. The names are object names (64 hexadecimal digits), which JSON
    takes as they are.
    """
    if v2:
        items = ['{"name":"%s","size":%d}' % entry for entry in entries]
    else:
        items = ['"%s"' % name for name, _ in entries]
    return ",".join(items).encode("ascii")


class ListingReader:
    """
    Reads the directories of one listing in order with C{list_dir} (a
    directory's entries), a piece at a time, one call after another.
    """

    def __init__(self, list_dir: Callable[[str], list[Entry]], directories: Iterable[str], v2: bool) -> None:
        self._list_dir = list_dir
        self._left = deque(directories)
        self._v2 = v2

    @property
    def done(self) -> bool:
        """
        Whether every directory has been read.
        """
        return not self._left

    def read(self) -> bytes:
        """
        The entries of the next directories, at least L{PIECE_ENTRIES} of
        them unless they are the last, as a piece of the listing
        (L{format_entries}); blocks as C{list_dir} does.
        """
        entries: list[Entry] = []
        while self._left and len(entries) < PIECE_ENTRIES:
            entries += self._list_dir(self._left.popleft())
        return format_entries(entries, self._v2)
