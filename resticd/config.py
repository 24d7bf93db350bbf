"""
The daemon's configuration: one frozen value made once from the command line.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    #: The htpasswd file, or None for --no-auth.
    htpasswd_file: str | None = None
    verify_upload: bool = True
    group_accessible: bool = False
    allow_repo_delete: bool = False
    debug: bool = False
    #: Worker threads for blocking filesystem work and bcrypt.
    threads: int = 8

    @property
    def tls(self) -> bool:
        """
        Whether the listeners speak TLS.
        """
        return self.tls_cert is not None
