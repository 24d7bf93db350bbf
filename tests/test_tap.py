"""
The C{twistd resticd} command line: C{--listen} values, options to
L{Config}, the plugin, the service's startup, and the real process's exit on
startup failures.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactor, RaisingMemoryReactor
from twisted.plugin import getPlugins
from twisted.protocols.tls import TLSMemoryBIOFactory

from resticd import __version__
from resticd.certs import self_signed
from resticd.config import Config
from resticd.service import ResticdService, StartupError
from resticd.tap import Options, endpoint_description, makeService
from resticd.tls import server_options

#: The checkout, so that subprocesses import this resticd and find its plugin.
CHECKOUT = str(Path(__file__).resolve().parent.parent)
#: The twistd script of the Python running the tests.
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
#: Seconds any subprocess may take.
TIMEOUT = 60

# htpasswd -nbB -C 4 alice 'correct horse'
ALICE = "alice:$2y$04$G3iEXeBw0jCx2TLuPLXBhuIQgfDfaKtpRR1vAVTq6cWPyaNKlilFu\n"


# -- endpoint_description --------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "description"),
    [
        (":8000", "tcp:8000"),
        (":0", "tcp:0"),
        ("127.0.0.1:8000", "tcp:8000:interface=127.0.0.1"),
        ("0.0.0.0:443", "tcp:443:interface=0.0.0.0"),
        ("localhost:8000", "tcp:8000:interface=localhost"),
        ("[::1]:8000", r"tcp:8000:interface=\:\:1"),
        ("[::]:8000", r"tcp:8000:interface=\:\:"),
        ("tcp:8000", "tcp:8000"),
        ("tcp6:8000", "tcp6:8000"),
        ("tcp:8000:interface=::1", "tcp:8000:interface=::1"),
        (r"tcp:8000:interface=\:\:1", r"tcp:8000:interface=\:\:1"),
        ("tcp6:8000:interface=\\:\\:1", "tcp6:8000:interface=\\:\\:1"),
        ("unix:/run/x.sock", "unix:/run/x.sock"),
        ("unix:/run/x.sock:mode=660", "unix:/run/x.sock:mode=660"),
        ("systemd:domain=INET6:index=0", "systemd:domain=INET6:index=0"),
        ("ssl:8443:privateKey=k.pem", "ssl:8443:privateKey=k.pem"),
    ],
)
def test_endpoint_description(listen, description):
    """
    rest-server's C{:port}, C{host:port} and C{[v6]:port} become Twisted
    C{tcp:} endpoints (IPv6 colons escaped); Twisted endpoint strings pass
    through unchanged.
    """
    assert endpoint_description(listen) == description


@pytest.mark.parametrize(
    "listen",
    ["", "garbage", "8000", ":", ":http", "[::1]", "[::1]:", "::1:8000", "1.2.3.4:", "[]:80", ":8000 "],
)
def test_endpoint_description_garbage(listen):
    """
    A C{--listen} value that is neither an endpoint string nor host:port is
    refused with L{ValueError}.
    """
    with pytest.raises(ValueError):
        endpoint_description(listen)


# -- Options -> Config -----------------------------------------------------------


def parse(*args: str) -> Config:
    options = Options()
    options.parseOptions(list(args))
    config: Config = options.config
    return config


def parse_error(*args: str) -> str:
    """
    The message of the SystemExit that parsing C{args} raises.
    """
    with pytest.raises(SystemExit) as caught:
        parse(*args)
    message = caught.value.code
    assert isinstance(message, str), message
    assert message.startswith("resticd: error: "), message
    assert "\n" not in message, message
    return message


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """
    A data directory with an htpasswd file where resticd looks by default.
    """
    path = tmp_path / "data"
    path.mkdir()
    (path / ".htpasswd").write_text(ALICE)
    return path


def test_defaults(data):
    """
    With only C{--path}: listen on tcp:8000, no TLS, users from
    C{<path>/.htpasswd}, uploads verified, HTTP/2 offered, private modes, no
    repository deletion, no debug log.
    """
    config = parse("--path", str(data))
    assert config == Config(
        path=str(data),
        listen=("tcp:8000",),
        tls_cert=None,
        tls_key=None,
        tls_min_version="1.2",
        http2=True,
        htpasswd_file=str(data / ".htpasswd"),
        verify_upload=True,
        group_accessible=False,
        allow_repo_delete=False,
        debug=False,
    )
    assert config.tls is False


def test_relative_paths_made_absolute(data, monkeypatch):
    """
    Relative C{--path} and C{--htpasswd-file} are resolved against the
    working directory at startup (twistd may chdir later).
    """
    monkeypatch.chdir(data.parent)
    (data.parent / "users").write_text(ALICE)
    config = parse("--path", "data", "--htpasswd-file", "users")
    assert config.path == str(data)
    assert config.htpasswd_file == str(data.parent / "users")


def test_path_created_later(tmp_path):
    """
    A C{--path} that does not exist yet is accepted (the daemon creates it).
    """
    config = parse("--path", str(tmp_path / "new"), "--no-auth")
    assert config.path == str(tmp_path / "new")


@pytest.mark.parametrize(
    ("flag", "field", "value"),
    [
        ("--no-http2", "http2", False),
        ("--no-verify-upload", "verify_upload", False),
        ("--group-accessible-repos", "group_accessible", True),
        ("--allow-repo-delete", "allow_repo_delete", True),
        ("--debug", "debug", True),
    ],
)
def test_flags(data, flag, field, value):
    """
    Each flag changes its one setting and nothing else.
    """
    config = parse("--path", str(data), flag)
    default = parse("--path", str(data))
    assert getattr(config, field) == value
    assert getattr(default, field) != value
    assert {k: v for k, v in vars(config).items() if k != field} == {
        k: v for k, v in vars(default).items() if k != field
    }


def test_no_auth(tmp_path):
    """
    C{--no-auth} serves without users: no htpasswd file is needed or used.
    """
    config = parse("--path", str(tmp_path), "--no-auth")
    assert config.htpasswd_file is None


def test_htpasswd_file(data, tmp_path):
    """
    C{--htpasswd-file} names the users' file instead of C{<path>/.htpasswd}.
    """
    users = tmp_path / "users"
    users.write_text(ALICE)
    assert parse("--path", str(data), "--htpasswd-file", str(users)).htpasswd_file == str(users)


def test_tls_min_version(data):
    """
    C{--tls-min-version 1.3} is kept; 1.2 is the default.
    """
    assert parse("--path", str(data), "--tls-min-version", "1.3").tls_min_version == "1.3"
    assert parse("--path", str(data), "--tls-min-version", "1.2").tls_min_version == "1.2"


def test_listen_repeatable(data):
    """
    C{--listen} may be given several times, in any accepted form; the daemon
    listens on all of them, in order, and not on the default.
    """
    config = parse(
        "--path", str(data),
        "--listen", ":8001",
        "--listen", "[::1]:8002",
        "--listen", "unix:/run/x.sock",
        "--listen", "systemd:domain=INET6:index=0",
    )  # fmt: skip
    assert config.listen == (
        "tcp:8001",
        r"tcp:8002:interface=\:\:1",
        "unix:/run/x.sock",
        "systemd:domain=INET6:index=0",
    )


@pytest.mark.parametrize("listen", ["tcp:8000", "tcp6:8000", "tcp:8000:interface=127.0.0.1"])
def test_listen_endpoint_string(data, listen):
    """
    C{--listen} with a Twisted endpoint string, as the man page shows it,
    is used as given (C{tcp:8000} is not "host tcp, port 8000").
    """
    assert parse("--path", str(data), "--listen", listen).listen == (listen,)


def test_listen_not_shared_between_parses(data):
    """
    Each parse starts from the default listen list (no leaking state).
    """
    parse("--path", str(data), "--listen", ":9000")
    assert parse("--path", str(data)).listen == ("tcp:8000",)


def write_pair(directory: Path, cert_name: str, key_name: str) -> tuple[Path, Path]:
    cert, key = self_signed()
    (directory / cert_name).write_bytes(cert)
    (directory / key_name).write_bytes(key)
    return directory / cert_name, directory / key_name


def test_tls_default_files(data):
    """
    C{--tls} alone uses rest-server's C{<path>/public_key} and
    C{<path>/private_key}.
    """
    cert, key = write_pair(data, "public_key", "private_key")
    config = parse("--path", str(data), "--tls")
    assert (config.tls_cert, config.tls_key) == (str(cert), str(key))
    assert config.tls is True


def test_tls_missing_default_files(data):
    """
    C{--tls} without C{<path>/public_key} is a command-line error.
    """
    message = parse_error("--path", str(data), "--tls")
    assert "public_key" in message


def test_tls_cert_and_key(data, tmp_path):
    """
    C{--tls-cert} and C{--tls-key} name the files (and turn TLS on without
    C{--tls}); with C{--tls} they override the defaults.
    """
    cert, key = write_pair(tmp_path, "c.pem", "k.pem")
    for extra in ((), ("--tls",)):
        config = parse("--path", str(data), *extra, "--tls-cert", str(cert), "--tls-key", str(key))
        assert (config.tls_cert, config.tls_key) == (str(cert), str(key))
        assert config.tls is True


def test_tls_cert_with_key_inside(data, tmp_path):
    """
    Only C{--tls-cert}, naming one PEM file with the certificate and the key,
    is enough: the key is read from the same file, and it works.
    """
    cert, key = self_signed()
    combined = tmp_path / "combined.pem"
    combined.write_bytes(cert + key)
    config = parse("--path", str(data), "--tls-cert", str(combined))
    assert (config.tls_cert, config.tls_key) == (str(combined), str(combined))
    assert config.tls_cert is not None and config.tls_key is not None
    server_options(config.tls_cert, config.tls_key, config.tls_min_version).getContext()


def test_missing_path():
    """
    C{--path} is required.
    """
    assert "--path" in parse_error("--no-auth")


def test_path_is_a_file(tmp_path):
    """
    A C{--path} that is a file is refused, naming it.
    """
    file = tmp_path / "file"
    file.write_text("")
    message = parse_error("--path", str(file), "--no-auth")
    assert str(file) in message and "not a directory" in message


@pytest.mark.parametrize("version", ["1.1", "1.0", "1", "tls1.3", ""])
def test_bad_tls_min_version(data, version):
    """
    C{--tls-min-version} accepts only 1.2 and 1.3.
    """
    assert "--tls-min-version" in parse_error("--path", str(data), "--tls-min-version", version)


def test_unreadable_tls_cert(data, tmp_path):
    """
    A C{--tls-cert} or C{--tls-key} that cannot be read is refused, naming
    the flag and the file.
    """
    cert, key = write_pair(tmp_path, "c.pem", "k.pem")
    missing = str(tmp_path / "missing.pem")
    message = parse_error("--path", str(data), "--tls-cert", missing, "--tls-key", str(key))
    assert "--tls-cert" in message and missing in message
    message = parse_error("--path", str(data), "--tls-cert", str(cert), "--tls-key", missing)
    assert "--tls-key" in message and missing in message


def test_no_htpasswd_without_no_auth(tmp_path):
    """
    Without C{--no-auth} there must be an htpasswd file; the message says how
    to make one or how to serve without.
    """
    message = parse_error("--path", str(tmp_path))
    assert str(tmp_path / ".htpasswd") in message
    assert "--no-auth" in message
    message = parse_error("--path", str(tmp_path), "--htpasswd-file", str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in message


@pytest.mark.parametrize("listen", ["garbage", "8000", "[::1]"])
def test_bad_listen(data, listen):
    """
    A C{--listen} value that is no endpoint is a command-line error naming
    the flag.
    """
    assert "--listen" in parse_error("--path", str(data), "--listen", listen)


def test_unknown_flag(data):
    """
    An unknown flag is a command-line error naming it.
    """
    assert "--frobnicate" in parse_error("--path", str(data), "--frobnicate")


# -- the plugin -----------------------------------------------------------------


def test_plugin_found():
    """
    twistd finds the C{resticd} plugin, whose options are L{Options}.
    """
    makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "resticd"]
    assert len(makers) == 1
    assert makers[0].options is Options
    assert makers[0].description


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (CHECKOUT, env.get("PYTHONPATH")) if p)
    return env


def test_plugin_import_does_not_install_reactor(tmp_path):
    """
    Importing the plugin and the options does not import (and so install)
    the reactor: twistd must still be able to pick one with C{--reactor}.
    """
    code = (
        "import sys; import twisted.plugins.resticd_plugin, resticd.tap; "
        "print('twisted.internet.reactor' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# -- the real process ---------------------------------------------------------------


def run_twistd(cwd: Path, *args: str) -> tuple[int, str]:
    """
    Run C{twistd --nodaemon resticd ARGS} to its end (bounded); its exit code
    and everything it printed on stdout and stderr.
    """
    proc = subprocess.Popen(
        [TWISTD, "--nodaemon", "--pidfile=", "resticd", *args],
        cwd=cwd,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out + err


def assert_one_error(code: int, output: str, *fragments: str) -> str:
    """
    The process failed with exactly one C{resticd: error:} line holding
    C{fragments}, and no traceback.
    """
    assert code != 0, output
    assert "Traceback" not in output, output
    assert "Unhandled Error" not in output, output
    lines = [line for line in output.splitlines() if "resticd: error:" in line]
    assert len(lines) == 1, output
    for fragment in fragments:
        assert fragment in lines[0], output
    return lines[0]


def test_version(tmp_path):
    """
    C{twistd resticd --version} prints C{resticd <version>} and exits 0.
    """
    proc = subprocess.run(
        [TWISTD, "resticd", "--version"],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"resticd {__version__}"


@pytest.mark.network
def test_port_in_use(tmp_path):
    """
    A port that is already taken makes the daemon exit non-zero with one
    error line naming the endpoint, not a traceback.
    """
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, output = run_twistd(
            tmp_path, "--path", str(tmp_path / "data"), "--no-auth",
            "--listen", f"tcp:{port}:interface=127.0.0.1",
        )  # fmt: skip
    finally:
        taken.close()
    assert_one_error(code, output, str(port))


def test_not_a_certificate(tmp_path):
    """
    A C{--tls-cert} file that holds no certificate makes the daemon exit
    non-zero with one error line naming the file, not a traceback.
    """
    bad = tmp_path / "cert.pem"
    bad.write_text("this is not a certificate\n")
    _, key = write_pair(tmp_path, "other.pem", "key.pem")
    code, output = run_twistd(
        tmp_path, "--path", str(tmp_path / "data"), "--no-auth",
        "--tls-cert", str(bad), "--tls-key", str(key),
        "--listen", "tcp:0:interface=127.0.0.1",
    )  # fmt: skip
    assert_one_error(code, output, str(bad))


def test_key_does_not_match_certificate(tmp_path):
    """
    A key that belongs to another certificate makes the daemon exit non-zero
    with one error line saying so, not a traceback.
    """
    cert, _ = write_pair(tmp_path, "cert1.pem", "key1.pem")
    _, other_key = write_pair(tmp_path, "cert2.pem", "key2.pem")
    code, output = run_twistd(
        tmp_path, "--path", str(tmp_path / "data"), "--no-auth",
        "--tls-cert", str(cert), "--tls-key", str(other_key),
        "--listen", "tcp:0:interface=127.0.0.1",
    )  # fmt: skip
    assert_one_error(code, output, str(other_key))


def test_missing_htpasswd_file(tmp_path):
    """
    Without an htpasswd file (and without C{--no-auth}) the daemon exits
    non-zero with one error line naming the file, not a traceback.
    """
    code, output = run_twistd(
        tmp_path, "--path", str(tmp_path / "data"), "--listen", "tcp:0:interface=127.0.0.1"
    )
    assert_one_error(code, output, str(tmp_path / "data" / ".htpasswd"))


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                return
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.05)
    raise AssertionError(f"the daemon did not listen in time:\n{log.read_text()}")


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_daemon_serves_and_stops(tmp_path, tls):
    """
    The control case for the failures above: with a usable configuration the
    daemon listens, answers a restic request (create a repository) with 200,
    and shuts down cleanly on SIGTERM without logging a traceback.
    """
    sock = tmp_path / "s.sock"
    log = tmp_path / "twistd.out"
    args = ["--path", str(tmp_path / "data"), "--no-auth", "--listen", f"unix:{sock}"]
    cert, key = write_pair(tmp_path, "cert.pem", "key.pem")
    if tls:
        args += ["--tls-cert", str(cert), "--tls-key", str(key)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [TWISTD, "--nodaemon", "--pidfile=", "resticd", *args],
            cwd=tmp_path,
            env=subprocess_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_socket(sock, proc, log)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(TIMEOUT)
        conn.connect(str(sock))
        if tls:
            context = ssl.create_default_context(cafile=str(cert))
            conn = context.wrap_socket(conn, server_hostname="localhost")
        with conn:
            conn.sendall(
                b"POST /r/?create=true HTTP/1.1\r\nHost: resticd\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert (tmp_path / "data" / "r" / "keys").is_dir()
        proc.terminate()
        # twistd re-raises the signal that stopped it once it has shut down.
        assert proc.wait(timeout=TIMEOUT) in (0, -signal.SIGTERM), log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert "Server Shut Down." in output
    assert "Traceback" not in output and "Unhandled Error" not in output, output


# -- ResticdService.prepare ----------------------------------------------------------


def test_prepare_removes_stale_spool_files(tmp_path, logged):
    """
    Uploads a crash left half-written in C{<path>/.spool} are removed at
    startup (and the count logged); repository files are left alone; the
    daemon then listens with its site.
    """
    root = tmp_path / "data"
    spool = root / ".spool"
    spool.mkdir(parents=True)
    (spool / "upload-a1b2c3").write_bytes(b"half a pack")
    (spool / "upload-d4e5f6").write_bytes(b"")
    key = root / "r" / "keys" / ("ab" * 32)
    key.parent.mkdir(parents=True)
    key.write_bytes(b"a key")
    reactor = MemoryReactor()
    service = ResticdService(Config(path=str(root)), reactor)
    service.prepare()
    assert os.listdir(spool) == []
    assert key.read_bytes() == b"a key"
    assert any("removed 2" in t for t in logged.texts()), logged.texts()
    assert [(port, factory) for port, factory, *_ in reactor.tcpServers] == [(8000, service.site)]


def test_prepare_creates_data_dir(tmp_path):
    """
    A missing data directory (and its parents) is created at startup,
    private to the daemon's user, with its spool directory.
    """
    root = tmp_path / "a" / "b" / "data"
    service = ResticdService(Config(path=str(root)), MemoryReactor())
    service.prepare()
    assert root.is_dir()
    assert (root / ".spool").is_dir()
    assert stat.S_IMODE(root.stat().st_mode) & 0o077 == 0


def test_prepare_listens_on_every_endpoint(tmp_path):
    """
    Every configured endpoint is listened on, once, even though twistd
    starts the service in two steps (privileged, then normal).
    """
    reactor = MemoryReactor()
    config = Config(
        path=str(tmp_path),
        listen=("tcp:8001", r"tcp:8002:interface=\:\:1", f"unix:{tmp_path}/s.sock"),
    )
    service = ResticdService(config, reactor)
    service.prepare()
    service.prepare()
    assert [(p, i) for p, _, _, i in reactor.tcpServers] == [(8001, ""), (8002, "::1")]
    assert [(a, f) for a, f, *_ in reactor.unixServers] == [(f"{tmp_path}/s.sock", service.site)]


def test_listeners_queue_a_crowd_of_connections(tmp_path):
    """
    TCP and unix listeners ask the kernel to queue up to 4096 connections
    not yet accepted (Twisted's default is 50, too few for many clients
    starting at once); an endpoint that sets its own backlog keeps it.
    """
    reactor = MemoryReactor()
    config = Config(
        path=str(tmp_path),
        listen=("tcp:8001", "tcp6:8002:backlog=10", f"unix:{tmp_path}/s.sock"),
    )
    ResticdService(config, reactor).prepare()
    assert [(port, backlog) for port, _, backlog, _ in reactor.tcpServers] == [(8001, 4096), (8002, 10)]
    assert [backlog for _, _, backlog, *_ in reactor.unixServers] == [4096]


def test_prepare_loads_users(tmp_path):
    """
    The htpasswd file is read at startup.
    """
    users = tmp_path / "users"
    users.write_text(ALICE)
    service = ResticdService(Config(path=str(tmp_path / "d"), htpasswd_file=str(users)), MemoryReactor())
    service.prepare()
    assert service.authenticator is not None
    assert service.authenticator.htpasswd.verify("alice", "correct horse")


def test_prepare_tls_wraps_site(tmp_path):
    """
    With a certificate and key, the listeners speak TLS around the site.
    """
    cert, key = write_pair(tmp_path, "cert.pem", "key.pem")
    reactor = MemoryReactor()
    config = Config(path=str(tmp_path / "d"), tls_cert=str(cert), tls_key=str(key))
    service = ResticdService(config, reactor)
    service.prepare()
    factory = reactor.tcpServers[0][1]
    assert isinstance(factory, TLSMemoryBIOFactory)
    assert factory.wrappedFactory is service.site


def _file(root: Path) -> None:
    root.write_text("")


def _below_file(root: Path) -> None:
    root.parent.mkdir()
    (root.parent / "file").write_text("")


def _spool_is_file(root: Path) -> None:
    root.mkdir()
    (root / ".spool").write_text("")


@pytest.mark.parametrize(
    ("breakage", "where"),
    [(_file, "data"), (_below_file, "parent/file/data"), (_spool_is_file, "data")],
    ids=["path-is-file", "path-below-file", "spool-is-file"],
)
def test_prepare_unusable_path(tmp_path, breakage, where):
    """
    A data directory that cannot be used makes startup fail with a one-line
    L{StartupError} naming C{--path}, and nothing is listened on.
    """
    if where == "data":
        root = tmp_path / "data"
    else:
        root = tmp_path / "parent" / "data"
    breakage(root)
    path = str(tmp_path / where)
    reactor = MemoryReactor()
    service = ResticdService(Config(path=path), reactor)
    with pytest.raises(StartupError) as caught:
        service.prepare()
    assert "--path" in str(caught.value) and path in str(caught.value)
    assert "\n" not in str(caught.value)
    assert reactor.tcpServers == []


def test_startup_error_exits_with_one_line(tmp_path):
    """
    When twistd starts the service, a startup failure becomes a
    C{SystemExit} with one C{resticd: error:} line.
    """
    file = tmp_path / "file"
    file.write_text("")
    service = ResticdService(Config(path=str(file)), MemoryReactor())
    with pytest.raises(SystemExit) as caught:
        service.privilegedStartService()
    assert isinstance(caught.value.code, str)
    assert caught.value.code.startswith("resticd: error: cannot use --path ")


def test_prepare_cannot_listen(tmp_path):
    """
    A listen failure (the port is taken) is a L{StartupError} naming the
    endpoint and the reason.
    """
    reactor = RaisingMemoryReactor(
        listenException=CannotListenError("", 8000, OSError(98, "Address already in use"))
    )
    service = ResticdService(Config(path=str(tmp_path)), reactor)
    with pytest.raises(StartupError) as caught:
        service.prepare()
    assert "tcp:8000" in str(caught.value) and "Address already in use" in str(caught.value)


@pytest.mark.parametrize("listen", ["bogus:x", "tcp:notaport"])
def test_prepare_bad_endpoint(tmp_path, listen):
    """
    An endpoint string Twisted cannot parse is a L{StartupError}.
    """
    service = ResticdService(Config(path=str(tmp_path), listen=(listen,)), MemoryReactor())
    with pytest.raises(StartupError, match="--listen"):
        service.prepare()


def test_prepare_bad_htpasswd(tmp_path):
    """
    A missing or undecodable htpasswd file is a L{StartupError} naming it.
    """
    missing = str(tmp_path / "missing")
    service = ResticdService(Config(path=str(tmp_path / "d"), htpasswd_file=missing), MemoryReactor())
    with pytest.raises(StartupError, match="htpasswd"):
        service.prepare()
    garbled = tmp_path / "garbled"
    garbled.write_bytes(b"h\xe9l\xe8ne:{SHA}hsAaMBat8aKiQgxhKhAqvbXOPbw=\n")
    service = ResticdService(Config(path=str(tmp_path / "d"), htpasswd_file=str(garbled)), MemoryReactor())
    with pytest.raises(StartupError, match="htpasswd"):
        service.prepare()


def test_prepare_bad_certificate(tmp_path):
    """
    A certificate file without a certificate is a L{StartupError} (so that
    twistd prints one line, not a traceback), and nothing is listened on.
    """
    bad = tmp_path / "cert.pem"
    bad.write_text("not a certificate\n")
    _, key = write_pair(tmp_path, "c.pem", "k.pem")
    reactor = MemoryReactor()
    config = Config(path=str(tmp_path / "d"), tls_cert=str(bad), tls_key=str(key))
    service = ResticdService(config, reactor)
    with pytest.raises(StartupError):
        service.prepare()
    assert reactor.tcpServers == []


def test_make_service(data):
    """
    The plugin makes the daemon's service from parsed options, with their
    configuration, without preparing anything yet (no data touched).
    """
    options = Options()
    options.parseOptions(["--path", str(data / "repos"), "--htpasswd-file", str(data / ".htpasswd")])
    service = makeService(options)
    assert isinstance(service, ResticdService)
    assert service.config == options.config
    assert not (data / "repos").exists()


def test_garbage_collector_is_off_until_the_reactor_runs(data):
    """
    Building the daemon's service turns Python's garbage collector off
    (starting makes some 60,000 objects that live as long as the process);
    once the reactor runs the collector is on again, with everything made
    so far frozen out of its walks.
    """
    code = (
        "import gc, sys\n"
        "from resticd.tap import Options, makeService\n"
        "options = Options()\n"
        "options.parseOptions(['--path', sys.argv[1], '--no-auth'])\n"
        "service = makeService(options)\n"
        "from twisted.internet import reactor\n"
        "print(gc.isenabled(), gc.get_freeze_count())\n"
        "def running():\n"
        "    print(gc.isenabled(), gc.get_freeze_count() > 50000)\n"
        "    reactor.stop()\n"
        "reactor.callWhenRunning(running)\n"
        "reactor.run()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(data / "repos")],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.stdout.split() == ["False", "0", "True", "True"], result.stdout + result.stderr


def module_loaded_by_daemon(module: str, config: str, after: str = "") -> bool:
    """
    Whether a fresh interpreter has imported C{module} once it has built a
    daemon from C{Config(path=..., <config>)} and run C{after} (with the
    service as C{service}).
    """
    code = (
        "import sys\n"
        "from twisted.internet.testing import MemoryReactor\n"
        "from resticd.config import Config\n"
        "from resticd.service import ResticdService\n"
        f"service = ResticdService(Config(path='/tmp/resticd-unused', {config}), MemoryReactor())\n"
        f"{after}\n"
        f"print({module!r} in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() in ("True", "False"), (result.stdout, result.stderr)
    return result.stdout.strip() == "True"


def test_metrics_library_loaded_only_when_metrics_are_served() -> None:
    """
    A daemon without --prometheus does not import prometheus_client (it
    starts faster); one with it does.
    """
    assert not module_loaded_by_daemon("prometheus_client", "prometheus=False")
    assert module_loaded_by_daemon("prometheus_client", "prometheus=True")


def test_password_hash_library_loaded_only_with_an_htpasswd_file(tmp_path: Path) -> None:
    """
    A daemon without an htpasswd file does not import passlib (it starts
    faster); one with a file does, once the file is read.
    """
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("alice:$2y$05$9ZbxEO5jBHGHhN9yVbEVHeRDHEPx2K2OtW1cu9X2P4kCMONHdgJqi\n")
    assert not module_loaded_by_daemon("passlib", "htpasswd_file=None")
    read_file = "service.authenticator.htpasswd.refresh()"
    assert module_loaded_by_daemon("passlib", f"htpasswd_file={str(htpasswd)!r}", read_file)


def test_open_files_limit_is_raised_to_the_hard_limit() -> None:
    """
    At startup the daemon raises its soft limit on open files to the hard
    limit (every connection and every upload in flight holds one).
    """
    code = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "from resticd.service import raise_open_files_limit\n"
        "raise_open_files_limit()\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "print(soft == hard or hard == resource.RLIM_INFINITY and soft >= 1 << 20, soft > 256)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.split() == ["True", "True"], result.stdout + result.stderr
