"""
Who may do what: rights, repository patterns, the access file and the policy
flags (pure), then their enforcement by the real site for users named by a
proxy header or HTTP Basic, the login throttle, refusal logging, and reloading
the rules.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from resticd.access import (
    ALL,
    ALL_WITH_REPO_DELETE,
    AccessFile,
    Pattern,
    Policy,
    Right,
    parse_access_file,
)
from resticd.auth import Authenticator, Htpasswd, Throttle
from resticd.config import Config
from resticd.paths import HASHED_TYPES, SPOOL_DIR
from resticd.service import ResticdService, make_context, make_site, make_store
from resticd.site import ResticSite
from resticd.threads import run_inline

from .web import V2, Server, SiteClient, make_server, name_of

ensure = pytest_twisted.ensureDeferred

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED_ACCESS_FILE = os.path.join(os.path.dirname(HERE), "etc", "access.toml")

# htpasswd -nbB -C 4 alice 'correct horse'
ALICE_LINE = "alice:$2y$04$G3iEXeBw0jCx2TLuPLXBhuIQgfDfaKtpRR1vAVTq6cWPyaNKlilFu"
ALICE_PASSWORD = "correct horse"

#: The header a (pretend) reverse proxy names the user in.
PROXY = "X-Remote-User"

R = Right.READ
A = Right.APPEND
D = Right.DELETE
X = Right.REPO_DELETE


# -- helpers ------------------------------------------------------------------


@dataclass
class RawReply:
    """
    The status line and headers of a response read off the wire.
    """

    code: int
    headers: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class Connection:
    """
    One client connection to a site from a chosen address, fed raw HTTP/1.1
    bytes by hand (so a body can be sent in pieces, or not at all yet).
    """

    def __init__(self, site: ResticSite, host: str = "127.0.0.1") -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        protocol = site.buildProtocol(self.transport.getPeer())
        assert protocol is not None
        self.protocol: IProtocol = protocol
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def send_head(self, method: str, path: str, headers: dict[str, str] | None = None) -> None:
        """
        The request line and headers (a body, if any, is sent separately).
        """
        lines = [f"{method} {path} HTTP/1.1", "Host: resticd.test"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"") -> RawReply:
        """
        A whole request with a Content-Length; its reply, which must be there.
        """
        self.send_head(method, path, {"Content-Length": str(len(body)), **(headers or {})})
        self.send(body)
        reply = self.reply()
        assert reply is not None, "no answer"
        self.transport.clear()
        return reply

    def reply(self) -> RawReply | None:
        """
        The reply's status and headers, or L{None} while there is none.
        """
        raw = self.transport.value()
        if b"\r\n\r\n" not in raw:
            return None
        head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        code = int(head[0].split(" ")[1])
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return RawReply(code, headers)

    def close(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def write_access(path: str, text: str) -> None:
    """
    Replace an access file the way editors do: a new file renamed over it.
    """
    with open(path + ".new", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".new", path)


# -- Right.parse --------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ([], Right.NONE),
        (["read"], R),
        (["append"], A),
        (["write"], A | D),
        (["admin"], A | D | X),
        (["read", "append"], R | A),
        (["read", "write"], R | A | D),
        (["read", "admin"], R | A | D | X),
        (["append", "append"], A),
    ],
)
def test_right_parse(names, expected):
    """
    C{read} reads; C{append} creates; C{write} is append plus delete; C{admin}
    is write plus repository delete; none of the last three includes read.
    """
    assert Right.parse(names) == expected


@pytest.mark.parametrize("name", ["raed", "delete", "all", "", "read,append"])
def test_right_parse_unknown(name):
    """
    An unknown right is an error naming it, never silently ignored.
    """
    with pytest.raises(ValueError) as e:
        Right.parse(["read", name])
    assert repr(name) in str(e.value)


# -- Pattern ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "repo", "user", "expected"),
    [
        ("/", (), None, True),
        ("/", ("a",), None, False),
        ("alice", ("alice",), None, True),
        ("/alice/", ("alice",), None, True),
        ("alice", ("Alice",), None, False),
        ("alice", ("alice", "x"), None, False),
        ("alice", (), None, False),
        ("*", ("a",), None, True),
        ("*", (), None, False),
        ("*", ("a", "b"), None, False),
        ("*/*", ("a", "b"), None, True),
        ("*/*", ("a",), None, False),
        ("a?c", ("abc",), None, True),
        ("a?c", ("ac",), None, False),
        ("a?c", ("abbc",), None, False),
        ("[ab]x", ("bx",), None, True),
        ("[ab]x", ("cx",), None, False),
        ("**", (), None, True),
        ("**", ("a",), None, True),
        ("**", ("a", "b"), None, True),
        ("alice/**", ("alice",), None, True),
        ("alice/**", ("alice", "x"), None, True),
        ("alice/**", ("bob", "alice"), None, False),
        ("**/x", ("x",), None, True),
        ("**/x", ("a", "x"), None, True),
        ("**/x", ("a",), None, False),
        ("{user}", ("alice",), "alice", True),
        ("{user}", ("bob",), "alice", False),
        ("{user}", ("alice",), None, False),
        ("{user}", (), "alice", False),
        ("{user}/*", ("alice", "laptop"), "alice", True),
        ("{user}/*", ("alice",), "alice", False),
        ("{user}/*", ("bob", "laptop"), "alice", False),
        ("{user}-*", ("alice-old",), "alice", True),
        ("*/{user}", ("shared", "alice"), "alice", True),
        # A user whose name holds glob characters matches only itself.
        ("{user}", ("*",), "*", True),
        ("{user}", ("alice",), "*", False),
        ("{user}", ("ab",), "a?", False),
        ("{user}", ("a?",), "a?", True),
        ("{user}", ("a",), "[ab]", False),
        ("{user}", ("[ab]",), "[ab]", True),
        ("{user}/*", ("x", "y"), "*", False),
    ],
)
def test_pattern_matches(pattern, repo, user, expected):
    """
    Segments are globs (C{*}, C{?}, C{[...]}) that never cross a C{/};
    C{**} spans any number of segments, none included; C{/} is the root
    repository; C{{user}} stands for the requesting user literally (glob
    characters in a user name match only themselves) and never matches when
    there is no user.
    """
    assert Pattern.parse(pattern).matches(repo, user) is expected


@given(
    user=st.text(st.characters(exclude_characters="/"), min_size=1),
    other=st.text(st.characters(exclude_characters="/"), min_size=1),
)
def test_pattern_user_is_literal(user, other):
    """
    For any user name, C{{user}} matches that name and nothing else, whatever
    glob characters either contains.
    """
    pattern = Pattern.parse("{user}")
    assert pattern.matches((user,), user)
    assert pattern.matches((other,), user) is (other == user)
    assert Pattern.parse("x-{user}").matches((f"x-{other}",), user) is (other == user)


@given(user=st.text(alphabet="*?[]!-^\\a", min_size=1), other=st.text(alphabet="*?[]!-^\\a", min_size=1))
def test_pattern_user_glob_characters(user, other):
    """
    The same, for names made only of glob syntax.
    """
    assert Pattern.parse("{user}/*").matches((other, "laptop"), user) is (other == user)


def test_pattern_rejects_empty_segments():
    """
    A pattern with an empty segment (C{a//b}) is an error, not a pattern that
    silently matches nothing.
    """
    with pytest.raises(ValueError, match="a//b"):
        Pattern.parse("a//b")


# -- parse_access_file --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        pytest.param('[users.alice\n"alice" = ["read"]\n', ["TOML", "line 1"], id="bad-toml"),
        pytest.param('[defaults]\n"*" = ["read"]\n', ["defaults"], id="unknown-section"),
        pytest.param('[users.alice]\n"alice/*" = ["read", "raed"]\n', ["[users.alice]", "raed"], id="unknown-right"),
        pytest.param('[default]\n"shared" = "admn"\n', ["[default]", "admn"], id="unknown-right-string"),
        pytest.param('[default]\n"shared" = 5\n', ["[default]", "shared"], id="rights-not-a-list"),
        pytest.param('[users.bob]\n"bob" = [1, 2]\n', ["[users.bob]", "bob"], id="rights-not-strings"),
        pytest.param('[users.bob]\n"bob//x" = ["read"]\n', ["[users.bob]", "bob//x"], id="bad-pattern"),
        pytest.param("users = 5\n", ["[users]"], id="users-not-a-table"),
        pytest.param("[users]\ncarol = 5\n", ["[users.carol]"], id="user-not-a-table"),
        pytest.param("default = 5\n", ["[default]"], id="default-not-a-table"),
        pytest.param('[quota.groups]\nstaff = "1G"\n', ["[quota]"], id="unknown-quota-table"),
        pytest.param('[quota.users]\nalice = "lots"\n', ["alice", "lots"], id="bad-user-size"),
        pytest.param("[quota.users]\nalice = -1\n", ["alice"], id="negative-user-size"),
        pytest.param('[quota.repos]\n"shared/*" = "2X"\n', ["shared/*", "2X"], id="bad-repo-size"),
    ],
)
def test_access_file_errors_name_the_entry(text, fragments):
    """
    An access file that cannot be used is refused with a message that says
    where: the TOML error's line, the unknown section, the section and the
    bad right, the pattern whose rights are not a list, the user or
    repository pattern whose quota is not a size.
    """
    with pytest.raises(ValueError) as e:
        parse_access_file(text)
    message = str(e.value)
    for fragment in fragments:
        assert fragment in message, message


def test_access_file_rules_in_order():
    """
    A user's own rules are tried first, in file order, then the default ones;
    the first matching pattern decides (even when it grants less); nothing
    matching means no rights; a single right may be written as a string.
    """
    access = parse_access_file(
        "[default]\n"
        '"{user}" = ["read", "write"]\n'
        '"public" = "read"\n'
        "[users.alice]\n"
        '"alice" = ["read"]\n'
        '"*" = ["append"]\n'
    )
    assert access.rights("alice", ("alice",)) == R
    assert access.rights("alice", ("public",)) == A
    assert access.rights("bob", ("bob",)) == R | A | D
    assert access.rights("bob", ("public",)) == R
    assert access.rights("bob", ("alice",)) == Right.NONE
    assert access.rights(None, ("public",)) == R
    assert access.rights(None, ("bob",)) == Right.NONE


def test_empty_access_file_grants_nothing():
    """
    An empty access file is valid and grants nobody anything.
    """
    access = parse_access_file("")
    assert access.rights("alice", ("alice",)) == Right.NONE
    assert access.rights(None, ()) == Right.NONE


def test_shipped_access_file_does_what_its_comments_say():
    """
    C{etc/access.toml} parses, and gives the rights its comments promise:
    everyone read and append on their own repositories and only there; the
    maintenance user read and write everywhere but the root; the restore
    host read on alice's repositories only; the uploader append on C{drop}
    without read; the admin everything; and the quotas it lists.
    """
    with open(SHIPPED_ACCESS_FILE, encoding="utf-8") as f:
        access = parse_access_file(f.read())

    assert access.rights("carol", ("carol",)) == R | A
    assert access.rights("carol", ("carol", "laptop")) == R | A
    assert access.rights("carol", ("alice",)) == Right.NONE
    assert access.rights("carol", ("alice", "laptop")) == Right.NONE
    assert access.rights("carol", ()) == Right.NONE
    assert access.rights(None, ("carol",)) == Right.NONE

    assert access.rights("maintenance", ("alice",)) == R | A | D
    assert access.rights("maintenance", ("alice", "laptop")) == R | A | D
    assert not access.rights("maintenance", ("alice",)) & X
    assert access.rights("maintenance", ()) == Right.NONE

    assert access.rights("restore", ("alice",)) == R
    assert access.rights("restore", ("alice", "laptop")) == R
    assert access.rights("restore", ("bob",)) == Right.NONE

    assert access.rights("uploader", ("drop",)) == A
    assert access.rights("uploader", ("alice",)) == Right.NONE

    assert access.rights("admin", ()) == R | A | D | X
    assert access.rights("admin", ("alice", "laptop")) == R | A | D | X

    gib = 1024**3
    assert dict(access.user_quotas) == {"alice": 100 * gib}
    assert access.repo_quota(("shared", "projects")) == 1024 * gib
    assert access.repo_quota(("shared",)) is None
    assert access.repo_quota(("alice",)) is None

    # "The command-line flags still apply on top of this file".
    assert Policy(append_only=True, access_file=access).rights("admin", ("x",)) == R | A
    private = Policy(private_repos=True, access_file=access)
    assert private.rights("maintenance", ("alice",)) == Right.NONE
    assert private.rights("restore", ("alice",)) == Right.NONE
    assert private.rights("carol", ("carol", "laptop")) == R | A


# -- Policy -------------------------------------------------------------------


def test_policy_without_flags():
    """
    Without flags or access file everybody (authenticated or not) may read,
    append and delete everywhere, but not delete whole repositories.
    """
    policy = Policy()
    for user in (None, "alice"):
        for repo in ((), ("alice",), ("bob", "x")):
            assert policy.rights(user, repo) == ALL == R | A | D


def test_policy_allow_repo_delete():
    """
    C{--allow-repo-delete} adds deleting whole repositories.
    """
    assert Policy(allow_repo_delete=True).rights("alice", ("r",)) == ALL_WITH_REPO_DELETE == R | A | D | X


@pytest.mark.parametrize("allow_repo_delete", [False, True])
def test_policy_append_only(allow_repo_delete):
    """
    C{--append-only} leaves only read and append, whatever else would be
    allowed (repository delete, or an access file's admin).
    """
    assert Policy(append_only=True, allow_repo_delete=allow_repo_delete).rights("a", ("r",)) == R | A
    admin = parse_access_file('[default]\n"**" = ["read", "admin"]\n')
    assert Policy(append_only=True, access_file=admin).rights("a", ()) == R | A
    write_only = parse_access_file('[default]\n"**" = ["write"]\n')
    assert Policy(append_only=True, access_file=write_only).rights("a", ()) == A


@pytest.mark.parametrize(
    ("user", "repo", "allowed"),
    [
        ("alice", ("alice",), True),
        ("alice", ("alice", "laptop"), True),
        ("alice", ("bob",), False),
        ("alice", ("bob", "alice"), False),
        ("alice", ("alice2",), False),
        ("alice", ("Alice",), False),
        ("alice", (), False),
        (None, (), False),
        (None, ("alice",), False),
    ],
)
def test_policy_private_repos(user, repo, allowed):
    """
    C{--private-repos}: a user may use C{/<user>/} and C{/<user>/<sub>/}
    only; nothing at all without a user.
    """
    expected = ALL if allowed else Right.NONE
    assert Policy(private_repos=True).rights(user, repo) == expected
    capped = Policy(private_repos=True, append_only=True).rights(user, repo)
    assert capped == (R | A if allowed else Right.NONE)


def test_policy_private_repos_caps_access_file():
    """
    With an access file, C{--private-repos} still refuses other users'
    repositories even where the file grants them.
    """
    access = parse_access_file('[default]\n"**" = ["read", "admin"]\n')
    policy = Policy(private_repos=True, access_file=access)
    assert policy.rights("alice", ("alice", "x")) == R | A | D | X
    assert policy.rights("alice", ("bob",)) == Right.NONE


def test_policy_access_file_replaces_defaults():
    """
    With an access file, only its rules grant anything: a user it does not
    mention has no rights, even without flags.
    """
    policy = Policy(access_file=AccessFile())
    assert policy.rights("alice", ("alice",)) == Right.NONE


# -- the rights matrix through the site ---------------------------------------

CONFIG = b"the stored config"
NEW_CONFIG = b"a new config"
STORED = {kind: f"stored {kind} object".encode() for kind in HASHED_TYPES}
NEW = {kind: f"new {kind} object".encode() for kind in HASHED_TYPES}


def object_rel(kind: str, body: bytes, repo: str = "r") -> str:
    name = name_of(body)
    if kind == "data":
        return f"{repo}/data/{name[:2]}/{name}"
    return f"{repo}/{kind}/{name}"


def populate(root: str) -> None:
    """
    A data directory with repository C{/r/} (a config and one object of each
    type) and repository C{/e/} (no config). Only the directories the tests
    touch are made (not all 256 C{data/xx}), so that it is cheap per test.
    """
    os.makedirs(os.path.join(root, SPOOL_DIR))
    for repo in ("r", "e"):
        for kind in HASHED_TYPES:
            os.makedirs(os.path.join(root, repo, kind))
    for body in (STORED["data"], NEW["data"]):
        os.makedirs(os.path.dirname(os.path.join(root, object_rel("data", body))), exist_ok=True)
    with open(os.path.join(root, "r", "config"), "wb") as f:
        f.write(CONFIG)
    for kind, body in STORED.items():
        with open(os.path.join(root, object_rel(kind, body)), "wb") as f:
            f.write(body)


def quick_server(root: str, **overrides: Any) -> Server:
    """
    Like L{make_server}, without counting what is stored (these tests need
    no quotas, and counting would dominate their run time).
    """
    config = replace(Config(path=root), **overrides)
    store = make_store(config)
    store.prepare_root()
    ctx = make_context(config, store, run_inline)
    ctx.access.refresh()
    reactor = MemoryReactorClock()
    site = make_site(config, ctx, None, reactor)
    return Server(config, store, site, SiteClient(site), reactor, ctx)


def snapshot(root: str) -> dict[str, bytes | None]:
    """
    Everything below the data root but the spool: directories (as L{None})
    and files with their content.
    """
    found: dict[str, bytes | None] = {}
    for directory, dirs, files in os.walk(root):
        rel = os.path.relpath(directory, root)
        if rel == SPOOL_DIR or rel.startswith(SPOOL_DIR + os.sep):
            continue
        if rel != ".":
            found[rel] = None
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                found[os.path.normpath(os.path.join(rel, name))] = f.read()
    return found


def under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


@dataclass(frozen=True)
class Op:
    """
    One request of the matrix: the right it needs (L{None}: the method is
    not served there at all), its success status, and what it changes on
    disk when allowed (paths created and removed, as prefixes).
    """

    method: str
    path: str
    need: str | None
    ok: int
    body: bytes | None = None
    creates: tuple[str, ...] = ()
    removes: tuple[str, ...] = ()
    answer: Any = None

    @property
    def id(self) -> str:
        return f"{self.method} {re.sub('[0-9a-f]{64}', 'NAME', self.path)}"


def matrix_ops() -> list[Op]:
    ops = [
        Op("POST", "/n/?create=true", "append", 200, creates=("n",)),
        Op("DELETE", "/r/", "repo-delete", 200, removes=("r",)),
        Op("GET", "/r/", None, 405),
        Op("HEAD", "/r/", None, 405),
        Op("HEAD", "/r/config", "read", 200),
        Op("GET", "/r/config", "read", 206, answer=CONFIG),
        Op("POST", "/e/config", "append", 200, body=NEW_CONFIG, creates=("e/config",)),
        Op("DELETE", "/r/config", "delete", 200, removes=("r/config",)),
    ]
    for kind in HASHED_TYPES:
        stored, new = STORED[kind], NEW[kind]
        ops += [
            Op("HEAD", f"/r/{kind}/{name_of(stored)}", "read", 200),
            Op("GET", f"/r/{kind}/{name_of(stored)}", "read", 206, answer=stored),
            Op("POST", f"/r/{kind}/{name_of(new)}", "append", 200, body=new, creates=(object_rel(kind, new),)),
            Op(
                "DELETE",
                f"/r/{kind}/{name_of(stored)}",
                "append" if kind == "locks" else "delete",
                200,
                removes=(object_rel(kind, stored),),
            ),
            Op("GET", f"/r/{kind}/", "read", 200, answer=[{"name": name_of(stored), "size": len(stored)}]),
            Op("HEAD", f"/r/{kind}/", "read", 200),
            Op("POST", f"/r/{kind}/", None, 405),
            Op("DELETE", f"/r/{kind}/", None, 405),
        ]
    return ops


#: Right sets as written in the access file, and what each may do.
RIGHT_SETS: dict[str, tuple[list[str], set[str]]] = {
    "none": ([], set()),
    "read": (["read"], {"read"}),
    "append": (["append"], {"append"}),
    "write": (["write"], {"append", "delete"}),
    "admin": (["admin"], {"append", "delete", "repo-delete"}),
    "read+append": (["read", "append"], {"read", "append"}),
    "read+write": (["read", "write"], {"read", "append", "delete"}),
}

#: Methods a target does not serve (need None) do not depend on rights: they
#: are checked for the two extremes only.
MATRIX = [
    pytest.param(rights, op, id=f"{rights}-{op.id}")
    for rights in RIGHT_SETS
    for op in matrix_ops()
    if op.need is not None or rights in ("none", "admin")
]


@dataclass
class Sandbox:
    """
    A populated data directory served to user C{u} with one right set, and
    its content as populated (restored after every test that changes it).
    """

    root: str
    server: Server
    pristine: dict[str, bytes | None]

    def restore(self) -> None:
        """
        Put the data directory back as it was populated.
        """
        current = snapshot(self.root)
        for path in sorted(set(current) - set(self.pristine), reverse=True):
            full = os.path.join(self.root, path)
            if current[path] is None:
                os.rmdir(full)
            else:
                os.unlink(full)
        for path in sorted(self.pristine):
            full = os.path.join(self.root, path)
            content = self.pristine[path]
            if content is None:
                if not os.path.isdir(full):
                    os.mkdir(full)
            elif current.get(path) != content:
                with open(full, "wb") as f:
                    f.write(content)


@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory) -> Callable[[str], Sandbox]:
    """
    The sandbox of each right set, made on first use: making a data
    directory per test would cost more than all the requests together.
    """
    made: dict[str, Sandbox] = {}

    def sandbox(rights: str) -> Sandbox:
        if rights not in made:
            base = tmp_path_factory.mktemp("matrix")
            root = str(base / "data")
            populate(root)
            access = str(base / "access.toml")
            write_access(access, f"[users.u]\n\"**\" = {json.dumps(RIGHT_SETS[rights][0])}\n")
            server = quick_server(root, proxy_auth_username=PROXY, access_file=access)
            made[rights] = Sandbox(root, server, snapshot(root))
        return made[rights]

    return sandbox


@pytest.mark.parametrize(("rights", "op"), MATRIX)
@ensure
async def test_rights_matrix(sandboxes, rights, op):
    """
    Every method on every kind of target, for a user whose access-file rule
    grants each set of rights: allowed requests succeed with restic's status
    and change exactly what they should on disk; refused ones answer 403 and
    delete, replace or create nothing (no spool file left either); methods a
    target does not serve are 405 for everyone.
    """
    box = sandboxes(rights)
    before = box.pristine
    assert snapshot(box.root) == before
    headers = {"x_remote_user": "u", "accept": V2}
    if op.ok == 206:
        headers["range"] = "bytes=0-"
    try:
        reply = await box.server.client.request(op.method, op.path, op.body, **headers)
        after = snapshot(box.root)
    finally:
        box.restore()
    assert box.server.spool_files() == []

    if op.need is None:
        assert reply.code == 405
        assert after == before
        return
    if op.need not in RIGHT_SETS[rights][1]:
        assert reply.code == 403, reply.body
        assert (reply.header("content-type") or "").startswith("text/plain")
        assert after == before
        return

    assert reply.code == op.ok, reply.body
    added = set(after) - set(before)
    removed = set(before) - set(after)
    assert all(under(p, op.creates) for p in added), added
    assert all(p in added for p in op.creates)
    assert all(under(p, op.removes) for p in removed), removed
    assert all(p in removed for p in op.removes)
    assert all(after[p] == before[p] for p in set(before) & set(after)), "a file was replaced"
    if op.body is not None:
        assert after[op.creates[0]] == op.body
    if isinstance(op.answer, bytes):
        assert reply.body == op.answer
    elif op.answer is not None:
        assert json.loads(reply.body) == op.answer


@ensure
async def test_access_file_with_basic_auth(tmp_path):
    """
    An access file applies to users of the htpasswd file too: alice's
    read-only rule lets her list but not upload; requests without
    credentials are still challenged (401) before any rule is looked at.
    """
    htpasswd_path = tmp_path / "htpasswd"
    htpasswd_path.write_text(ALICE_LINE + "\n")
    htpasswd = Htpasswd(str(htpasswd_path))
    htpasswd.refresh()
    authenticator = Authenticator(htpasswd, run_inline, Clock())
    access = str(tmp_path / "access.toml")
    write_access(access, '[users.alice]\n"r" = ["read"]\n')
    server = make_server(str(tmp_path / "data"), authenticator=authenticator, access_file=access)
    server.store.create_repo(("r",))
    alice = "Basic " + base64.b64encode(f"alice:{ALICE_PASSWORD}".encode()).decode()
    assert (await server.client.get("/r/keys/", authorization=alice, accept=V2)).code == 200
    body = b"key"
    assert (await server.client.post(f"/r/keys/{name_of(body)}", body, authorization=alice)).code == 403
    assert (await server.client.get("/r/keys/", accept=V2)).code == 401
    assert not os.path.exists(server.layout.object_path(("r",), "keys", name_of(body)))


@ensure
async def test_access_file_without_authentication(tmp_path):
    """
    Without authentication the default rules apply to everybody, and rules
    with C{{user}} never match.
    """
    access = str(tmp_path / "access.toml")
    write_access(access, '[default]\n"public" = ["read", "append"]\n"{user}" = ["read", "write"]\n')
    server = make_server(str(tmp_path / "data"), access_file=access)
    assert (await server.client.post("/public/?create=true")).code == 200
    assert (await server.client.get("/public/keys/", accept=V2)).code == 200
    assert (await server.client.post("/other/?create=true")).code == 403
    assert not os.path.exists(os.path.join(server.layout.root, "other"))


# -- the flags through the site -----------------------------------------------


async def upload(server: Server, repo: str, kind: str, body: bytes, **headers: str) -> int:
    return (await server.client.post(f"{repo}{kind}/{name_of(body)}", body, **headers)).code


@ensure
async def test_append_only(tmp_path):
    """
    C{--append-only}: uploads of every type and lock deletes work; deleting
    any other object, the config or the repository is 403 and keeps it (even
    with C{--allow-repo-delete}); an identical re-upload still answers 200,
    a different config under the existing name 403.
    """
    root = str(tmp_path / "data")
    populate(root)
    server = make_server(root, append_only=True, allow_repo_delete=True)
    client = server.client

    for kind in HASHED_TYPES:
        assert await upload(server, "/r/", kind, NEW[kind]) == 200
        assert os.path.exists(os.path.join(root, object_rel(kind, NEW[kind])))
    assert (await client.post("/e/config", NEW_CONFIG)).code == 200
    assert (await client.post("/s/?create=true")).code == 200

    lock = STORED["locks"]
    assert (await client.delete(f"/r/locks/{name_of(lock)}")).code == 200
    assert not os.path.exists(os.path.join(root, object_rel("locks", lock)))

    before = snapshot(root)
    for kind in ("data", "keys", "snapshots", "index"):
        assert (await client.delete(f"/r/{kind}/{name_of(STORED[kind])}")).code == 403, kind
    assert (await client.delete("/r/config")).code == 403
    assert (await client.delete("/r/")).code == 403
    assert (await client.post("/r/config", b"a different config")).code == 403
    assert snapshot(root) == before

    stored = os.path.join(root, object_rel("data", STORED["data"]))
    inode = os.stat(stored).st_ino
    assert await upload(server, "/r/", "data", STORED["data"]) == 200
    assert (await client.post("/r/config", CONFIG)).code == 200
    assert os.stat(stored).st_ino == inode
    assert snapshot(root) == before
    assert server.spool_files() == []


@ensure
async def test_append_only_different_reupload_is_403(tmp_path):
    """
    C{--append-only} with C{--no-verify-upload}: a different body under an
    existing object name is 403 and the stored object stays.
    """
    server = make_server(str(tmp_path / "data"), append_only=True, verify_upload=False)
    assert (await server.client.post("/r/?create=true")).code == 200
    name = "d" * 64
    assert (await server.client.post(f"/r/data/{name}", b"first")).code == 200
    assert (await server.client.post(f"/r/data/{name}", b"second")).code == 403
    assert (await server.client.get(f"/r/data/{name}", range="bytes=0-")).body == b"first"


@ensure
async def test_append_only_caps_access_file(tmp_path):
    """
    C{--append-only} applies on top of an access file: a user the file makes
    admin still cannot delete objects or repositories.
    """
    root = str(tmp_path / "data")
    populate(root)
    access = str(tmp_path / "access.toml")
    write_access(access, '[default]\n"**" = ["read", "admin"]\n')
    server = make_server(root, append_only=True, access_file=access, proxy_auth_username=PROXY)
    before = snapshot(root)
    assert (await server.client.delete(f"/r/keys/{name_of(STORED['keys'])}", x_remote_user="root")).code == 403
    assert (await server.client.delete("/r/", x_remote_user="root")).code == 403
    assert snapshot(root) == before
    assert await upload(server, "/r/", "keys", NEW["keys"], x_remote_user="root") == 200


@ensure
async def test_private_repos(tmp_path):
    """
    C{--private-repos}: alice may create and use C{/alice/} and
    C{/alice/x/}; C{/bob/} and the root repository are 403 for her, and
    nothing is created there; bob cannot read alice's repository.
    """
    server = make_server(str(tmp_path / "data"), private_repos=True, proxy_auth_username=PROXY)
    client = server.client
    root = server.layout.root
    body = b"alice's pack"
    for repo in ("/alice/", "/alice/x/"):
        assert (await client.post(f"{repo}?create=true", x_remote_user="alice")).code == 200
        assert await upload(server, repo, "data", body, x_remote_user="alice") == 200
        listed = await client.get(f"{repo}data/", x_remote_user="alice", accept=V2)
        assert listed.code == 200
        assert json.loads(listed.body) == [{"name": name_of(body), "size": len(body)}]
    for repo in ("/bob/", "/"):
        assert (await client.post(f"{repo}?create=true", x_remote_user="alice")).code == 403
        assert await upload(server, repo, "data", body, x_remote_user="alice") == 403
        assert (await client.get(f"{repo}data/", x_remote_user="alice", accept=V2)).code == 403
    assert not os.path.exists(os.path.join(root, "bob"))
    assert not os.path.exists(os.path.join(root, "data"))
    assert (await client.get("/alice/data/", x_remote_user="bob", accept=V2)).code == 403
    assert (await client.get(f"/alice/data/{name_of(body)}", x_remote_user="bob", range="bytes=0-")).code == 403


# -- --proxy-auth-username ------------------------------------------------------


@ensure
async def test_proxy_header_missing_or_empty_is_401(tmp_path):
    """
    With C{--proxy-auth-username}, a request without the header, or with it
    empty, is 401 and creates nothing.
    """
    server = make_server(str(tmp_path / "data"), proxy_auth_username=PROXY)
    assert (await server.client.post("/r/?create=true")).code == 401
    assert (await server.client.post("/r/?create=true", x_remote_user="")).code == 401
    assert (await server.client.post("/r/?create=true", x_other_user="alice")).code == 401
    assert not os.path.exists(os.path.join(server.layout.root, "r"))


@pytest.mark.parametrize("name", ["a b", "../x", "a:b", "a/b", ".hidden", "-x", "x" * 129])
@ensure
async def test_proxy_header_invalid_user_is_400(tmp_path, name):
    """
    A user name in the proxy's header that is not a valid user name (space,
    path characters, colon, leading dot or dash, too long) is 400 and
    creates nothing.
    """
    server = make_server(str(tmp_path / "data"), proxy_auth_username=PROXY, private_repos=True)
    assert (await server.client.post("/r/?create=true", x_remote_user=name)).code == 400
    assert (await server.client.get("/r/keys/", x_remote_user=name)).code == 400
    assert os.listdir(server.layout.root) == [SPOOL_DIR]


@ensure
async def test_proxy_header_names_the_user(tmp_path):
    """
    A valid name in the proxy's header is the user the request is served
    as: with C{--private-repos} it may use its own repositories only. The
    user name is checked case-sensitively against the repository.
    """
    server = make_server(str(tmp_path / "data"), proxy_auth_username=PROXY, private_repos=True)
    client = server.client
    assert (await client.post("/alice.b/?create=true", x_remote_user="alice.b")).code == 200
    assert (await client.post("/carol/?create=true", x_remote_user="alice.b")).code == 403
    assert (await client.post("/carol/?create=true", x_remote_user="Carol")).code == 403
    assert (await client.post("/carol/?create=true", x_remote_user="carol")).code == 200
    assert sorted(os.listdir(server.layout.root)) == [SPOOL_DIR, "alice.b", "carol"]


# -- login throttling -----------------------------------------------------------


@dataclass
class ThrottledSite:
    site: ResticSite
    clock: Clock
    throttle: Throttle


@pytest.fixture
def throttled(tmp_path) -> ThrottledSite:
    """
    A site behind Basic authentication (user alice) with a login throttle,
    time on a L{Clock}, built the way the daemon builds it.
    """
    users = tmp_path / "htpasswd"
    users.write_text(ALICE_LINE + "\n")
    config = Config(path=str(tmp_path / "data"), htpasswd_file=str(users))
    store = make_store(config)
    store.prepare_root()
    ctx = make_context(config, store, run_inline)
    ctx.access.refresh()
    clock = Clock()
    htpasswd = Htpasswd(str(users))
    htpasswd.refresh()
    throttle = Throttle(clock)
    site = make_site(config, ctx, Authenticator(htpasswd, run_inline, clock), MemoryReactorClock(), throttle)
    return ThrottledSite(site, clock, throttle)


def login(site: ResticSite, host: str, password: str, user: str = "alice") -> RawReply:
    credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
    connection = Connection(site, host)
    try:
        return connection.request("POST", "/r/?create=true", {"Authorization": f"Basic {credentials}"})
    finally:
        connection.close()


def test_throttle_blocks_after_failed_logins(throttled, logged):
    """
    After 10 failed logins from one address within 60 s, that address gets
    429 with C{Retry-After} for the back-off (300 s), even with the right
    password; another address is unaffected; once the back-off is over the
    right password works again. Each failure is logged once, with the user
    and the address.
    """
    site, clock = throttled.site, throttled.clock
    for _ in range(10):
        seen = len(logged.events)
        assert login(site, "10.0.0.1", "wrong").code == 401
        new = [t for t in logged.texts(LogLevel.warn, seen) if "alice" in t and "10.0.0.1" in t]
        assert len(new) == 1, logged.texts(since=seen)
        clock.advance(1)
    blocked = login(site, "10.0.0.1", ALICE_PASSWORD)
    assert blocked.code == 429
    retry = blocked.header("retry-after")
    assert retry is not None and 280 <= int(retry) <= 300
    assert login(site, "10.0.0.1", "wrong").code == 429

    assert login(site, "10.0.0.2", ALICE_PASSWORD).code == 200

    clock.advance(throttled.throttle.backoff - 20)
    assert login(site, "10.0.0.1", ALICE_PASSWORD).code == 429
    clock.advance(20)
    assert login(site, "10.0.0.1", ALICE_PASSWORD).code == 200



def test_throttle_counts_only_recent_failures(throttled):
    """
    Failures spread over more than 60 s do not add up: 9 failures, a pause,
    one more, and the right password is still accepted.
    """
    site, clock = throttled.site, throttled.clock
    for _ in range(9):
        assert login(site, "10.0.0.3", "wrong").code == 401
    clock.advance(61)
    assert login(site, "10.0.0.3", "wrong").code == 401
    assert login(site, "10.0.0.3", ALICE_PASSWORD).code == 200


def test_throttle_blocks_unknown_users_too(throttled):
    """
    Guessing user names counts like guessing passwords.
    """
    site = throttled.site
    for i in range(10):
        assert login(site, "10.0.0.4", "x", user=f"user{i}").code == 401
    assert login(site, "10.0.0.4", ALICE_PASSWORD).code == 429


def test_long_password_is_401(throttled, logged):
    """
    A password longer than bcrypt's 72 bytes, for a bcrypt user, is simply
    wrong: 401, not a server error.
    """
    assert login(throttled.site, "10.0.0.5", "x" * 100).code == 401
    assert login(throttled.site, "10.0.0.5", ALICE_PASSWORD + "x" * 80).code == 401


# -- refusals are logged --------------------------------------------------------


def test_refusal_is_logged(tmp_path, logged):
    """
    A request refused for lack of rights is logged once, with the user, the
    client's address, the method and the path.
    """
    access = str(tmp_path / "access.toml")
    write_access(access, '[users.mallory]\n"r" = ["read"]\n')
    server = make_server(str(tmp_path / "data"), proxy_auth_username=PROXY, access_file=access)
    connection = Connection(server.site, "192.0.2.7")
    body = b"not yours"
    reply = connection.request("POST", f"/r/keys/{name_of(body)}", {PROXY: "mallory"}, body)
    connection.close()
    assert reply.code == 403
    refused = [t for t in logged.texts(LogLevel.warn) if "mallory" in t]
    assert len(refused) == 1, logged.texts()
    for fragment in ("mallory", "192.0.2.7", "POST", f"/r/keys/{name_of(body)}"):
        assert fragment in refused[0], refused[0]


# -- reloading the rules ------------------------------------------------------------


@ensure
async def test_access_refresh_picks_up_edits(tmp_path):
    """
    L{Access.refresh} re-reads an edited access file; the new rules apply to
    the next request; an unchanged file is not re-read.
    """
    access = str(tmp_path / "access.toml")
    write_access(access, '[users.u]\n"**" = ["read"]\n')
    server = make_server(str(tmp_path / "data"), proxy_auth_username=PROXY, access_file=access)
    assert (await server.client.post("/r/?create=true", x_remote_user="u")).code == 403
    assert server.ctx.access.refresh() is False
    write_access(access, '[users.u]\n"**" = ["read", "append"]\n')
    assert server.ctx.access.refresh() is True
    assert (await server.client.post("/r/?create=true", x_remote_user="u")).code == 200


@ensure
async def test_service_reload_keeps_rules_of_broken_file(tmp_path, logged):
    """
    L{ResticdService.reload} applies an edited access file; when the file is
    then broken (bad TOML) or gone, the previous rules stay in force and the
    error is logged with the file's path and why.
    """
    access = str(tmp_path / "access.toml")
    write_access(access, '[users.u]\n"**" = ["append"]\n')
    config = Config(path=str(tmp_path / "data"), listen=(), proxy_auth_username=PROXY, access_file=access)
    service = ResticdService(config, global_reactor)
    service.prepare()
    service.threads.start()
    try:
        client = SiteClient(service.site)
        # HEAD of a missing config: 404 with the read right, 403 without.
        assert (await client.head("/r/config", x_remote_user="u")).code == 403

        write_access(access, '[users.u]\n"**" = ["read"]\n')
        await service.reload()
        assert (await client.head("/r/config", x_remote_user="u")).code == 404

        write_access(access, '[users.u]\n"**" = ["append"\n')
        seen = len(logged.events)
        await service.reload()
        errors = logged.texts(LogLevel.error, seen)
        assert len(errors) == 1 and access in errors[0] and "TOML" in errors[0], errors
        assert (await client.head("/r/config", x_remote_user="u")).code == 404

        os.unlink(access)
        seen = len(logged.events)
        await service.reload()
        errors = logged.texts(LogLevel.error, seen)
        assert len(errors) == 1 and access in errors[0], errors
        assert (await client.head("/r/config", x_remote_user="u")).code == 404
    finally:
        service.threads.stop()
