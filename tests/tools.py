"""
What several test modules share: the external programs the tests drive
(required on CI, optional elsewhere), bounded polling, and files taken out
of the page cache.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest


def unavailable(why: str) -> NoReturn:
    """
    Give up on a test that cannot run here: a failure on CI (C{CI=true}),
    which must run every test, and a skip elsewhere.
    """
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}, and CI must run this test")
    pytest.skip(why)


def required_program(name: str, package: str | None = None) -> str:
    """
    The path of program C{name} (from Debian package C{package}), or
    L{unavailable} when it is not installed.
    """
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed (Debian package {package or name})")
    return path


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """
    Poll C{predicate} until it holds (L{True}) or C{timeout} seconds pass
    (L{False}).
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def evict(path: str | Path) -> None:
    """
    Drop the file's pages from the page cache (written out first: only
    clean pages can be dropped).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
