"""
The C{twistd resticd} command line and the service it makes.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from . import __version__
from .config import TLS_VERSIONS, Config
from .access import parse_size
from .health import MinFree

_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)\Z")
#: Twisted's own server endpoint types; C{NAME:PORT} with any other name is a
#: host and port.
_ENDPOINT_TYPES = frozenset({"tcp", "tcp6", "unix", "ssl", "systemd"})


def endpoint_description(listen: str) -> str:
    """
    A Twisted endpoint description for a C{--listen} value: endpoint strings
    (C{tcp:8000}, C{unix:/run/resticd.sock}, C{systemd:domain=INET:index=0})
    pass through; rest-server's C{:8000}, C{host:8000} and C{[::1]:8000} are
    translated to C{tcp:...}.

    @raise ValueError: for anything else.
    """
    kind = listen.partition(":")[0]
    match = _HOST_PORT.match(listen)
    if match and kind not in _ENDPOINT_TYPES:
        host = match.group("v6") or match.group("host")
        port = match.group("port")
        if not host:
            return f"tcp:{port}"
        return f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}"
    if kind.isidentifier() and ":" in listen:
        return listen
    raise ValueError(f"not an endpoint or host:port: {listen!r}")


class Options(usage.Options):
    """
    The options of C{twistd resticd}.
    """

    synopsis = "[options] --path DIR"
    longdesc = (
        "Serve restic repositories below DIR over restic's REST backend protocol, "
        "on HTTP/1.1 and HTTP/2, with or without TLS."
    )

    optParameters = [
        ["path", None, None, "Data directory holding the repositories (required; created if missing)."],
        ["tls-cert", None, None, "PEM certificate file (server certificate, then any chain); turns TLS on."],
        ["tls-key", None, None, "PEM private key file (may be the certificate file); turns TLS on."],
        ["tls-min-version", None, "1.2", "Lowest TLS version accepted: 1.2 or 1.3."],
        ["htpasswd-file", None, None, "htpasswd file of users (default: <path>/.htpasswd)."],
        ["proxy-auth-username", None, None, "Take the user name from this header set by a trusted reverse proxy instead of checking passwords."],
        ["tls-client-ca", None, None, "Require client certificates signed by a CA in this PEM file; the certificate's common name is the user."],
        ["access-file", None, None, "TOML file of rights and quotas per user and repository (see etc/access.toml)."],
        ["max-size", None, None, "Most bytes the whole data directory may hold, e.g. 500G or 2T; more is refused with 507."],
        ["max-blob-size", None, "1G", "Largest upload accepted, e.g. 256M; a larger one is refused with 413 before its body is read."],
        ["prometheus-listen", None, None, "Also serve /metrics and the health endpoints, without authentication, on this endpoint (e.g. tcp:9100:interface=127.0.0.1)."],
        ["log", None, None, "Write an access log in Apache's combined format to this file (- for standard output); reopened on SIGHUP."],
        ["min-free-space", None, "1%", "Free space on the data directory's filesystem below which /-/ready answers 503: a percentage or a size."],
        ["request-timeout", None, 60.0, "Seconds a request's headers may take to arrive, and its body may stall, before the connection is closed; a connection idle between requests is closed after 180 s.", float],
        ["shutdown-timeout", None, 30.0, "Seconds that requests in flight get to finish when resticd stops (SIGTERM, SIGINT).", float],
    ]
    optFlags = [
        ["tls", None, "Turn TLS on with <path>/public_key and <path>/private_key (rest-server's layout)."],
        ["no-http2", None, "Do not offer HTTP/2 (ALPN h2) on TLS listeners."],
        ["no-auth", None, "Do not check passwords (no htpasswd file); with --tls-client-ca the certificate alone names the user."],
        ["no-verify-upload", None, "Do not hash uploads nor check that their sha256 matches their name."],
        ["group-accessible-repos", None, "Create files 0660 and directories 0770 instead of 0600/0700."],
        ["allow-repo-delete", None, "Allow DELETE of a whole repository."],
        ["append-only", None, "Allow creating but not deleting or replacing anything except locks."],
        ["private-repos", None, "Let each user use only the repositories /<user>/ and /<user>/<name>/."],
        ["prometheus", None, "Serve Prometheus metrics at /metrics (a valid login is needed unless --prometheus-no-auth)."],
        ["prometheus-no-auth", None, "Serve /metrics without authentication (implies --prometheus)."],
        ["debug", None, "Log every request."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, value: str) -> None:
        """
        Endpoint to listen on, repeatable: a Twisted endpoint such as tcp:8000:interface=127.0.0.1, unix:/run/resticd.sock or systemd:domain=INET6:index=0, or rest-server's :8000, host:8000 and [::1]:8000 (default: tcp:8000).
        """
        try:
            self["listen"].append(endpoint_description(value))
        except ValueError as e:
            raise usage.UsageError(f"--listen: {e}") from None

    def opt_version(self) -> None:
        """
        Print the version and exit.
        """
        print(f"resticd {__version__}")
        sys.exit(0)

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"resticd: error: {e} (see twistd resticd --help)") from None

    def postOptions(self) -> None:
        self.config = config_from(self)


def _fail(message: str) -> usage.UsageError:
    return usage.UsageError(message)


def config_from(options: usage.Options) -> Config:
    """
    The checked L{Config} of parsed options.

    @raise usage.UsageError: with a one-line reason when a value is unusable.
    """
    if not options["path"]:
        raise _fail("--path is required: the directory that holds the repositories")
    path = os.path.abspath(options["path"])
    if os.path.exists(path) and not os.path.isdir(path):
        raise _fail(f"--path {path}: not a directory")
    if options["tls-min-version"] not in TLS_VERSIONS:
        raise _fail(f"--tls-min-version must be one of {', '.join(TLS_VERSIONS)}")
    cert, key = options["tls-cert"], options["tls-key"]
    if options["tls"]:
        cert = cert or os.path.join(path, "public_key")
        key = key or os.path.join(path, "private_key")
    elif cert or key:
        cert = cert or key
        key = key or cert
    for flag, value in (("--tls-cert", cert), ("--tls-key", key)):
        if value is not None and not os.access(value, os.R_OK):
            raise _fail(f"{flag} {value}: not a readable file")
    client_ca = options["tls-client-ca"]
    if client_ca is not None:
        if cert is None:
            raise _fail("--tls-client-ca needs TLS (--tls-cert and --tls-key, or --tls)")
        if not os.access(client_ca, os.R_OK):
            raise _fail(f"--tls-client-ca {client_ca}: not a readable file")
    proxy_header = options["proxy-auth-username"]
    htpasswd = None
    if not options["no-auth"] and proxy_header is None:
        htpasswd = os.path.abspath(options["htpasswd-file"] or os.path.join(path, ".htpasswd"))
        if not os.access(htpasswd, os.R_OK):
            raise _fail(
                f"no readable htpasswd file at {htpasswd}: create one "
                "(htpasswd -B -c FILE USER), name it with --htpasswd-file, or run with --no-auth"
            )
    if options["private-repos"] and htpasswd is None and proxy_header is None and client_ca is None:
        raise _fail("--private-repos needs users: an htpasswd file, --proxy-auth-username or --tls-client-ca")
    access_file = options["access-file"]
    if access_file is not None and not os.access(access_file, os.R_OK):
        raise _fail(f"--access-file {access_file}: not a readable file")
    prometheus_listen = None
    if options["prometheus-listen"] is not None:
        try:
            prometheus_listen = endpoint_description(options["prometheus-listen"])
        except ValueError as e:
            raise _fail(f"--prometheus-listen: {e}") from None
    try:
        min_free = MinFree.parse(options["min-free-space"])
    except ValueError as e:
        raise _fail(f"--min-free-space: {e}") from None
    for flag in ("shutdown-timeout", "request-timeout"):
        if options[flag] < 0:
            raise _fail(f"--{flag} cannot be negative")
    try:
        max_blob_size = parse_size(options["max-blob-size"])
    except ValueError as e:
        raise _fail(f"--max-blob-size: {e}") from None
    max_size = None
    if options["max-size"] is not None:
        try:
            max_size = parse_size(options["max-size"])
        except ValueError as e:
            raise _fail(f"--max-size: {e}") from None
    return Config(
        path=path,
        listen=tuple(options["listen"]) or ("tcp:8000",),
        tls_cert=os.path.abspath(cert) if cert else None,
        tls_key=os.path.abspath(key) if key else None,
        tls_min_version=options["tls-min-version"],
        http2=not options["no-http2"],
        htpasswd_file=htpasswd,
        proxy_auth_username=proxy_header,
        tls_client_ca=os.path.abspath(client_ca) if client_ca else None,
        verify_upload=not options["no-verify-upload"],
        group_accessible=bool(options["group-accessible-repos"]),
        allow_repo_delete=bool(options["allow-repo-delete"]),
        append_only=bool(options["append-only"]),
        private_repos=bool(options["private-repos"]),
        max_size=max_size,
        max_blob_size=max_blob_size,
        access_file=os.path.abspath(access_file) if access_file else None,
        prometheus=bool(options["prometheus"] or options["prometheus-no-auth"]),
        prometheus_no_auth=bool(options["prometheus-no-auth"]),
        prometheus_listen=prometheus_listen,
        access_log=options["log"] if options["log"] in (None, "-") else os.path.abspath(options["log"]),
        min_free_space=min_free,
        shutdown_timeout=options["shutdown-timeout"],
        request_timeout=options["request-timeout"],
        debug=bool(options["debug"]),
    )


def makeService(options: Options) -> IService:
    """
    The daemon's service for parsed C{options}, on resticd's reactor (see
    L{resticd.reactor}) unless C{twistd --reactor} chose one. The garbage
    collector is off until the reactor runs (see
    L{resticd.memory.resume_collection}).
    """
    import gc
    import select

    gc.disable()
    if hasattr(select, "epoll"):
        from .reactor import install

        install()
    from twisted.internet import reactor

    from .memory import resume_collection
    from .service import ResticdService

    reactor.callWhenRunning(resume_collection)
    return ResticdService(options.config, reactor)
