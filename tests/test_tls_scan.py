"""
The daemon's TLS configuration as a scanner sees it: C{sslscan} (Debian's
package) against the real daemon on 127.0.0.1, with the default
C{--tls-min-version 1.2} and with C{1.3}. TLS compression, which Debian's
sslscan cannot test (its OpenSSL has no zlib), is checked with a hand-made
ClientHello that offers DEFLATE.

Without C{sslscan} the scans are skipped, except in CI (C{CI=true}), where
they fail: C{.ci/run} installs it.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from resticd.certs import write_self_signed

from .daemon import Daemon, running
from .tools import required_program

pytestmark = pytest.mark.network

#: Seconds a scan may take.
SCAN_TIMEOUT = 120.0
#: Protocols older than TLS 1.2, which no configuration may offer.
OLD_PROTOCOLS = ("SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1")
#: Cipher name parts that mark a weak suite.
WEAK_CIPHER_PARTS = ("NULL", "EXP", "RC4", "DES", "MD5", "ADH", "AECDH", "ANON", "PSK", "SRP", "IDEA", "SEED")
#: sslscan's strength ratings that are not good enough.
WEAK_STRENGTHS = ("null", "anonymous", "weak", "medium")


def sslscan() -> str:
    """
    The sslscan binary; skips the test without it, or fails in CI.
    """
    return required_program("sslscan")


@dataclass
class Scan:
    """
    What sslscan found: protocols (C{"TLSv1.2"} -> offered), renegotiation,
    compression (when it could test it), and the accepted ciphers as
    (protocol, name, strength).
    """

    protocols: dict[str, bool] = field(default_factory=dict)
    renegotiation_supported: bool = False
    renegotiation_secure: bool = False
    compression: bool | None = None
    ciphers: list[tuple[str, str, str]] = field(default_factory=list)


def scan(host: str, port: int) -> Scan:
    """
    Run sslscan against C{host:port} and parse its XML report.
    """
    result = subprocess.run(
        [sslscan(), "--xml=-", "--no-colour", "--no-heartbleed", f"{host}:{port}"],
        capture_output=True,
        text=True,
        timeout=SCAN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"sslscan failed ({result.returncode}): {result.stderr}"
    root = ET.fromstring(result.stdout)
    test = root.find("ssltest")
    assert test is not None, f"sslscan reported no test: {result.stdout[:2000]}"
    found = Scan()
    for protocol in test.iter("protocol"):
        kind, version = protocol.get("type", ""), protocol.get("version", "")
        name = f"SSLv{version}" if kind == "ssl" else f"TLSv{version}"
        found.protocols[name] = protocol.get("enabled") == "1"
    renegotiation = test.find("renegotiation")
    if renegotiation is not None:
        found.renegotiation_supported = renegotiation.get("supported") == "1"
        found.renegotiation_secure = renegotiation.get("secure") == "1"
    compression = test.find("compression")
    if compression is not None:
        found.compression = compression.get("supported") == "1"
    for cipher in test.iter("cipher"):
        found.ciphers.append((cipher.get("sslversion", ""), cipher.get("cipher", ""), cipher.get("strength", "")))
    assert len(found.protocols) == 6, f"sslscan did not test every protocol: {found.protocols}"
    return found


def problems(found: Scan, minimum: str) -> list[str]:
    """
    Everything wrong with a scan of a server that should offer TLS
    C{minimum} and newer only, strong ciphers only, and no insecure
    renegotiation or compression.
    """
    allowed = ("TLSv1.2", "TLSv1.3") if minimum == "1.2" else ("TLSv1.3",)
    out = [f"{name} offered" for name, on in found.protocols.items() if on and name not in allowed]
    if found.renegotiation_supported and not found.renegotiation_secure:
        out.append("insecure renegotiation")
    if found.compression:
        out.append("TLS compression")
    for version, name, strength in found.ciphers:
        if version not in allowed:
            out.append(f"cipher {name} over {version}")
        if any(part in name.upper() for part in WEAK_CIPHER_PARTS) or strength in WEAK_STRENGTHS:
            out.append(f"weak cipher {name} ({strength}) over {version}")
    return out


# -- compression, by hand -------------------------------------------------------


def client_hello_offering_compression(host: str) -> bytes:
    """
    A TLS 1.2 ClientHello record offering DEFLATE compression (and null),
    with the suites, groups and signature algorithms a modern server picks
    from.
    """
    suites = [0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC009, 0xC013, 0x009C, 0x002F]
    name = host.encode()
    extensions = b""

    def extension(kind: int, data: bytes) -> bytes:
        return struct.pack("!HH", kind, len(data)) + data

    extensions += extension(0, struct.pack("!HBH", len(name) + 3, 0, len(name)) + name)  # server_name
    groups = struct.pack("!5H", 0x001D, 0x0017, 0x0018, 0x0019, 0x0100)
    extensions += extension(10, struct.pack("!H", len(groups)) + groups)  # supported_groups
    extensions += extension(11, b"\x01\x00")  # ec_point_formats: uncompressed
    algorithms = struct.pack("!8H", 0x0403, 0x0503, 0x0603, 0x0804, 0x0805, 0x0806, 0x0401, 0x0501)
    extensions += extension(13, struct.pack("!H", len(algorithms)) + algorithms)  # signature_algorithms
    extensions += extension(0xFF01, b"\x00")  # renegotiation_info
    body = b"\x03\x03" + os.urandom(32) + b"\x00"
    body += struct.pack("!H", 2 * len(suites)) + struct.pack(f"!{len(suites)}H", *suites)
    body += b"\x02\x01\x00"  # compression methods: DEFLATE, null
    body += struct.pack("!H", len(extensions)) + extensions
    handshake = b"\x01" + struct.pack("!I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


def server_hello_compression(record: bytes) -> int | None:
    """
    The compression method a ServerHello (the first handshake record a
    server sends) chose: 0 for none, 1 for DEFLATE; L{None} when the server
    answered with an alert instead (it refused the handshake).
    """
    if record[:1] == b"\x15":
        return None
    assert record[:1] == b"\x16", f"not a handshake record: {record[:16]!r}"
    handshake = record[5:]
    assert handshake[:1] == b"\x02", f"not a ServerHello: {handshake[:16]!r}"
    at = 4 + 2 + 32  # type and length, version, random
    session_id_length = handshake[at]
    at += 1 + session_id_length + 2  # session id, cipher suite
    return handshake[at]


def negotiated_compression(host: str, port: int) -> int | None:
    """
    Offer DEFLATE in a TLS 1.2 ClientHello; the compression the server
    chose (L{None}: it refused the handshake).
    """
    with socket.create_connection((host, port), timeout=15) as sock:
        sock.sendall(client_hello_offering_compression(host))
        record = b""
        deadline = time.monotonic() + 15
        while len(record) < 5 or len(record) < 5 + struct.unpack("!H", record[3:5])[0]:
            assert time.monotonic() < deadline, "no ServerHello"
            data = sock.recv(65536)
            assert data, f"the server closed the connection after {record!r}"
            record += data
    return server_hello_compression(record)


# -- the tests --------------------------------------------------------------------


@pytest.fixture(scope="module", params=["1.2", "1.3"])
def tls_daemon(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Daemon]]:
    """
    The daemon over TLS (its self-signed certificate) with each
    C{--tls-min-version}.
    """
    minimum = request.param
    with running(tmp_path_factory.mktemp(f"tls-{minimum}"), "--tls-min-version", minimum) as daemon:
        yield minimum, daemon


def test_scan_finds_nothing_weak(tls_daemon):
    """
    sslscan finds no SSLv2, SSLv3, TLS 1.0 or 1.1 (nor TLS 1.2 with
    C{--tls-min-version 1.3}), no weak cipher (NULL, EXPORT, RC4, DES or
    3DES, MD5, anonymous), no insecure renegotiation and no compression;
    and it does find TLS 1.3, and TLS 1.2 where allowed, with ciphers (so
    the scan did reach the server).
    """
    minimum, daemon = tls_daemon
    found = scan(daemon.host, daemon.port)
    assert problems(found, minimum) == []
    assert found.protocols["TLSv1.3"]
    assert found.protocols["TLSv1.2"] == (minimum == "1.2")
    assert {version for version, _, _ in found.ciphers} == ({"TLSv1.2", "TLSv1.3"} if minimum == "1.2" else {"TLSv1.3"})


def test_no_tls_compression(tls_daemon):
    """
    Offered DEFLATE compression in a TLS 1.2 handshake, the daemon chooses
    none (CRIME). (TLS 1.3 has no compression; a daemon with
    C{--tls-min-version 1.3} refuses the TLS 1.2 handshake altogether.)
    """
    minimum, daemon = tls_daemon
    assert negotiated_compression(daemon.host, daemon.port) == (0 if minimum == "1.2" else None)


def test_checks_flag_a_weak_server(tmp_path):
    """
    The scan and its checks can fail: against C{openssl s_server} offering
    TLS 1.0 with anonymous and NULL ciphers, they report the old protocol
    and the weak ciphers. (The compression parser reads DEFLATE from a
    ServerHello that chose it.)
    """
    scanner = sslscan()
    openssl = required_program("openssl")
    cert, key = write_self_signed(str(tmp_path / "tls"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [openssl, "s_server", "-accept", f"127.0.0.1:{port}", "-cert", cert, "-key", key,
         "-cipher", "ALL:eNULL:aNULL:@SECLEVEL=0", "-tls1", "-www", "-quiet"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "openssl s_server did not start"
                time.sleep(0.05)
        assert scanner
        found = problems(scan("127.0.0.1", port), "1.2")
    finally:
        server.terminate()
        server.wait(10)
    assert "TLSv1.0 offered" in found
    assert any(p.startswith("weak cipher") and "anonymous" in p for p in found), found
    assert any(p.startswith("weak cipher") and "NULL" in p for p in found), found
    hello = b"\x16\x03\x03\x00\x2a" + b"\x02\x00\x00\x26\x03\x03" + b"r" * 32 + b"\x00" + b"\xc0\x2b" + b"\x01"
    assert server_hello_compression(hello) == 1
