"""
Self-signed certificates for trying resticd out and for its tests.

C{python -m resticd.certs DIR [HOST ...]} writes C{DIR/cert.pem} and
C{DIR/key.pem} for the given host names and addresses (default: localhost,
127.0.0.1 and ::1), unless they exist already.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def self_signed(
    hosts: tuple[str, ...] = DEFAULT_HOSTS,
    days: int = 365,
    common_name: str | None = None,
) -> tuple[bytes, bytes]:
    """
    A new self-signed certificate and its key, both PEM, valid for C{hosts}.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name or hosts[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_self_signed(directory: str, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> tuple[str, str]:
    """
    Write C{cert.pem} and C{key.pem} (mode 0600) into C{directory} unless
    both exist; return their paths.
    """
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return cert_path, key_path
    os.makedirs(directory, 0o700, exist_ok=True)
    cert, key = self_signed(hosts)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    with open(cert_path, "wb") as f:
        f.write(cert)
    return cert_path, key_path


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m resticd.certs DIR [HOST ...]", file=sys.stderr)
        return 2
    hosts = tuple(argv[1:]) or DEFAULT_HOSTS
    for path in write_self_signed(argv[0], hosts):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
