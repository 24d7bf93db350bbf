"""
The response headers resticd writes straight into twisted.web's header table,
and Last-Modified with conditional GETs.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import pytest_twisted
from twisted.web.http import datetimeToString
from twisted.web.http_headers import Headers

from resticd.headers import (
    ACCEPT_RANGES,
    CONTENT_LENGTH,
    CONTENT_RANGE,
    CONTENT_TYPE,
    DATE,
    IF_MODIFIED_SINCE,
    LAST_MODIFIED,
    SERVER,
    not_modified,
    response_headers,
)

from .test_access import Connection
from .web import Server, name_of

ensure = pytest_twisted.ensureDeferred

NAMES = [ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, DATE, IF_MODIFIED_SINCE, LAST_MODIFIED, SERVER]


class Answer:
    """
    Just what L{not_modified} and L{response_headers} use of a request.
    """

    def __init__(self, **request_headers: str) -> None:
        self.requestHeaders = Headers({k.replace("_", "-"): [v] for k, v in request_headers.items()})
        self.responseHeaders = Headers()
        self.code = 200

    def setResponseCode(self, code: int) -> None:
        self.code = code


@pytest.mark.parametrize("name", NAMES)
def test_a_header_set_in_the_table_is_the_one_twisted_knows(name: bytes) -> None:
    """
    A header written into the table under resticd's constant is the header
    twisted.web reads under any spelling of its name, and setting it again
    through twisted.web replaces it rather than adding a second one.
    """
    answer: Any = Answer()
    response_headers(answer)[name] = [b"1"]
    headers = answer.responseHeaders
    assert headers.getRawHeaders(name.lower()) == [b"1"]
    assert headers.getRawHeaders(name.decode().upper()) == ["1"]
    headers.setRawHeaders(name.lower(), [b"2"])
    assert list(headers.getAllRawHeaders()) == [(name, [b"2"])]


def test_last_modified_is_the_modification_time_rounded_up() -> None:
    """
    The Last-Modified of an object modified at a fraction of a second is the
    next whole second, as twisted.web's setLastModified gives it.
    """
    answer: Any = Answer()
    assert not_modified(answer, 1_700_000_000.2) is False
    assert answer.responseHeaders.getRawHeaders(b"last-modified") == [datetimeToString(1_700_000_001)]
    assert answer.code == 200


@pytest.mark.parametrize(
    ("since", "expected"),
    [
        (datetimeToString(1_700_000_001).decode(), 304),  # the same second
        (datetimeToString(1_700_000_100).decode(), 304),  # later
        (datetimeToString(1_700_000_001).decode() + "; length=12", 304),  # an old extension
        (datetimeToString(1_700_000_000).decode(), 200),  # a second too early
        ("", 200),
        ("   ", 200),
        ("; length=12", 200),
        ("yesterday", 200),
        ("Fri, 04 Foo 2026 17:51:55 GMT", 200),
        ("Fri, 04 Dec 2026 17:51 GMT", 200),
    ],
)
def test_if_modified_since_decides_a_304(since: str, expected: int) -> None:
    """
    An If-Modified-Since at or after the object's Last-Modified makes the
    answer a 304; an earlier one, and one that is blank or not a date, leave
    it as it is (RFC 9110: such a header is ignored).
    """
    answer: Any = Answer(if_modified_since=since)
    assert not_modified(answer, 1_700_000_000.2) is (expected == 304)
    assert answer.code == expected


def raw_reply(connection: Connection, request: bytes) -> tuple[list[bytes], bytes]:
    """
    The header lines and body of the answer to C{request}, read off the wire.
    """
    connection.transport.clear()
    connection.send(request)
    head, _, body = connection.transport.value().partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


def header_names(lines: list[bytes]) -> list[bytes]:
    return sorted(line.split(b":", 1)[0].lower() for line in lines[1:])


@ensure
async def test_small_range_and_head_answers_carry_each_header_once(repo: Server) -> None:
    """
    A small range and a HEAD of a stored object carry each of their headers
    exactly once, with the object's values: a range its Content-Range,
    Content-Length, Last-Modified (the file's time) and the rest; a HEAD its
    size and type.
    """
    body = os.urandom(100_000)
    name = name_of(body)
    assert (await repo.client.post(f"/r/data/{name}", body)).code == 200
    mtime = os.stat(os.path.join(repo.layout.root, "r", "data", name[:2], name)).st_mtime
    connection = Connection(repo.site)
    lines, got = raw_reply(connection, b"GET /r/data/%s HTTP/1.1\r\nHost: x\r\nRange: bytes=10-4105\r\n\r\n" % name.encode())
    assert lines[0] == b"HTTP/1.1 206 Partial Content"
    assert header_names(lines) == [
        b"accept-ranges",
        b"content-length",
        b"content-range",
        b"content-type",
        b"date",
        b"last-modified",
        b"server",
    ]
    assert b"Content-Range: bytes 10-4105/100000" in lines
    assert b"Content-Length: 4096" in lines
    assert b"Last-Modified: " + datetimeToString(int(mtime) + (mtime % 1 > 0)) in lines
    assert got == body[10:4106]
    lines, got = raw_reply(connection, b"HEAD /r/data/%s HTTP/1.1\r\nHost: x\r\n\r\n" % name.encode())
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert header_names(lines) == [b"accept-ranges", b"content-length", b"content-type", b"date", b"server"]
    assert b"Content-Length: 100000" in lines
    assert b"Content-Type: application/octet-stream" in lines
    assert got == b""


@ensure
async def test_a_conditional_get_of_an_unchanged_object_is_a_bodiless_304(repo: Server) -> None:
    """
    A GET (whole or a range) whose If-Modified-Since is the object's
    Last-Modified is answered 304 with no body; one from before the object
    was written gets the object; an If-Modified-Since with no date before
    its parameters is ignored (it used to make twisted.web's date parser
    fail: a 500).
    """
    body = os.urandom(5000)
    name = name_of(body)
    assert (await repo.client.post(f"/r/data/{name}", body)).code == 200
    first = await repo.client.get(f"/r/data/{name}")
    modified = first.header("last-modified")
    assert modified is not None
    unchanged = await repo.client.get(f"/r/data/{name}", if_modified_since=modified)
    assert (unchanged.code, unchanged.body, unchanged.header("last-modified")) == (304, b"", modified)
    piece = await repo.client.get(f"/r/data/{name}", if_modified_since=modified, range="bytes=0-9")
    assert (piece.code, piece.body) == (304, b"")
    earlier = datetimeToString(int(time.time()) - 3600).decode()
    changed = await repo.client.get(f"/r/data/{name}", if_modified_since=earlier)
    assert (changed.code, changed.body) == (200, body)
    no_date = await repo.client.get(f"/r/data/{name}", if_modified_since="; length=5000")
    assert (no_date.code, no_date.body) == (200, body)
