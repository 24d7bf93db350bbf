"""
Listing formats: restic's v1 (names) and v2 (names and sizes).
"""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from resticd import listing
from resticd.listing import V1, V2, ListingReader, content_type, format_entries, wants_v2

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
    Pieces formatted a few entries at a time, the non-empty ones joined by
    commas between brackets, are the JSON listing of all entries in order:
    names for v1, name and size objects for v2.
    """
    pieces = [format_entries(chunk, v2) for chunk in chunks]
    assert [bool(piece) for piece in pieces] == [bool(chunk) for chunk in chunks]
    body = b"[" + b",".join(piece for piece in pieces if piece) + b"]"
    everything = [e for chunk in chunks for e in chunk]
    expected = [{"name": n, "size": s} for n, s in everything] if v2 else [n for n, _ in everything]
    assert json.loads(body) == expected


directories = st.lists(
    st.lists(st.tuples(st.sampled_from("0123456789abcdef"), st.integers(0, 9)), max_size=6),
    max_size=8,
)


@given(directories, st.integers(1, 8), st.booleans())
def test_a_reader_reads_directories_in_order_a_piece_at_a_time(
    contents: list[list[tuple[str, int]]], piece_entries: int, v2: bool
) -> None:
    """
    A listing's reader reads each directory once, in order, as few of them
    per piece as make at least C{PIECE_ENTRIES} entries (the last piece may
    hold fewer); its pieces, joined, are the listing of every entry in
    directory order.
    """
    named = [[(char * 64, size) for char, size in entries] for entries in contents]
    read: list[int] = []

    def list_dir(directory: str) -> list[tuple[str, int]]:
        read.append(int(directory))
        return named[int(directory)]

    old, listing.PIECE_ENTRIES = listing.PIECE_ENTRIES, piece_entries
    try:
        reader = ListingReader(list_dir, [str(i) for i in range(len(named))], v2)
        pieces = []
        counts = []
        while not reader.done:
            before = len(read)
            pieces.append(reader.read())
            counts.append(sum(len(named[i]) for i in read[before:]))
            # No directory more than needed: without its last one, a piece
            # would hold too few entries.
            assert counts[-1] - len(named[read[-1]]) < piece_entries
    finally:
        listing.PIECE_ENTRIES = old
    assert read == list(range(len(named)))
    assert all(count >= piece_entries for count in counts[:-1])
    body = b"[" + b",".join(piece for piece in pieces if piece) + b"]"
    everything = [e for entries in named for e in entries]
    assert json.loads(body) == ([{"name": n, "size": s} for n, s in everything] if v2 else [n for n, _ in everything])
