"""
The upload path: bodies streamed into the spool and hashed on the way in,
published durably and write-once, and nothing left behind on any failure.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from io import BytesIO
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel

from resticd.errors import Forbidden
from resticd.request import SpoolingRequest
from resticd import spool as spool_module
from resticd.paths import Layout
from resticd.reads import is_cached
from resticd.spool import (
    ALIGN,
    BACKLOG,
    BUDGET,
    BUDGET_MOST,
    BUDGET_TIME,
    PIECE,
    RATE_WINDOW,
    SMALL_BODY,
    STAGING,
    Spool,
    SpoolFile,
    WriteBudget,
    create_unique,
)
from resticd.store import Store
from resticd.threads import Stopped, run_inline

from .logcapture import LogCapture
from .test_reads import nowait_works
from .tools import mounted, unavailable
from .web import HeldWrites, Server, make_server, name_of

ensure = pytest_twisted.ensureDeferred


def open_request(server: Server) -> tuple[SpoolingRequest, StringTransport]:
    """
    A request on a real HTTP channel of the server's site, to be fed by hand
    as a channel would (headers, then body chunks, then the request line).
    """
    channel = HTTPChannel()
    channel.site = server.site  # type: ignore[attr-defined]
    channel.requestFactory = server.site.requestFactory
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234))
    channel.makeConnection(transport)
    request = SpoolingRequest(channel)
    channel.requests.append(request)
    return request, transport


def test_body_streams_into_the_spool_and_is_hashed(server: Server) -> None:
    """
    A request body is written to a spool file under the data directory as it
    arrives (in pieces of at most a MiB; nothing else is buffered in memory
    or C{$TMPDIR}), hashed on the way; synced, the file holds all of it, and
    it is removed when the connection is lost.
    """
    request, _ = open_request(server)
    body = os.urandom(300_000)
    request.gotLength(len(body))
    for i in range(0, len(body), 65536):
        request.handleContentChunk(body[i : i + 65536])
    spool = request.spool_file
    assert spool is not None
    spool.flush()
    assert spool.hexdigest() == name_of(body)
    path = spool.sync()
    assert os.path.dirname(path) == server.layout.spool_dir()
    with open(path, "rb") as f:
        assert f.read() == body
    assert isinstance(request.content, BytesIO) and request.content.getvalue() == b""
    request.connectionLost(Failure(ConnectionError("client went away")))
    assert server.spool_files() == []


def test_empty_body_makes_no_spool_file(server: Server) -> None:
    """
    Requests without a body (most of them) cost no spool file.
    """
    request, _ = open_request(server)
    request.gotLength(0)
    assert request.spool_file is None
    assert server.spool_files() == []


@ensure
async def test_body_shorter_than_content_length_is_400(repo: Server) -> None:
    """
    A body that ends before its declared Content-Length (a stream ended
    early) is a bad request and nothing is stored, even when the bytes that
    did arrive hash to the name.
    """
    body = b"0123456789" * 10
    name = name_of(body[:50])
    request, transport = open_request(repo)
    request.requestHeaders.setRawHeaders(b"content-length", [b"100"])
    request.gotLength(100)
    request.handleContentChunk(body[:50])
    request.requestReceived(b"POST", f"/r/data/{name}".encode(), b"HTTP/1.1")
    assert transport.value().startswith(b"HTTP/1.1 400 ")
    assert (await repo.client.head(f"/r/data/{name}")).code == 404
    assert repo.spool_files() == []


@ensure
async def test_identical_reupload_keeps_the_stored_file(repo: Server) -> None:
    """
    Uploading an object that exists with the same content (a retry after a
    lost answer) answers 200 and keeps the stored file untouched.
    """
    body = b"pack contents"
    name = name_of(body)
    path = repo.layout.object_path(("r",), "data", name)
    assert (await repo.client.post(f"/r/data/{name}", body)).code == 200
    before = os.stat(path)
    assert (await repo.client.post(f"/r/data/{name}", body)).code == 200
    after = os.stat(path)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert repo.spool_files() == []


@ensure
async def test_different_reupload_is_403(tmp_path) -> None:
    """
    Uploading different content under an existing name is refused with 403
    and the stored object is unchanged (seen with --no-verify-upload, the
    only way such an upload passes verification).
    """
    server = make_server(str(tmp_path / "d"), verify_upload=False)
    assert (await server.client.post("/r/?create=true")).code == 200
    name = "c" * 64
    assert (await server.client.post(f"/r/data/{name}", b"first")).code == 200
    reply = await server.client.post(f"/r/data/{name}", b"second")
    assert reply.code == 403
    assert (await server.client.get(f"/r/data/{name}")).body == b"first"
    assert server.spool_files() == []


@ensure
async def test_unverified_identical_reupload_is_recognised(tmp_path) -> None:
    """
    With --no-verify-upload (uploads are then not hashed as they come), a
    retried upload of the same content under the same name is still
    recognised as identical: 200, and the stored file is kept untouched.
    """
    server = make_server(str(tmp_path / "d"), verify_upload=False)
    assert (await server.client.post("/r/?create=true")).code == 200
    name = "e" * 64
    path = server.layout.object_path(("r",), "data", name)
    body = os.urandom(3 * PIECE + 5)
    assert (await server.client.post(f"/r/data/{name}", body)).code == 200
    before = os.stat(path)
    assert (await server.client.post(f"/r/data/{name}", body)).code == 200
    after = os.stat(path)
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert (await server.client.get(f"/r/data/{name}")).body == body
    assert server.spool_files() == []


def test_unhashed_spool_file_has_no_digest(tmp_path) -> None:
    """
    A spool made for unverified uploads writes every byte but computes no
    sha256 (the CPU --no-verify-upload saves); a verifying one does.
    """
    body = os.urandom(SMALL_BODY + 7)
    for hashed, digest in ((False, None), (True, name_of(body))):
        spool = Spool(str(tmp_path), hashed=hashed).open()
        spool.write(body)
        spool.flush()
        path = spool.sync()
        assert spool.hexdigest() == digest
        with open(path, "rb") as f:
            assert f.read() == body
        spool.remove()


class FullDiskSpoolFile(SpoolFile):
    """A spool file on a disk that fills up after C{room} bytes."""

    room = 10

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.room:
            self.error = OSError(errno.ENOSPC, "No space left on device")
            return
        super().write(data)


class FullDiskSpool(Spool):
    def open(self) -> SpoolFile:
        return FullDiskSpoolFile(self.directory, self.mode)


@ensure
async def test_disk_full_while_receiving_is_507(repo: Server) -> None:
    """
    When the disk fills while the body is written, the upload answers 507
    (restic's "insufficient storage", final) and leaves nothing behind.
    """
    repo.site.spool = FullDiskSpool(repo.layout.spool_dir())
    body = b"x" * 100
    reply = await repo.client.post(f"/r/data/{name_of(body)}", body)
    assert reply.code == 507
    assert (await repo.client.head(f"/r/data/{name_of(body)}")).code == 404
    assert repo.spool_files() == []


@ensure
async def test_disk_full_while_publishing_is_507(tmp_path) -> None:
    """
    When fsync or link fails for lack of space, the upload answers 507 and
    neither the object nor its spool file remains.
    """

    def full_disk(f: Any, *args: Any) -> Deferred[Any]:
        if getattr(f, "__name__", "") == "publish":
            return fail(OSError(errno.ENOSPC, "No space left on device"))
        return run_inline(f, *args)

    server = make_server(str(tmp_path / "d"), run=full_disk)
    assert (await server.client.post("/r/?create=true")).code == 200
    body = b"y" * 100
    reply = await server.client.post(f"/r/data/{name_of(body)}", body)
    assert reply.code == 507
    assert (await server.client.head(f"/r/data/{name_of(body)}")).code == 404
    assert server.spool_files() == []


@ensure
async def test_server_fault_is_plain_500(tmp_path) -> None:
    """
    An unexpected failure answers 500 in plain text, without a traceback.
    """

    def broken(f: Any, *args: Any) -> Deferred[Any]:
        return fail(RuntimeError("boom"))

    server = make_server(str(tmp_path / "d"), run=broken)
    reply = await server.client.post("/r/?create=true")
    assert reply.code == 500
    assert b"boom" not in reply.body and b"Traceback" not in reply.body


@ensure
async def test_a_spool_file_that_cannot_be_made_is_a_plain_500(repo: Server, logged: LogCapture) -> None:
    """
    When the spool file cannot be made (its directory was removed from under
    the daemon), a small upload and a large one both answer 500, store
    nothing, are logged once each and leave the daemon serving: once the
    directory is back, the same uploads are stored.
    """
    os.rmdir(repo.layout.spool_dir())
    bodies = [b"s" * 100, os.urandom(PIECE + 1)]  # one made with its fsync, one by its first write
    for body in bodies:
        reply = await repo.client.post(f"/r/data/{name_of(body)}", body)
        assert reply.code == 500, reply.body
        assert (await repo.client.head(f"/r/data/{name_of(body)}")).code == 404
    failures = logged.texts(LogLevel.critical)
    assert [f"POST /r/data/{name_of(body)} failed" for body in bodies] == failures, "each logged once"
    os.mkdir(repo.layout.spool_dir())
    for body in bodies:
        assert (await repo.client.post(f"/r/data/{name_of(body)}", body)).code == 200
        assert (await repo.client.get(f"/r/data/{name_of(body)}")).body == body
    assert repo.spool_files() == []


def test_spool_clean_removes_crash_leftovers(tmp_path) -> None:
    """
    Spool files left by a crash are removed by the startup cleanup.
    """
    spool = Spool(str(tmp_path))
    leftovers = [spool.open() for _ in range(3)]
    for f in leftovers:
        f.write(b"partial")
    assert spool.clean() == 3
    assert os.listdir(tmp_path) == []


def test_spool_modes(tmp_path) -> None:
    """
    Spool files are created 0600, or 0660 with group-accessible repositories.
    """
    for mode in (0o600, 0o660):
        spool = Spool(str(tmp_path / oct(mode)), mode)
        os.mkdir(spool.directory)
        spool.open().write(b"x")
        (name,) = os.listdir(spool.directory)
        assert os.stat(os.path.join(spool.directory, name)).st_mode & 0o777 == mode


def test_spool_files_never_take_a_name_in_use(tmp_path) -> None:
    """
    A spool file is never made under a name a file already has (one left
    with the same process id and number): the next number is taken, and
    the file that was there stays as it was.
    """
    fd, first = create_unique(str(tmp_path), 0o600)
    os.close(fd)
    prefix, number = first.rsplit("-", 1)
    taken = [f"{prefix}-{int(number) + k}" for k in (1, 2)]
    for path in taken:
        with open(path, "wb") as f:
            f.write(b"left behind")
    fd, made = create_unique(str(tmp_path), 0o600)
    os.close(fd)
    assert made == f"{prefix}-{int(number) + 3}"
    for path in taken:
        with open(path, "rb") as f:
            assert f.read() == b"left behind"


@pytest.fixture
def store(tmp_path) -> Store:

    store = Store(Layout(str(tmp_path / "d")))
    store.prepare_root()
    store.create_repo(("r",))
    return store


def spooled(store: Store, body: bytes) -> SpoolFile:
    spool = Spool(store.layout.spool_dir()).open()
    spool.write(body)
    return spool


def test_concurrent_identical_uploads_store_one_file(store: Store) -> None:
    """
    The same object uploaded by many clients at once ends as one correct
    file; every upload succeeds; no spool file remains.
    """
    body = os.urandom(50_000)
    name = name_of(body)
    spools = [spooled(store, body) for _ in range(20)]
    outcomes: list[bool] = []
    threads = [threading.Thread(target=lambda s=s: outcomes.append(store.publish(s, ("r",), "data", name))) for s in spools]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcomes) == [False] * 19 + [True]
    with open(store.layout.object_path(("r",), "data", name), "rb") as f:
        assert f.read() == body
    assert os.listdir(store.layout.spool_dir()) == []


def test_publish_never_replaces(store: Store) -> None:
    """
    Publishing different content under an existing name raises Forbidden
    and keeps the first file.
    """
    assert store.publish(spooled(store, b"first"), ("r",), "keys", "d" * 64)
    with pytest.raises(Forbidden):
        store.publish(spooled(store, b"other"), ("r",), "keys", "d" * 64)
    with open(store.layout.object_path(("r",), "keys", "d" * 64), "rb") as f:
        assert f.read() == b"first"
    assert os.listdir(store.layout.spool_dir()) == []


def test_publish_recreates_missing_fanout_dir(store: Store) -> None:
    """
    A missing C{data/xx/} directory is created (durably) on the first upload
    into it.
    """
    body = b"z"
    name = name_of(body)
    os.rmdir(os.path.join(store.layout.type_dir(("r",), "data"), name[:2]))
    assert store.publish(spooled(store, body), ("r",), "data", name)
    assert os.path.isfile(store.layout.object_path(("r",), "data", name))


def test_group_accessible_modes(tmp_path) -> None:
    """
    With group-accessible repositories, directories are 0770 and objects
    0660; otherwise 0700 and 0600.
    """
    from resticd.store import Modes

    for group, dmode, fmode in ((False, 0o700, 0o600), (True, 0o770, 0o660)):
        store = Store(Layout(str(tmp_path / str(group))), Modes.for_group(group))
        store.prepare_root()
        store.create_repo(("r",))
        spool = Spool(store.layout.spool_dir(), store.modes.file).open()
        spool.write(b"k")
        store.publish(spool, ("r",), "keys", name_of(b"k"))
        assert os.stat(store.layout.repo_dir(("r",))).st_mode & 0o777 == dmode
        assert os.stat(store.layout.type_dir(("r",), "data") + "/00").st_mode & 0o777 == dmode
        assert os.stat(store.layout.object_path(("r",), "keys", name_of(b"k"))).st_mode & 0o777 == fmode


def flushed_content(spool: SpoolFile | None, runner: HeldWrites) -> bytes:
    """
    Flush C{spool}, run every write queued in C{runner}, sync it; what its
    file holds.
    """
    assert spool is not None
    spool.flush()
    while runner.queued:
        runner.release()
    with open(spool.sync(), "rb") as f:
        return f.read()


def test_body_is_written_in_large_pieces_off_the_reactor(tmp_path) -> None:
    """
    With worker threads, the body is hashed and written in pieces of a MiB,
    not per network read, one after another, and its spool file is made by
    the first of those writes, not before; the digest and file are complete
    once the writes are flushed.
    """
    runner = HeldWrites()
    spool = SpoolFile(str(tmp_path), 0o600, runner, WriteBudget())
    body = os.urandom(3 * PIECE + 12345)
    for i in range(0, len(body), 65536):
        spool.write(body[i : i + 65536])
    assert len(runner.queued) == 1
    assert os.listdir(tmp_path) == [], "the file was made on the reactor thread"
    flushed = spool.flush()
    assert not flushed.called
    sizes = []
    while runner.queued:
        sizes.append(sum(len(piece) for piece in runner.queued[0][2]))
        runner.release()
    assert sizes[:3] == [PIECE] * 3 and sum(sizes) == len(body)
    assert flushed.called
    assert spool.hexdigest() == name_of(body)
    assert spool.size == len(body)
    path = spool.sync()
    assert os.path.dirname(path) == str(tmp_path)
    with open(path, "rb") as f:
        assert f.read() == body


def test_small_body_takes_one_trip_to_the_workers(tmp_path) -> None:
    """
    A small body (up to SMALL_BODY) is hashed when it is flushed, without
    a trip to the worker threads; its spool file is made and written by the
    same worker call that fsyncs and publishes it (nothing is made before);
    the stored object is complete and named by its digest. A body one byte
    over goes to the workers as before.
    """
    store = Store(Layout(str(tmp_path / "store")))
    store.prepare_root()
    store.create_repo(("r",))
    runner = HeldWrites()
    body = os.urandom(SMALL_BODY)
    spool = SpoolFile(store.layout.spool_dir(), 0o600, runner, WriteBudget())
    for i in range(0, len(body), 16384):
        spool.write(body[i : i + 16384])
    flushed = spool.flush()
    assert flushed.called and runner.queued == []
    assert spool.hexdigest() == name_of(body)
    assert os.listdir(store.layout.spool_dir()) == [], "the file was made before the worker call"
    assert store.publish(spool, ("r",), "data", name_of(body)) is True
    with open(store.layout.object_path(("r",), "data", name_of(body)), "rb") as f:
        assert f.read() == body
    assert os.listdir(store.layout.spool_dir()) == []

    bigger = SpoolFile(str(tmp_path), 0o600, runner, WriteBudget())
    bigger.write(os.urandom(SMALL_BODY + 1))
    assert not bigger.flush().called
    assert len(runner.queued) == 1


def test_discard_skips_queued_writes_and_removes_the_file_after_them(tmp_path) -> None:
    """
    A spool file dropped while pieces wait for the workers gets none of
    them written (the disk is spared up to BACKLOG bytes of a cancelled
    upload), and is removed once they are done, by a worker; nothing more is
    written to it.
    """
    runner = HeldWrites()
    spool = SpoolFile(str(tmp_path), 0o600, runner, WriteBudget())
    spool.write(os.urandom(PIECE))
    runner.release()  # the first piece is in the file
    assert spool.path is not None
    path = spool.path
    spool.write(os.urandom(PIECE))  # the second one waits
    spool.discard()
    spool.write(b"more")
    runner.release()
    assert os.path.getsize(path) == PIECE
    runner.release()  # the removal, also in a worker
    assert runner.queued == []
    assert os.listdir(tmp_path) == []


def test_an_upload_dropped_before_its_first_queued_write_ran_makes_no_file(tmp_path) -> None:
    """
    An upload dropped while its first piece waits for the workers never
    makes its spool file, and its removal takes no further trip to them.
    """
    runner = HeldWrites()
    spool = SpoolFile(str(tmp_path), 0o600, runner, WriteBudget())
    spool.write(os.urandom(PIECE))
    spool.discard()
    runner.release()
    assert runner.queued == [] and os.listdir(tmp_path) == [] and spool.path is None


def test_an_upload_dropped_before_its_first_write_makes_no_file(tmp_path) -> None:
    """
    An upload dropped before anything of it was written (a small body cut
    off or refused) never makes a spool file, and dropping it takes no trip
    to the worker threads.
    """
    runner = HeldWrites()
    spool = SpoolFile(str(tmp_path), 0o600, runner, WriteBudget())
    spool.write(b"the start of a body")
    spool.discard()
    spool.write(b"and what came after it was dropped")
    assert spool.flush().called
    assert runner.queued == [] and os.listdir(tmp_path) == [] and spool.path is None


class StoppingWrites(HeldWrites):
    """
    Held writes, until the worker threads are stopped: then every call is
    refused, as L{resticd.threads.WorkerThreads} refuses them.
    """

    stopped = False

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        if self.stopped:
            raise Stopped("the worker threads are stopped")
        return super().__call__(f, *args)


def test_a_file_dropped_after_the_workers_stopped_is_removed_at_once(tmp_path, logged: LogCapture) -> None:
    """
    An upload dropped once the worker threads have stopped (its connection
    closed late in a shutdown) has its spool file removed on the spot, and
    no failure is logged.
    """
    runner = StoppingWrites()
    spool = SpoolFile(str(tmp_path), 0o600, runner, WriteBudget())
    spool.write(os.urandom(PIECE))
    runner.release()
    assert len(os.listdir(tmp_path)) == 1
    runner.stopped = True
    spool.discard()
    assert os.listdir(tmp_path) == []
    assert logged.texts(LogLevel.critical) == []


def test_write_backlog_pauses_the_client(server: Server) -> None:
    """
    When the worker threads fall behind by more than the write budget, the
    upload stops reading from its client (the transport is paused) until
    the backlog is down to half the budget, then reading resumes.
    """
    runner = HeldWrites()
    server.site.spool = Spool(server.layout.spool_dir(), 0o600, runner, WriteBudget(limit=2 * PIECE))
    request, transport = open_request(server)
    body = os.urandom(4 * PIECE)
    request.gotLength(len(body))
    for i in range(0, len(body), 65536):
        request.handleContentChunk(body[i : i + 65536])
    assert transport.producerState == "paused"
    while runner.queued:
        runner.release()
    assert transport.producerState == "producing"
    assert flushed_content(request.spool_file, runner) == body


def test_what_uploads_keep_for_their_next_piece_counts_against_the_budget(server: Server) -> None:
    """
    What uploads keep for their next piece (up to a MiB each) counts
    against the write budget of all uploads: of six uploads that each got
    half a piece, those past a budget of two pieces stop reading from their
    clients; while they wait, what the others keep stays within a quarter
    of the budget (the rest goes to the workers: the room they wait for
    must not wait for more of a body, which its client may be unable to
    send). They read again once it is written, and every body is stored
    whole.
    """
    runner = HeldWrites()
    server.site.spool = Spool(server.layout.spool_dir(), 0o600, runner, WriteBudget(limit=2 * PIECE))
    uploads = [open_request(server) for _ in range(6)]
    bodies = [os.urandom(PIECE + 4321) for _ in uploads]
    for (request, _), body in zip(uploads, bodies):
        request.gotLength(len(body))
        request.handleContentChunk(body[: PIECE // 2])
    assert [transport.producerState for _, transport in uploads] == ["producing"] * 4 + ["paused"] * 2
    kept = [request.spool_file.kept for request, _ in uploads if request.spool_file is not None]
    assert sum(kept) <= PIECE // 2 and len(runner.queued) == 5
    runner.release_all()
    assert [transport.producerState for _, transport in uploads] == ["producing"] * 6
    for (request, _), body in zip(uploads, bodies):
        request.handleContentChunk(body[PIECE // 2 :])
    for (request, _), body in zip(uploads, bodies):
        assert flushed_content(request.spool_file, runner) == body


def drain(budget: WriteBudget, clock: Clock, rate: float, seconds: float, step: int = PIECE) -> None:
    """
    Take and give back C{step} bytes at a time through C{budget} for
    C{seconds}, at C{rate} bytes per second of C{clock} (the budget's).
    """
    for _ in range(round(rate * seconds / step)):
        budget.take(step)
        clock.advance(step / rate)
        budget.give(step)


def test_the_write_budget_grows_while_the_writes_drain_it_fast() -> None:
    """
    While the workers give bytes back fast, the cap grows to what they
    write in BUDGET_TIME at that rate, within BUDGET_MOST: bytes a fixed
    cap of BUDGET would hold back go on (a fast disk is fed without
    waiting for room).
    """
    clock = Clock()
    budget = WriteBudget(BUDGET, BUDGET_MOST, clock.seconds)
    assert budget.limit == BUDGET
    middle = (BUDGET + BUDGET_MOST) / 2 / BUDGET_TIME
    drain(budget, clock, middle, 2 * RATE_WINDOW)
    assert abs(budget.limit - (BUDGET + BUDGET_MOST) // 2) <= PIECE
    drain(budget, clock, 1 << 30, 2 * RATE_WINDOW)
    assert budget.limit == BUDGET_MOST
    budget.take(BUDGET_MOST - PIECE)
    assert not budget.exceeded
    budget.take(2 * PIECE)
    assert budget.exceeded


def test_the_write_budget_keeps_its_least_for_a_slow_disk_and_after_a_pause() -> None:
    """
    Bytes given back slowly (a disk slower than the clients) leave the cap
    at BUDGET, where more would only hold more memory; and after a pause in
    the writes the cap starts from BUDGET again, however fast they went.
    """
    clock = Clock()
    budget = WriteBudget(BUDGET, BUDGET_MOST, clock.seconds)
    drain(budget, clock, 30 << 20, 1.0)
    assert budget.limit == BUDGET
    budget.take(BUDGET + 1)
    assert budget.exceeded
    budget.give(BUDGET + 1)
    drain(budget, clock, 1 << 30, 2 * RATE_WINDOW)
    assert budget.limit == BUDGET_MOST
    clock.advance(10.0)
    budget.take(PIECE)
    budget.give(PIECE)
    assert budget.limit == BUDGET


def test_a_write_budget_made_with_one_limit_keeps_it() -> None:
    """
    A budget given only its limit keeps that cap however fast its bytes
    are written (the tests of the budget's other rules rely on it), while
    the spool's own budget, by default, grows from BUDGET to BUDGET_MOST.
    """
    clock = Clock()
    budget = WriteBudget(2 * PIECE, clock=clock.seconds)
    drain(budget, clock, 1 << 30, 2 * RATE_WINDOW)
    assert budget.limit == 2 * PIECE
    default = Spool("/nonexistent").budget
    assert (default.least, default.most) == (BUDGET, BUDGET_MOST)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(min_value=0, max_value=4 * PIECE), st.floats(min_value=0, max_value=1.0)),
        max_size=60,
    )
)
def test_the_write_budget_stays_between_its_least_and_its_most(steps: list[tuple[int, float]]) -> None:
    """
    Whatever is given back, however fast or slowly, the cap stays within
    BUDGET and BUDGET_MOST.
    """
    clock = Clock()
    budget = WriteBudget(BUDGET, BUDGET_MOST, clock.seconds)
    for size, seconds in steps:
        budget.take(size)
        clock.advance(seconds)
        budget.give(size)
        assert BUDGET <= budget.limit <= BUDGET_MOST


def test_uploads_past_the_least_go_on_while_the_writes_drain_fast(server: Server) -> None:
    """
    Through the site: with a budget of two to four pieces whose writes
    drained fast lately, four uploads with a piece each keep reading from
    their clients where a fixed budget of two pieces pauses all but two;
    a fifth, past the most, waits for room.
    """
    clock = Clock()
    fixed = WriteBudget(2 * PIECE, clock=clock.seconds)
    grown = WriteBudget(2 * PIECE, 4 * PIECE, clock.seconds)
    for budget in (fixed, grown):
        drain(budget, clock, 1 << 30, 2 * RATE_WINDOW)
    assert (fixed.limit, grown.limit) == (2 * PIECE, 4 * PIECE)
    for budget, producing in ((fixed, 2), (grown, 4)):
        runner = HeldWrites()
        server.site.spool = Spool(server.layout.spool_dir(), 0o600, runner, budget)
        uploads = [open_request(server) for _ in range(5)]
        for request, _ in uploads:
            request.gotLength(3 * PIECE)
            request.handleContentChunk(bytes(PIECE))
        assert states(uploads) == ["producing"] * producing + ["paused"] * (5 - producing)
        for request, _ in uploads:
            if request.spool_file is not None:
                request.spool_file.discard()
        runner.release_all()


def paused_uploads(server: Server, runner: HeldWrites, pieces: int, count: int) -> list[tuple[SpoolingRequest, StringTransport]]:
    """
    C{count} uploads of three pieces each under a write budget of
    C{pieces} pieces, each given its first piece: those past the budget
    wait for room.
    """
    server.site.spool = Spool(server.layout.spool_dir(), 0o600, runner, WriteBudget(limit=pieces * PIECE))
    uploads = [open_request(server) for _ in range(count)]
    for request, _ in uploads:
        request.gotLength(3 * PIECE)
        request.handleContentChunk(bytes(PIECE))
    return uploads


def states(uploads: list[tuple[SpoolingRequest, StringTransport]]) -> list[str]:
    return [transport.producerState for _, transport in uploads]


def test_uploads_waiting_for_the_budget_go_on_in_turn(server: Server) -> None:
    """
    Uploads waiting for the write budget go on in turn once the writes
    caught up, as many as the room left takes a read each (a MiB), not all
    at once (each would bring a read); the next ones go on as the reads of
    those come and are written, and every body is stored whole.
    """
    runner = HeldWrites()
    uploads = paused_uploads(server, runner, pieces=4, count=10)
    assert states(uploads) == ["producing"] * 4 + ["paused"] * 6
    runner.release_all()
    assert states(uploads) == ["producing"] * 8 + ["paused"] * 2
    for request, _ in uploads[4:8]:
        request.handleContentChunk(bytes(PIECE))
    assert states(uploads)[8:] == ["paused"] * 2, "the reads on their way fill the room"
    runner.release_all()
    assert states(uploads) == ["producing"] * 10
    for request, _ in uploads:
        while request.spool_file is not None and request.spool_file.size < 3 * PIECE:
            request.handleContentChunk(bytes(PIECE))
            runner.release_all()
        assert flushed_content(request.spool_file, runner) == bytes(3 * PIECE)


def test_an_upload_that_went_on_and_brought_a_short_read_makes_room_for_the_next(server: Server) -> None:
    """
    An upload let go on by the write budget is counted as a read (a MiB) on
    its way until its bytes come; when they are fewer, the room left goes
    to the next uploads waiting at once, without waiting for a write.
    """
    runner = HeldWrites()
    uploads = paused_uploads(server, runner, pieces=4, count=10)
    runner.release_all()
    assert states(uploads) == ["producing"] * 8 + ["paused"] * 2
    for request, _ in uploads[4:8]:
        request.handleContentChunk(bytes(64 << 10))
    assert runner.queued == [] and states(uploads) == ["producing"] * 10


def test_an_upload_that_went_on_and_ended_without_a_read_makes_room_for_the_next(server: Server) -> None:
    """
    An upload let go on by the write budget whose client then goes away
    without sending anything more makes room for the next one waiting,
    which would otherwise wait for a read that never comes.
    """
    runner = HeldWrites()
    uploads = paused_uploads(server, runner, pieces=2, count=6)
    runner.release_all()
    assert states(uploads) == ["producing"] * 4 + ["paused"] * 2
    for request, _ in uploads[2:4]:
        request.connectionLost(Failure(ConnectionError("client went away")))
    runner.release_all()
    assert states(uploads)[4:] == ["producing"] * 2


def test_an_upload_far_behind_its_writes_reports_it_and_when_it_caught_up(tmp_path) -> None:
    """
    An upload whose writes are more than BACKLOG bytes behind says so, and
    one waiting for them to catch up is called once they are no more than
    half of it behind, not before, and only once.
    """
    runner = HeldWrites()
    spool = SpoolFile(str(tmp_path), 0o600, runner, WriteBudget(limit=64 * PIECE))
    for i in range(0, BACKLOG + PIECE, 65536):
        spool.write(os.urandom(65536))
    assert spool.backlog == BACKLOG + PIECE and spool.backlogged
    caught_up: list[int] = []
    spool.when_caught_up(lambda: caught_up.append(spool.backlog))
    runner.release()  # one piece written: BACKLOG behind, more than half of it
    assert caught_up == [] and spool.backlogged is False
    while runner.queued and not caught_up:
        runner.release()
    assert caught_up == [BACKLOG // 2]
    while runner.queued:
        runner.release()
    assert caught_up == [BACKLOG // 2] and spool.backlog == 0


def test_a_failing_resume_is_logged_and_neither_stops_the_others_nor_the_writes(tmp_path, logged: LogCapture) -> None:
    """
    When one upload waiting for its writes to catch up fails to resume, the
    failure is logged once, the other waiters are still resumed, and the
    file's later writes go on (it is not taken for a write error).
    """
    runner = HeldWrites()
    spool = SpoolFile(str(tmp_path), 0o600, runner, WriteBudget(limit=64 * PIECE))
    body = os.urandom(BACKLOG + PIECE)
    for i in range(0, len(body), 65536):
        spool.write(body[i : i + 65536])
    resumed: list[str] = []

    def broken() -> None:
        raise ValueError("resume broke")

    spool.when_caught_up(broken)
    spool.when_caught_up(lambda: resumed.append("other"))
    while runner.queued:
        runner.release()
    assert resumed == ["other"]
    assert len([t for t in logged.texts(LogLevel.critical) if "resuming an upload failed" in t]) == 1
    assert spool.error is None
    spool.write(b"tail")
    assert flushed_content(spool, runner) == body + b"tail"


def test_one_upload_far_behind_its_writes_pauses_its_client(server: Server) -> None:
    """
    However much room the write budget of all uploads has, a single upload
    whose writes fall more than BACKLOG bytes behind stops reading from its
    client (so that a big upload to a slow disk holds a few MiB, not the
    whole budget), and reads again once they are half of that behind; the
    body arrives intact.
    """
    runner = HeldWrites()
    server.site.spool = Spool(server.layout.spool_dir(), 0o600, runner, WriteBudget(limit=64 * PIECE))
    request, transport = open_request(server)
    body = os.urandom(3 * BACKLOG)
    request.gotLength(len(body))
    sent = 0
    while sent < len(body) and transport.producerState == "producing":
        request.handleContentChunk(body[sent : sent + 65536])
        sent += 65536
    assert transport.producerState == "paused"
    assert request.spool_file is not None
    assert BACKLOG < request.spool_file.backlog <= BACKLOG + 65536
    runner.release()
    assert transport.producerState == "paused"
    while transport.producerState == "paused":
        runner.release()
    assert request.spool_file.backlog <= BACKLOG // 2
    while sent < len(body):
        if transport.producerState == "paused":
            runner.release()
            continue
        request.handleContentChunk(body[sent : sent + 65536])
        sent += 65536
    assert flushed_content(request.spool_file, runner) == body


def release_one_write_of(runner: HeldWrites, spool: SpoolFile | None) -> None:
    """
    Run the oldest write of C{spool} queued in C{runner}.
    """
    mine = [i for i, (_, f, _) in enumerate(runner.queued) if getattr(f, "__self__", None) is spool]
    d, f, args = runner.queued.pop(mine[0])
    run_inline(f, *args).chainDeferred(d)


def test_an_upload_resumed_by_the_budget_waits_for_its_own_writes(server: Server) -> None:
    """
    An upload paused because all uploads together were too far behind stays
    paused when the others' writes make room but its own writes are still
    more than BACKLOG behind, and reads again once those are half of it
    behind.
    """
    runner = HeldWrites()
    limit = 2 * (BACKLOG + PIECE)
    server.site.spool = Spool(server.layout.spool_dir(), 0o600, runner, WriteBudget(limit=limit))
    other, _ = open_request(server)
    other.gotLength(limit - BACKLOG)
    for i in range(0, limit - BACKLOG, 65536):
        other.handleContentChunk(os.urandom(65536))
    request, transport = open_request(server)
    request.gotLength(4 * BACKLOG)
    for i in range(0, BACKLOG - PIECE, 65536):
        request.handleContentChunk(os.urandom(65536))
    assert transport.producerState == "producing"
    # One read puts both the budget and this upload's own backlog over.
    request.handleContentChunk(os.urandom(2 * PIECE))
    assert transport.producerState == "paused"
    assert request.spool_file is not None and request.spool_file.backlog == BACKLOG + PIECE
    release_writes_of(runner, other.spool_file)  # the budget is down to half
    assert transport.producerState == "paused"
    while request.spool_file.backlog > BACKLOG // 2:
        assert transport.producerState == "paused"
        release_one_write_of(runner, request.spool_file)
    assert transport.producerState == "producing"


def release_writes_of(runner: HeldWrites, spool: SpoolFile | None) -> None:
    """
    Run every write of C{spool} queued in C{runner}, leaving the others.
    """
    assert spool is not None
    while True:
        mine = [i for i, (_, f, _) in enumerate(runner.queued) if getattr(f, "__self__", None) is spool]
        if not mine:
            return
        d, f, args = runner.queued.pop(mine[0])
        run_inline(f, *args).chainDeferred(d)


@ensure
async def test_upload_answered_while_paused_does_not_break_the_others(repo: Server) -> None:
    """
    An upload paused by the write budget whose body is complete is written,
    stored and answered while another upload's backlog still holds the
    budget; when that backlog drains, the other upload is resumed and
    stored, and neither gets a write error.
    """
    runner = HeldWrites()
    repo.site.spool = Spool(repo.layout.spool_dir(), 0o600, runner, WriteBudget(limit=2 * PIECE))
    first, first_transport = open_request(repo)
    body = os.urandom(3 * PIECE)
    name = name_of(body)
    first.requestHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    first.gotLength(len(body))
    for i in range(0, len(body), 65536):
        first.handleContentChunk(body[i : i + 65536])
    assert first_transport.producerState == "paused"
    first_spool = first.spool_file

    second, second_transport = open_request(repo)
    other = os.urandom(2 * PIECE + 1)
    second.requestHeaders.setRawHeaders(b"content-length", [b"%d" % len(other)])
    second.gotLength(len(other))
    second.handleContentChunk(other[:PIECE])
    second.handleContentChunk(other[PIECE : 2 * PIECE])
    assert second_transport.producerState == "paused"
    second_spool = second.spool_file

    # The first upload is written, stored and answered; the second one's
    # backlog still exceeds half the budget.
    first.requestReceived(b"POST", f"/r/data/{name}".encode(), b"HTTP/1.1")
    release_writes_of(runner, first_spool)
    assert first_transport.value().startswith(b"HTTP/1.1 200 ")
    assert second_transport.producerState == "paused"

    release_writes_of(runner, second_spool)
    assert second_transport.producerState == "producing"
    second.handleContentChunk(other[2 * PIECE :])
    second.requestReceived(b"POST", f"/r/data/{name_of(other)}".encode(), b"HTTP/1.1")
    release_writes_of(runner, second_spool)
    assert second_transport.value().startswith(b"HTTP/1.1 200 ")
    assert (await repo.client.get(f"/r/data/{name_of(other)}")).code == 200
    assert repo.spool_files() == []


def test_directory_fsyncs_are_shared_by_concurrent_uploads() -> None:
    """
    Uploads that publish into one directory at the same time share its
    fsync (fewer than one per upload), yet each returns only after an fsync
    that started after it asked, so every acknowledged upload is durable.
    """
    import time

    from resticd.store import DirectorySyncs

    runs: list[tuple[float, float]] = []
    lock = threading.Lock()

    def slow_fsync(path: str) -> None:
        start = time.monotonic()
        time.sleep(0.05)
        with lock:
            runs.append((start, time.monotonic()))

    syncs = DirectorySyncs(slow_fsync)
    calls: list[tuple[float, float]] = []

    def upload() -> None:
        asked = time.monotonic()
        syncs.sync("/dir")
        with lock:
            calls.append((asked, time.monotonic()))

    threads = [threading.Thread(target=upload) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 20
    assert 1 <= len(runs) < 20
    for asked, returned in calls:
        assert any(start >= asked and end <= returned for start, end in runs)


# -- direct writes ---------------------------------------------------------------


def cached_blocks(path: str, size: int) -> list[bool]:
    """
    Whether the first byte of each MiB of the file at C{path}, up to
    C{size}, is in the page cache (asked through a descriptor without
    read-ahead, so that asking about one brings in none of the next).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return [is_cached(fd, offset, 1) for offset in range(0, size, PIECE)]
    finally:
        os.close(fd)


@ensure
async def test_a_large_upload_is_stored_past_the_page_cache(repo: Server) -> None:
    """
    A body larger than SMALL_BODY is written with O_DIRECT: once stored,
    none of it but its last, partial block is in the page cache (uploads do
    not push what is read often out of it), and it reads back intact.
    """
    large = os.urandom(3 * PIECE + 1234)
    assert (await repo.client.post(f"/r/data/{name_of(large)}", large)).code == 200
    path = repo.layout.object_path(("r",), "data", name_of(large))
    if not nowait_works(path):
        unavailable("this filesystem does not tell what is in the page cache")
    assert cached_blocks(path, len(large) - len(large) % ALIGN) == [False] * 3
    assert (await repo.client.get(f"/r/data/{name_of(large)}")).body == large


def write_through(spool: SpoolFile, body: bytes, cuts: list[int]) -> bytes:
    """
    Write C{body} to C{spool} in network reads of the sizes C{cuts} (the
    rest in one read), flush and sync it; what its file holds.
    """
    offset = 0
    for size in cuts:
        spool.write(body[offset : offset + size])
        offset += size
    if offset < len(body):
        spool.write(body[offset:])
    spool.flush()
    with open(spool.sync(), "rb") as f:
        return f.read()


@given(st.lists(st.integers(1, 3 * STAGING // 2), max_size=10), st.integers(0, ALIGN + 1))
@settings(max_examples=40, deadline=None)
def test_direct_writes_keep_every_byte_in_order(tmp_path_factory: pytest.TempPathFactory, cuts: list[int], extra: int) -> None:
    """
    However the network cuts a body (reads smaller and larger than the
    staging buffer, bodies ending on a block boundary or just past one), the
    file written through the staging buffer holds exactly the body, and the
    digest is the body's, before the file is synced.
    """
    directory = tmp_path_factory.mktemp("spool")
    body = os.urandom(sum(cuts) + extra)
    spool = SpoolFile(str(directory), 0o600, hashed=True)
    assert write_through(spool, body, cuts) == body
    assert spool.hexdigest() == name_of(body)
    spool.remove()


def test_a_filesystem_refusing_direct_writes_gets_them_through_the_page_cache(tmp_path, logged: LogCapture) -> None:
    """
    On a filesystem that refuses O_DIRECT (a real ramfs), large bodies are
    written through the page cache instead, intact; the spool logs that
    once (from the reactor thread, once the workers' write is back), however
    many files it writes.
    """
    root = tmp_path / "ramfs"
    root.mkdir()
    with mounted("ramfs", root):
        spool = Spool(str(root), run=run_inline)
        for body in (os.urandom(PIECE + 5000), os.urandom(2 * PIECE + 1)):
            file = spool.open()
            assert write_through(file, body, [65536] * (len(body) // 65536)) == body
            assert file.hexdigest() == name_of(body)
            file.remove()
    refusals = [t for t in logged.texts(LogLevel.info) if "written through the page cache" in t]
    assert refusals == [f"uploads to {root} are written through the page cache: its filesystem refuses direct writes (Invalid argument)"]


def test_a_direct_write_the_disk_refuses_goes_through_the_page_cache(
    tmp_path, logged: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Should the filesystem take O_DIRECT files but refuse a write (a disk
    whose blocks do not divide what resticd takes for whole blocks), that
    write and the rest of the file go through the page cache, intact; the
    next file is not written with O_DIRECT; the refusal is logged once.
    """
    monkeypatch.setattr(spool_module, "ALIGN", 1000)  # no disk's block size divides it
    spool = Spool(str(tmp_path))
    bodies = [os.urandom(STAGING + 3000), os.urandom(2 * STAGING)]
    for body in bodies:
        file = spool.open()
        assert write_through(file, body, [100_001] * (len(body) // 100_001)) == body
        assert file.hexdigest() == name_of(body)
        file.remove()
    if spool.direct.enabled:
        unavailable("this filesystem takes direct writes of any length")
    refusals = [t for t in logged.texts(LogLevel.info) if "written through the page cache" in t]
    assert len(refusals) == 1


def test_staging_buffers_are_reused_and_those_not_lent_go_back_when_idle(tmp_path) -> None:
    """
    Direct writes borrow page-aligned staging buffers: one after another they
    reuse one, at once they get one each; the idle trim closes those not
    lent (and says so), never one a write holds, and writes go on after it.
    """
    spool = Spool(str(tmp_path))
    direct = spool.direct
    first = direct.take()
    assert len(first) == STAGING and ctypes.addressof(ctypes.c_char.from_buffer(first)) % ALIGN == 0
    direct.give(first)
    again = direct.take()
    assert again is first
    other = direct.take()
    assert other is not first
    direct.give(other)
    assert direct.release() is True
    assert other.closed and not again.closed
    assert direct.release() is False
    direct.give(again)
    body = os.urandom(STAGING + ALIGN + 1)
    assert write_through(spool.open(), body, []) == body
    assert direct.release() is True and again.closed


def test_a_staging_buffer_still_looked_at_is_released_later(tmp_path) -> None:
    """
    A staging buffer something still has a view of (the traceback of a failed
    write, kept with the upload's error) is not closed by the idle release,
    which neither fails nor reports it; a later release, once the view is
    gone, closes it.
    """
    direct = Spool(str(tmp_path)).direct
    buffer = direct.take()
    view = memoryview(buffer)
    direct.give(buffer)
    assert direct.release() is False
    assert not buffer.closed
    view.release()
    assert direct.release() is True
    assert buffer.closed
