"""
Running blocking work off the reactor thread.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")


class Runner(Protocol):
    """
    Runs a blocking callable somewhere and returns a L{Deferred} of its result.
    """

    def __call__(self, f: Callable[..., T], *args: Any) -> Deferred[T]: ...


class PoolRunner:
    """
    Runs blocking work in a bounded thread pool.
    """

    def __init__(self, reactor: IReactorFromThreads, pool: ThreadPool) -> None:
        self._reactor = reactor
        self.pool = pool

    def __call__(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self.pool, f, *args)


def run_inline(f: Callable[..., T], *args: Any) -> Deferred[T]:
    """
    A L{Runner} that runs work at once on the calling thread (for tests).
    """
    return maybeDeferred(f, *args)
