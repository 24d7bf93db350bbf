"""
A full disk: the real daemon with its data directory on a small filesystem.

Every test runs twice:

- C{tmpfs}: the data directory is a real 32 MiB tmpfs (C{mount -t tmpfs -o
  size=32m}), unmounted when the test ends. Mounting needs root (or
  CAP_SYS_ADMIN); where it is refused this variant is skipped with the
  reason, except in CI (C{CI=true}), which runs as root: there a refused
  mount fails the test.
- C{injected}: a loop-free fault injection that runs anywhere. The daemon
  gets a C{sitecustomize} module (through C{PYTHONPATH}) that gives
  C{resticd.spool} and C{resticd.health} a 32 MiB "disk": a write that would
  take the files below the disk's directory past 32 MiB writes what fits
  and then fails with ENOSPC, as a real filesystem does, and C{statvfs}
  reports that disk's size and free space. Everything else (HTTP, spool,
  publishing, listings, reads) is the real daemon on a real filesystem.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .daemon import Daemon, running
from .test_crash import Findings, Verifier
from .test_restic import Restic, restic_bin
from .test_restic_access import fails, small_tree, snapshot_ids
from .tools import mounted

__all__ = ["restic_bin"]

KIB = 1 << 10
MIB = 1 << 20
#: The size of the small filesystem.
CAPACITY = 32 * MIB
#: Seconds any one request may take.
TIMEOUT = 30.0
V2 = "application/vnd.x.restic.rest.v2"

#: The fault injection of the C{injected} variant (see the module docstring).
SITECUSTOMIZE = textwrap.dedent(
    '''
    """
    Written by tests/test_disk_full.py: the daemon's data directory is on a
    "disk" of RESTICD_FAKE_DISK_BYTES bytes: every file below
    RESTICD_FAKE_DISK_ROOT counts against it.
    """
    import errno
    import os

    _ROOT = os.environ["RESTICD_FAKE_DISK_ROOT"]
    _CAPACITY = int(os.environ["RESTICD_FAKE_DISK_BYTES"])
    _BLOCK = 4096


    def _used():
        total = 0
        for directory, _, files in os.walk(_ROOT):
            for name in files:
                try:
                    total += os.lstat(os.path.join(directory, name)).st_size
                except OSError:
                    pass
        return total


    class _Disk:
        def __getattr__(self, name):
            return getattr(os, name)

        def write(self, fd, data):
            free = _CAPACITY - _used()
            if free <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return os.write(fd, memoryview(data)[:free])

        def statvfs(self, path):
            real = os.statvfs(path)
            free = max(0, _CAPACITY - _used()) // _BLOCK
            return os.statvfs_result(
                (_BLOCK, _BLOCK, _CAPACITY // _BLOCK, free, free,
                 real.f_files, real.f_ffree, real.f_favail, real.f_flag, real.f_namemax)
            )


    import resticd.health
    import resticd.spool

    resticd.spool.os = _Disk()
    resticd.health.os = _Disk()
    '''
)


@dataclass
class SmallDisk:
    """
    A directory on a filesystem of L{CAPACITY} bytes: the daemon's data
    directory is C{root / "data"}; C{env} is what the daemon needs to see
    it so (empty for a real tmpfs).
    """

    variant: str
    root: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.root / "data"


@pytest.fixture(params=["tmpfs", "injected"])
def small_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SmallDisk]:
    """
    A 32 MiB filesystem: a real tmpfs (unmounted at the end), or the
    injected fake one.
    """
    root = tmp_path / "small"
    root.mkdir()
    if request.param == "injected":
        hook = tmp_path / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
        path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
        yield SmallDisk(
            "injected",
            root,
            {"PYTHONPATH": path, "RESTICD_FAKE_DISK_ROOT": str(root), "RESTICD_FAKE_DISK_BYTES": str(CAPACITY)},
        )
        return
    with mounted("tmpfs", root, f"size={CAPACITY // MIB}m,mode=0700"):
        yield SmallDisk("tmpfs", root)


# -- HTTP -------------------------------------------------------------------------


def call(
    daemon: Daemon, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """
    One request on a connection of its own: status, headers (lower-case
    names), body.
    """
    conn = http.client.HTTPConnection(daemon.host, daemon.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def upload(daemon: Daemon, body: bytes, repo: str = "r") -> int:
    return call(daemon, "POST", f"/{repo}/data/{hashlib.sha256(body).hexdigest()}", body)[0]


def ready(daemon: Daemon) -> tuple[int, dict[str, object]]:
    status, _, body = call(daemon, "GET", "/-/ready")
    return status, json.loads(body)


def assert_clean(daemon: Daemon, expected: dict[str, bytes], repo: str = "r") -> None:
    """
    No upload left in the spool; every file under a final name hashes to
    it, nothing else is in the repository; the data objects on disk, and in
    the v2 listing, are exactly C{expected} (name -> body).
    """
    assert daemon.wait_spool_empty() == []
    findings = Findings()
    found = Verifier(daemon.data, (repo,)).on_disk(findings)
    assert not findings.problems(), findings.problems()
    on_disk = found.get(repo, {}).get("data", {})
    assert on_disk == {name: len(body) for name, body in expected.items()}
    status, headers, listing = call(daemon, "GET", f"/{repo}/data/", headers={"Accept": V2})
    assert status == 200
    assert {e["name"]: e["size"] for e in json.loads(listing)} == on_disk


def assert_reads(daemon: Daemon, stored: dict[str, bytes], repo: str = "r") -> None:
    """
    Stored objects read back: HEAD sizes, whole ranged GETs, and pieces.
    """
    for name, body in sorted(stored.items())[:4]:
        path = f"/{repo}/data/{name}"
        status, headers, _ = call(daemon, "HEAD", path)
        assert (status, headers.get("content-length")) == (200, str(len(body)))
        status, headers, whole = call(daemon, "GET", path, headers={"Range": "bytes=0-"})
        assert status == 206 and whole == body
        status, headers, piece = call(daemon, "GET", path, headers={"Range": "bytes=100-1099"})
        assert status == 206
        assert piece == body[100:1100]
        assert headers.get("content-range") == f"bytes 100-1099/{len(body)}"


def test_full_disk_refuses_with_507_and_recovers(small_disk: SmallDisk, tmp_path: Path) -> None:
    """
    On a 32 MiB data filesystem filled by uploads of shrinking sizes: each
    upload that does not fit is answered 507 (never 500), leaves nothing
    under its final name and nothing in the spool; what was stored stays
    intact and readable (HEAD, whole and partial ranged GETs) and listed;
    /-/ready answers 503 naming the free space while it is below
    --min-free-space 10%. After deleting objects through the server,
    /-/ready is 200 again and uploads that were refused succeed (200).
    """
    rng = random.Random(32)
    with running(
        tmp_path / "daemons", "--min-free-space", "10%", tls=False, auth=None, data=small_disk.data, env=small_disk.env
    ) as daemon:
        assert call(daemon, "POST", "/r/?create=true")[0] == 200
        assert call(daemon, "POST", "/r/config", b"config\n")[0] == 200
        assert ready(daemon)[0] == 200

        stored: dict[str, bytes] = {}
        refused: dict[int, bytes] = {}
        for size in (4 * MIB, 1 * MIB, 256 * KIB, 64 * KIB, 16 * KIB, 4 * KIB):
            for _ in range(CAPACITY // size + 2):
                body = rng.randbytes(size)
                status = upload(daemon, body)
                if status == 507:
                    refused[size] = body
                    break
                assert status == 200, f"upload of {size} bytes: {status}"
                stored[hashlib.sha256(body).hexdigest()] = body
            assert size in refused, f"uploads of {size} bytes never filled the disk"
            assert_clean(daemon, stored)
        big = [name for name, body in stored.items() if len(body) == 4 * MIB]
        assert len(big) >= 5, f"only {len(big)} objects of 4 MiB fit on {CAPACITY} bytes"

        status, reasons = ready(daemon)
        assert status == 503, reasons
        assert any("free" in str(reason) for reason in reasons["reasons"]), reasons  # type: ignore[attr-defined]
        assert call(daemon, "GET", "/-/healthy")[0] == 200

        assert_reads(daemon, stored)
        assert call(daemon, "GET", "/r/config")[2] == b"config\n"
        too_big = rng.randbytes(8 * MIB)
        assert upload(daemon, too_big) == 507
        assert_clean(daemon, stored)

        for name in big[:5]:
            assert call(daemon, "DELETE", f"/r/data/{name}")[0] == 200
            del stored[name]
        assert_clean(daemon, stored)
        assert ready(daemon)[0] == 200

        for body in (refused[4 * MIB], too_big):
            assert upload(daemon, body) == 200
            stored[hashlib.sha256(body).hexdigest()] = body
        assert_clean(daemon, stored)
        assert_reads(daemon, stored)
        assert ready(daemon)[0] == 200


@pytest.mark.restic
def test_restic_backup_too_big_for_the_disk(small_disk: SmallDisk, tmp_path: Path, restic_bin: str) -> None:
    """
    A restic backup of 48 MiB into a repository on a 32 MiB filesystem
    fails with restic reporting 507 (Insufficient Storage); nothing partial
    or left in the spool remains; once some space is freed (a ballast file
    next to the data directory is removed), `restic unlock` and `restic
    check --read-data` pass, the earlier snapshot is still the only one, and
    a small new backup succeeds.
    """
    ballast = small_disk.root / "ballast"
    ballast.write_bytes(b"\0" * (4 * MIB))
    source = small_tree(tmp_path / "source", 1)
    big = tmp_path / "big"
    big.mkdir()
    rng = random.Random(48)
    for i in range(6):
        (big / f"random{i}.bin").write_bytes(rng.randbytes(8 * MIB))
    home = tmp_path / "home"
    home.mkdir()
    with running(tmp_path / "daemons", tls=False, auth=None, data=small_disk.data, env=small_disk.env) as daemon:
        restic = Restic(restic_bin, f"rest:http://{daemon.host}:{daemon.port}/repo", home)
        restic("init")
        restic("backup", str(source))
        before = snapshot_ids(restic)
        assert len(before) == 1

        failed = fails(restic, "backup", str(big), status=507)
        assert re.search(r"507|[Ii]nsufficient [Ss]torage", failed.stderr), failed.stderr
        assert daemon.wait_spool_empty() == []
        findings = Findings()
        Verifier(daemon.data, ("repo",)).on_disk(findings)
        assert not findings.problems(), findings.problems()

        ballast.unlink()
        restic("unlock")
        restic("check", "--read-data")
        assert snapshot_ids(restic) == before
        (source / "new.txt").write_text("after the disk was full\n")
        restic("backup", str(source))
        assert len(snapshot_ids(restic)) == 2
        assert daemon.wait_spool_empty() == []
