"""
The response headers resticd sets on its busiest answers (HEAD, small
ranges, every answer's Date and Server), written straight into the table
twisted.web keeps them in, and their values made once rather than for every
answer.

C{Request.setHeader} encodes the name of each header, looks it up, and
checks the value for line breaks; resticd's names are constants and its
values are bytes it made itself, so it writes them into
C{Headers._rawHeaders} under the keys twisted.web's own C{setRawHeaders}
would use (L{header_name}, within the pinned Twisted range): a small range
answer takes some 6 % less of the event loop's time.
"""

from __future__ import annotations

import math
from functools import lru_cache

from twisted.web.http import NOT_MODIFIED, datetimeToString, stringToDatetime
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest


def header_name(name: bytes) -> bytes:
    """
    The key twisted.web's L{Headers} keep the header C{name} under.
    """
    headers = Headers()
    headers.setRawHeaders(name, [b""])
    [key] = headers._rawHeaders
    return key


ACCEPT_RANGES = header_name(b"accept-ranges")
CONTENT_LENGTH = header_name(b"content-length")
CONTENT_RANGE = header_name(b"content-range")
CONTENT_TYPE = header_name(b"content-type")
DATE = header_name(b"date")
IF_MODIFIED_SINCE = header_name(b"if-modified-since")
LAST_MODIFIED = header_name(b"last-modified")
SERVER = header_name(b"server")


def response_headers(request: IRequest) -> dict[bytes, list[bytes]]:
    """
    The table of C{request}'s response headers: a header set there is a
    name from the constants above and a list of values without line breaks.
    """
    table: dict[bytes, list[bytes]] = request.responseHeaders._rawHeaders
    return table


class HTTPDate:
    """
    The value of the Date header for a time, formatted once per second.
    """

    _second = -1
    _value = b""

    def __call__(self, now: float) -> bytes:
        second = int(now)
        if second != self._second:
            self._second, self._value = second, datetimeToString(second)
        return self._value


http_date = HTTPDate()

#: An HTTP date for a whole number of seconds; objects are read again and
#: again, and their times repeat.
_modified_date = lru_cache(maxsize=1024)(datetimeToString)


def not_modified(request: IRequest, mtime: float) -> bool:
    """
    Give C{request}'s answer the Last-Modified header of an object last
    modified at C{mtime} and say whether the client's If-Modified-Since
    shows that its copy is current: then the answer is a 304, with no body
    (its code is set here). As C{Request.setLastModified}, in whole seconds,
    rounded up, except that an If-Modified-Since that is not a date (blank
    ones included, which make twisted.web's parser fail) is ignored, as
    RFC 9110 has it.
    """
    when = math.ceil(mtime)
    response_headers(request)[LAST_MODIFIED] = [_modified_date(when)]
    since = request.requestHeaders._rawHeaders.get(IF_MODIFIED_SINCE)
    if not since:
        return False
    try:
        client_has = stringToDatetime(since[-1].split(b";", 1)[0])
    except (ValueError, IndexError, OverflowError):
        return False
    if client_has < when:
        return False
    request.setResponseCode(NOT_MODIFIED)
    return True
