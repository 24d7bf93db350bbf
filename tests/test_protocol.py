"""
Every endpoint of restic's REST protocol and every status code it answers,
through the real site and request objects, in memory.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from resticd import listing, resources
from resticd.listing import ListingReader
from resticd.resources import StoredFile
from resticd.threads import run_inline

from .logcapture import LogCapture
from .test_access import Connection
from .test_h2 import data_frames, h2_requests
from .web import V2, HeldWrites, Server, make_server, name_of

ensure = pytest_twisted.ensureDeferred

PLAIN = "text/plain; charset=utf-8"


def stored(server: Server, *parts: str) -> str:
    return os.path.join(server.layout.root, *parts)


# -- repositories ----------------------------------------------------------


@ensure
async def test_create_makes_restics_layout(server: Server) -> None:
    """
    C{POST /r/?create=true} answers 200 and creates the type directories and
    the 256 data fan-out directories.
    """
    reply = await server.client.post("/r/?create=true")
    assert reply.code == 200
    for kind in ("data", "keys", "locks", "snapshots", "index"):
        assert os.path.isdir(stored(server, "r", kind))
    assert sorted(os.listdir(stored(server, "r", "data"))) == [f"{i:02x}" for i in range(256)]
    assert not os.path.exists(stored(server, "r", "config"))


@ensure
async def test_create_is_idempotent_until_there_is_a_config(server: Server) -> None:
    """
    Creating again answers 200 while the repository has no config (restic's
    init may retry), and 409 once it has one.
    """
    client = server.client
    assert (await client.post("/r/?create=true")).code == 200
    assert (await client.post("/r?create=true")).code == 200
    assert (await client.post("/r/config", b"cfg")).code == 200
    reply = await client.post("/r/?create=true")
    assert reply.code == 409
    assert reply.header("content-type") == PLAIN


@ensure
async def test_create_needs_create_true(server: Server) -> None:
    """
    A POST on a repository without C{create=true} is a bad request and
    creates nothing.
    """
    for query in ("", "?create=false", "?create=1", "?create=true&create=true", "?other=true"):
        reply = await server.client.post("/r/" + query)
        assert reply.code == 400, query
    assert not os.path.exists(stored(server, "r"))


@ensure
async def test_root_and_nested_repositories(server: Server) -> None:
    """
    The root, one-level and two-level paths are repositories; a third level
    is not found.
    """
    client = server.client
    assert (await client.post("/?create=true")).code == 200
    assert os.path.isdir(stored(server, "keys"))
    assert (await client.post("/a/b/?create=true")).code == 200
    assert os.path.isdir(stored(server, "a", "b", "keys"))
    assert (await client.post("/a/b/c/?create=true")).code == 404
    assert not os.path.exists(stored(server, "a", "b", "c"))


@ensure
async def test_invalid_repository_names_are_not_found(server: Server) -> None:
    """
    Hidden names (the spool), C{-}, C{..} in every encoding and separators
    smuggled in as C{%2F} or C{%5C} name no repository.
    """
    for path in ("/.spool/", "/-/", "/../", "/%2e%2e/", "/a%2Fb/", "/a%5Cb/", "/a%00/", "/%ff/"):
        reply = await server.client.post(path + "?create=true")
        assert reply.code == 404, path
    assert sorted(os.listdir(server.layout.root)) == [".spool"]


@ensure
async def test_repository_delete_is_refused_by_default(repo: Server) -> None:
    """
    Without C{--allow-repo-delete}, C{DELETE /r/} answers 403 and the
    repository stays.
    """
    assert (await repo.client.post("/r/config", b"cfg")).code == 200
    reply = await repo.client.delete("/r/")
    assert reply.code == 403
    assert os.path.exists(stored(repo, "r", "config"))


@ensure
async def test_repository_delete_leaves_nested_repositories(tmp_path) -> None:
    """
    With C{--allow-repo-delete}, deleting a repository removes its config and
    objects but never a repository nested below it; deleting C{/} removes
    only the root repository's own files.
    """
    server = make_server(str(tmp_path / "d"), allow_repo_delete=True)
    client = server.client
    body = b"object"
    for repo in ("/", "/a/", "/a/b/"):
        assert (await client.post(repo + "?create=true")).code == 200
        assert (await client.post(repo + "config", b"cfg")).code == 200
        assert (await client.post(f"{repo}data/{name_of(body)}", body)).code == 200
    assert (await client.delete("/a/")).code == 200
    assert not os.path.exists(stored(server, "a", "config"))
    assert not os.path.exists(stored(server, "a", "data"))
    assert os.path.exists(stored(server, "a", "b", "config"))
    assert (await client.head(f"/a/b/data/{name_of(body)}")).code == 200
    assert (await client.delete("/")).code == 200
    assert sorted(os.listdir(server.layout.root)) == [".spool", "a"]
    assert (await client.head("/a/b/config")).code == 200
    assert (await client.delete("/nothere/")).code == 404


# -- config ------------------------------------------------------------------


@ensure
async def test_config_lifecycle(repo: Server) -> None:
    """
    The config can be saved once, read whole or by range with exact
    lengths, and deleted; a different config cannot replace it.
    """
    client = repo.client
    assert (await client.head("/r/config")).code == 404
    assert (await client.get("/r/config")).code == 404
    config = b"not a hash-named file"
    assert (await client.post("/r/config", config)).code == 200
    head = await client.head("/r/config")
    assert head.code == 200 and head.length == len(config)
    assert head.body == b""
    whole = await client.get("/r/config", range="bytes=0-")
    assert (whole.code, whole.body) == (206, config)
    assert (await client.post("/r/config", config)).code == 200
    assert (await client.post("/r/config", b"another")).code == 403
    assert (await client.get("/r/config")).body == config
    assert (await client.delete("/r/config")).code == 200
    assert (await client.head("/r/config")).code == 404
    assert (await client.delete("/r/config")).code == 200


# -- listings ----------------------------------------------------------------


@ensure
async def test_listing_v1_and_v2(repo: Server) -> None:
    """
    A type listing is a JSON array of names (v1) or of names with exact sizes
    (v2, only for restic's exact Accept value), with the matching media type
    and no parameters.
    """
    client = repo.client
    bodies = [b"one", b"two two", b""]
    for body in bodies:
        assert (await client.post(f"/r/snapshots/{name_of(body)}", body)).code == 200
    v1 = await client.get("/r/snapshots/")
    assert v1.code == 200
    assert v1.header("content-type") == "application/vnd.x.restic.rest.v1"
    assert sorted(json.loads(v1.body)) == sorted(name_of(b) for b in bodies)
    v2 = await client.get("/r/snapshots/", accept=V2)
    assert v2.header("content-type") == "application/vnd.x.restic.rest.v2"
    listed = {e["name"]: e["size"] for e in json.loads(v2.body)}
    assert listed == {name_of(b): len(b) for b in bodies}


@ensure
async def test_data_listing_spans_fanout_dirs(repo: Server) -> None:
    """
    The data listing includes objects from every C{data/xx/} directory and
    nothing that is not a valid object (stray or temporary files).
    """
    client = repo.client
    bodies = [f"blob {i}".encode() for i in range(40)]
    for body in bodies:
        assert (await client.post(f"/r/data/{name_of(body)}", body)).code == 200
    with open(stored(repo, "r", "data", "00", "tmp-upload-123"), "wb") as f:
        f.write(b"partial")
    os.mkdir(stored(repo, "r", "data", "00", "0" * 64))
    reply = await client.get("/r/data/", accept=V2)
    listed = {e["name"]: e["size"] for e in json.loads(reply.body)}
    assert listed == {name_of(b): len(b) for b in bodies}


class HeldListings:
    """
    A runner that holds the reads of listing pieces (C{ListingReader.read})
    until released and runs everything else at once.
    """

    def __init__(self) -> None:
        self.held: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []
        self.asked = 0

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        if not isinstance(getattr(f, "__self__", None), ListingReader):
            return run_inline(f, *args)
        d: Deferred[Any] = Deferred()
        self.held.append((d, f, args))
        self.asked += 1
        return d

    def release(self, error: Exception | None = None) -> None:
        """
        Finish the oldest read held, or fail it with C{error}.
        """
        d, f, args = self.held.pop(0)
        if error is not None:
            d.errback(error)
        else:
            run_inline(f, *args).chainDeferred(d)


def held_listings_of_data(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Server, HeldListings, list[bytes]]:
    """
    A server whose listing reads are held, one object per piece, and the
    objects of its repository /r/, one in each of data/00/, data/01/ and
    data/02/.
    """
    monkeypatch.setattr(listing, "PIECE_ENTRIES", 1)
    reads = HeldListings()
    server = make_server(str(tmp_path / "data"), run=reads)
    server.store.create_repo(("r",))
    bodies = []
    for prefix in ("00", "01", "02"):
        body = next(b for b in (b"%d" % i for i in range(100_000)) if name_of(b).startswith(prefix))
        bodies.append(body)
        path = stored(server, "r", "data", prefix, name_of(body))
        with open(path, "wb") as f:
            f.write(body)
    return server, reads, bodies


def listing_of_data(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Server, HeldListings, Connection, list[bytes]]:
    """
    A server whose listing reads are held, one object per piece, with
    objects in data/00/, data/01/ and data/02/, and a connection that has
    asked for their v2 listing.
    """
    server, reads, bodies = held_listings_of_data(tmp_path, monkeypatch)
    connection = Connection(server.site)
    connection.send_head("GET", "/r/data/", {"Accept": V2})
    assert len(reads.held) == 1, "the listing did not start with one read"
    return server, reads, connection, bodies


def listed(connection: Connection) -> Any:
    """
    The listing a connection received: the JSON in the chunks of its
    (chunked) HTTP/1.1 answer.
    """
    body = connection.transport.value().split(b"\r\n\r\n", 1)[1]
    return json.loads(b"".join(body.split(b"\r\n")[1::2]))


def test_a_listing_reads_many_directories_per_call(tmp_path, monkeypatch) -> None:
    """
    A listing reads as many directories per call to the worker threads as
    make about a thousand entries (each call is a hand-off between threads):
    the three objects of /r/data/, spread over its 256 fan-out directories,
    take one call.
    """
    server, reads, bodies = held_listings_of_data(tmp_path, monkeypatch)
    monkeypatch.setattr(listing, "PIECE_ENTRIES", 1024)
    connection = Connection(server.site)
    connection.send_head("GET", "/r/data/", {"Accept": V2})
    while reads.held:
        reads.release()
    assert reads.asked == 1
    assert listed(connection) == [{"name": name_of(b), "size": len(b)} for b in bodies]


def test_a_listing_whose_client_went_away_stops_reading(tmp_path, monkeypatch) -> None:
    """
    When the client of a listing goes away, the piece being read is the
    last one read.
    """
    server, reads, connection, bodies = listing_of_data(tmp_path, monkeypatch)
    reads.release()
    connection.protocol.connectionLost(Failure(ConnectionDone("the client went away")))
    reads.release()
    assert reads.held == [] and reads.asked == 2


def test_a_listing_reads_no_further_while_its_client_is_behind(tmp_path, monkeypatch) -> None:
    """
    While the connection cannot send (its buffer full: the client is not
    reading), a listing reads no next piece; once it can send again, the
    listing goes on, and the client gets all of it, in order.
    """
    server, reads, connection, bodies = listing_of_data(tmp_path, monkeypatch)
    channel = connection.transport.producer  # told when the socket is full
    assert channel is not None
    channel.pauseProducing()
    reads.release()
    assert name_of(bodies[0]).encode() in connection.transport.value()
    assert reads.held == [] and reads.asked == 1, "a piece was read for a client that is behind"
    channel.resumeProducing()
    assert reads.asked == 2
    while reads.held:
        reads.release()
    assert listed(connection) == [{"name": name_of(b), "size": len(b)} for b in bodies]


class FullAfterFirstAnswer(StringTransport):
    """
    A transport whose socket is full once the first answer is written: it
    tells its producer so once, as a socket under TLS does.
    """

    told = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if not self.told and self.producer is not None:
            self.told = True
            self.producer.pauseProducing()


@pytest.mark.parametrize("read", ["at once", "by a worker"])
def test_pipelined_requests_wait_while_the_client_is_behind(tmp_path, monkeypatch, read: str) -> None:
    """
    Requests sent pipelined behind one whose answer the client has not
    taken yet (its connection is full) wait, unanswered, however small
    their answers: answers written at once would otherwise pile up in
    memory. Once the client catches up, they are answered, in order. This
    holds whether the answer before them was written at once or after a
    worker read the object (the requests behind it then arrive while it is
    under way).
    """
    runner = HeldWrites()
    server = make_server(str(tmp_path / "data"), run=runner)
    if read == "by a worker":
        monkeypatch.setattr(resources, "read_cached", lambda fd, length, offset: None)
    server.store.create_repo(("r",))
    bodies = [b"first", b"second", b"third"]
    for body in bodies:
        name = name_of(body)
        with open(stored(server, "r", "data", name[:2], name), "wb") as f:
            f.write(body)
    transport = FullAfterFirstAnswer(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel = server.site.buildProtocol(transport.getPeer())
    assert channel is not None
    channel.makeConnection(transport)
    channel.dataReceived(b"".join(b"GET /r/data/%s HTTP/1.1\r\nHost: h\r\n\r\n" % name_of(b).encode() for b in bodies))
    runner.release_all()
    assert transport.value().count(b"HTTP/1.1 200 ") == 1 and transport.value().endswith(b"first")
    assert transport.producer is not None
    transport.producer.resumeProducing()  # the client caught up
    runner.release_all()
    answers = transport.value().split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert [answer.split(b"\r\n\r\n", 1)[1] for answer in answers] == bodies
    channel.connectionLost(Failure(ConnectionDone()))


def rest_over_h2(reads: HeldListings, client: Any, transport: StringTransport, clock: Any) -> list[tuple[int, bytes]]:
    """
    Over HTTP/2: release each listing read as it comes and run the
    connection's turns until the listings are sent (a few turns); the DATA
    frames the client received from now on.
    """
    received = data_frames(client, transport)
    for _ in range(10):
        while reads.held:
            reads.release()
        clock.turn()
        received += data_frames(client, transport)
    return received


def test_a_listing_over_http2_reads_no_further_while_its_streams_window_is_used_up(tmp_path, monkeypatch) -> None:
    """
    Over HTTP/2, a listing reads no next piece while the client's window
    for its stream is used up; once the client opens the window, the
    listing goes on, and the client gets all of it, in order.
    """
    server, reads, bodies = held_listings_of_data(tmp_path, monkeypatch)
    h2, client, transport, clock = h2_requests(server.site, ["/r/data/"], window=16, headers=[("accept", V2)])
    reads.release()
    assert reads.held == [] and reads.asked == 1, "a piece was read for a stream without room"
    clock.turn()  # sends what the window allows, and stops there
    received = data_frames(client, transport)
    assert b"".join(data for _, data in received) == b'[{"name":"' + name_of(bodies[0])[:6].encode()
    assert reads.asked == 1
    client.increment_flow_control_window(1 << 20, stream_id=1)
    h2.dataReceived(client.data_to_send())
    assert reads.asked == 2
    received += rest_over_h2(reads, client, transport, clock)
    sent = b"".join(data for _, data in received)
    assert json.loads(sent) == [{"name": name_of(b), "size": len(b)} for b in bodies]


def test_a_listing_over_http2_queues_no_more_than_its_stream_may_hold_however_wide_the_window(
    tmp_path, monkeypatch
) -> None:
    """
    Over HTTP/2, a listing whose client opened its window wide but takes
    nothing (the connection cannot send) reads no next piece once
    C{STREAM_QUEUE} bytes of it wait to be sent (here 100 bytes: a piece
    and a half); once they are sent, it goes on, and the client gets all
    of it, in order.
    """
    server, reads, bodies = held_listings_of_data(tmp_path, monkeypatch)
    monkeypatch.setattr("resticd.h2.STREAM_QUEUE", 100)
    connection, client, transport, clock = h2_requests(server.site, ["/r/data/"], window=(1 << 31) - 1, headers=[("accept", V2)])
    connection.pauseProducing()  # its transport is full: the client reads nothing
    reads.release()
    assert reads.asked == 2, "a piece and a half may wait to be sent: the second piece is read"
    reads.release()
    assert reads.held == [] and reads.asked == 2, "a piece was read for a stream whose queue is full"
    connection.resumeProducing()  # the send loop goes on: both pieces are sent
    assert reads.asked == 3
    received = rest_over_h2(reads, client, transport, clock)
    sent = b"".join(data for _, data in received)
    assert json.loads(sent) == [{"name": name_of(b), "size": len(b)} for b in bodies]


def test_answers_on_one_http2_connection_share_what_it_may_queue(tmp_path, monkeypatch) -> None:
    """
    Answers produced at once on one HTTP/2 connection share what it may
    queue: with C{CONNECTION_QUEUE} 200 bytes, two listings whose client
    reads nothing each read no further once 100 bytes of theirs wait (a
    piece and a half), where one alone would have read on; once the
    connection can send, both go on, and the client gets both whole.
    """
    server, reads, bodies = held_listings_of_data(tmp_path, monkeypatch)
    monkeypatch.setattr("resticd.h2.CONNECTION_QUEUE", 200)
    paths = ["/r/data/", "/r/data/"]
    connection, client, transport, clock = h2_requests(server.site, paths, window=(1 << 31) - 1, headers=[("accept", V2)])
    connection.pauseProducing()  # its transport is full: the client reads nothing
    while reads.held:
        reads.release()
    assert reads.asked == 4, "each listing reads two pieces, and no third"
    connection.resumeProducing()
    received = rest_over_h2(reads, client, transport, clock)
    expected = [{"name": name_of(b), "size": len(b)} for b in bodies]
    for stream in (1, 3):
        assert json.loads(b"".join(data for s, data in received if s == stream)) == expected


def test_a_listing_that_fails_after_it_began_is_cut_and_logged(tmp_path, monkeypatch, logged: LogCapture) -> None:
    """
    A directory that cannot be read once the listing has begun cuts the
    connection (the client sees an incomplete answer, never a short but
    valid listing), reads nothing more and is logged once.
    """
    server, reads, connection, bodies = listing_of_data(tmp_path, monkeypatch)
    reads.release()
    assert name_of(bodies[0]).encode() in connection.transport.value(), "the listing had not begun"
    reads.release(OSError(errno.EIO, "Input/output error"))
    assert connection.transport.disconnected, "the connection was not cut"
    assert not connection.transport.value().endswith(b"0\r\n\r\n"), "the answer was ended"
    assert reads.held == [] and reads.asked == 2
    assert logged.texts(LogLevel.critical) == ["listing data of /r/ failed"]


@ensure
async def test_missing_listings_are_empty(server: Server) -> None:
    """
    A type directory that does not exist (or a repository that does not)
    lists as C{200 []}, as restic 0.14 requires.
    """
    assert (await server.client.post("/r/?create=true")).code == 200
    os.rmdir(stored(server, "r", "locks"))
    for path in ("/r/locks/", "/nope/keys/", "/r/data/"):
        reply = await server.client.get(path, accept=V2)
        assert (reply.code, json.loads(reply.body)) == (200, []), path


@ensure
async def test_listing_without_slash_is_not_redirected(repo: Server) -> None:
    """
    C{GET /r/keys} lists like C{/r/keys/}; the server never redirects.
    """
    reply = await repo.client.get("/r/keys")
    assert reply.code == 200
    assert json.loads(reply.body) == []


# -- objects -----------------------------------------------------------------


@ensure
async def test_object_roundtrip(repo: Server) -> None:
    """
    An uploaded object is stored under restic's layout and answers HEAD with
    its size, GET whole and by range, and DELETE.
    """
    client = repo.client
    body = os.urandom(100_000)
    name = name_of(body)
    assert (await client.post(f"/r/data/{name}", body)).code == 200
    with open(stored(repo, "r", "data", name[:2], name), "rb") as f:
        assert f.read() == body
    head = await client.head(f"/r/data/{name}")
    assert (head.code, head.length, head.body) == (200, len(body), b"")
    assert head.header("content-type") == "application/octet-stream"
    whole = await client.get(f"/r/data/{name}", range="bytes=0-")
    assert (whole.code, whole.body) == (206, body)
    assert whole.header("content-range") == f"bytes 0-{len(body) - 1}/{len(body)}"
    plain = await client.get(f"/r/data/{name}")
    assert (plain.code, plain.body) == (200, body)
    assert (await client.delete(f"/r/data/{name}")).code == 200
    assert (await client.head(f"/r/data/{name}")).code == 404
    assert not os.path.exists(stored(repo, "r", "data", name[:2], name))


@ensure
async def test_ranges(repo: Server) -> None:
    """
    Ranges are inclusive, an end beyond the file is clipped, a start beyond
    it is 416 with C{Content-Range: bytes */size}.
    """
    client = repo.client
    body = bytes(range(256)) * 4
    name = name_of(body)
    assert (await client.post(f"/r/index/{name}", body)).code == 200
    piece = await client.get(f"/r/index/{name}", range="bytes=10-19")
    assert (piece.code, piece.body, piece.length) == (206, body[10:20], 10)
    assert piece.header("content-range") == f"bytes 10-19/{len(body)}"
    clipped = await client.get(f"/r/index/{name}", range="bytes=1000-5000")
    assert (clipped.code, clipped.body) == (206, body[1000:])
    beyond = await client.get(f"/r/index/{name}", range=f"bytes={len(body)}-")
    assert beyond.code == 416
    assert beyond.header("content-range") == f"bytes */{len(body)}"


@ensure
async def test_empty_object_reads_as_empty_200(repo: Server) -> None:
    """
    An empty object read with C{Range: bytes=0-} (how restic reads whole
    files) answers 200 with an empty body, not 416.
    """
    name = name_of(b"")
    assert (await repo.client.post(f"/r/keys/{name}", b"")).code == 200
    reply = await repo.client.get(f"/r/keys/{name}", range="bytes=0-")
    assert (reply.code, reply.body, reply.length) == (200, b"", 0)
    head = await repo.client.head(f"/r/keys/{name}")
    assert (head.code, head.length) == (200, 0)


@ensure
async def test_missing_objects_are_plain_404(repo: Server) -> None:
    """
    HEAD and GET of a missing object answer 404 in plain text, never an
    HTML page.
    """
    name = "0" * 64
    for method in ("GET", "HEAD"):
        reply = await repo.client.request(method, f"/r/data/{name}", range="bytes=0-")
        assert reply.code == 404
        assert reply.header("content-type") == PLAIN


@ensure
async def test_delete_of_missing_object_is_ok(repo: Server) -> None:
    """
    Deleting an object that is not there answers 200 (restic deletes before
    retrying an upload, and prune must not fail on it).
    """
    assert (await repo.client.delete(f"/r/locks/{'1' * 64}")).code == 200


@ensure
async def test_invalid_object_names_touch_nothing(repo: Server) -> None:
    """
    Names that are not 64 lowercase hex digits are 404 for every method and
    create nothing.
    """
    before = sorted(os.walk(repo.layout.root))
    for name in ("A" * 64, "a" * 63, "a" * 65, "..", "%2e%2e", "config", "a" * 64 + "%00"):
        for method in ("GET", "HEAD", "POST", "DELETE"):
            reply = await repo.client.request(method, f"/r/data/{name}", b"x" if method == "POST" else None)
            assert reply.code == 404, (method, name)
    assert sorted(os.walk(repo.layout.root)) == before


@ensure
async def test_upload_must_match_its_name(repo: Server) -> None:
    """
    An upload whose sha256 is not its name is a bad request and leaves
    nothing behind, neither under the name nor in the spool.
    """
    name = name_of(b"the real content")
    reply = await repo.client.post(f"/r/data/{name}", b"something else")
    assert reply.code == 400
    assert (await repo.client.head(f"/r/data/{name}")).code == 404
    assert repo.spool_files() == []


@ensure
async def test_no_verify_upload_accepts_any_body(tmp_path) -> None:
    """
    With C{--no-verify-upload} the body is stored without checking its hash.
    """
    server = make_server(str(tmp_path / "d"), verify_upload=False)
    assert (await server.client.post("/r/?create=true")).code == 200
    name = "f" * 64
    assert (await server.client.post(f"/r/data/{name}", b"whatever")).code == 200
    assert (await server.client.get(f"/r/data/{name}")).body == b"whatever"


@ensure
async def test_upload_into_missing_repository_is_404(server: Server) -> None:
    """
    Uploading into a repository that was never created answers 404 and
    creates no directories.
    """
    body = b"x"
    reply = await server.client.post(f"/nope/data/{name_of(body)}", body)
    assert reply.code == 404
    assert sorted(os.listdir(server.layout.root)) == [".spool"]
    assert server.spool_files() == []


@ensure
async def test_wrong_methods_are_405_with_allow(repo: Server) -> None:
    """
    Methods a resource does not answer get 405 and an C{Allow} header that
    lists the ones it does.
    """
    cases = {
        "/r/": ("GET", "DELETE, POST"),
        "/r/data/": ("POST", "GET, HEAD"),
        f"/r/data/{'a' * 64}": ("PUT", "DELETE, GET, HEAD, POST"),
        "/r/config": ("PATCH", "DELETE, GET, HEAD, POST"),
    }
    for path, (method, allow) in cases.items():
        reply = await repo.client.request(method, path)
        assert reply.code == 405, path
        assert reply.header("allow") == allow, path
        assert reply.header("content-type") == PLAIN


@ensure
async def test_unknown_paths_are_404(repo: Server) -> None:
    """
    Paths below an object, below the config, or past the nesting limit are
    not found.
    """
    for path in (f"/r/data/{'a' * 64}/x", "/r/config/x", "/r/data/ab/", "/r/x/y/z"):
        assert (await repo.client.get(path)).code == 404, path


# -- containment -------------------------------------------------------------


@ensure
async def test_symlinks_do_not_lead_out_of_the_root(tmp_path) -> None:
    """
    A symbolic link planted in the data directory that points outside it is
    never followed: reads are 404 and writes store nothing outside.
    """
    outside = tmp_path / "outside"
    for kind in ("keys", "data"):
        (outside / kind).mkdir(parents=True)
    (outside / "config").write_bytes(b"secret")
    server = make_server(str(tmp_path / "d"))
    os.symlink(outside, stored(server, "evil"))
    client = server.client
    assert (await client.get("/evil/config")).code == 404
    assert (await client.head("/evil/config")).code == 404
    body = b"key"
    assert (await client.post(f"/evil/keys/{name_of(body)}", body)).code == 404
    assert (await client.post("/evil/?create=true")).code == 404
    assert (await client.get("/evil/keys/")).code == 404
    assert sorted(os.listdir(outside / "keys")) == []
    assert (await client.delete("/evil/config")).code == 404
    assert (outside / "config").read_bytes() == b"secret"


@ensure
async def test_symlinked_object_is_not_served(repo: Server, tmp_path) -> None:
    """
    An object file that is a symbolic link to a file outside the root is not
    served.
    """
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    name = "b" * 64
    os.symlink(secret, stored(repo, "r", "keys", name))
    assert (await repo.client.get(f"/r/keys/{name}")).code == 404
    assert (await repo.client.head(f"/r/keys/{name}")).code == 404


class _CountingTransport(StringTransport):
    """
    A transport that keeps each write apart.
    """

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def writeSequence(self, seq: Any) -> None:
        self.write(b"".join(seq))


@ensure
async def test_an_answer_reaches_the_connection_in_one_write(server: Server) -> None:
    """
    The status line, headers and body of a small answer go to the connection
    as one write (over TLS: one record, not one for the headers and one for
    the body); answers without a body (HEAD) still send their headers, once.
    """
    body = bytes(range(256)) * 4
    name = name_of(body)
    assert (await server.client.post("/r/?create=true")).code == 200
    assert (await server.client.post(f"/r/data/{name}", body)).code == 200
    requests = [
        (f"GET /r/data/{name} HTTP/1.1\r\nRange: bytes=10-99\r\n", b"HTTP/1.1 206 ", body[10:100]),
        (f"GET /r/data/{name} HTTP/1.1\r\n", b"HTTP/1.1 200 ", body),
        (f"HEAD /r/data/{name} HTTP/1.1\r\n", b"HTTP/1.1 200 ", b"\r\n\r\n"),
        (f"GET /r/data/{'0' * 64} HTTP/1.1\r\n", b"HTTP/1.1 404 ", b"not found\n"),
    ]
    for head, status, end in requests:
        protocol = server.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = _CountingTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(f"{head}Host: x\r\n\r\n".encode())
        assert len(transport.writes) == 1, (head, transport.writes)
        assert transport.writes[0].startswith(status) and transport.writes[0].endswith(end), head
        protocol.connectionLost(Failure(ConnectionDone()))


def _answers(server: Server, raw: bytes) -> bytes:
    """
    What a new connection to the server's site answers to C{raw}.
    """
    protocol = server.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(raw)
    protocol.connectionLost(Failure(ConnectionDone()))
    answer: bytes = transport.value()
    return answer


def _header(answer: bytes, name: bytes) -> bytes | None:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b": ")
        if key.lower() == name:
            return value
    return None


def test_answers_are_dated_by_the_sites_clock(server: Server) -> None:
    """
    Every answer carries a Date header with the current time of the site's
    clock, in HTTP's format, and a Server header; it moves on with the
    clock, second by second.
    """
    clock: Any = server.reactor
    clock.advance(1_780_000_000.4 - clock.seconds())
    ask = b"HEAD /r/config HTTP/1.1\r\nHost: x\r\n\r\n"
    first = _answers(server, ask)
    assert _header(first, b"date") == b"Thu, 28 May 2026 20:26:40 GMT"
    assert (_header(first, b"server") or b"").startswith(b"TwistedWeb/")
    clock.advance(0.5)
    assert _header(_answers(server, ask), b"date") == b"Thu, 28 May 2026 20:26:40 GMT"
    clock.advance(0.2)
    assert _header(_answers(server, ask), b"date") == b"Thu, 28 May 2026 20:26:41 GMT"
    clock.advance(86400)
    assert _header(_answers(server, ask), b"date") == b"Fri, 29 May 2026 20:26:41 GMT"


def test_options_star_is_answered_without_a_resource(server: Server) -> None:
    """
    C{OPTIONS *} (a client probing the server) gets an empty 200; any other
    method on C{*} a 405 that allows only OPTIONS.
    """
    options = _answers(server, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
    assert options.startswith(b"HTTP/1.1 200 ") and _header(options, b"content-length") == b"0"
    get = _answers(server, b"GET * HTTP/1.1\r\nHost: x\r\n\r\n")
    assert get.startswith(b"HTTP/1.1 405 ") and _header(get, b"allow") == b"OPTIONS"


def _upload_request(body: bytes) -> bytes:
    """
    A whole upload of C{body} as restic sends it, headers and body.
    """
    return (
        f"POST /r/data/{name_of(body)} HTTP/1.1\r\nHost: x\r\nUser-Agent: restic/0.14.0\r\n"
        f"Accept: {V2}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


@ensure
@pytest.mark.parametrize("cut", [0, 5, 150, 1 << 16, (1 << 20) + 3])
async def test_uploads_arriving_in_large_reads_with_their_headers_are_stored_whole(repo: Server, cut: int) -> None:
    """
    Two uploads and a download sent back to back, arriving in reads of
    1.5 MiB (as TLS hands them over) that start anywhere (the end of a
    header block cut in two too): both objects are stored whole and the
    three answers come in order.
    """
    first, second = os.urandom((1 << 20) + 4321), os.urandom(3 << 20)
    stream = (
        _upload_request(first)
        + _upload_request(second)
        + f"GET /r/data/{name_of(first)} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n".encode()
    )
    protocol = repo.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(stream[:cut])
    for start in range(cut, len(stream), 3 << 19):
        protocol.dataReceived(stream[start : start + (3 << 19)])
    answers = transport.value()
    assert [line.split(b" ")[1] for line in answers.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")] == [
        b"200",
        b"200",
        b"206",
    ]
    assert answers.endswith(first[:10])
    for body in (first, second):
        with open(stored(repo, "r", "data", name_of(body)[:2], name_of(body)), "rb") as f:
            assert f.read() == body
    protocol.connectionLost(Failure(ConnectionDone()))


def test_header_lines_are_parsed_apart_from_the_body_that_came_with_them(server: Server) -> None:
    """
    The headers of an upload that arrive in one read with a MiB of its body
    are parsed on their own: the body is not copied once per header line
    (Twisted's line parser copies everything after each line it cuts off).
    """
    protocol = server.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    protocol.makeConnection(StringTransport())
    channel: Any = protocol._channel
    behind: list[int] = []
    line_received = channel.lineReceived

    def watched(line: bytes) -> None:
        behind.append(len(channel._buffer))
        line_received(line)

    channel.lineReceived = watched
    protocol.dataReceived(_upload_request(os.urandom(2 << 20))[: 1 << 20])
    assert len(behind) == 7
    assert max(behind) < 1000
    protocol.connectionLost(Failure(ConnectionDone()))


@ensure
async def test_a_small_range_of_an_object_truncated_meanwhile_cuts_the_connection(server: Server, monkeypatch) -> None:
    """
    A range of at most a MiB (read in one go) from an object that turned
    out shorter than when it was opened: the connection is cut before any
    of the answer is written, rather than answering with a short body.
    """
    body = os.urandom(4096)
    name = name_of(body)
    assert (await server.client.post("/r/?create=true")).code == 200
    assert (await server.client.post(f"/r/data/{name}", body)).code == 200
    opened = StoredFile._open

    def open_then_truncate(self: StoredFile, flags: int = os.O_RDONLY) -> tuple[int, os.stat_result]:
        fd, st = opened(self, flags)
        os.truncate(self.path, 100)
        return fd, st

    monkeypatch.setattr(StoredFile, "_open", open_then_truncate)
    protocol = server.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(f"GET /r/data/{name} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-4095\r\n\r\n".encode())
    assert transport.disconnected and transport.value() == b""
    protocol.connectionLost(Failure(ConnectionDone()))
