"""
External programs the tests drive: required on CI, optional elsewhere.
"""

from __future__ import annotations

import os
import shutil
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
