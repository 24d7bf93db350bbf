"""
Fixtures shared by the test suite.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from .logcapture import LogCapture
from .web import Server, make_server


@pytest.fixture
def server(tmp_path) -> Server:
    """
    An open (no authentication) server over an empty data directory, its
    blocking work done inline.
    """
    return make_server(str(tmp_path / "data"))


@pytest_twisted.async_fixture
async def repo(server: Server) -> Server:
    """
    The same server with a repository C{/r/} created.
    """
    assert (await server.client.post("/r/?create=true")).code == 200
    return server


@pytest.fixture
def logged() -> Iterator[LogCapture]:
    """
    Everything logged while the test runs.
    """
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    try:
        yield capture
    finally:
        globalLogPublisher.removeObserver(capture)
