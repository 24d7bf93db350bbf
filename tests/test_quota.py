"""
Storage limits: C{--max-size} and the access file's per-user and
per-repository quotas, checked against the stored usage plus the uploads in
flight, from the declared length before a byte is written and again as a
body streams in; and the usage counts they rest on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from resticd.access import parse_size
from resticd.paths import HASHED_TYPES, Repo
from resticd.threads import run_inline
from resticd.usage import ALL, Counts, Usage

from .test_access import Connection, write_access
from .web import Server, make_server, name_of

ensure = pytest_twisted.ensureDeferred
T = TypeVar("T")

LIMIT = 1000
MIB = 1 << 20
PROXY = "X-Remote-User"


def blob(size: int, tag: str) -> bytes:
    """
    C{size} bytes, different for every C{tag}.
    """
    return (f"{tag}:".encode() * size)[:size]


def make_repos(server: Server, *repos: str) -> None:
    """
    Make repositories directly on disk: their type directories only, which
    is all the server needs (creating them over HTTP makes 256 data
    directories and fsyncs them, which would dominate these tests).
    """
    for repo in repos:
        for kind in HASHED_TYPES:
            os.makedirs(os.path.join(server.layout.root, repo.strip("/"), kind), exist_ok=True)


async def upload(server: Server, repo: str, body: bytes, kind: str = "data", **headers: str) -> int:
    return (await server.client.post(f"{repo}{kind}/{name_of(body)}", body, **headers)).code


def stored(server: Server, repo: Repo, body: bytes, kind: str = "data") -> bool:
    return os.path.exists(server.layout.object_path(repo, kind, name_of(body)))


def nonzero(usage: Usage) -> dict[Repo, dict[str, Counts]]:
    """
    The counts of a usage, without the types that hold nothing.
    """
    return {
        repo: {kind: c for kind, c in kinds.items() if c.objects}
        for repo, kinds in usage.repos.items()
        if any(c.objects for c in kinds.values())
    }


def start_upload(server: Server, repo: str, body: bytes, declared: int | None = None) -> Connection:
    """
    A connection that has sent the headers of an upload of C{body} (with a
    Content-Length of C{declared}, its length by default) but no body yet.
    """
    connection = Connection(server.site)
    length = len(body) if declared is None else declared
    connection.send_head("POST", f"{repo}data/{name_of(body)}", {"Content-Length": str(length)})
    return connection


def start_stream(server: Server, repo: str, body: bytes) -> Connection:
    """
    A connection that has sent the headers of an upload of C{body} without a
    declared length (chunked: twisted.web then calls C{gotLength(None)}, as
    for an HTTP/2 stream without Content-Length) but no body yet.
    """
    connection = Connection(server.site)
    connection.send_head("POST", f"{repo}data/{name_of(body)}", {"Transfer-Encoding": "chunked"})
    return connection


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def status(connection: Connection) -> int | None:
    reply = connection.reply()
    return None if reply is None else reply.code


# -- before any byte is written --------------------------------------------------


@ensure
async def test_declared_length_over_the_limit_is_refused_before_writing(tmp_path):
    """
    An upload whose declared Content-Length would go over C{--max-size} is
    refused as soon as its headers are in: its body is read and dropped,
    never written (no spool file, though more than a MiB of it came), the
    answer is 507 and nothing is stored. An upload that fits is stored.
    """
    server = make_server(str(tmp_path / "data"), max_size=LIMIT)
    make_repos(server, "/r/")
    fits, too_big = blob(600, "fits"), blob(2 * MIB, "big")

    refused = start_upload(server, "/r/", too_big)
    refused.send(too_big[: MIB + MIB // 2])
    assert server.spool_files() == []
    refused.send(too_big[MIB + MIB // 2 :])
    assert server.spool_files() == []
    assert status(refused) == 507
    assert not stored(server, ("r",), too_big)
    refused.close()

    accepted = start_upload(server, "/r/", fits)
    accepted.send(fits)
    assert status(accepted) == 200
    accepted.close()
    assert stored(server, ("r",), fits)
    assert server.spool_files() == []


@ensure
async def test_streamed_body_crossing_the_limit(tmp_path):
    """
    A body without a declared length is refused the moment it crosses the
    limit: its spool file (made once its first MiB was written) is removed
    at once, the rest is dropped, the answer is 507, nothing is stored or
    counted, nothing stays reserved.
    """
    server = make_server(str(tmp_path / "data"), max_size=2 * MIB)
    make_repos(server, "/r/")
    body = blob(3 * MIB, "stream")
    connection = start_stream(server, "/r/", body)
    connection.send(chunk(body[: MIB + MIB // 2]))
    assert len(server.spool_files()) == 1

    connection.send(chunk(body[MIB + MIB // 2 :]))
    assert server.spool_files() == []
    connection.send(b"0\r\n\r\n")
    assert status(connection) == 507
    connection.close()
    assert not stored(server, ("r",), body)
    assert server.ctx.usage.scope_bytes(ALL) == 0
    assert server.ctx.quota is not None and server.ctx.quota.held(ALL) == 0

    # A body without a declared length that stays within the limit is fine.
    small = blob(2 * MIB, "small")
    connection = start_stream(server, "/r/", small)
    connection.send(chunk(small[:MIB]) + chunk(small[MIB:]) + b"0\r\n\r\n")
    assert status(connection) == 200
    assert stored(server, ("r",), small)


# -- uploads in flight ------------------------------------------------------------


@ensure
async def test_concurrent_declared_uploads_race_the_limit(tmp_path):
    """
    Of three 400-byte uploads received at once under a 1000-byte limit, the
    two that complete first are stored and the third is refused (507): the
    bytes of an upload are held once it is authorized, so concurrent uploads
    never overshoot the limit together.
    """
    server = make_server(str(tmp_path / "data"), max_size=LIMIT)
    make_repos(server, "/r/")
    bodies = [blob(400, f"racer{i}") for i in range(3)]
    connections = [start_upload(server, "/r/", body) for body in bodies]

    for i in (2, 1, 0):
        connections[i].send(bodies[i])
    assert [status(c) for c in connections] == [507, 200, 200]
    for c in connections:
        c.close()
    assert [stored(server, ("r",), b) for b in bodies] == [False, True, True]
    assert server.ctx.usage.scope_bytes(ALL) == 800
    assert server.spool_files() == []

    assert await upload(server, "/r/", blob(201, "over")) == 507
    assert await upload(server, "/r/", blob(200, "exact")) == 200


@ensure
async def test_concurrent_streams_race_the_limit(tmp_path):
    """
    Two 600-byte bodies without declared lengths streaming at once under a
    1000-byte limit: each fits on its own while it arrives; the one that
    completes first is stored, the other refused (507), and no spool file
    is left.
    """
    server = make_server(str(tmp_path / "data"), max_size=LIMIT)
    make_repos(server, "/r/")
    a, b = blob(600, "a"), blob(600, "b")
    first, second = start_stream(server, "/r/", a), start_stream(server, "/r/", b)
    first.send(chunk(a[:300]))
    second.send(chunk(b[:300]))
    first.send(chunk(a[300:]))
    second.send(chunk(b[300:]))
    second.send(b"0\r\n\r\n")
    first.send(b"0\r\n\r\n")
    assert (status(first), status(second)) == (507, 200)
    assert stored(server, ("r",), b) and not stored(server, ("r",), a)
    assert server.ctx.usage.scope_bytes(ALL) == 600
    assert server.spool_files() == []


class HeldPublish:
    """
    A L{resticd.threads.Runner} that does all work at once, except
    publishing an upload, which waits until L{release}.
    """

    def __init__(self) -> None:
        self.waiting: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []

    def __call__(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        if getattr(f, "__name__", "") == "publish":
            d: Deferred[T] = Deferred()
            self.waiting.append((d, f, args))
            return d
        return run_inline(f, *args)

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, f, args in waiting:
            run_inline(f, *args).chainDeferred(d)


@ensure
async def test_reservation_is_held_until_the_upload_is_counted(tmp_path):
    """
    A received upload keeps its bytes reserved while it is being made
    durable: another upload that would not fit beside it is refused then,
    and the first is stored once publishing completes.
    """
    runner = HeldPublish()
    server = make_server(str(tmp_path / "data"), run=runner, max_size=LIMIT)
    make_repos(server, "/r/")
    a, b = blob(600, "a"), blob(600, "b")
    first = start_upload(server, "/r/", a)
    first.send(a)
    assert runner.waiting and status(first) is None

    second = start_upload(server, "/r/", b)
    second.send(b)
    assert status(second) == 507
    runner.release()
    assert status(first) == 200
    assert stored(server, ("r",), a) and not stored(server, ("r",), b)
    assert server.ctx.usage.scope_bytes(ALL) == 600


@ensure
async def test_abandoned_upload_frees_its_reservation(tmp_path):
    """
    An upload whose client goes away mid-body leaves no spool file and
    holds nothing: the whole limit can be used right after.
    """
    server = make_server(str(tmp_path / "data"), max_size=LIMIT)
    make_repos(server, "/r/")
    body = blob(800, "gone")
    connection = start_upload(server, "/r/", body)
    connection.send(body[:300])
    connection.close()
    assert server.spool_files() == []
    assert server.ctx.quota is not None and server.ctx.quota.held(ALL) == 0
    assert await upload(server, "/r/", blob(LIMIT, "full")) == 200


@pytest.mark.parametrize("who", ["no-credentials", "read-only-user"])
@ensure
async def test_refused_client_holds_no_quota(tmp_path, who):
    """
    A client that will be refused (no credentials: 401; no right to write
    there: 403) cannot make other users' uploads fail by declaring a big
    Content-Length and sending its body slowly: while its request is in
    flight, alice's upload within the limit is stored.
    """
    access = str(tmp_path / "access.toml")
    write_access(access, '[users.alice]\n"**" = ["read", "write"]\n[users.reader]\n"**" = ["read"]\n')
    server = make_server(str(tmp_path / "data"), max_size=LIMIT, proxy_auth_username=PROXY, access_file=access)
    make_repos(server, "/r/")

    stranger = Connection(server.site)
    headers = {"Content-Length": str(LIMIT)}
    if who == "read-only-user":
        headers[PROXY] = "reader"
    stranger.send_head("POST", f"/r/data/{'0' * 64}", headers)
    stranger.send(b"x" * 10)

    assert await upload(server, "/r/", blob(500, "alice"), x_remote_user="alice") == 200
    stranger.send(b"x" * (LIMIT - 10))
    assert status(stranger) == (401 if who == "no-credentials" else 403)
    stranger.close()


# -- what counts -------------------------------------------------------------------


@ensure
async def test_delete_frees_space(tmp_path):
    """
    Deleting an object gives its bytes back: an upload refused for lack of
    room succeeds after the delete.
    """
    server = make_server(str(tmp_path / "data"), max_size=LIMIT)
    make_repos(server, "/r/")
    a, b = blob(600, "a"), blob(600, "b")
    assert await upload(server, "/r/", a) == 200
    assert await upload(server, "/r/", b) == 507
    assert (await server.client.delete(f"/r/data/{name_of(a)}")).code == 200
    assert server.ctx.usage.scope_bytes(ALL) == 0
    assert await upload(server, "/r/", b) == 200


@ensure
async def test_config_delete_frees_space(tmp_path):
    """
    Configs count, and deleting one gives its bytes back too.
    """
    server = make_server(str(tmp_path / "data"), max_size=LIMIT)
    make_repos(server, "/r/")
    assert (await server.client.post("/r/config", blob(600, "config"))).code == 200
    assert await upload(server, "/r/", blob(600, "b")) == 507
    assert (await server.client.delete("/r/config")).code == 200
    assert await upload(server, "/r/", blob(600, "b")) == 200


@ensure
async def test_repository_delete_frees_space(tmp_path):
    """
    With C{--allow-repo-delete}, deleting a repository gives back all its
    bytes, and only its own (a nested repository keeps counting).
    """
    server = make_server(str(tmp_path / "data"), max_size=LIMIT, allow_repo_delete=True)
    make_repos(server, "/r/", "/r/n/", "/s/")
    assert await upload(server, "/r/", blob(500, "r")) == 200
    assert await upload(server, "/r/n/", blob(100, "nested")) == 200
    assert await upload(server, "/s/", blob(500, "s")) == 507
    assert (await server.client.delete("/r/")).code == 200
    assert server.ctx.usage.scope_bytes(ALL) == 100
    assert await upload(server, "/s/", blob(500, "s")) == 200
    assert await upload(server, "/s/", blob(401, "t")) == 507


@ensure
async def test_identical_reupload_counts_once(tmp_path):
    """
    Uploading an object that is already stored (a retry) answers 200 and
    does not count its bytes again.
    """
    server = make_server(str(tmp_path / "data"), max_size=LIMIT)
    make_repos(server, "/r/")
    a = blob(400, "a")
    assert await upload(server, "/r/", a) == 200
    assert await upload(server, "/r/", a) == 200
    assert server.ctx.usage.repos[("r",)]["data"] == Counts(400, 1)
    assert await upload(server, "/r/", blob(600, "b")) == 200


@ensure
async def test_identical_reupload_near_the_limit(tmp_path):
    """
    A retry of an upload that was stored (its answer was lost) still
    answers 200 when the quota has no room for a second copy: it needs no
    room at all. (restic treats 507 as final: the backup would fail.)
    """
    server = make_server(str(tmp_path / "data"), max_size=LIMIT)
    make_repos(server, "/r/")
    a = blob(600, "a")
    assert await upload(server, "/r/", a) == 200
    assert await upload(server, "/r/", a) == 200
    assert server.ctx.usage.scope_bytes(ALL) == 600


@ensure
async def test_failed_uploads_do_not_count(tmp_path):
    """
    An upload refused for a body that does not match its name (400) counts
    nothing and holds nothing afterwards: the whole limit can then be used.
    """
    server = make_server(str(tmp_path / "data"), max_size=LIMIT)
    make_repos(server, "/r/")
    reply = await server.client.post(f"/r/data/{'0' * 64}", blob(600, "bad"))
    assert reply.code == 400
    assert server.ctx.usage.scope_bytes(ALL) == 0
    assert await upload(server, "/r/", blob(LIMIT, "full")) == 200


# -- counting at startup --------------------------------------------------------------


async def fill(server: Server) -> int:
    """
    Upload objects of every type and a config to C{/a/}, and data to
    C{/a/b/}; the bytes stored.
    """
    make_repos(server, "/a/", "/a/b/")
    total = 0
    for i in range(2):
        body = blob(100 + i, f"data{i}")
        assert await upload(server, "/a/", body) == 200
        total += len(body)
    for kind in HASHED_TYPES[1:]:
        body = blob(50, kind)
        assert await upload(server, "/a/", body, kind) == 200
        total += len(body)
    assert (await server.client.post("/a/config", b"config!")).code == 200
    nested = blob(70, "nested")
    assert await upload(server, "/a/b/", nested) == 200
    return total + len(b"config!") + len(nested)


@ensure
async def test_usage_counts_per_repository_and_type(tmp_path):
    """
    The usage holds, per repository and type (config included), exactly the
    bytes and objects uploaded; its totals per scope add the repositories
    up (the user scope C{a} spans C{/a/} and C{/a/b/}); deletes come off.
    """
    server = make_server(str(tmp_path / "data"))
    total = await fill(server)
    usage = server.ctx.usage
    assert nonzero(usage) == {
        ("a",): {
            "data": Counts(201, 2),
            "keys": Counts(50, 1),
            "locks": Counts(50, 1),
            "snapshots": Counts(50, 1),
            "index": Counts(50, 1),
            "config": Counts(7, 1),
        },
        ("a", "b"): {"data": Counts(70, 1)},
    }
    assert usage.scope_bytes(ALL) == total == 478
    assert usage.scope_bytes(("user", "a")) == total
    assert usage.scope_bytes(("repo", "a")) == total - 70
    assert usage.scope_bytes(("repo", "a", "b")) == 70

    assert (await server.client.delete(f"/a/locks/{name_of(blob(50, 'locks'))}")).code == 200
    assert usage.repos[("a",)]["locks"] == Counts(0, 0)
    assert usage.scope_bytes(ALL) == total - 50


@ensure
async def test_restart_counts_what_is_stored(tmp_path):
    """
    A server started over an existing data directory counts what is stored
    there, the same as the server that stored it; a half-received upload
    in the spool is never counted (its bytes do not block an upload that
    fits beside what is stored).
    """
    root = str(tmp_path / "data")
    first = make_server(root)
    total = await fill(first)
    half = blob(2 * MIB, "half")
    pending = start_upload(first, "/a/", half)
    pending.send(half[: MIB + 300])  # a first MiB is written to the spool
    assert len(first.spool_files()) == 1

    again = make_server(root, max_size=total + 100)
    assert nonzero(again.ctx.usage) == nonzero(first.ctx.usage)
    assert again.ctx.usage.scope_bytes(ALL) == total
    assert again.spool_files() == first.spool_files()
    assert await upload(again, "/a/", blob(100, "fits")) == 200
    assert await upload(again, "/a/", blob(1, "x")) == 507
    pending.close()


# -- scopes ------------------------------------------------------------------------------


def quota_server(tmp_path, quotas: str, **overrides: Any) -> Server:
    """
    A server where everybody may read and write everywhere, with the quota
    sections C{quotas} in its access file.
    """
    access = str(tmp_path / "access.toml")
    write_access(access, '[default]\n"**" = ["read", "write"]\n' + quotas)
    return make_server(str(tmp_path / "data"), access_file=access, **overrides)


@ensure
async def test_user_quota_spans_their_repositories(tmp_path):
    """
    A C{[quota.users]} limit counts everything below C{/<user>/} together
    (C{/alice/}, C{/alice/a/}, C{/alice/b/}); other users are not limited
    by it.
    """
    server = quota_server(tmp_path, "[quota.users]\nalice = 1000\n")
    make_repos(server, "/alice/", "/alice/a/", "/alice/b/", "/bob/")
    assert await upload(server, "/alice/a/", blob(500, "a")) == 200
    assert await upload(server, "/alice/b/", blob(600, "b")) == 507
    assert await upload(server, "/alice/", blob(600, "root")) == 507
    assert await upload(server, "/alice/b/", blob(400, "b")) == 200
    assert await upload(server, "/alice/", blob(100, "root")) == 200
    assert await upload(server, "/alice/a/", blob(1, "one")) == 507
    assert await upload(server, "/bob/", blob(1500, "bob")) == 200


@ensure
async def test_repository_quota_is_per_repository(tmp_path):
    """
    A C{[quota.repos]} limit applies to each matching repository on its own;
    the first matching pattern decides; repositories that match none are
    not limited.
    """
    quotas = '[quota.repos]\n"shared/big" = 3000\n"shared/*" = 1000\n'
    server = quota_server(tmp_path, quotas)
    make_repos(server, "/shared/", "/shared/a/", "/shared/b/", "/shared/big/")
    assert await upload(server, "/shared/a/", blob(600, "a")) == 200
    assert await upload(server, "/shared/b/", blob(600, "b")) == 200
    assert await upload(server, "/shared/a/", blob(600, "a2")) == 507
    assert await upload(server, "/shared/big/", blob(2500, "big")) == 200
    assert await upload(server, "/shared/big/", blob(600, "big2")) == 507
    assert await upload(server, "/shared/", blob(5000, "top")) == 200


@ensure
async def test_max_size_spans_everything(tmp_path):
    """
    C{--max-size} counts every repository together, the root one included.
    """
    server = make_server(str(tmp_path / "data"), max_size=LIMIT)
    make_repos(server, "/", "/a/", "/b/x/")
    assert await upload(server, "/", blob(400, "root")) == 200
    assert await upload(server, "/a/", blob(400, "a")) == 200
    assert await upload(server, "/b/x/", blob(201, "b")) == 507
    assert await upload(server, "/b/x/", blob(200, "b")) == 200


@ensure
async def test_tightest_limit_applies(tmp_path):
    """
    Where several limits apply, each must hold: the repository's, its
    user's and the server's.
    """
    quotas = '[quota.users]\nalice = 1500\n[quota.repos]\n"alice/small" = 300\n'
    server = quota_server(tmp_path, quotas, max_size=2000)
    make_repos(server, "/alice/small/", "/alice/big/", "/bob/")
    assert await upload(server, "/alice/small/", blob(301, "s")) == 507
    assert await upload(server, "/alice/small/", blob(300, "s")) == 200
    assert await upload(server, "/alice/big/", blob(1201, "b")) == 507
    assert await upload(server, "/alice/big/", blob(1200, "b")) == 200
    assert await upload(server, "/bob/", blob(501, "bob")) == 507
    assert await upload(server, "/bob/", blob(500, "bob")) == 200


@ensure
async def test_quota_change_applies_after_reload(tmp_path):
    """
    Quotas come from the access file as last loaded: raising one lets the
    next upload in.
    """
    server = quota_server(tmp_path, "[quota.users]\nalice = 500\n")
    make_repos(server, "/alice/")
    assert await upload(server, "/alice/", blob(800, "a")) == 507
    write_access(str(tmp_path / "access.toml"), '[default]\n"**" = ["read", "write"]\n[quota.users]\nalice = "1K"\n')
    assert server.ctx.access.refresh()
    assert await upload(server, "/alice/", blob(800, "a")) == 200


# -- parse_size -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("123", 123),
        (123, 123),
        (0, 0),
        ("500K", 500 * 1024),
        ("500k", 500 * 1024),
        ("500KiB", 500 * 1024),
        ("500KB", 500 * 1024),
        ("100M", 100 * 1024**2),
        ("500G", 500 * 1024**3),
        ("2T", 2 * 1024**4),
        ("1.5TiB", 3 * 1024**4 // 2),
        ("1P", 1024**5),
        (" 7 G ", 7 * 1024**3),
    ],
)
def test_parse_size(text, size):
    """
    Sizes are plain byte counts or numbers with a binary unit (K, M, G, T,
    P; optionally KiB/KB; any case; a fraction allowed).
    """
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "G", "5X", "-1", -1, "1.5.5", "1 000", "5GG", "0x10", "1e9", True])
def test_parse_size_rejects_garbage(text):
    """
    Anything else, negative sizes and booleans included, is a ValueError.
    """
    with pytest.raises(ValueError):
        parse_size(text)


@ensure
async def test_owner_pattern_in_repo_quotas(tmp_path):
    """
    In C{[quota.repos]}, C{{user}} stands for a repository's first segment:
    C{"{user}/*" = 1000} limits each repository below a user's folder on its
    own, so one full repository does not stop its sibling.
    """
    access = str(tmp_path / "access.toml")
    write_access(access, '[default]\n"**" = ["read", "write"]\n[quota.repos]\n"{user}/*" = 1000\n')
    server = make_server(str(tmp_path / "data"), access_file=access)
    make_repos(server, "/alice/a/", "/alice/b/")
    assert await upload(server, "/alice/a/", blob(900, "a1")) == 200
    assert await upload(server, "/alice/a/", blob(200, "a2")) == 507
    assert await upload(server, "/alice/b/", blob(900, "b1")) == 200


def test_uploads_without_limits_never_look_at_the_disk() -> None:
    """
    Where no limit applies, checking and reserving an upload asks nothing
    of the filesystem (not even whether the object is already stored):
    every upload on a server without quotas would otherwise pay for it on
    the event loop. Where a limit applies, a stored object is looked up
    once per check.
    """
    from resticd.paths import Target
    from resticd.usage import Limits, Quota

    asked: list[Target] = []

    def stored(target: Target) -> bool:
        asked.append(target)
        return False

    limits = Limits()
    quota = Quota(Usage(), lambda: limits, stored)
    target = Target(("r",), "data", "0" * 64)
    assert quota.check(target, 100) is None
    quota.reserve(target, 100).release()
    assert asked == []

    limits = Limits(total=1000)
    assert quota.check(target, 100) is None
    quota.reserve(target, 100).release()
    assert asked == [target, target]
