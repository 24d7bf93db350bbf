"""
Access control as the real restic client meets it: --append-only, an access
file like the shipped example (append-only users and a maintenance user who
prunes), --private-repos, and --max-size.

restic before 0.17 retries every failed request about ten times with growing
pauses (close to a minute) before it gives up, even when the server refused
for good (403, 507). To keep this file fast, a restic command that is expected
to fail is interrupted (SIGINT, by its pid) as soon as it reports that the
server refused it with the expected status: what the test pins is that
refusal, which restic would only repeat. Newer clients treat those statuses
as final and exit on their own. Set RESTICD_TESTS_WAIT_FOR_RESTIC=1 to let
every such command run to its own exit instead.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from .daemon import Daemon, running
from .test_restic import COMMAND_TIMEOUT, Restic, restic_bin

pytestmark = pytest.mark.restic

__all__ = ["restic_bin"]

MIB = 1 << 20
#: Whether commands expected to fail run to their own exit (see above).
WAIT_FOR_RESTIC = os.environ.get("RESTICD_TESTS_WAIT_FOR_RESTIC") == "1"
#: The shipped, annotated access file.
SHIPPED_ACCESS_FILE = Path(__file__).resolve().parent.parent / "etc" / "access.toml"
#: restic's line when it is about to retry a failed request (before 0.17).
RETRYING = re.compile(r"returned error, retrying after .*")


@dataclass
class Failed:
    """
    A restic command that failed: its exit status, its output, and whether it
    was interrupted after reporting the expected refusal.
    """

    returncode: int
    stdout: str
    stderr: str
    interrupted: bool


def fails(restic: Restic, *args: str, status: int) -> Failed:
    """
    Run a restic command that must fail because the server answers
    C{status}: it exits non-zero and names C{status} in its errors. When it
    reports a retry of a request refused with C{status}, it is interrupted
    (SIGINT to its pid, then SIGKILL if it lingers) unless
    L{WAIT_FOR_RESTIC}.
    """
    argv = [restic.binary, "-r", restic.repo]
    if restic.cacert is not None:
        argv += ["--cacert", str(restic.cacert)]
    argv += list(args)
    process = subprocess.Popen(
        argv, env=restic.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda: out.extend(process.stdout or ()), daemon=True),
        threading.Thread(target=lambda: err.extend(process.stderr or ()), daemon=True),
    ]
    for reader in readers:
        reader.start()
    refused = re.compile(rf"\b{status}\b")
    interrupted = False
    deadline = time.monotonic() + COMMAND_TIMEOUT
    try:
        while process.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"restic {' '.join(args)} ran for more than {COMMAND_TIMEOUT} s:\n{''.join(err)}")
            retries = [line for line in list(err) if RETRYING.search(line)]
            if not WAIT_FOR_RESTIC and not interrupted and any(refused.search(line) for line in retries):
                process.send_signal(signal.SIGINT)
                interrupted = True
                deadline = min(deadline, time.monotonic() + 20)
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        for reader in readers:
            reader.join(10)
    stdout, stderr = "".join(out), "".join(err)
    assert process.returncode != 0, f"restic {' '.join(args)} succeeded:\n{stdout}\n{stderr}"
    assert refused.search(stderr), f"restic {' '.join(args)} did not fail with {status}:\n{stderr}"
    if interrupted:
        # Every retry was of a refusal with the expected status.
        retries = [line for line in stderr.splitlines() if RETRYING.search(line)]
        assert all(refused.search(line) for line in retries), stderr
    return Failed(process.returncode, stdout, stderr, interrupted)


def small_tree(root: Path, seed: int) -> Path:
    """
    A few small files whose contents depend on C{seed}.
    """
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.txt").write_text(f"notes {seed}\n")
    (root / "blob.bin").write_bytes(rng.randbytes(50_000))
    (root / "sub").mkdir(exist_ok=True)
    (root / "sub" / "more.txt").write_text(f"more {seed}\n" * 100)
    return root


def url(daemon: Daemon, repo: str, user: str | None = None, password: str | None = None) -> str:
    credentials = f"{user}:{quote(password or '', safe='')}@" if user is not None else ""
    return f"rest:https://{credentials}{daemon.host}:{daemon.port}/{repo}"


def snapshot_ids(restic: Restic) -> list[str]:
    return sorted(s["id"] for s in restic.json("snapshots"))


def stored_files(directory: Path) -> dict[str, int]:
    """
    Every file below C{directory} (relative path -> size).
    """
    return {
        str(path.relative_to(directory)): path.stat().st_size for path in directory.rglob("*") if path.is_file()
    }


# -- --append-only ---------------------------------------------------------------


def test_append_only_refuses_prune(tmp_path: Path, restic_bin: str) -> None:
    """
    With --append-only, an authenticated user inits a repository, backs up
    twice and unlocks; but `forget --keep-last 1 --prune` fails (403 on the
    delete of a snapshot) and changes nothing: both snapshots are still
    listed, every stored file is still there, and `check --read-data` passes.
    """
    home = tmp_path / "home"
    home.mkdir()
    source = small_tree(tmp_path / "source", 1)
    with running(tmp_path, "--append-only", auth={"alice": "alice pw"}) as daemon:
        restic = Restic(restic_bin, url(daemon, "alice", "alice", "alice pw"), home, cacert=daemon.cert)
        restic("init")
        restic("backup", str(source))
        small_tree(source, 2)
        restic("backup", str(source))
        restic("unlock")
        before = snapshot_ids(restic)
        assert len(before) == 2
        repo_dir = daemon.data / "alice"
        stored = {k: v for k, v in stored_files(repo_dir).items() if not k.startswith("locks/")}

        fails(restic, "forget", "--keep-last", "1", "--prune", status=403)

        assert snapshot_ids(restic) == before
        after = {k: v for k, v in stored_files(repo_dir).items() if not k.startswith("locks/")}
        assert after == stored
        restic("unlock")
        restic("check", "--read-data")
        assert daemon.wait_spool_empty() == []


# -- an access file ------------------------------------------------------------


def test_shipped_access_file(tmp_path: Path, restic_bin: str) -> None:
    """
    With the shipped etc/access.toml ([default] "{user}" = read, append;
    [users.maintenance] "*" = read, write): user laptop creates /laptop/ and
    backs up twice, but its `forget --prune` is refused (403) and changes
    nothing; the maintenance user's `forget --keep-last 1 --prune` on
    /laptop/ succeeds, after which `check --read-data` passes and laptop still
    reads its one remaining snapshot; laptop cannot open /other/ (403).
    """
    home = tmp_path / "home"
    home.mkdir()
    source = small_tree(tmp_path / "source", 3)
    users = {"laptop": "laptop pw", "maintenance": "maint pw"}
    with running(tmp_path, "--access-file", str(SHIPPED_ACCESS_FILE), auth=users) as daemon:
        laptop = Restic(restic_bin, url(daemon, "laptop", "laptop", "laptop pw"), home, cacert=daemon.cert)
        maintenance = Restic(restic_bin, url(daemon, "laptop", "maintenance", "maint pw"), home, cacert=daemon.cert)
        laptop("init")
        laptop("backup", str(source))
        small_tree(source, 4)
        laptop("backup", str(source))
        before = snapshot_ids(laptop)
        assert len(before) == 2

        fails(laptop, "forget", "--keep-last", "1", "--prune", status=403)
        assert snapshot_ids(laptop) == before

        maintenance("forget", "--keep-last", "1", "--prune")
        remaining = snapshot_ids(maintenance)
        assert len(remaining) == 1 and remaining[0] in before
        laptop("check", "--read-data")
        assert snapshot_ids(laptop) == remaining

        other_by_maintenance = Restic(restic_bin, url(daemon, "other", "maintenance", "maint pw"), home, cacert=daemon.cert)
        other_by_maintenance("init")
        other_by_laptop = Restic(restic_bin, url(daemon, "other", "laptop", "laptop pw"), home, cacert=daemon.cert)
        fails(other_by_laptop, "snapshots", status=403)
        fails(other_by_laptop, "backup", str(source), status=403)
        assert os.listdir(daemon.data / "other" / "snapshots") == []
        assert daemon.wait_spool_empty() == []


# -- --private-repos -------------------------------------------------------------


def test_private_repos(tmp_path: Path, restic_bin: str) -> None:
    """
    With --private-repos, user alice inits and backs up /alice/ (and checks
    it), but restic fails for /bob/: init is refused (403) and nothing is
    created for bob.
    """
    home = tmp_path / "home"
    home.mkdir()
    source = small_tree(tmp_path / "source", 5)
    with running(tmp_path, "--private-repos", auth={"alice": "alice pw", "bob": "bob pw"}) as daemon:
        alice = Restic(restic_bin, url(daemon, "alice", "alice", "alice pw"), home, cacert=daemon.cert)
        alice("init")
        alice("backup", str(source))
        assert len(snapshot_ids(alice)) == 1
        alice("check")
        into_bob = Restic(restic_bin, url(daemon, "bob", "alice", "alice pw"), home, cacert=daemon.cert)
        fails(into_bob, "init", status=403)
        fails(into_bob, "snapshots", status=403)
        assert not (daemon.data / "bob").exists()


# -- --max-size ------------------------------------------------------------------


def test_max_size_refuses_with_507(tmp_path: Path, restic_bin: str) -> None:
    """
    With --max-size 2M, a backup of ~6 MiB of random data fails with 507
    (Insufficient Storage) as restic reports it; the data directory never
    holds more than the limit, no upload is left in the spool, and the server
    keeps serving: the repository still lists its earlier snapshot and passes
    `check --read-data`.
    """
    home = tmp_path / "home"
    home.mkdir()
    source = small_tree(tmp_path / "source", 6)
    big = tmp_path / "big"
    big.mkdir()
    (big / "random.bin").write_bytes(random.Random(6).randbytes(6 * MIB))
    with running(tmp_path, "--max-size", "2M", auth=None) as daemon:
        restic = Restic(restic_bin, url(daemon, "first"), home, cacert=daemon.cert)
        restic("init")
        restic("backup", str(source))
        before = snapshot_ids(restic)
        assert len(before) == 1

        failed = fails(restic, "backup", str(big), status=507)
        assert re.search(r"507|[Ii]nsufficient [Ss]torage", failed.stderr), failed.stderr

        assert daemon.wait_spool_empty() == []
        stored = sum(stored_files(daemon.data).values())
        assert stored <= 2 * MIB, stored
        restic("unlock")
        assert snapshot_ids(restic) == before
        restic("check", "--read-data")
