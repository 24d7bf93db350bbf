"""
systemd's notification protocol (C{Type=notify}): tell the service manager
when the daemon is ready and when it is stopping. Without C{NOTIFY_SOCKET}
in the environment (not started by systemd) it does nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """
    Send C{state} (e.g. C{READY=1}, C{STOPPING=1}) to systemd; whether it
    was sent.
    """
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
        except OSError:
            return False
    return True
