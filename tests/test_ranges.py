"""
Range headers: what part of an object each one asks for.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from resticd.ranges import UNSATISFIABLE, parse_range


def test_restics_ranges() -> None:
    """
    restic's two forms: C{bytes=0-} (the whole object) and C{bytes=a-b}
    (inclusive); an end beyond the object is clipped.
    """
    assert parse_range(b"bytes=0-", 100) == (0, 99)
    assert parse_range(b"bytes=10-19", 100) == (10, 19)
    assert parse_range(b"bytes=90-500", 100) == (90, 99)


def test_suffix_ranges() -> None:
    """
    C{bytes=-n} is the last n bytes (all of a shorter object); C{-0} asks
    for nothing and cannot be satisfied.
    """
    assert parse_range(b"bytes=-10", 100) == (90, 99)
    assert parse_range(b"bytes=-1000", 100) == (0, 99)
    assert parse_range(b"bytes=-0", 100) == UNSATISFIABLE


def test_beyond_the_end_is_unsatisfiable() -> None:
    """
    A range that starts at or past the end of the object is answered 416,
    however large the number.
    """
    assert parse_range(b"bytes=100-", 100) == UNSATISFIABLE
    assert parse_range(b"bytes=99999999999999999999999-", 100) == UNSATISFIABLE


def test_other_headers_mean_the_whole_object() -> None:
    """
    No header, a malformed one, a reversed range, another unit or several
    ranges: the whole object is sent (a server may ignore such headers).
    """
    for header in (None, b"", b"bytes=", b"bytes=-", b"bytes=5-2", b"items=0-1", b"bytes=0-1,5-6", b"bytes=a-b"):
        assert parse_range(header, 100) is None, header


@given(st.binary(max_size=40), st.integers(1, 2**40))
def test_any_header_gives_a_range_inside_the_object(header: bytes, size: int) -> None:
    """
    Whatever the header, the answer is the whole object, a 416, or a range
    that starts and ends inside the object.
    """
    wanted = parse_range(header, size)
    if wanted is None or wanted == UNSATISFIABLE:
        return
    assert isinstance(wanted, tuple)
    start, end = wanted
    assert 0 <= start <= end < size


@given(st.integers(0, 2**64), st.one_of(st.none(), st.integers(0, 2**64)), st.integers(1, 2**40))
def test_well_formed_ranges(first: int, last: int | None, size: int) -> None:
    """
    C{bytes=first-last} is satisfiable exactly when first is inside the
    object (and not past last).
    """
    header = b"bytes=%d-%s" % (first, b"" if last is None else b"%d" % last)
    wanted = parse_range(header, size)
    if last is not None and last < first:
        assert wanted is None
    elif first >= size:
        assert wanted == UNSATISFIABLE
    else:
        assert wanted == (first, min(size - 1, last if last is not None else size - 1))
