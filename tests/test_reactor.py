"""
L{resticd.reactor}: the epoll reactor without a log context per event, on a
real epoll and real sockets (never installed as the global reactor here).
"""

from __future__ import annotations

import http.client
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from resticd.reactor import ResticReactor

from .daemon import running
from .logcapture import LogCapture


class Reader:
    """
    A selectable over one socket that records what the reactor asks of it.
    """

    def __init__(self, sock: socket.socket, name: str, fail_on_lost: bool = False) -> None:
        self.sock = sock
        self.name = name
        self.fail_on_lost = fail_on_lost
        self.reads: list[bytes] = []
        self.lost: list[Failure] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return self.name

    def doRead(self) -> Any:
        data = self.sock.recv(100)
        self.reads.append(data)
        if not data:
            return ConnectionDone()
        return None

    def doWrite(self) -> Any:
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)
        if self.fail_on_lost:
            raise RuntimeError("connectionLost broke")


@pytest.fixture
def reactor() -> Iterator[ResticReactor]:
    r = ResticReactor()
    try:
        yield r
    finally:
        r.removeAll()
        r._poller.close()
        r.waker.connectionLost(None)


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


def test_events_reach_their_selectables(reactor: ResticReactor) -> None:
    """
    Bytes arriving on a watched socket are handed to its reader in the next
    poll; a socket closed by its peer is read to its end and its selectable
    told the connection is lost.
    """
    a, b = pair()
    reader = Reader(a, "one")
    reactor.addReader(reader)
    b.sendall(b"hello")
    reactor.doPoll(0)
    assert reader.reads == [b"hello"]
    b.close()
    reactor.doPoll(0)
    assert reader.reads[-1] == b""
    assert [f.type for f in reader.lost] == [ConnectionDone]
    assert reader not in reactor.getReaders()
    a.close()


def test_a_failing_event_is_logged_once_and_the_others_are_handled(reactor: ResticReactor, logged: LogCapture) -> None:
    """
    An error escaping the handling of one event (here a selectable whose
    connectionLost raises) is logged once, naming that connection, and the
    other events of the same poll are still handled.
    """
    a1, b1 = pair()
    a2, b2 = pair()
    broken = Reader(a1, "broken-connection", fail_on_lost=True)
    fine = Reader(a2, "fine")
    reactor.addReader(broken)
    reactor.addReader(fine)
    b1.close()
    b2.sendall(b"still here")
    reactor.doPoll(0)
    assert fine.reads == [b"still here"]
    failures = [e for e in logged.events if e.get("log_failure") is not None]
    assert len(failures) == 1
    assert "broken-connection" in logged.texts()[-1]
    assert failures[0]["log_failure"].check(RuntimeError)
    reactor.removeAll()
    for s in (a1, a2, b2):
        s.close()


def test_an_event_for_a_removed_selectable_is_skipped(reactor: ResticReactor, logged: LogCapture) -> None:
    """
    A selectable removed while the events of its poll are handled (by the
    handling of an earlier one) is not called, and nothing is logged.
    """
    a1, b1 = pair()
    a2, b2 = pair()
    second = Reader(a2, "second")

    class Remover(Reader):
        def doRead(self) -> Any:
            reactor.removeReader(second)
            return super().doRead()

    first = Remover(a1, "first")
    reactor.addReader(first)
    reactor.addReader(second)
    b1.sendall(b"x")  # ready first, so handled first
    b2.sendall(b"y")
    reactor.doPoll(0)
    assert (first.reads, second.reads) == ([b"x"], [])
    assert [e for e in logged.events if e.get("log_failure") is not None or e.get("isError")] == []
    reactor.removeAll()
    for s in (a1, b1, a2, b2):
        s.close()


@pytest.mark.parametrize(
    "options, reactor_class",
    [
        ((), "resticd.reactor.ResticReactor"),
        (("--reactor", "poll"), "twisted.internet.pollreactor.PollReactor"),
    ],
)
def test_the_daemon_runs_on_resticds_reactor_unless_told_otherwise(
    tmp_path: Path, options: tuple[str, ...], reactor_class: str
) -> None:
    """
    C{twistd resticd} runs on resticd's reactor, and on the one named by
    C{twistd --reactor} when there is one; either way it answers.
    """
    with running(tmp_path, tls=False, twistd_options=options) as daemon:
        conn = http.client.HTTPConnection(daemon.host, daemon.port, timeout=10)
        conn.request("POST", "/r/?create=true")
        assert conn.getresponse().status == 200
        conn.close()
        assert f"reactor class: {reactor_class}." in daemon.log()


def test_a_failing_event_of_a_selectable_without_a_log_prefix_is_logged(reactor: ResticReactor, logged: LogCapture) -> None:
    """
    A selectable whose log prefix cannot be had (its logPrefix raises) is
    named by its repr when the handling of its event fails; the loop goes on.
    """

    class Nameless(Reader):
        def logPrefix(self) -> str:
            raise RuntimeError("no prefix")

        def __repr__(self) -> str:
            return "<the nameless selectable>"

    a, b = pair()
    nameless = Nameless(a, "", fail_on_lost=True)
    reactor.addReader(nameless)
    b.close()
    reactor.doPoll(0)
    assert [e for e in logged.events if e.get("log_failure") is not None]
    assert "<the nameless selectable>" in logged.texts()[-1]
    reactor.removeAll()
    a.close()
