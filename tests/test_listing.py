"""
Listing formats: restic's v1 (names) and v2 (names and sizes).
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from resticd.listing import V1, V2, content_type, format_entries, wants_v2

entries = st.lists(
    st.tuples(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64), st.integers(0, 2**40)),
    max_size=20,
)


def test_v2_only_for_the_exact_media_type() -> None:
    """
    The v2 format is chosen only when Accept is exactly restic's v2 type;
    anything else (missing, v1, a list, a wildcard) gets v1.
    """
    assert wants_v2(V2)
    assert not wants_v2(None)
    assert not wants_v2(V1)
    assert not wants_v2(b"*/*")
    assert not wants_v2(V2 + b", application/json")


def test_content_types_have_no_parameters() -> None:
    """
    Listings are labelled with the bare media types (restic compares them
    exactly; a C{; charset} suffix makes it fall back to v1).
    """
    assert content_type(True) == b"application/vnd.x.restic.rest.v2"
    assert content_type(False) == b"application/vnd.x.restic.rest.v1"


@given(st.lists(entries, max_size=5), st.booleans())
def test_pieces_join_into_the_listing(chunks: list[list[tuple[str, int]]], v2: bool) -> None:
    """
    Pieces formatted one directory at a time, joined between brackets, are
    the JSON listing of all entries in order: names for v1, name and size
    objects for v2.
    """
    body = b"["
    first = True
    for chunk in chunks:
        piece = format_entries(chunk, v2, first)
        if piece:
            body += piece
            first = False
    body += b"]"
    everything = [e for chunk in chunks for e in chunk]
    expected = [{"name": n, "size": s} for n, s in everything] if v2 else [n for n, _ in everything]
    assert json.loads(body) == expected
