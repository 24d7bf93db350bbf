"""
End to end with the real restic client against the real daemon: a whole
repository life cycle over HTTPS (HTTP/2, with a user) and over plain HTTP
(HTTP/1.1, no authentication), and the served repository read by restic
directly from disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from .daemon import Daemon, running
from .tools import required_program

pytestmark = pytest.mark.restic

#: Seconds one restic command may take.
COMMAND_TIMEOUT = 120
MIB = 1 << 20
PASSWORD = "correct horse battery staple"
USER, USER_PASSWORD = "alice", "s3cret w/ spaces:and:colons"
#: One line of the daemon's --debug access log (combined log format).
ACCESS_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<uri>\S+) (?P<proto>HTTP/[0-9.]+)" (?P<code>\d{3}) ')


@pytest.fixture(scope="module")
def restic_bin() -> str:
    """
    The restic executable: a test failure in CI when it is missing, a skip
    elsewhere.
    """
    return required_program("restic")


@dataclass
class Restic:
    """
    Runs restic against one repository, with a password, a private cache and
    no other RESTIC_* settings from the environment.
    """

    binary: str
    repo: str
    home: Path
    cacert: Path | None = None
    password: str = PASSWORD

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")}
        env.update(
            HOME=str(self.home),
            RESTIC_PASSWORD=self.password,
            RESTIC_CACHE_DIR=str(self.home / "cache"),
        )
        return env

    def __call__(self, *args: str, cwd: Path | None = None, password: str | None = None) -> str:
        """
        Run one command; its standard output. Fails the test with restic's
        output when it exits non-zero.
        """
        argv = [self.binary, "-r", self.repo]
        if self.cacert is not None:
            argv += ["--cacert", str(self.cacert)]
        argv += list(args)
        env = self.env()
        if password is not None:
            env["RESTIC_PASSWORD"] = password
        done = subprocess.run(
            argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
        assert done.returncode == 0, (
            f"restic {' '.join(args)} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
        )
        return done.stdout

    def json(self, *args: str, password: str | None = None) -> Any:
        return json.loads(self("--json", *args, password=password))


# -- the tree that is backed up -----------------------------------------------


def make_tree(root: Path, seed: int = 20261127) -> None:
    """
    A tree with a bit of everything: large random files (several packs), ~300
    small files in nested directories, empty files and directories, relative
    and dangling symlinks, and non-ASCII names and names with spaces.
    """
    rng = random.Random(seed)
    (root / "big").mkdir(parents=True)
    (root / "big" / "one.bin").write_bytes(rng.randbytes(12 * MIB))
    (root / "big" / "two.bin").write_bytes(rng.randbytes(12 * MIB))
    (root / "big" / "three.bin").write_bytes(rng.randbytes(3 * MIB))
    for i in range(10):
        for j in range(3):
            directory = root / "small" / f"d{i:02d}" / f"e{j}"
            directory.mkdir(parents=True)
            for k in range(10):
                (directory / f"f{k}.txt").write_bytes(rng.randbytes(rng.randrange(1, 5000)))
    (root / "empty.txt").write_bytes(b"")
    (root / "small" / "d03" / "empty too").write_bytes(b"")
    (root / "empty dir").mkdir()
    (root / "nested" / "deeper" / "emptiest").mkdir(parents=True)
    (root / "ü").mkdir()
    (root / "ü" / "日本語.txt").write_text("こんにちは, Grüße\n", encoding="utf-8")
    (root / "ü" / "name with spaces.txt").write_bytes(rng.randbytes(777))
    (root / "ü" / "sub dir ñ").mkdir()
    (root / "ü" / "sub dir ñ" / "é ï.bin").write_bytes(rng.randbytes(4096))
    os.symlink("big/three.bin", root / "link to three")
    os.symlink("../small/d01", root / "nested" / "dir link")
    os.symlink("does/not/exist", root / "dangling")
    os.symlink("日本語.txt", root / "ü" / "link ü")
    os.chmod(root / "ü" / "name with spaces.txt", 0o640)
    os.chmod(root / "small" / "d02" / "e1" / "f3.txt", 0o755)


def modify_tree(root: Path) -> None:
    """
    A second state of the tree: one large file rewritten, one small file
    changed, one removed, one added, and a symlink retargeted.
    """
    rng = random.Random(7)
    (root / "big" / "three.bin").write_bytes(rng.randbytes(3 * MIB))
    (root / "small" / "d00" / "e0" / "f0.txt").write_bytes(b"changed\n")
    (root / "small" / "d09" / "e2" / "f9.txt").unlink()
    (root / "ü" / "new ファイル.txt").write_bytes(rng.randbytes(10_000))
    os.unlink(root / "dangling")
    os.symlink("still/not/there", root / "dangling")


def describe_tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """
    Every entry below C{root} (not following symlinks): its kind, and the
    sha256 and permission bits of files, the target of symlinks.
    """
    entries: dict[str, tuple[Any, ...]] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                entries[rel] = ("file", st.st_size, digest, stat.S_IMODE(st.st_mode))
            else:
                entries[rel] = ("other", st.st_mode)
    return entries


def assert_same_tree(original: Path, restored: Path) -> None:
    """
    The restored tree has exactly the entries of the original, with the same
    contents, link targets and permission bits.
    """
    assert restored.is_dir(), f"nothing restored at {restored}"
    want = describe_tree(original)
    got = describe_tree(restored)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    differ = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    assert not (missing or extra or differ), f"missing: {missing}\nextra: {extra}\ndiffering: {differ}"


# -- the daemon, over each transport -------------------------------------------


@dataclass
class Served:
    daemon: Daemon
    restic: Restic
    transport: str


@pytest.fixture(params=["https-h2-auth", "http-noauth"])
def served(request: pytest.FixtureRequest, tmp_path: Path, restic_bin: str) -> Iterator[Served]:
    """
    A daemon and a restic pointed at repository C{/repo} on it: over HTTPS
    with a user in the URL, or over plain HTTP without authentication.
    """
    home = tmp_path / "home"
    home.mkdir()
    if request.param == "https-h2-auth":
        with running(tmp_path, "--debug", auth={USER: USER_PASSWORD}) as daemon:
            url = f"rest:https://{USER}:{quote(USER_PASSWORD, safe='')}@{daemon.host}:{daemon.port}/repo"
            yield Served(daemon, Restic(restic_bin, url, home, cacert=daemon.cert), request.param)
    else:
        with running(tmp_path, "--debug", tls=False) as daemon:
            url = f"rest:http://{daemon.host}:{daemon.port}/repo"
            yield Served(daemon, Restic(restic_bin, url, home), request.param)


def access_log(daemon: Daemon) -> list[re.Match[str]]:
    return [m for m in ACCESS_LINE.finditer(daemon.log())]


def test_restic_life_cycle(served: Served, tmp_path: Path) -> None:
    """
    restic can use the daemon as its repository from start to end: init,
    backup, list snapshots, verify every byte, restore an identical tree,
    back up a changed tree, forget and prune the old snapshot, check, restore
    the new state, add a second key that then opens the repository, list both
    keys, and unlock. Over HTTPS every request goes over HTTP/2; over plain
    HTTP over HTTP/1.1.
    """
    restic, daemon = served.restic, served.daemon
    source = tmp_path / "source"
    make_tree(source)

    restic("init")
    restic("backup", str(source))
    snapshots = restic.json("snapshots")
    assert len(snapshots) == 1
    assert snapshots[0]["paths"] == [str(source)]
    restic("check", "--read-data")

    first_restore = tmp_path / "restore-1"
    restic("restore", "latest", "--target", str(first_restore))
    assert_same_tree(source, first_restore / source.relative_to("/"))

    modify_tree(source)
    restic("backup", str(source))
    assert len(restic.json("snapshots")) == 2
    restic("forget", "--keep-last", "1", "--prune")
    remaining = restic.json("snapshots")
    assert len(remaining) == 1
    assert remaining[0]["id"] != snapshots[0]["id"]
    restic("check", "--read-data")

    second_restore = tmp_path / "restore-2"
    restic("restore", "latest", "--target", str(second_restore))
    assert_same_tree(source, second_restore / source.relative_to("/"))

    new_password = tmp_path / "new-password"
    new_password.write_text("another password\n")
    restic("key", "add", "--new-password-file", str(new_password))
    keys = restic.json("key", "list")
    assert len(keys) == 2
    assert len(restic.json("snapshots", password="another password")) == 1
    restic("unlock")

    # Nothing left half-uploaded, no lock left behind.
    assert daemon.wait_spool_empty() == []
    assert os.listdir(daemon.data / "repo" / "locks") == []

    lines = access_log(daemon)
    assert any(m["method"] == "POST" and "/repo/data/" in m["uri"] for m in lines), daemon.log()
    protocols = {m["proto"] for m in lines}
    if served.transport == "https-h2-auth":
        assert protocols == {"HTTP/2"}, f"not all requests used HTTP/2: {protocols}"
        assert all(m["code"] != "401" for m in lines), "restic's credentials were refused"
    else:
        assert protocols == {"HTTP/1.1"}, protocols


def test_restic_reads_served_repository_from_disk(served: Served, tmp_path: Path) -> None:
    """
    A repository written through the daemon is in restic's local layout: restic
    opens the data directory's repository directly and sees the same
    snapshot, with every byte intact.
    """
    source = tmp_path / "source"
    source.mkdir()
    (source / "a.txt").write_text("a\n")
    (source / "b.bin").write_bytes(random.Random(1).randbytes(2 * MIB))
    served.restic("init")
    served.restic("backup", str(source))
    over_http = served.restic.json("snapshots")
    assert len(over_http) == 1

    repo_dir = served.daemon.data / "repo"
    assert (repo_dir / "config").is_file()
    local = Restic(served.restic.binary, str(repo_dir), served.restic.home)
    on_disk = local.json("snapshots")
    assert [s["id"] for s in on_disk] == [s["id"] for s in over_http]
    local("check", "--read-data")
    restored = tmp_path / "restored"
    local("restore", "latest", "--target", str(restored))
    assert_same_tree(source, restored / source.relative_to("/"))
