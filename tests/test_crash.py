"""
Crashes: the real daemon killed with SIGKILL at random moments while clients
upload as fast as they can, then restarted over the same data directory, many
times; and the real restic client carrying a backup through such a crash.

What a crash may never do: lose an upload that was answered 200, leave a
partial or foreign file under a final name, show a temp file in a listing, or
leave spool files behind once the daemon serves again.

The helpers here (L{Ledger}, L{Loader}, L{Verifier}, L{crash_cycles}, L{big_tree},
L{restic_crash_round}) are also what C{bench/soak.py} runs for longer.
Environment: C{RESTICD_CRASH_CYCLES} raises the number of kill cycles above
L{CYCLES}.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .daemon import Daemon, running
from .test_restic import COMMAND_TIMEOUT, Restic, assert_same_tree, restic_bin

__all__ = ["restic_bin"]

KIB = 1 << 10
MIB = 1 << 20
#: Kill cycles in the test suite (at least; RESTICD_CRASH_CYCLES may ask for more).
CYCLES = 20
#: Client threads uploading during each cycle.
CLIENTS = 4
#: The repositories the clients upload into (one at the top, one nested).
REPOS = ("alpha", "beta/gamma")
#: Object types and how often each is uploaded.
KINDS = (("data", 80), ("index", 7), ("snapshots", 4), ("keys", 3), ("locks", 6))
#: Smallest and largest object uploaded.
MIN_SIZE, MAX_SIZE = 1 * KIB, 4 * MIB
#: Seconds one client socket operation may take while the daemon is alive.
CLIENT_TIMEOUT = 20.0
#: Seconds of uploading before the kill: at most this much.
MAX_RUN = 1.2
#: Once the objects on disk exceed this many bytes, acknowledged objects are
#: deleted (through the server, before the next load) to stay bounded.
DISK_CAP = 768 * MIB
V1 = "application/vnd.x.restic.rest.v1"
V2 = "application/vnd.x.restic.rest.v2"
_NAME = re.compile(r"[0-9a-f]{64}\Z")
_HEX2 = re.compile(r"[0-9a-f]{2}\Z")
TYPES = ("data", "keys", "locks", "snapshots", "index")


def crash_cycles() -> int:
    """
    How many kill cycles to run: L{CYCLES}, or more when the environment
    variable C{RESTICD_CRASH_CYCLES} asks for more.
    """
    wanted = os.environ.get("RESTICD_CRASH_CYCLES", "")
    return max(CYCLES, int(wanted)) if wanted.strip() else CYCLES


# -- the objects: reproducible bodies with sha256 names ---------------------------

#: The random bytes every body is a slice of (after a unique prefix).
_POOL = random.Random(0x5EED).randbytes(MAX_SIZE + 64 * KIB)


def body_of(token: bytes, size: int) -> bytes:
    """
    The body of one object: its 16-byte unique token, then C{size - 16} bytes
    of the random pool from an offset the token picks. The same token and
    size always give the same bytes, so an object can be uploaded again.
    """
    offset = int.from_bytes(token[:4], "big") % (len(_POOL) - size)
    return token + _POOL[offset : offset + size - len(token)]


def sha256_path(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


Key = tuple[str, str, str]


@dataclass(frozen=True)
class Obj:
    """
    One object a client uploaded: where, its name, size and token.
    """

    repo: str
    kind: str
    name: str
    size: int
    token: bytes

    @property
    def key(self) -> Key:
        return (self.repo, self.kind, self.name)

    @property
    def url_path(self) -> str:
        return f"/{self.repo}/{self.kind}/{self.name}"

    def body(self) -> bytes:
        return body_of(self.token, self.size)


def new_object(rng: random.Random, repo: str, kind: str) -> tuple[Obj, bytes]:
    """
    A new object with a log-uniform size between L{MIN_SIZE} and L{MAX_SIZE}.
    """
    size = int(MIN_SIZE * (MAX_SIZE / MIN_SIZE) ** rng.random())
    token = rng.randbytes(16)
    body = body_of(token, size)
    return Obj(repo, kind, hashlib.sha256(body).hexdigest(), size, token), body


# -- what the clients were told ---------------------------------------------------


@dataclass
class Ledger:
    """
    What the server acknowledged across all cycles: uploads answered 200
    (and not deleted since), deletes answered 200, deletes whose answer was
    lost in a crash; and anything the server answered that it should not
    have.
    """

    acked: dict[Key, Obj] = field(default_factory=dict)
    deleted: dict[Key, Obj] = field(default_factory=dict)
    uncertain: dict[Key, Obj] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    attempts: int = 0
    acks: int = 0
    reuploads: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, obj: Obj) -> None:
        with self.lock:
            self.acked[obj.key] = obj
            self.acks += 1

    def bad(self, what: str) -> None:
        with self.lock:
            self.unexpected.append(what)

    def pick(self, rng: random.Random, kind: str | None = None) -> Obj | None:
        with self.lock:
            candidates = [o for o in self.acked.values() if kind is None or o.kind == kind]
            if kind is None:
                candidates = [o for o in candidates if o.kind != "locks"]
            return rng.choice(candidates) if candidates else None

    def start_delete(self, obj: Obj) -> bool:
        """
        Move C{obj} from acknowledged to uncertain (its delete is in flight);
        whether it was still acknowledged.
        """
        with self.lock:
            if self.acked.pop(obj.key, None) is None:
                return False
            self.uncertain[obj.key] = obj
            return True

    def deleted_ok(self, obj: Obj) -> None:
        with self.lock:
            self.uncertain.pop(obj.key, None)
            self.deleted[obj.key] = obj


def request(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


class Loader:
    """
    C{CLIENTS} threads, each on its own keep-alive HTTP/1.1 connection,
    uploading new random objects as fast as they can (sometimes an
    acknowledged one again, sometimes deleting an acknowledged lock) until
    the daemon is killed.

    Every answer other than 200, and every connection error before the kill,
    is recorded in the ledger as unexpected.
    """

    def __init__(self, daemon: Daemon, ledger: Ledger, rng: random.Random, clients: int = CLIENTS) -> None:
        self.daemon = daemon
        self.ledger = ledger
        self.killed = threading.Event()
        self.in_flight = 0
        self._count_lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(random.Random(rng.random()),), daemon=True) for _ in range(clients)
        ]

    def __enter__(self) -> Loader:
        for thread in self.threads:
            thread.start()
        return self

    def kill_daemon(self) -> int:
        """
        Kill the daemon (SIGKILL by its pid) in the middle of the load; how
        many requests were in flight just before.
        """
        with self._count_lock:
            in_flight = self.in_flight
        self.killed.set()
        self.daemon.kill()
        return in_flight

    def __exit__(self, *exc: object) -> None:
        self.killed.set()
        for thread in self.threads:
            thread.join(CLIENT_TIMEOUT + 5)
        stuck = [t for t in self.threads if t.is_alive()]
        assert not stuck, f"{len(stuck)} client threads did not finish"

    def _run(self, rng: random.Random) -> None:
        ledger = self.ledger
        conn: http.client.HTTPConnection | None = None
        kinds = [k for k, _ in KINDS]
        weights = [w for _, w in KINDS]
        while True:
            if conn is None:
                if self.killed.is_set():
                    return
                conn = http.client.HTTPConnection(self.daemon.host, self.daemon.port, timeout=CLIENT_TIMEOUT)
            roll = rng.random()
            repo = rng.choice(REPOS)
            what = "upload"
            obj: Obj | None = None
            body: bytes | None = None
            if roll < 0.05:
                obj = ledger.pick(rng)
                what = "re-upload"
            elif roll < 0.09:
                lock = ledger.pick(rng, "locks")
                if lock is not None and ledger.start_delete(lock):
                    obj, what = lock, "delete"
            if obj is None:
                obj, body = new_object(rng, repo, rng.choices(kinds, weights)[0])
                what = "upload"
            elif what == "re-upload":
                body = obj.body()
            with self._count_lock:
                self.in_flight += 1
            try:
                with ledger.lock:
                    ledger.attempts += 1
                if what == "delete":
                    status, _, answer = request(conn, "DELETE", obj.url_path)
                else:
                    status, _, answer = request(conn, "POST", obj.url_path, body)
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                conn = None
                if not self.killed.is_set():
                    ledger.bad(f"{what} {obj.url_path}: {e!r} while the daemon was up")
                continue
            finally:
                with self._count_lock:
                    self.in_flight -= 1
            if status != 200:
                ledger.bad(f"{what} {obj.url_path}: {status} {answer[:200]!r}")
                continue
            if what == "delete":
                ledger.deleted_ok(obj)
            else:
                if what == "re-upload":
                    with ledger.lock:
                        ledger.reuploads += 1
                ledger.ack(obj)


# -- what must hold after every restart ---------------------------------------------


@dataclass
class Findings:
    """
    Everything wrong with a data directory after a restart.
    """

    #: Acknowledged objects that are missing or have other bytes.
    lost: list[str] = field(default_factory=list)
    #: Files under a final name whose content does not hash to that name.
    partial: list[str] = field(default_factory=list)
    #: Files in the repositories that are not objects or configs (temp files).
    stray: list[str] = field(default_factory=list)
    #: Files left in the spool once the daemon serves.
    spool: list[str] = field(default_factory=list)
    #: Objects whose acknowledged delete did not last.
    resurrected: list[str] = field(default_factory=list)
    #: Listings that differ from what is on disk.
    listings: list[str] = field(default_factory=list)
    #: Reads through the server that did not give the stored bytes.
    reads: list[str] = field(default_factory=list)

    def problems(self) -> dict[str, list[str]]:
        return {k: v for k, v in vars(self).items() if v}


class Verifier:
    """
    Checks a data directory served by a freshly restarted daemon against a
    L{Ledger}; remembers which files it has hashed already (by inode, size
    and times) so that each cycle hashes only new or changed files.
    """

    def __init__(self, data: Path, repos: tuple[str, ...] = REPOS) -> None:
        self.data = data
        self.repos = repos
        self._hashed: dict[str, tuple[tuple[int, ...], str]] = {}
        self.files_hashed = 0

    def digest(self, path: str) -> str:
        st = os.stat(path)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._hashed.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        digest = sha256_path(path)
        self.files_hashed += 1
        self._hashed[path] = (stamp, digest)
        return digest

    def on_disk(self, findings: Findings) -> dict[str, dict[str, dict[str, int]]]:
        """
        Every object on disk (repo -> type -> name -> size), hashed; files
        that are neither objects under their right name nor configs go into
        C{findings}.
        """
        found: dict[str, dict[str, dict[str, int]]] = {}
        repo_dirs = {str(self.data / repo) for repo in self.repos}
        for directory, dirnames, filenames in os.walk(self.data):
            dirnames.sort()
            rel = os.path.relpath(directory, self.data)
            if rel == ".spool" or rel.startswith(".spool" + os.sep):
                continue
            for name in filenames:
                path = os.path.join(directory, name)
                where = self._classify(directory, name, repo_dirs)
                if where is None:
                    findings.stray.append(os.path.relpath(path, self.data))
                    continue
                repo, kind = where
                if kind == "config":
                    continue
                if not os.path.isfile(path) or os.path.islink(path):
                    findings.stray.append(os.path.relpath(path, self.data))
                    continue
                if self.digest(path) != name:
                    findings.partial.append(f"{os.path.relpath(path, self.data)} ({os.path.getsize(path)} bytes)")
                found.setdefault(repo, {}).setdefault(kind, {})[name] = os.path.getsize(path)
        return found

    def _classify(self, directory: str, name: str, repo_dirs: set[str]) -> tuple[str, str] | None:
        if directory in repo_dirs and name == "config":
            return os.path.relpath(directory, self.data), "config"
        if not _NAME.match(name):
            return None
        parent, leaf = os.path.split(directory)
        if parent in repo_dirs and leaf in TYPES and leaf != "data":
            return os.path.relpath(parent, self.data), leaf
        grand, middle = os.path.split(parent)
        if grand in repo_dirs and middle == "data" and _HEX2.match(leaf) and name.startswith(leaf):
            return os.path.relpath(grand, self.data), "data"
        return None

    def check(self, daemon: Daemon, ledger: Ledger, rng: random.Random, reads: int = 3) -> Findings:
        """
        Everything that must hold once a restarted daemon serves, before any
        new request: spool empty; every file under a final name hashes to it;
        no stray files; every acknowledged object present and intact, every
        acknowledged delete still gone; v1 and v2 listings of every type equal
        to the files on disk; a few acknowledged objects read back whole
        through the server.
        """
        findings = Findings()
        findings.spool = sorted(os.listdir(daemon.spool))
        found = self.on_disk(findings)
        for key, obj in sorted(ledger.acked.items()):
            size = found.get(obj.repo, {}).get(obj.kind, {}).get(obj.name)
            if size is None:
                findings.lost.append(f"{obj.url_path} ({obj.size} bytes): missing")
            elif size != obj.size:
                findings.lost.append(f"{obj.url_path}: {size} bytes on disk, {obj.size} acknowledged")
        for key, obj in sorted(ledger.deleted.items()):
            if obj.name in found.get(obj.repo, {}).get(obj.kind, {}):
                findings.resurrected.append(obj.url_path)
        conn = http.client.HTTPConnection(daemon.host, daemon.port, timeout=CLIENT_TIMEOUT)
        try:
            self._check_listings(conn, found, findings)
            for obj in rng.sample(sorted(ledger.acked.values(), key=lambda o: o.key), min(reads, len(ledger.acked))):
                status, headers, body = request(conn, "GET", obj.url_path, headers={"Range": "bytes=0-"})
                if status not in (200, 206) or hashlib.sha256(body).hexdigest() != obj.name:
                    findings.reads.append(f"GET {obj.url_path}: {status}, {len(body)} bytes")
        finally:
            conn.close()
        return findings

    def _check_listings(
        self, conn: http.client.HTTPConnection, found: dict[str, dict[str, dict[str, int]]], findings: Findings
    ) -> None:
        for repo in self.repos:
            for kind in TYPES:
                want = found.get(repo, {}).get(kind, {})
                path = f"/{repo}/{kind}/"
                status, headers, body = request(conn, "GET", path, headers={"Accept": V2})
                if status != 200 or headers.get("content-type") != V2:
                    findings.listings.append(f"v2 {path}: {status} {headers.get('content-type')}")
                else:
                    got = {e["name"]: e["size"] for e in json.loads(body)}
                    if got != want:
                        extra = sorted(set(got) - set(want))[:5]
                        missing = sorted(set(want) - set(got))[:5]
                        wrong = sorted(n for n in set(got) & set(want) if got[n] != want[n])[:5]
                        findings.listings.append(f"v2 {path}: extra {extra}, missing {missing}, sizes {wrong}")
                status, headers, body = request(conn, "GET", path)
                if status != 200 or headers.get("content-type") != V1:
                    findings.listings.append(f"v1 {path}: {status} {headers.get('content-type')}")
                elif sorted(json.loads(body)) != sorted(want):
                    findings.listings.append(f"v1 {path}: {len(json.loads(body))} names, {len(want)} files on disk")


def trim(daemon: Daemon, ledger: Ledger, rng: random.Random, cap: int = DISK_CAP) -> int:
    """
    When the acknowledged objects exceed C{cap} bytes, delete random ones
    through the server (each delete must answer 200) until they are under
    half of it; how many were deleted.
    """
    total = sum(o.size for o in ledger.acked.values())
    if total <= cap:
        return 0
    victims = sorted(ledger.acked.values(), key=lambda o: o.key)
    rng.shuffle(victims)
    conn = http.client.HTTPConnection(daemon.host, daemon.port, timeout=CLIENT_TIMEOUT)
    deleted = 0
    try:
        for obj in victims:
            if total <= cap // 2:
                break
            ledger.start_delete(obj)
            status, _, answer = request(conn, "DELETE", obj.url_path)
            assert status == 200, f"DELETE {obj.url_path}: {status} {answer!r}"
            ledger.deleted_ok(obj)
            total -= obj.size
            deleted += 1
    finally:
        conn.close()
    return deleted


def create_repos(daemon: Daemon, repos: tuple[str, ...] = REPOS) -> None:
    """
    Create the repositories and give each a config (as restic init does).
    """
    conn = http.client.HTTPConnection(daemon.host, daemon.port, timeout=CLIENT_TIMEOUT)
    try:
        for repo in repos:
            status, _, body = request(conn, "POST", f"/{repo}/?create=true")
            assert status == 200, f"create {repo}: {status} {body!r}"
            status, _, body = request(conn, "POST", f"/{repo}/config", f"config of {repo}\n".encode())
            assert status == 200, f"config of {repo}: {status} {body!r}"
    finally:
        conn.close()


@dataclass
class CycleStats:
    """
    Totals over a run of kill cycles.
    """

    cycles: int = 0
    killed_in_flight: int = 0
    spool_leftovers_at_kill: int = 0
    trimmed: int = 0


def run_cycles(
    tmp: Path,
    data: Path,
    cycles: int,
    ledger: Ledger,
    verifier: Verifier,
    rng: random.Random,
    check: Callable[[int, Findings, CycleStats], None],
    max_run: float = MAX_RUN,
    cap: int = DISK_CAP,
    deadline: float | None = None,
) -> CycleStats:
    """
    Run C{cycles} kill cycles over C{data}: start the daemon (creating the
    repositories the first time), verify, load it, kill it at a random
    moment, note what the kill left in the spool; and a last start that
    only verifies. C{check} gets each verification's findings (cycle number,
    findings, running totals) while that daemon runs, and may raise. With a
    C{deadline} (of C{time.monotonic}), fewer cycles run when time is up;
    the last start still only verifies.
    """
    stats = CycleStats()
    leftovers = 0
    for cycle in range(cycles + 1):
        with running(tmp, tls=False, auth=None, data=data) as daemon:
            if cycle == 0:
                create_repos(daemon)
            findings = verifier.check(daemon, ledger, rng)
            if leftovers and f"removed {leftovers} unfinished uploads" not in daemon.log():
                findings.spool.append(f"the daemon did not log removing the {leftovers} spool files the kill left")
            check(cycle, findings, stats)
            if cycle == cycles or (deadline is not None and time.monotonic() > deadline):
                break
            stats.trimmed += trim(daemon, ledger, rng, cap)
            delay = rng.uniform(0.0, 0.05) if rng.random() < 0.1 else rng.uniform(0.05, max_run)
            with Loader(daemon, ledger, rng) as loader:
                time.sleep(delay)
                stats.killed_in_flight += loader.kill_daemon()
            leftovers = len(os.listdir(daemon.spool))
            stats.spool_leftovers_at_kill += leftovers
            stats.cycles += 1
    return stats


def test_kill_cycles_lose_no_acknowledged_upload(tmp_path: Path) -> None:
    """
    With clients uploading random objects (1 KiB to 4 MiB, into two
    repositories, every object type) as fast as they can, the daemon killed
    with SIGKILL at a random moment and restarted over the same data
    directory, again and again: after every restart every upload that was
    answered 200 is there with its exact bytes, every file under a final
    name hashes to its name, nothing but objects and configs is in the
    repositories, v1 and v2 listings of every type show exactly the files on
    disk, deletes answered 200 stay deleted, re-uploads of stored objects
    answer 200, and the spool is empty once the daemon serves (it logs the
    unfinished uploads it removed). While the daemon is up, every request is
    answered 200.
    """
    cycles = crash_cycles()
    data = tmp_path / "data"
    ledger = Ledger()
    verifier = Verifier(data)
    seed = int(os.environ.get("RESTICD_CRASH_SEED", "0")) or random.randrange(1 << 30)
    rng = random.Random(seed)

    def check(cycle: int, findings: Findings, stats: CycleStats) -> None:
        assert not findings.problems(), f"after kill {cycle} (seed {seed}): {findings.problems()}"
        assert not ledger.unexpected, f"during cycle {cycle} (seed {seed}): {ledger.unexpected[:10]}"

    stats = run_cycles(tmp_path / "daemons", data, cycles, ledger, verifier, rng, check)
    assert stats.cycles == cycles
    # The test did what it claims: uploads were acknowledged, kills hit
    # requests in flight and left spool files, which the restart removed.
    assert ledger.acks >= cycles, f"only {ledger.acks} uploads acknowledged in {cycles} cycles"
    assert len(ledger.acked) > 0
    assert stats.killed_in_flight > 0, "no kill hit a request in flight"
    assert stats.spool_leftovers_at_kill > 0, "no kill left a spool file to clean up"


# -- restic through a crash ----------------------------------------------------------


def big_tree(root: Path, seed: int = 1127, total: int = 100 * MIB) -> Path:
    """
    About C{total} bytes of incompressible files (several of 2 to 12 MiB, so
    that restic uploads many packs), ~200 small files, nested directories.
    """
    rng = random.Random(seed)
    root.mkdir(parents=True)
    written = 0
    i = 0
    small = root / "small"
    for d in range(10):
        directory = small / f"d{d}"
        directory.mkdir(parents=True)
        for k in range(20):
            size = rng.randrange(0, 20_000)
            (directory / f"f{k}.txt").write_bytes(rng.randbytes(size))
            written += size
    while written < total:
        size = min(rng.randrange(2 * MIB, 12 * MIB), total - written)
        (root / f"big{i:02d}.bin").write_bytes(rng.randbytes(size))
        written += size
        i += 1
    return root


def stored_data_bytes(data: Path, repo: str) -> int:
    total = 0
    for directory, _, filenames in os.walk(data / repo / "data"):
        for name in filenames:
            try:
                total += os.path.getsize(os.path.join(directory, name))
            except FileNotFoundError:
                pass
    return total


def spooled_bytes(spool: Path) -> int:
    """
    The bytes of the uploads in flight (their spool files so far).
    """
    total = 0
    for name in os.listdir(spool):
        try:
            total += os.path.getsize(spool / name)
        except FileNotFoundError:
            pass
    return total


@dataclass
class ResticRound:
    """
    What happened in one restic crash round.
    """

    #: Bytes of packs stored when the server was killed, of the tree's total.
    killed_at_bytes: int
    total_bytes: int
    #: Spool files the kill left (removed by the restart).
    spool_leftovers: int
    #: How the backup that saw the crash ended (None: it hung and was killed).
    first_exit: int | None
    first_output: str
    findings: Findings


def restic_crash_round(
    tmp: Path, restic_binary: str, source: Path, kill_fraction: float = 0.35, repo: str = "repo"
) -> ResticRound:
    """
    Back up C{source} with restic over plain HTTP; when about
    C{kill_fraction} of it has arrived (stored packs and uploads in flight,
    at least one pack stored), SIGKILL the daemon; restart
    it on the same port and data directory (restic retries meanwhile) and let
    that first backup end (or kill it, by pid, if it does not end in time).
    Then verify the data directory (as after a kill cycle), and: unlock,
    back up again (must succeed), check --read-data, restore and compare
    byte for byte.
    """
    data = tmp / "data"
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    daemons = tmp / "daemons"
    total = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    log = tmp / "first-backup.log"
    backup: subprocess.Popen[bytes] | None = None
    try:
        with running(daemons, tls=False, auth=None, data=data) as first:
            port = first.port
            restic = Restic(restic_binary, f"rest:http://127.0.0.1:{port}/{repo}", home)
            restic("init")
            argv = [restic_binary, "-r", restic.repo, "backup", str(source)]
            with open(log, "wb") as out:
                backup = subprocess.Popen(
                    argv, env=restic.env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
                )
            deadline = time.monotonic() + COMMAND_TIMEOUT
            stored = 0
            while backup.poll() is None and time.monotonic() < deadline:
                # Progress is what has arrived, stored or still in the spool:
                # packs are published only after their fsync, which on a slow
                # disk comes in bursts (from a third stored to all of it
                # between two polls).
                stored = stored_data_bytes(data, repo)
                if stored and stored + spooled_bytes(first.spool) >= kill_fraction * total:
                    break
                time.sleep(0.01)
            running_at_kill = backup.poll() is None
            first.kill()
            assert running_at_kill, (
                f"the backup ended (exit {backup.returncode}) before the server could be killed: "
                f"{log.read_text(errors='replace')[-2000:]}"
            )
        leftovers = len(os.listdir(first.spool))
        with running(daemons, tls=False, auth=None, data=data, listen=(f"tcp:{port}:interface=127.0.0.1",)) as second:
            first_exit: int | None
            try:
                first_exit = backup.wait(COMMAND_TIMEOUT)
            except subprocess.TimeoutExpired:
                backup.kill()
                backup.wait(10)
                first_exit = None
            verifier = Verifier(data, (repo,))
            findings = verifier.check(second, Ledger(), random.Random(0))
            if leftovers and f"removed {leftovers} unfinished uploads" not in second.log():
                findings.spool.append(f"the daemon did not log removing the {leftovers} spool files the kill left")
            restic("unlock")
            restic("backup", str(source))
            restic("check", "--read-data")
            target = tmp / "restored"
            restic("restore", "latest", "--target", str(target))
            assert_same_tree(source, target / source.relative_to("/"))
            after = verifier.check(second, Ledger(), random.Random(0))
            for name, found in after.problems().items():
                getattr(findings, name).extend(found)
    finally:
        if backup is not None and backup.poll() is None:
            backup.kill()
            backup.wait(10)
    return ResticRound(stored, total, leftovers, first_exit, log.read_text(errors="replace"), findings)


@pytest.mark.restic
def test_restic_backup_survives_server_kill(tmp_path: Path, restic_bin: str) -> None:
    """
    A restic backup of ~100 MiB over HTTP whose server is killed with
    SIGKILL a third of the way through and restarted on the same port: that
    backup carries on through restic's retries and succeeds; the data
    directory has no partial file, no temp file and no spool leftover, and
    its listings match the disk; `restic unlock` and a rerun of the backup
    succeed, `restic check --read-data` passes, and the restored tree is
    byte for byte the original.
    """
    source = big_tree(tmp_path / "source")
    outcome = restic_crash_round(tmp_path / "run", restic_bin, source)
    assert not outcome.findings.problems(), outcome.findings.problems()
    assert 0 < outcome.killed_at_bytes < outcome.total_bytes
    assert outcome.first_exit == 0, f"the backup that saw the crash failed:\n{outcome.first_output[-3000:]}"
