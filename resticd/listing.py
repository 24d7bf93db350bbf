"""
Object listings in the two formats of restic's REST protocol.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

V1: Final = b"application/vnd.x.restic.rest.v1"
V2: Final = b"application/vnd.x.restic.rest.v2"


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


def format_entries(entries: Iterable[tuple[str, int]], v2: bool, first: bool) -> bytes:
    """
    A piece of a JSON array of listing entries: names (v1) or
    C{{"name", "size"}} objects (v2), preceded by a comma unless C{first}.

    Pieces joined between C{[} and C{]} form the whole listing, so a listing
    can be sent while it is still being read from disk. The names are
    object names (64 hexadecimal digits), which JSON takes as they are.
    """
    if v2:
        items = ['{"name":"%s","size":%d}' % entry for entry in entries]
    else:
        items = ['"%s"' % name for name, _ in entries]
    if not items:
        return b""
    text = ",".join(items)
    return (text if first else "," + text).encode("ascii")
