"""
Running the real daemon (C{twistd resticd}) as a subprocess, for tests that
talk to it over real sockets on 127.0.0.1 / ::1.

L{running} starts one daemon over a fresh data directory, waits (bounded)
until it logs the addresses it serves, hands back a L{Daemon} and, on exit,
stops that process by its own pid: SIGTERM, a bounded wait, then SIGKILL. A
daemon that died before it was told to stop, or that logged a traceback, fails
the test with its log. A test may instead kill it itself (L{Daemon.kill}, a
crash), and may run several daemons one after another over the same data
directory (C{running(..., data=...)}).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt

from resticd.certs import write_self_signed

#: The daemon's line once it listens: "resticd serving DIR on URL".
SERVING = re.compile(r"resticd serving (?P<path>.+) on (?P<url>(?:https?://\S+|unix:\S+))\s*$", re.M)
#: Seconds the daemon has to start listening.
START_TIMEOUT = 20.0
#: Seconds it has to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
#: What must never appear in the log of a daemon that behaves.
TRACEBACK_MARKERS = ("Traceback (most recent call last)", "Unhandled Error")


def twistd() -> str:
    """
    The C{twistd} script of the Python running the tests.
    """
    path = Path(sys.executable).parent / "twistd"
    assert path.exists(), f"no twistd next to {sys.executable}"
    return str(path)


def sha256_hex(body: bytes) -> str:
    """
    The name restic gives an object: the sha256 of its bytes, in hex.
    """
    return hashlib.sha256(body).hexdigest()


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    """
    An htpasswd file of bcrypt entries for C{users} (name -> password), at
    the lowest bcrypt cost so that tests stay fast.
    """
    lines = [f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}\n" for user, pw in users.items()]
    path.write_text("".join(lines))
    return path


@dataclass
class Daemon:
    """
    A started daemon: its process, the URLs it serves, its data directory,
    its certificate (when TLS is on) and its log file.
    """

    process: subprocess.Popen[bytes]
    urls: list[str]
    data: Path
    log_path: Path
    cert: Path | None = None
    args: list[str] = field(default_factory=list)
    #: Whether the test killed it on purpose (L{kill}).
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self, timeout: float = STOP_TIMEOUT) -> None:
        """
        Crash the daemon: SIGKILL by its own pid, and wait (bounded) until it
        is gone. Its death is then not a test failure.
        """
        self.killed = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout)

    @property
    def url(self) -> str:
        """
        The first URL it serves.
        """
        return self.urls[0]

    @property
    def host(self) -> str:
        host = self.url.split("://", 1)[1].rsplit(":", 1)[0]
        return host.strip("[]")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].rstrip("/"))

    @property
    def spool(self) -> Path:
        """
        The directory of uploads in flight.
        """
        return self.data / ".spool"

    def log(self) -> str:
        """
        Everything the daemon logged so far.
        """
        return self.log_path.read_text(errors="replace")

    def spool_files(self) -> list[str]:
        return sorted(os.listdir(self.spool))

    def wait_spool_empty(self, timeout: float = 5.0) -> list[str]:
        """
        Poll (bounded) until the spool directory is empty; what is left in it.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = self.spool_files()
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)


def _wait_serving(process: subprocess.Popen[bytes], log_path: Path, listeners: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_text(errors="replace")
        urls = [m.group("url") for m in SERVING.finditer(text)]
        if len(urls) >= listeners:
            return urls
        if process.poll() is not None:
            raise AssertionError(f"the daemon exited with {process.returncode} before serving; its log:\n{text}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the daemon did not log 'resticd serving' within {timeout} s; its log:\n{text}")
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int | None:
    """
    Stop C{process} by its own pid: SIGTERM, wait up to C{timeout} seconds,
    then SIGKILL. Its exit status, or L{None} when it had to be killed.
    """
    if process.poll() is not None:
        return process.returncode
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)
        return None


@contextmanager
def running(
    tmp: Path,
    *args: str,
    tls: bool = True,
    auth: dict[str, str] | None = None,
    listen: tuple[str, ...] = ("tcp:0:interface=127.0.0.1",),
    check_log: bool = True,
    start_timeout: float = START_TIMEOUT,
    data: Path | None = None,
    env: dict[str, str] | None = None,
    twistd_options: tuple[str, ...] = (),
) -> Iterator[Daemon]:
    """
    Run C{twistd resticd} over a fresh data directory below C{tmp} until the
    block ends.

    @param args: extra command-line options (C{--no-http2}, C{--debug}, ...).
    @param tls: serve HTTPS with a new self-signed certificate for
        localhost, 127.0.0.1 and ::1.
    @param auth: users (name -> password) of an htpasswd file, or L{None} for
        C{--no-auth}.
    @param listen: C{--listen} endpoints; must bind 127.0.0.1 or ::1 only.
    @param check_log: fail when the daemon logged a traceback.
    @param data: the data directory to serve, kept as it is (e.g. the one of
        an earlier daemon, to restart over it); a fresh one when L{None}.
    @param env: environment variables to set for the daemon, besides the
        test's own.
    @param twistd_options: options of twistd itself (before C{resticd}).
    """
    for description in listen:
        assert "interface=127.0.0.1" in description or "interface=\\:\\:1" in description, description
    tmp.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="resticd-", dir=tmp))
    if data is None:
        data = base / "data"
    log_path = base / "daemon.log"
    argv = [twistd(), "--nodaemon", "--pidfile=", "--logfile=-", *twistd_options, "resticd", "--path", str(data)]
    cert: Path | None = None
    if tls:
        cert_file, key_file = write_self_signed(str(base / "tls"))
        cert = Path(cert_file)
        argv += ["--tls-cert", cert_file, "--tls-key", key_file]
    if auth is None:
        argv.append("--no-auth")
    else:
        argv += ["--htpasswd-file", str(write_htpasswd(base / "htpasswd", auth))]
    for description in listen:
        argv += ["--listen", description]
    argv += list(args)
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, cwd=base, env=environment
        )
    try:
        urls = _wait_serving(process, log_path, len(listen), start_timeout)
        daemon = Daemon(process, urls, data, log_path, cert, argv)
        yield daemon
    except BaseException:
        stop(process)
        # The test failed already: show the log with its failure.
        print(f"--- daemon log ({' '.join(argv)}) ---\n{log_path.read_text(errors='replace')}")
        raise
    died = process.poll()
    status = stop(process)
    text = log_path.read_text(errors="replace")
    if died is not None and not daemon.killed:
        raise AssertionError(f"the daemon died during the test (exit status {died}); its log:\n{text}")
    if status is None:
        raise AssertionError(f"the daemon ignored SIGTERM for {STOP_TIMEOUT} s and was killed; its log:\n{text}")
    if check_log:
        for marker in TRACEBACK_MARKERS:
            assert marker not in text, f"the daemon logged {marker!r}; its log:\n{text}"
