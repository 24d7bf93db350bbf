"""
HTTP Range requests, as restic sends them: one byte range per request.
"""

from __future__ import annotations

import re
from typing import Final

_SPEC = re.compile(rb"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*\Z")

#: A range that lies wholly beyond the end of the object: 416.
UNSATISFIABLE: Final = "unsatisfiable"


def parse_range(header: bytes | None, size: int) -> tuple[int, int] | str | None:
    """
    The byte range a C{Range} header asks of an object of C{size} bytes.

    Returns the first and last byte (inclusive, the last clipped to the
    object), L{UNSATISFIABLE} when the range starts beyond the end (or asks
    for a zero-byte suffix), or L{None} when the whole object is to be sent:
    no header, or one that is malformed or asks for several ranges (which a
    server may ignore).
    """
    if header is None:
        return None
    match = _SPEC.match(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            return UNSATISFIABLE
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return UNSATISFIABLE
    return start, min(end, size - 1)
