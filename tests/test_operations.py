"""
Running the daemon as a service: SIGHUP (a new TLS certificate during a
backup, a broken one, the access log reopened), certificate files that
change by themselves, SIGTERM while uploads are in flight and
C{--shutdown-timeout}, systemd's readiness notification, socket activation,
a unix socket listener, and the fail2ban filter shipped in C{etc/}.

Every daemon here is a real C{twistd resticd} process started by the test
and stopped by its own pid, and every wait is bounded.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, StreamEnded
from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent

from resticd.certs import self_signed
from resticd.config import Config
from resticd.service import TLS_CHECK_INTERVAL, Periodic, ResticdService
from resticd.systemd import notify
from resticd.threads import run_inline
from resticd.tls import ReloadingTLS

from .daemon import SERVING, START_TIMEOUT, TRACEBACK_MARKERS, sha256_hex, stop, twistd, write_htpasswd
from .test_restic import ACCESS_LINE, Restic
from .test_tap import assert_one_error, run_twistd
from .tools import required_program

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
#: Seconds any one socket operation or wait may take.
TIMEOUT = 15.0
#: Seconds a daemon has to exit after SIGTERM when nothing is in flight.
EXIT_TIMEOUT = 10.0
LOOPBACK = "tcp:0:interface=127.0.0.1"
#: What the daemon logs when it refuses a new certificate.
REFUSED_CERT = "not using the new TLS certificate"
#: What it logs when it loaded one.
LOADED_CERT = "loaded TLS certificate"


# -- helpers: tools, certificates, ports ----------------------------------------


@dataclass
class Pair:
    """
    A self-signed certificate (for localhost, 127.0.0.1, ::1) and its key,
    as PEM, and the certificate's DER encoding.
    """

    cert: bytes
    key: bytes

    @property
    def der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.cert).public_bytes(Encoding.DER)

    def write(self, cert_path: Path, key_path: Path) -> None:
        """
        Overwrite the two files in place (as C{cp} would).
        """
        cert_path.write_bytes(self.cert)
        key_path.write_bytes(self.key)


@pytest.fixture
def restic_bin() -> str:
    """
    The restic executable (a failure in CI when it is missing, a skip
    elsewhere).
    """
    return required_program("restic")


def new_pair() -> Pair:
    """
    A new pair. Each has a subject name of its own, so that a trust bundle
    of several is unambiguous to OpenSSL.
    """
    return Pair(*self_signed(common_name=f"resticd test {random.getrandbits(64):016x}"))


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_certificate(port: int, cafile: Path) -> bytes:
    """
    The DER certificate a new TLS connection to 127.0.0.1:C{port} is shown
    (verified against C{cafile}); the connection also answers
    C{GET /-/healthy} with 200.
    """
    ctx = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            der = conn.getpeercert(binary_form=True)
            conn.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: resticd\r\nConnection: close\r\n\r\n")
            response = http.client.HTTPResponse(conn)
            response.begin()
            assert response.status == 200
            response.read()
    assert der is not None
    return der


def established_peers(port: int) -> set[str]:
    """
    The remote ends (address:port, as the kernel writes them) of the
    established TCP connections whose local port is C{port} (Linux).
    """
    peers = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                peers.add(remote)
    return peers


def wait_for(condition, timeout: float, what: str, interval: float = 0.02):
    """
    Poll C{condition} until it returns something true (which is returned),
    at most C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# -- helpers: a daemon process that the test may stop itself ---------------------


@dataclass
class Proc:
    """
    A C{twistd resticd} process: its data directory, log, TLS files and
    (once it serves) the URLs it serves.
    """

    process: subprocess.Popen[bytes]
    base: Path
    data: Path
    log_path: Path
    cert_path: Path | None = None
    key_path: Path | None = None
    urls: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        return int(self.urls[0].rsplit(":", 1)[1].rstrip("/"))

    @property
    def spool(self) -> Path:
        return self.data / ".spool"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = TIMEOUT, count: int = 1) -> None:
        """
        Wait until C{text} appears C{count} times in the log; fails when the
        process exits first.
        """

        def seen() -> bool:
            if self.log().count(text) >= count:
                return True
            assert self.process.poll() is None, f"the daemon exited while waiting for {text!r}:\n{self.log()}"
            return False

        wait_for(seen, timeout, repr(text))

    def wait_serving(self, listeners: int = 1, timeout: float = START_TIMEOUT) -> None:
        def serving() -> list[str]:
            urls = [m.group("url") for m in SERVING.finditer(self.log())]
            if len(urls) < listeners:
                assert self.process.poll() is None, f"the daemon exited before serving:\n{self.log()}"
                return []
            return urls

        self.urls = wait_for(serving, timeout, "the daemon to serve")

    def terminate(self) -> float:
        """
        Send SIGTERM; when it was sent.
        """
        self.process.send_signal(signal.SIGTERM)
        return time.monotonic()

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        """
        The exit status, waiting at most C{timeout} seconds (then the test
        fails, and the process is killed when the test ends).
        """
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon did not exit within {timeout} s:\n{self.log()}") from None


@contextmanager
def launched(
    tmp: Path,
    *args: str,
    tls: Pair | None = None,
    listen: tuple[str, ...] = (LOOPBACK,),
    env: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
    wait: bool = True,
    check_log: bool = True,
) -> Iterator[Proc]:
    """
    Run C{twistd resticd --no-auth} (unless C{args} bring an htpasswd
    file) over a fresh data directory below C{tmp}. With C{tls}, that pair is
    written to the files given to C{--tls-cert} and C{--tls-key}. C{prefix}
    goes before the twistd command (a launcher such as
    C{systemd-socket-activate}); without C{wait} the test waits for the
    daemon itself. The process is stopped by its pid when the block ends, and
    its log must hold no traceback.
    """
    base = Path(tempfile.mkdtemp(prefix="op-", dir=tmp))
    data = base / "data"
    log_path = base / "daemon.log"
    argv = [*prefix, twistd(), "--nodaemon", "--pidfile=", "--logfile=-", "resticd", "--path", str(data)]
    cert_path = key_path = None
    if tls is not None:
        (base / "tls").mkdir()
        cert_path, key_path = base / "tls" / "cert.pem", base / "tls" / "key.pem"
        tls.write(cert_path, key_path)
        argv += ["--tls-cert", str(cert_path), "--tls-key", str(key_path)]
    if "--htpasswd-file" not in args:
        argv.append("--no-auth")
    for description in listen:
        argv += ["--listen", description]
    argv += list(args)
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    environment.pop("NOTIFY_SOCKET", None)
    environment.update(env or {})
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, cwd=base, env=environment
        )
    proc = Proc(process, base, data, log_path, cert_path, key_path)
    try:
        if wait:
            proc.wait_serving(len(listen))
        yield proc
    except BaseException:
        stop(process)
        print(f"--- daemon log ({' '.join(argv)}) ---\n{proc.log()}")
        raise
    status = stop(process)
    assert status is not None, f"the daemon ignored SIGTERM and was killed:\n{proc.log()}"
    if check_log:
        text = proc.log()
        for marker in TRACEBACK_MARKERS:
            assert marker not in text, f"the daemon logged {marker!r}:\n{text}"


# -- helpers: plain HTTP/1.1 requests -----------------------------------------------


def request(port: int, method: str, path: str, body: bytes = b"", **headers: str) -> tuple[int, bytes]:
    """
    One request on a new connection to 127.0.0.1:C{port}: status and body.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def stored_path(data: Path, repo: str, name: str) -> Path:
    """
    Where a data object is stored: restic's local layout.
    """
    return data / repo / "data" / name[:2] / name


def stored_objects(data: Path, repo: str) -> dict[str, bytes]:
    """
    Every file below the repository's C{data/} directory, by name.
    """
    return {p.name: p.read_bytes() for p in (data / repo / "data").glob("*/*") if p.is_file()}


class Upload:
    """
    A POST of one object on a connection of its own, its body sent in
    C{pieces} parts with C{pause} seconds between them; C{status} is the
    answer's status, or L{None} when the connection failed or was closed
    without an answer.
    """

    def __init__(self, port: int, repo: str, body: bytes, pieces: int = 1, pause: float = 0.0) -> None:
        self.port = port
        self.repo = repo
        self.body = body
        self.name = sha256_hex(body)
        self.pieces = pieces
        self.pause = pause
        self.status: int | None = None
        self.error: BaseException | None = None
        self.started: float | None = None
        self.ended: float | None = None
        self.sock: socket.socket | None = None

    def connect(self) -> None:
        """
        Connect and send the request head.
        """
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        self.started = time.monotonic()
        self.sock.sendall(
            f"POST /{self.repo}/data/{self.name} HTTP/1.1\r\nHost: resticd\r\n"
            f"Content-Length: {len(self.body)}\r\nConnection: close\r\n\r\n".encode()
        )

    def send(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(data)

    def answer(self) -> int | None:
        """
        Read the answer; its status, or L{None} when there is none.
        """
        assert self.sock is not None
        try:
            response = http.client.HTTPResponse(self.sock)
            response.begin()
            response.read()
            self.status = response.status
        except (OSError, http.client.HTTPException) as e:
            self.error = e
        finally:
            self.ended = time.monotonic()
            self.sock.close()
        return self.status

    def run(self) -> int | None:
        """
        The whole upload, paced; its status, or L{None}.
        """
        try:
            self.connect()
            step = max(1, -(-len(self.body) // self.pieces))
            for offset in range(0, len(self.body), step):
                self.send(self.body[offset : offset + step])
                if self.pause:
                    time.sleep(self.pause)
        except OSError as e:
            self.error = e
            self.ended = time.monotonic()
            if self.sock is not None:
                self.sock.close()
            return None
        return self.answer()


# -- SIGHUP and TLS certificates ---------------------------------------------------------


@pytest.mark.restic
@pytest.mark.network
def test_sighup_swaps_certificate_during_restic_backup(tmp_path, restic_bin):
    """
    A backup over TLS (HTTP/2) is not disturbed when the certificate is
    replaced and the daemon gets SIGHUP while it runs: the connection open
    before the signal stays open and carries on, restic reports no error or
    retry, the backup completes and C{restic check} passes. A new TLS
    connection is then shown the new certificate, and every request of the
    backup went over HTTP/2 without a server error.
    """
    first, second = new_pair(), new_pair()
    bundle = tmp_path / "trusted.pem"
    bundle.write_bytes(first.cert + second.cert)
    source = tmp_path / "source"
    source.mkdir()
    rng = random.Random(20261127)
    for i in range(4):
        (source / f"part{i}.bin").write_bytes(rng.randbytes(16 * MIB))
    home = tmp_path / "home"
    home.mkdir()

    with launched(tmp_path, "--log", str(tmp_path / "access.log"), tls=first) as daemon:
        assert daemon.cert_path is not None and daemon.key_path is not None
        restic = Restic(restic_bin, f"rest:https://127.0.0.1:{daemon.port}/repo", home, cacert=bundle)
        restic("init")
        assert server_certificate(daemon.port, bundle) == first.der
        packs = daemon.data / "repo" / "data"
        out, err = tmp_path / "backup.out", tmp_path / "backup.err"
        # 64 MiB in 4 MiB packs at 16 MiB/s: several seconds of uploads.
        argv = [restic_bin, "-r", restic.repo, "--cacert", str(bundle), "--pack-size", "4", "--limit-upload", "16384"]
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            backup = subprocess.Popen([*argv, "backup", str(source)], env=restic.env(), stdout=stdout, stderr=stderr)
        try:
            wait_for(lambda: any(packs.glob("*/*")) or backup.poll() is not None, 60, "the first pack")
            assert backup.poll() is None, "the backup ended before the certificate was replaced"
            before = established_peers(daemon.port)
            assert before, "restic holds no connection to the daemon"

            second.write(daemon.cert_path, daemon.key_path)
            daemon.process.send_signal(signal.SIGHUP)
            daemon.wait_log(LOADED_CERT)
            after = established_peers(daemon.port)
            running_at_reload = backup.poll() is None
            packs_at_reload = len(list(packs.glob("*/*")))
            assert running_at_reload, "the backup ended before the certificate was reloaded"
            assert before <= after, "a connection open before SIGHUP was closed"

            assert server_certificate(daemon.port, bundle) == second.der
            status = backup.wait(120)
        finally:
            if backup.poll() is None:
                backup.kill()
                backup.wait()
        errors = err.read_text(errors="replace")
        assert status == 0, f"restic backup exited {status}:\n{errors}"
        assert "retrying" not in errors and "error" not in errors.lower(), errors
        assert len(list(packs.glob("*/*"))) > packs_at_reload, "no pack was uploaded after the reload"
        restic("check")
        lines = [m for m in ACCESS_LINE.finditer((tmp_path / "access.log").read_text())]
        assert any(m["method"] == "POST" and "/repo/data/" in m["uri"] for m in lines)
        assert {m["proto"] for m in lines if m["uri"].startswith("/repo/")} == {"HTTP/2"}
        assert [m.group(0) for m in lines if m["code"].startswith("5")] == []
        assert daemon.log().count(REFUSED_CERT) == 0


@pytest.mark.network
def test_sighup_with_broken_certificate_keeps_the_old_one(tmp_path):
    """
    SIGHUP while the certificate file holds garbage, or a certificate that
    does not match the key: the daemon logs that it refuses the new
    certificate and goes on serving the old one to new connections. Once a
    usable pair is in place, the next SIGHUP brings it into use.
    """
    old, new = new_pair(), new_pair()
    bundle = tmp_path / "trusted.pem"
    bundle.write_bytes(old.cert + new.cert)
    # The daemon's own periodic check may notice a changed file as well as
    # SIGHUP does, so a refusal can be logged twice: wait for each by its reason.
    garbage, mismatch = "no PEM certificate found", "does not match"
    with launched(tmp_path, tls=old) as daemon:
        assert daemon.cert_path is not None and daemon.key_path is not None
        daemon.cert_path.write_bytes(b"this is not a certificate\n")
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_log(garbage)
        assert server_certificate(daemon.port, bundle) == old.der

        # The new certificate with the old key.
        daemon.cert_path.write_bytes(new.cert)
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_log(mismatch)
        assert server_certificate(daemon.port, bundle) == old.der
        assert LOADED_CERT not in daemon.log()

        new.write(daemon.cert_path, daemon.key_path)
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_log(LOADED_CERT)
        assert server_certificate(daemon.port, bundle) == new.der
        refusals = [line for line in daemon.log().splitlines() if REFUSED_CERT in line]
        assert any(garbage in line for line in refusals) and any(mismatch in line for line in refusals), refusals
        assert all("keeping the previous one" in line for line in refusals), refusals


@pytest.mark.network
def test_sighup_reopens_access_log(tmp_path):
    """
    After the C{--log} file is moved away (as logrotate does) and the daemon
    gets SIGHUP, requests are logged to a new file at the original path;
    the moved file keeps the lines from before and gets no new ones.
    """
    log_file = tmp_path / "access.log"
    rotated = tmp_path / "access.log.1"
    with launched(tmp_path, "--log", str(log_file)) as daemon:
        assert request(daemon.port, "GET", "/-/healthy?before")[0] == 200
        wait_for(lambda: "/-/healthy?before" in log_file.read_text(), TIMEOUT, "the first access log line")
        log_file.rename(rotated)
        daemon.process.send_signal(signal.SIGHUP)

        def reopened() -> bool:
            request(daemon.port, "GET", "/-/healthy?after")
            return log_file.exists() and "/-/healthy?after" in log_file.read_text()

        wait_for(reopened, TIMEOUT, "a new access log", interval=0.1)
        assert "?after" not in rotated.read_text()
        assert "?before" in rotated.read_text()
        assert "?before" not in log_file.read_text()


# -- certificates that change by themselves (unit level) -------------------------------


def handshake(creator) -> bytes:
    """
    A TLS handshake in memory, the stdlib client against a server connection
    made by C{creator}; the DER certificate the client was shown.
    """
    # What Twisted's ALPN callback looks at: the TLS protocol's factory.
    protocol = SimpleNamespace(factory=SimpleNamespace(wrappedFactory=None))
    server = creator.serverConnectionForTLS(protocol)
    server.set_accept_state()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    for _ in range(50):
        try:
            client.do_handshake()
            der = client.getpeercert(binary_form=True)
            assert der is not None
            return der
        except ssl.SSLWantReadError:
            pass
        if pending := outgoing.read():
            server.bio_write(pending)
        try:
            server.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            incoming.write(server.bio_read(1 << 20))
        except SSL.WantReadError:
            pass
    raise AssertionError("the handshake did not complete")


@pytest.fixture
def tls_files(tmp_path) -> tuple[Path, Path, Pair]:
    """
    A certificate and key file, and the pair they hold.
    """
    pair = new_pair()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    pair.write(cert, key)
    return cert, key, pair


def test_reload_without_changes_keeps_the_certificate(tls_files):
    """
    Checking certificate files that did not change reports no reload and
    keeps serving the same certificate.
    """
    cert, key, pair = tls_files
    tls = ReloadingTLS(str(cert), str(key))
    options = tls.options
    assert handshake(tls) == pair.der
    assert tls.reload() is False
    assert tls.reload() is False
    assert tls.options is options
    assert handshake(tls) == pair.der


@pytest.mark.parametrize("replace", ["in-place", "renamed"])
def test_reload_after_change_serves_the_new_certificate(tls_files, logged, replace):
    """
    When the certificate and key files change (rewritten in place as by
    C{cp}, or renamed over the old ones as ACME clients do), the next check
    reloads them, logs it, and new handshakes get the new certificate; a
    second check without further changes does nothing.
    """
    cert, key, old = tls_files
    tls = ReloadingTLS(str(cert), str(key))
    assert handshake(tls) == old.der
    new = new_pair()
    time.sleep(0.05)  # beyond the file system's timestamp granularity
    if replace == "in-place":
        new.write(cert, key)
    else:
        new.write(cert.with_suffix(".new"), key.with_suffix(".new"))
        os.replace(cert.with_suffix(".new"), cert)
        os.replace(key.with_suffix(".new"), key)
    assert tls.reload() is True
    assert handshake(tls) == new.der
    assert any(LOADED_CERT in text for text in logged.texts())
    assert tls.reload() is False


def _garbage(cert: Path, key: Path) -> None:
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")


def _empty(cert: Path, key: Path) -> None:
    cert.write_bytes(b"")


def _other_key(cert: Path, key: Path) -> None:
    key.write_bytes(new_pair().key)


def _missing_key(cert: Path, key: Path) -> None:
    key.unlink()


@pytest.mark.parametrize("breakage", [_garbage, _empty, _other_key, _missing_key], ids=lambda f: f.__name__[1:])
def test_reload_of_broken_files_keeps_the_old_certificate(tls_files, logged, breakage):
    """
    When the files change into something unusable (garbage, an empty file, a
    key of another certificate, a missing key), the check reports no reload,
    logs an error, and new handshakes still get the old certificate.
    """
    cert, key, old = tls_files
    tls = ReloadingTLS(str(cert), str(key))
    options = tls.options
    time.sleep(0.05)
    breakage(cert, key)
    assert tls.reload() is False
    assert tls.options is options
    assert handshake(tls) == old.der
    errors = [formatEvent(e) for e in logged.events if e.get("log_level") == LogLevel.error]
    assert any(REFUSED_CERT in text for text in errors), logged.texts()


def test_service_checks_certificate_files_every_minute(tmp_path, tls_files, monkeypatch):
    """
    With TLS, the daemon checks the certificate files every
    C{TLS_CHECK_INTERVAL} (60) seconds: files replaced after a check are in
    use after the next one, not before.
    """
    assert TLS_CHECK_INTERVAL == 60
    cert, key, old = tls_files
    reactor = MemoryReactorClock()
    config = Config(path=str(tmp_path / "data"), tls_cert=str(cert), tls_key=str(key), listen=(LOOPBACK,))
    service = ResticdService(config, reactor)
    service.prepare()
    assert service.tls is not None
    timers = [s for s in service if isinstance(s, Periodic) and s.interval == TLS_CHECK_INTERVAL]
    assert len(timers) == 1
    timer = timers[0]
    monkeypatch.setattr(service, "run", run_inline)  # the checks' file reads, on this thread
    timer.startService()
    try:
        assert handshake(service.tls) == old.der
        reactor.advance(1)
        new = new_pair()
        time.sleep(0.05)
        new.write(cert, key)
        reactor.advance(TLS_CHECK_INTERVAL - 2)
        assert handshake(service.tls) == old.der
        reactor.advance(1)
        assert handshake(service.tls) == new.der
    finally:
        timer.stopService()


# -- SIGTERM and --shutdown-timeout ------------------------------------------------------


@pytest.mark.network
def test_a_periodic_task_runs_at_once_then_every_interval_one_call_at_a_time() -> None:
    """
    A periodic task (the reload checks, the idle trim) runs when the daemon
    starts and then every interval of its reactor's clock; a call that
    returns a Deferred is waited for before the next, and stopping waits for
    the call under way.
    """
    clock = MemoryReactorClock()
    pending: list[Deferred[None]] = []

    def call() -> Deferred[None]:
        pending.append(Deferred())
        return pending[-1]

    task = Periodic(5.0, call, clock)
    task.startService()
    assert len(pending) == 1
    clock.advance(5)
    assert len(pending) == 1, "a second call while the first is under way"
    pending[0].callback(None)
    clock.advance(5)
    assert len(pending) == 2
    stopped = task.stopService()
    assert not stopped.called
    pending[1].callback(None)
    assert stopped.called
    clock.advance(60)
    assert len(pending) == 2


def test_a_failing_periodic_call_is_logged_and_the_next_one_still_comes(logged) -> None:
    """
    A periodic call that fails is logged once, under the task's name, and
    does not stop the next calls.
    """
    clock = MemoryReactorClock()
    calls: list[int] = []

    def call() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise OSError("the disk went away")

    task = Periodic(5.0, call, clock)
    task.setName("checking something")
    task.startService()
    clock.advance(5)
    clock.advance(5)
    assert calls == [0, 1, 2]
    assert logged.texts(LogLevel.critical) == ["checking something failed"]
    task.stopService()


def test_sigterm_during_uploads_loses_nothing_answered(tmp_path):
    """
    SIGTERM while several clients upload objects (of mixed sizes, some
    sent slowly): uploads in progress are finished and answered, every
    upload answered 200 is stored with exactly its content, no file under a
    final name is partial or wrong, the spool is empty afterwards, and the
    daemon exits with status 0.
    """
    with launched(tmp_path, check_log=True) as daemon:
        assert request(daemon.port, "POST", "/r/?create=true")[0] == 200
        uploads: list[Upload] = []
        lock = threading.Lock()
        stopping = threading.Event()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            while not stopping.is_set():
                size = rng.choice([0, 1, rng.randrange(1, 64 * 1024), rng.randrange(1, 3 * MIB)])
                slow = rng.random() < 0.4
                body = rng.randbytes(size)
                upload = Upload(daemon.port, "r", body, pieces=10 if slow else 1, pause=0.12 if slow else 0.0)
                with lock:
                    uploads.append(upload)
                upload.run()

        threads = [threading.Thread(target=client, args=(seed,), daemon=True) for seed in range(6)]
        for thread in threads:
            thread.start()
        try:

            def ready() -> bool:
                with lock:
                    answered = sum(1 for u in uploads if u.status == 200)
                    now = time.monotonic()
                    long_running = [
                        u for u in uploads if u.ended is None and u.started is not None and now - u.started > 0.4
                    ]
                return answered >= 12 and len(long_running) >= 1

            wait_for(ready, 30, "a dozen answered uploads and one slow upload under way")
            sigterm = daemon.terminate()
            time.sleep(0.5)
            stopping.set()
            status = daemon.wait_exit(EXIT_TIMEOUT)
        finally:
            stopping.set()
            for thread in threads:
                thread.join(TIMEOUT)
        assert not any(thread.is_alive() for thread in threads)
        assert status == 0, daemon.log()

        # Uploads well under way at SIGTERM (the daemon had surely accepted
        # them) and not finished then.
        in_flight = [
            u for u in uploads if u.started is not None and u.started < sigterm - 0.3 and (u.ended or 0) > sigterm
        ]
        assert in_flight, "no upload was in progress at SIGTERM"
        assert [u.status for u in in_flight] == [200] * len(in_flight), daemon.log()

        answered = {u.name: u.body for u in uploads if u.status == 200}
        stored = stored_objects(daemon.data, "r")
        assert [name for name in answered if stored.get(name) != answered[name]] == []
        assert [name for name, body in stored.items() if sha256_hex(body) != name] == []
        assert os.listdir(daemon.spool) == []
        assert "waiting up to 30.0 s for" in daemon.log()
        # Nothing was cut off (the shutdown timeout is 30 s): whatever was
        # stored was also answered.
        unanswered = sorted(set(stored) - set(answered))
        assert unanswered == [], [(u.name[:8], len(u.body), u.error) for u in uploads if u.name in unanswered]


@pytest.mark.network
def test_request_in_flight_finishes_after_sigterm(tmp_path):
    """
    An upload whose last bytes arrive a second after SIGTERM is answered 200
    and stored: the daemon stops accepting connections at once but gives
    requests in flight up to C{--shutdown-timeout} (30 s by default) to
    finish, then exits with status 0.
    """
    with launched(tmp_path) as daemon:
        assert request(daemon.port, "POST", "/r/?create=true")[0] == 200
        body = random.Random(7).randbytes(2 * MIB + 123)
        upload = Upload(daemon.port, "r", body)
        upload.connect()
        upload.send(body[:-1000])
        wait_for(lambda: os.listdir(daemon.spool), TIMEOUT, "the upload to reach the spool")
        daemon.terminate()
        daemon.wait_log("waiting up to 30.0 s for 1 requests in flight")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", daemon.port), timeout=TIMEOUT).close()
        time.sleep(1.0)
        assert daemon.process.poll() is None, "the daemon did not wait for the upload"
        upload.send(body[-1000:])
        answer = upload.answer()
        assert daemon.wait_exit() == 0
        assert stored_path(daemon.data, "r", upload.name).read_bytes() == body
        assert os.listdir(daemon.spool) == []
        assert answer == 200, f"the upload was stored but not answered: {upload.error!r}"


@pytest.mark.network
def test_shutdown_timeout_cuts_off_a_stalled_upload(tmp_path):
    """
    With C{--shutdown-timeout 1}, an upload that stalls half-way when SIGTERM
    arrives is cut off after about a second: it gets no answer, nothing is
    stored under its name, the spool is empty, and the daemon exits with
    status 0 within a few seconds.
    """
    with launched(tmp_path, "--shutdown-timeout", "1") as daemon:
        assert request(daemon.port, "POST", "/r/?create=true")[0] == 200
        body = random.Random(8).randbytes(3 * MIB)
        upload = Upload(daemon.port, "r", body)
        upload.connect()
        upload.send(body[: len(body) // 2])  # more than the first MiB, written to the spool
        wait_for(lambda: os.listdir(daemon.spool), TIMEOUT, "the upload to reach the spool")
        sigterm = daemon.terminate()
        status = daemon.wait_exit(EXIT_TIMEOUT)
        took = time.monotonic() - sigterm
        assert status == 0, daemon.log()
        assert 0.9 <= took < 5.0, took
        assert upload.answer() is None
        assert not stored_path(daemon.data, "r", upload.name).exists()
        assert stored_objects(daemon.data, "r") == {}
        assert os.listdir(daemon.spool) == []
        assert "requests still in flight; closing them" in daemon.log()


@pytest.mark.network
def test_idle_tls_clients_do_not_hold_up_a_stop(tmp_path):
    """
    Clients that keep an idle TLS connection open and read nothing while
    idle (an HTTP/1.1 client between requests, an HTTP/2 one) do not hold a
    stopping daemon for the shutdown timeout: at SIGTERM the HTTP/2 client
    is told (GOAWAY, no error) that no new request will be served, both
    connections end cleanly (the TLS close alert, then the socket closed a
    second later at most, as neither client answers), and the daemon exits
    with status 0 within a few seconds, not the 30 s of the timeout.
    """
    pair = new_pair()
    with launched(tmp_path, tls=pair) as daemon:
        assert daemon.cert_path is not None
        context = ssl.create_default_context(cafile=str(daemon.cert_path))
        http1 = http.client.HTTPSConnection("127.0.0.1", daemon.port, timeout=TIMEOUT, context=context)
        http1.request("POST", "/r/?create=true")
        created = http1.getresponse()
        created.read()
        assert created.status == 200
        context.set_alpn_protocols(["h2"])
        http2 = context.wrap_socket(
            socket.create_connection(("127.0.0.1", daemon.port), timeout=TIMEOUT), server_hostname="127.0.0.1"
        )
        assert http2.selected_alpn_protocol() == "h2"
        client = H2Connection(H2Configuration(client_side=True))
        client.initiate_connection()
        client.send_headers(1, [(":method", "HEAD"), (":path", "/r/config"), (":scheme", "https"), (":authority", "x")], end_stream=True)
        http2.sendall(client.data_to_send())
        answered: list[object] = []
        while not any(isinstance(e, StreamEnded) for e in answered):
            answered += client.receive_data(http2.recv(1 << 16))
            http2.sendall(client.data_to_send())
        sigterm = daemon.terminate()
        assert daemon.wait_exit() == 0
        took = time.monotonic() - sigterm
        assert took < 5.0, took
        told: list[object] = []
        while data := http2.recv(1 << 16):  # a clean TLS end reads as b""
            told += client.receive_data(data)
        assert [e.error_code for e in told if isinstance(e, ConnectionTerminated)] == [ErrorCodes.NO_ERROR]
        assert http1.sock is not None and http1.sock.recv(1) == b""
        http1.close()
        http2.close()


# -- systemd: readiness notification and socket activation ---------------------------


def test_notify_without_notify_socket_does_nothing():
    """
    Outside systemd (no C{NOTIFY_SOCKET}) a notification is not sent.
    """
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": ""}) is False


def test_notify_to_abstract_socket():
    """
    C{NOTIFY_SOCKET=@name} is a socket in the abstract namespace (as systemd
    uses): the state arrives there as one datagram.
    """
    name = f"resticd-test-{os.getpid()}-{random.randrange(1 << 30)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(TIMEOUT)
        assert notify("READY=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert listener.recv(4096) == b"READY=1"


def test_notify_to_a_socket_nobody_listens_on(tmp_path):
    """
    A C{NOTIFY_SOCKET} that cannot be reached is reported as not sent (not
    raised).
    """
    assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nothing.sock")}) is False


@pytest.mark.network
def test_daemon_notifies_ready_and_stopping(tmp_path):
    """
    Under a service manager's C{NOTIFY_SOCKET}, the daemon sends C{READY=1}
    once it listens (a connection right after it is answered) and
    C{STOPPING=1} on SIGTERM, then exits with status 0.
    """
    directory = Path(tempfile.mkdtemp(prefix="n", dir="/tmp"))  # a short path for the socket
    try:
        address = str(directory / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(address)
            listener.settimeout(START_TIMEOUT)
            port = free_port()
            with launched(
                tmp_path, listen=(f"tcp:{port}:interface=127.0.0.1",), env={"NOTIFY_SOCKET": address}, wait=False
            ) as daemon:
                states = listener.recv(4096).decode().split("\n")
                assert "READY=1" in states
                assert request(port, "GET", "/-/healthy")[0] == 200
                daemon.terminate()
                listener.settimeout(EXIT_TIMEOUT)
                assert "STOPPING=1" in listener.recv(4096).decode().split("\n")
                assert daemon.wait_exit() == 0
    finally:
        shutil.rmtree(directory)


@pytest.mark.restic
@pytest.mark.network
def test_socket_activation_with_restic(tmp_path, restic_bin):
    """
    Started by C{systemd-socket-activate} with C{--listen
    systemd:domain=INET:index=0}, the daemon serves the inherited socket:
    the connection that started it is answered, and restic can init, back
    up and check a repository through it. SIGTERM stops it with status 0.
    """
    activate = required_program("systemd-socket-activate")
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    source = tmp_path / "source"
    source.mkdir()
    (source / "file.bin").write_bytes(random.Random(3).randbytes(3 * MIB))
    (source / "note.txt").write_text("socket activation\n")
    with launched(
        tmp_path,
        listen=("systemd:domain=INET:index=0",),
        # --fdname: systemd names the sockets it passes (LISTEN_FDNAMES), and
        # Twisted ignores inherited sockets without names.
        prefix=(activate, "-l", f"127.0.0.1:{port}", "--fdname=resticd", "--"),
        wait=False,
    ) as daemon:
        # systemd-socket-activate listens now; it starts twistd, under its own
        # pid, when the first connection comes.
        wait_for(lambda: port_listening(port), START_TIMEOUT, "systemd-socket-activate to listen")
        restic = Restic(restic_bin, f"rest:http://127.0.0.1:{port}/repo", home)
        restic("init")
        daemon.wait_serving()
        assert daemon.urls == [f"http://127.0.0.1:{port}"]
        restic("backup", str(source))
        assert len(restic.json("snapshots")) == 1
        restic("check", "--read-data")
        assert (daemon.data / "repo" / "config").is_file()
        daemon.terminate()
        assert daemon.wait_exit() == 0


def test_socket_activation_without_a_socket_is_a_startup_error(tmp_path):
    """
    C{--listen systemd:domain=INET:index=0} when no socket was passed (the
    service started without its socket unit) makes the daemon exit non-zero
    with one C{resticd: error:} line naming the endpoint, not a traceback.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    with pytest.MonkeyPatch.context() as patch:
        for name in set(os.environ) - set(env):
            patch.delenv(name)
        code, output = run_twistd(
            tmp_path, "--path", str(tmp_path / "data"), "--no-auth", "--listen", "systemd:domain=INET:index=0"
        )
    assert_one_error(code, output, "systemd:domain=INET:index=0")


def port_listening(port: int) -> bool:
    """
    Whether something listens on 127.0.0.1:C{port} (Linux: the kernel's
    table, without connecting).
    """
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        address, _, local_port = local.partition(":")
        if state == "0A" and int(local_port, 16) == port and address in ("0100007F", "00000000"):
            return True
    return False


# -- a unix socket listener -----------------------------------------------------------------


@pytest.mark.network
def test_unix_socket_listener_with_curl(tmp_path):
    """
    With C{--listen unix:PATH:mode=660} the socket file has mode 0660 and
    serves the protocol: create a repository, upload an object, read part of
    it back with a Range, and list the data objects in the v2 format.
    """
    curl = required_program("curl")
    directory = Path(tempfile.mkdtemp(prefix="u", dir="/tmp"))  # a short path for the socket
    try:
        sock = directory / "resticd.sock"
        with launched(tmp_path, listen=(f"unix:{sock}:mode=660",)) as daemon:
            assert daemon.urls[0].startswith("unix:")
            assert stat.S_ISSOCK(sock.stat().st_mode)
            assert stat.S_IMODE(sock.stat().st_mode) == 0o660

            def run_curl(*args: str) -> tuple[int, dict[str, str], bytes]:
                headers = directory / "headers"
                body = directory / "body"
                done = subprocess.run(
                    [curl, "-sS", "--unix-socket", str(sock), "-D", str(headers), "-o", str(body), *args],
                    capture_output=True,
                    timeout=TIMEOUT,
                    check=False,
                )
                assert done.returncode == 0, done.stderr
                lines = headers.read_text().splitlines()
                status = int(lines[0].split()[1])
                pairs = (line.partition(":") for line in lines[1:] if ":" in line)
                fields = {k.strip().lower(): v.strip() for k, _, v in pairs}
                return status, fields, body.read_bytes()

            assert run_curl("-X", "POST", "http://localhost/r/?create=true")[0] == 200
            payload = random.Random(5).randbytes(100_000)
            name = sha256_hex(payload)
            object_file = directory / "object"
            object_file.write_bytes(payload)
            status, _, _ = run_curl(
                "-X",
                "POST",
                "--data-binary",
                f"@{object_file}",
                "-H",
                "Content-Type:",
                f"http://localhost/r/data/{name}",
            )
            assert status == 200
            assert stored_path(daemon.data, "r", name).read_bytes() == payload

            status, headers, body = run_curl("-H", "Range: bytes=1000-1999", f"http://localhost/r/data/{name}")
            assert status == 206
            assert body == payload[1000:2000]
            assert headers["content-range"] == f"bytes 1000-1999/{len(payload)}"

            status, headers, body = run_curl(
                "-H", "Accept: application/vnd.x.restic.rest.v2", "http://localhost/r/data/"
            )
            assert status == 200
            assert headers["content-type"] == "application/vnd.x.restic.rest.v2"
            assert json.loads(body) == [{"name": name, "size": len(payload)}]
    finally:
        shutil.rmtree(directory)


# -- fail2ban ------------------------------------------------------------------------------------


@pytest.mark.network
def test_fail2ban_filter_matches_failed_logins(tmp_path):
    """
    The fail2ban filter shipped in C{etc/fail2ban/filter.d/resticd.conf}
    finds the client's address in the daemon's own log lines for wrong
    passwords and unknown users, also when the user name sent contains
    C{from ADDRESS}, and ignores requests without credentials and
    successful ones.
    """
    fail2ban_regex = shutil.which("fail2ban-regex")
    if fail2ban_regex is None:
        pytest.skip("fail2ban is not installed")
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"alice": "right"})
    with launched(tmp_path, "--htpasswd-file", str(htpasswd)) as daemon:

        def get(user: str | None, password: str = "") -> int:
            headers = {}
            if user is not None:
                headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            return request(daemon.port, "GET", "/alice/config", b"", **headers)[0]

        assert get("alice", "wrong") == 401
        assert get("mallory", "guess") == 401
        assert get("x from 10.9.8.7", "guess") == 401
        assert get(None) == 401
        assert get("alice", "right") == 404
        wait_for(lambda: daemon.log().count("refused 401") >= 4, TIMEOUT, "four refusals in the log")
    log_file = tmp_path / "resticd.log"
    log_file.write_text(daemon.log())
    done = subprocess.run(
        [fail2ban_regex, "-o", "ip", str(log_file), str(ROOT / "etc" / "fail2ban" / "filter.d" / "resticd.conf")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["127.0.0.1"] * 3, done.stdout
