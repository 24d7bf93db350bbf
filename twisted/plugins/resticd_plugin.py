"""
The C{twistd resticd} plugin; everything else is imported lazily.
"""

from twisted.application.service import ServiceMaker

resticd = ServiceMaker(
    "resticd",
    "resticd.tap",
    "A restic REST backend server (HTTP/1.1, HTTP/2, TLS)",
    "resticd",
)
