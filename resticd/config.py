"""
The daemon's configuration: one frozen value made once from the command line.
"""

from __future__ import annotations

from dataclasses import dataclass

from .health import MinFree

#: The --tls-min-version values.
TLS_VERSIONS = ("1.2", "1.3")


@dataclass(frozen=True)
class Config:
    """
    Everything the command line says, checked and resolved.
    """

    #: The data directory (absolute).
    path: str
    #: Twisted endpoint descriptions to listen on.
    listen: tuple[str, ...] = ("tcp:8000",)
    #: PEM certificate (chain) and key; TLS is on when both are set.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_min_version: str = "1.2"
    http2: bool = True
    #: The htpasswd file, or None when Basic authentication is off.
    htpasswd_file: str | None = None
    #: The header a trusted reverse proxy names the user in.
    proxy_auth_username: str | None = None
    #: CA certificates that client certificates must be signed by.
    tls_client_ca: str | None = None
    verify_upload: bool = True
    group_accessible: bool = False
    allow_repo_delete: bool = False
    append_only: bool = False
    private_repos: bool = False
    #: Limit on the bytes stored in the whole data directory.
    max_size: int | None = None
    #: The largest upload accepted (413 beyond).
    max_blob_size: int = 1 << 30
    #: Seconds a request's headers may take, and its body may stall.
    request_timeout: float = 60.0
    #: The access file (rights and quotas per user and repository).
    access_file: str | None = None
    #: Serve /metrics on the listeners; without a login when metrics_no_auth.
    prometheus: bool = False
    prometheus_no_auth: bool = False
    #: A separate endpoint that serves only metrics and health, without auth.
    prometheus_listen: str | None = None
    #: The access log file, "-" for standard output.
    access_log: str | None = None
    #: Free space below which /-/ready answers 503.
    min_free_space: MinFree = MinFree(fraction=0.01)
    #: Seconds that requests in flight get to finish when the daemon stops.
    shutdown_timeout: float = 30.0
    debug: bool = False
    #: Worker threads for blocking filesystem work and bcrypt.
    threads: int = 8

    @property
    def authenticates(self) -> bool:
        """
        Whether requests are made by known users.
        """
        return bool(self.htpasswd_file or self.proxy_auth_username or self.tls_client_ca)

    @property
    def tls(self) -> bool:
        """
        Whether the listeners speak TLS.
        """
        return self.tls_cert is not None
