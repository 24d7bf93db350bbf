"""
HTTP Basic authentication: the header parser, the htpasswd file, the
credential cache, and the 401 answers of the real site behind L{AuthGate}.

The htpasswd lines below were made once with the C{htpasswd} tool of
apache2-utils (the command is above each); the tests never run it.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import pytest_twisted  # type: ignore[import-untyped, unused-ignore]
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel

from resticd.auth import Authenticator, Htpasswd, parse_basic, parse_htpasswd
from resticd.threads import run_inline

from .web import V2, Server, make_server, name_of

T = TypeVar("T")

# htpasswd -nbB -C 4 alice 'correct horse'
ALICE = "alice:$2y$04$G3iEXeBw0jCx2TLuPLXBhuIQgfDfaKtpRR1vAVTq6cWPyaNKlilFu"
# htpasswd -nbB -C 4 alice 'battery staple'  (same user, a new password)
ALICE_NEW = "alice:$2y$04$CBoiTIT13ZbJjGCDL2zem.ypxiuRf.aDgxB.lgtRAeSN6gsA08a4y"
# htpasswd -nbB alice 'correct horse'  (the tool's default cost, 5)
ALICE_COST5 = "alice:$2y$05$Q6DWo5WIKiOYnhmHiVoOFu9m9vd8BveI/NooU.cCram/6zwM/JU.u"
# htpasswd -nbm bob 'b0b:pass'  (Apache MD5; the password holds a colon)
BOB = "bob:$apr1$TOIMRHTN$kWOkTINfOc7dcAZOtbIGZ."
# htpasswd -nbs carol carol-pw
CAROL = "carol:{SHA}hsAaMBat8aKiQgxhKhAqvbXOPbw="
# htpasswd -nb2 dave 'dave pw 5'  (SHA-256 crypt)
DAVE = "dave:$5$IJPY8IuD0ShK2foF$wVfg9JrGMTVzjuJhtWJbQLevZ.QUrm/5mmR/6UJ1qsD"
# htpasswd -nb5 erin erin-pw-6  (SHA-512 crypt)
ERIN = (
    "erin:$6$LHMwq1WNXEqoeBh4$alfpm0vs8woMnj5r7Bz6RTfS6Qkdq27ihXUwr32mOkqxBfZ9FKpaAZ/"
    ".5Ksi2F5W1vUB65gDBPZmJhZwZORK81"
)
# htpasswd -nbB -C 4 'ünï' 'pässwörd'  (a UTF-8 user name and password)
UNI = "ünï:$2y$04$0E2ujBpyhCgrLX.Ge7aZOu97YgXTyDumIiq/pZrY0dogEW6eaoP7u"
# htpasswd -nbp frank plain  (plaintext: must never be accepted)
FRANK = "frank:plain"

#: user, right password, htpasswd line, for every supported scheme.
VECTORS = [
    ("alice", "correct horse", ALICE),
    ("alice", "correct horse", ALICE_COST5),
    ("bob", "b0b:pass", BOB),
    ("carol", "carol-pw", CAROL),
    ("dave", "dave pw 5", DAVE),
    ("erin", "erin-pw-6", ERIN),
    ("ünï", "pässwörd", UNI),
]
VECTOR_IDS = ["bcrypt", "bcrypt-cost5", "apr1", "sha1", "sha256-crypt", "sha512-crypt", "utf8-bcrypt"]

#: The htpasswd file the site tests serve from.
USERS_FILE = "\n".join([ALICE, BOB, CAROL, DAVE, ERIN]) + "\n"


def basic(user: str, password: str) -> str:
    """
    The C{Authorization} header value for these credentials.
    """
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def header(credentials: bytes) -> bytes:
    return b"Basic " + base64.b64encode(credentials)


# -- parse_basic --------------------------------------------------------------


def test_parse_basic_valid():
    """
    A well-formed Basic header yields its user name and password.
    """
    assert parse_basic(header(b"alice:correct horse")) == ("alice", "correct horse")


@pytest.mark.parametrize("scheme", [b"basic", b"BASIC", b"bAsIc"])
def test_parse_basic_scheme_case_insensitive(scheme):
    """
    The auth scheme name is case-insensitive (RFC 7235), so C{basic} works
    like C{Basic}.
    """
    value = scheme + b" " + base64.b64encode(b"alice:pw")
    assert parse_basic(value) == ("alice", "pw")


def test_parse_basic_password_with_colons():
    """
    Only the first colon separates user from password: a password may hold
    colons, and an empty password is a password.
    """
    assert parse_basic(header(b"bob:b0b:pass:")) == ("bob", "b0b:pass:")
    assert parse_basic(header(b"bob:")) == ("bob", "")


def test_parse_basic_utf8():
    """
    User names and passwords are decoded as UTF-8.
    """
    assert parse_basic(header("ünï:pässwörd".encode())) == ("ünï", "pässwörd")


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="no-header"),
        pytest.param(b"", id="empty"),
        pytest.param(b"Basic", id="scheme-only"),
        pytest.param(b"Basic !!!!", id="bad-base64"),
        pytest.param(b"Basic YWxpY2U6cHc", id="bad-padding"),
        pytest.param(b"Basic " + base64.b64encode(b"\xff\xfe:pw"), id="user-not-utf8"),
        pytest.param(b"Basic " + base64.b64encode(b"alice:\xff"), id="password-not-utf8"),
        pytest.param(b"Basic " + base64.b64encode(b"alice"), id="no-colon"),
        pytest.param(b"Basic Og==", id="restic-empty-user-and-password"),
        pytest.param(b"Basic " + base64.b64encode(b":secret"), id="empty-user"),
        pytest.param(b"Bearer " + base64.b64encode(b"alice:pw"), id="other-scheme"),
        pytest.param(b"Digest username=alice", id="digest"),
    ],
)
def test_parse_basic_rejects(value):
    """
    Headers that carry no usable Basic credentials give L{None} (and so a
    401), never an exception: a missing header, a foreign scheme, bad base64,
    bytes that are not UTF-8, no colon, and an empty user name, which is what
    restic sends when it has no credentials (C{Basic Og==}).
    """
    assert parse_basic(value) is None


@given(
    user=st.text(st.characters(codec="utf-8", exclude_characters=":"), min_size=1),
    password=st.text(st.characters(codec="utf-8")),
)
def test_parse_basic_round_trip(user, password):
    """
    Any non-empty user name without a colon and any password survive the
    trip through a Basic header unchanged.
    """
    assert parse_basic(header(f"{user}:{password}".encode())) == (user, password)


# -- parse_htpasswd and Htpasswd.verify ------------------------------------------


@pytest.mark.parametrize(("user", "password", "line"), VECTORS, ids=VECTOR_IDS)
def test_htpasswd_schemes(tmp_path, user, password, line):
    """
    Entries made by C{htpasswd} with bcrypt, Apache MD5, C{{SHA}}, SHA-256
    and SHA-512 crypt are loaded; the right password is accepted, a wrong one
    (and the right one for another user name) refused.
    """
    entries, warnings = parse_htpasswd(line + "\n")
    assert warnings == []
    assert list(entries) == [user]
    path = tmp_path / "htpasswd"
    path.write_text(line + "\n", encoding="utf-8")
    htpasswd = Htpasswd(str(path))
    assert htpasswd.refresh() is True
    assert htpasswd.verify(user, password) is True
    assert htpasswd.verify(user, password + "x") is False
    assert htpasswd.verify(user, "") is False
    assert htpasswd.verify(user + "x", password) is False


def test_htpasswd_skips_plaintext_and_malformed(tmp_path, logged):
    """
    A plaintext entry (C{htpasswd -p}) and malformed lines are skipped, each
    with a warning naming its line, and logged when the file is read;
    comments, blank lines and CRLF line ends are ignored silently; the good
    entries around them still work, and the plaintext password never does.
    """
    text = (
        "# users of the backup server\n"
        "\n"
        f"{ALICE}\r\n"
        f"{FRANK}\n"  # line 4
        "   \n"
        "no colon at all\n"  # line 6
        ":$2y$04$G3iEXeBw0jCx2TLuPLXBhuIQgfDfaKtpRR1vAVTq6cWPyaNKlilFu\n"  # line 7
        "gina:not-a-hash\n"  # line 8
        "   # an indented comment\n"
        f"{BOB}\n"
    )
    entries, warnings = parse_htpasswd(text)
    assert sorted(entries) == ["alice", "bob"]
    assert len(warnings) == 4
    assert [w.split(":")[0] for w in warnings] == ["line 4", "line 6", "line 7", "line 8"]
    assert "frank" in warnings[0]
    assert "gina" in warnings[3]

    path = tmp_path / "htpasswd"
    path.write_text(text, encoding="utf-8")
    htpasswd = Htpasswd(str(path))
    htpasswd.refresh()
    assert htpasswd.verify("alice", "correct horse")
    assert htpasswd.verify("bob", "b0b:pass")
    assert not htpasswd.verify("frank", "plain")
    assert not htpasswd.verify("gina", "not-a-hash")
    warned = logged.texts(LogLevel.warn)
    for line in (4, 6, 7, 8):
        assert any(f"line {line}:" in w and str(path) in w for w in warned), warned


def test_htpasswd_empty_file(tmp_path):
    """
    An empty htpasswd file (or one of comments only) loads no users, without
    error: nobody gets in.
    """
    path = tmp_path / "htpasswd"
    path.write_text("# nobody yet\n", encoding="utf-8")
    htpasswd = Htpasswd(str(path))
    assert htpasswd.refresh() is True
    assert htpasswd.entries == {}
    assert htpasswd.verify("alice", "correct horse") is False


# -- helpers for the site tests ----------------------------------------------


class CountingRunner:
    """
    A L{Runner} that does the work at once on the calling thread and counts
    how often it is asked to check a password.
    """

    def __init__(self) -> None:
        self.verifies = 0

    def __call__(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        if getattr(f, "__func__", None) is Htpasswd.verify:
            self.verifies += 1
        return run_inline(f, *args)


@dataclass
class AuthServer:
    """
    A site behind authentication, with what drives and observes it.
    """

    server: Server
    authenticator: Authenticator
    runner: CountingRunner
    clock: Clock
    htpasswd: str

    async def get(self, path: str, credentials: str | None) -> Any:
        headers = {"accept": V2}
        if credentials is not None:
            headers["authorization"] = credentials
        return await self.server.client.get(path, **headers)

    async def post(self, path: str, body: bytes, credentials: str | None) -> Any:
        headers = {}
        if credentials is not None:
            headers["authorization"] = credentials
        return await self.server.client.post(path, body, **headers)

    def write_users(self, text: str) -> None:
        """
        Replace the htpasswd file the way editors and C{htpasswd} do: a new
        file renamed over the old one.
        """
        temp = self.htpasswd + ".new"
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temp, self.htpasswd)


ALICE_OK = basic("alice", "correct horse")


@pytest.fixture
def auth(tmp_path) -> AuthServer:
    """
    A site over an empty data directory whose users are L{USERS_FILE}, with
    time on a L{Clock} and password checks counted.
    """
    path = str(tmp_path / "htpasswd")
    with open(path, "w", encoding="utf-8") as f:
        f.write(USERS_FILE)
    htpasswd = Htpasswd(path)
    htpasswd.refresh()
    runner = CountingRunner()
    clock = Clock()
    authenticator = Authenticator(htpasswd, runner, clock)
    server = make_server(str(tmp_path / "data"), run=runner, authenticator=authenticator)
    return AuthServer(server, authenticator, runner, clock, path)


def assert_challenge(reply: Any) -> None:
    """
    C{reply} is a 401 with a Basic challenge and a short plain-text body.
    """
    assert reply.code == 401
    assert reply.header("www-authenticate") == 'Basic realm="restic"'
    assert (reply.header("content-type") or "").startswith("text/plain")
    assert b"<" not in reply.body
    assert reply.body.strip() != b""


# -- through the site -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_credentials_challenged(auth):
    """
    A request without an Authorization header, to any path and with any
    method, gets 401 with C{WWW-Authenticate: Basic realm="restic"} and a
    plain-text body, not an HTML page; and nothing is created.
    """
    client = auth.server.client
    assert_challenge(await client.get("/r/keys/", accept=V2))
    assert_challenge(await client.get("/"))
    assert_challenge(await client.post("/r/?create=true"))
    head = await client.head("/r/config")
    assert head.code == 401
    assert head.header("www-authenticate") == 'Basic realm="restic"'
    assert not os.path.exists(os.path.join(auth.server.layout.root, "r"))


@pytest_twisted.ensureDeferred
async def test_restic_empty_credentials_refused(auth):
    """
    restic without credentials sends C{Authorization: Basic Og==}; an
    authenticating server answers it 401 with the challenge, without
    spending a password check on it.
    """
    assert_challenge(await auth.post("/r/?create=true", b"", "Basic Og=="))
    assert_challenge(await auth.get("/r/keys/", "Basic Og=="))
    assert auth.runner.verifies == 0


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param(basic("alice", "wrong"), id="wrong-password"),
        pytest.param(basic("alice", ""), id="empty-password"),
        pytest.param(basic("alice", "correct horse "), id="password-plus-space"),
        pytest.param(basic("Alice", "correct horse"), id="user-case"),
        pytest.param(basic("mallory", "correct horse"), id="unknown-user"),
        pytest.param("Basic !!!", id="garbage"),
        pytest.param("Bearer abc", id="other-scheme"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_credentials_refused(auth, credentials):
    """
    Wrong passwords, unknown users (user names are case-sensitive) and
    unusable headers all get the same 401 with a Basic challenge, and the
    repository is not created.
    """
    assert_challenge(await auth.post("/r/?create=true", b"", credentials))
    assert_challenge(await auth.get("/r/keys/", credentials))
    assert not os.path.exists(os.path.join(auth.server.layout.root, "r"))


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("alice", "correct horse"),
        ("bob", "b0b:pass"),
        ("carol", "carol-pw"),
        ("dave", "dave pw 5"),
        ("erin", "erin-pw-6"),
    ],
    ids=["bcrypt", "apr1-password-with-colon", "sha1", "sha256-crypt", "sha512-crypt"],
)
@pytest_twisted.ensureDeferred
async def test_right_credentials_reach_repository(auth, user, password):
    """
    With a user's right password (any supported scheme) requests reach the
    repository: it can be created and its keys listed.
    """
    credentials = basic(user, password)
    created = await auth.post("/r/?create=true", b"", credentials)
    assert created.code == 200, created.body
    listed = await auth.get("/r/keys/", credentials)
    assert listed.code == 200, listed.body
    assert listed.header("content-type") == V2
    assert listed.body.strip() == b"[]"
    assert os.path.isdir(os.path.join(auth.server.layout.root, "r", "keys"))


@pytest.mark.parametrize("kind", ["keys", "data"])
@pytest.mark.parametrize(
    "credentials",
    [None, "Basic Og==", basic("alice", "wrong"), basic("mallory", "x")],
    ids=["none", "empty", "wrong-password", "unknown-user"],
)
@pytest_twisted.ensureDeferred
async def test_refused_upload_stores_nothing(auth, kind, credentials):
    """
    An upload refused for its credentials leaves nothing behind: no object
    in the repository, nothing in its listing, no spool file; the same upload
    with the right credentials is then stored.
    """
    assert (await auth.post("/r/?create=true", b"", ALICE_OK)).code == 200
    body = b"secret pack contents " * 1000
    name = name_of(body)
    stored = auth.server.layout.object_path(("r",), kind, name)

    assert_challenge(await auth.post(f"/r/{kind}/{name}", body, credentials))
    assert not os.path.exists(stored)
    assert auth.server.spool_files() == []
    listed = await auth.get(f"/r/{kind}/", ALICE_OK)
    assert listed.code == 200
    assert listed.body.strip() == b"[]"

    assert (await auth.post(f"/r/{kind}/{name}", body, ALICE_OK)).code == 200
    with open(stored, "rb") as f:
        assert f.read() == body


@pytest_twisted.ensureDeferred
async def test_no_auth_ignores_restic_empty_credentials(tmp_path):
    """
    Without authentication (C{--no-auth}) the C{Basic Og==} header restic
    sends when it has no credentials is ignored: requests succeed.
    """
    server = make_server(str(tmp_path / "data"))
    client = server.client
    assert (await client.post("/r/?create=true", authorization="Basic Og==")).code == 200
    listed = await client.get("/r/keys/", authorization="Basic Og==", accept=V2)
    assert listed.code == 200
    assert listed.body.strip() == b"[]"
    assert listed.header("www-authenticate") is None


# -- the credential cache --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cache_spares_second_check(auth):
    """
    Verified credentials are remembered: the next requests with the same
    user and password do not check the password again.
    """
    assert (await auth.post("/r/?create=true", b"", ALICE_OK)).code == 200
    assert auth.runner.verifies == 1
    for _ in range(3):
        assert (await auth.get("/r/keys/", ALICE_OK)).code == 200
    assert auth.runner.verifies == 1


@pytest_twisted.ensureDeferred
async def test_cache_is_per_password(auth):
    """
    A cached password does not let a different password for the same user
    through, nor another user's request skip its own check.
    """
    assert (await auth.post("/r/?create=true", b"", ALICE_OK)).code == 200
    assert_challenge(await auth.get("/r/keys/", basic("alice", "correct horse!")))
    assert auth.runner.verifies == 2
    assert (await auth.get("/r/keys/", basic("bob", "b0b:pass"))).code == 200
    assert auth.runner.verifies == 3


@pytest_twisted.ensureDeferred
async def test_cache_expires_after_ttl(auth):
    """
    Remembered credentials are checked again once C{ttl} seconds have passed
    since they were verified, and then remembered anew.
    """
    ttl = auth.authenticator.ttl
    assert (await auth.post("/r/?create=true", b"", ALICE_OK)).code == 200
    assert auth.runner.verifies == 1
    auth.clock.advance(ttl - 1)
    assert (await auth.get("/r/keys/", ALICE_OK)).code == 200
    assert auth.runner.verifies == 1
    auth.clock.advance(2)
    assert (await auth.get("/r/keys/", ALICE_OK)).code == 200
    assert auth.runner.verifies == 2
    assert (await auth.get("/r/keys/", ALICE_OK)).code == 200
    assert auth.runner.verifies == 2


@pytest_twisted.ensureDeferred
async def test_wrong_password_never_cached(auth):
    """
    A refused password is checked again on every request (it is never
    remembered as refused or, worse, as accepted).
    """
    wrong = basic("alice", "wrong")
    for attempt in range(1, 4):
        assert_challenge(await auth.get("/r/keys/", wrong))
        assert auth.runner.verifies == attempt
    assert not auth.authenticator.cached("alice", "wrong")
    assert (await auth.post("/r/?create=true", b"", ALICE_OK)).code == 200
    assert auth.runner.verifies == 4


@pytest_twisted.ensureDeferred
async def test_reload_of_changed_file_drops_cache(auth):
    """
    When the htpasswd file changes (a password is replaced), a reload forgets
    the remembered credentials: the old password stops working at once, even
    though it was cached, and the new one works.
    """
    assert (await auth.post("/r/?create=true", b"", ALICE_OK)).code == 200
    assert (await auth.get("/r/keys/", ALICE_OK)).code == 200
    assert auth.runner.verifies == 1

    auth.write_users(USERS_FILE.replace(ALICE, ALICE_NEW))
    await auth.authenticator.reload()

    assert_challenge(await auth.get("/r/keys/", ALICE_OK))
    assert (await auth.get("/r/keys/", basic("alice", "battery staple"))).code == 200


@pytest_twisted.ensureDeferred
async def test_reload_removes_deleted_user(auth):
    """
    A user removed from the htpasswd file is refused after the reload, even
    with credentials that were cached.
    """
    bob = basic("bob", "b0b:pass")
    assert (await auth.post("/r/?create=true", b"", bob)).code == 200
    assert (await auth.get("/r/keys/", bob)).code == 200
    auth.write_users(USERS_FILE.replace(BOB + "\n", ""))
    await auth.authenticator.reload()
    assert_challenge(await auth.get("/r/keys/", bob))


@pytest_twisted.ensureDeferred
async def test_reload_of_unchanged_file_keeps_cache(auth):
    """
    Reloading a file that did not change keeps the remembered credentials
    (the periodic check does not cost a password check per user).
    """
    assert (await auth.post("/r/?create=true", b"", ALICE_OK)).code == 200
    await auth.authenticator.reload()
    assert (await auth.get("/r/keys/", ALICE_OK)).code == 200
    assert auth.runner.verifies == 1


def _delete(path: str) -> None:
    os.unlink(path)


def _directory(path: str) -> None:
    os.unlink(path)
    os.mkdir(path)


def _not_utf8(path: str) -> None:
    with open(path, "wb") as f:
        f.write(USERS_FILE.encode() + b"h\xe9l\xe8ne:{SHA}hsAaMBat8aKiQgxhKhAqvbXOPbw=\n")


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        (_delete, "No such file"),
        (_directory, "Is a directory"),
        (_not_utf8, "utf-8"),
    ],
    ids=["deleted", "unreadable-directory", "not-utf8"],
)
@pytest_twisted.ensureDeferred
async def test_failed_reload_keeps_users(auth, logged, breakage, reason):
    """
    When the htpasswd file cannot be re-read (deleted, not a readable file,
    not UTF-8), the reload logs an error naming the file and the reason and
    keeps serving the users it had: their passwords still verify.
    """
    assert (await auth.post("/r/?create=true", b"", ALICE_OK)).code == 200
    breakage(auth.htpasswd)
    await auth.authenticator.reload()

    errors = logged.texts(LogLevel.error) + logged.texts(LogLevel.critical)
    assert any(auth.htpasswd in e and reason.lower() in e.lower() for e in errors), logged.texts()
    # Not cached: bob's password is really checked against the kept users.
    assert (await auth.get("/r/keys/", basic("bob", "b0b:pass"))).code == 200
    assert auth.runner.verifies == 2
    assert_challenge(await auth.get("/r/keys/", basic("bob", "wrong")))
