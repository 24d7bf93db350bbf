"""
The worker threads: blocking calls run off the reactor thread, no more of
them at once than there are threads, results and exceptions come back to
the caller, and stopping finishes what was queued.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.logger import LogLevel

from resticd.threads import PoolRunner, Stopped, WorkerThreads

from .logcapture import LogCapture
from .tools import wait_for

ensure = pytest_twisted.ensureDeferred


def collector() -> tuple[Callable[[bool, Any], None], queue.SimpleQueue[tuple[bool, Any]]]:
    """
    A C{done} callback for L{WorkerThreads.call} and the queue it fills.
    """
    results: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
    return lambda ok, result: results.put((ok, result)), results


@ensure
async def test_work_runs_in_a_worker_and_its_result_comes_back_on_the_reactor() -> None:
    """
    A call through L{PoolRunner} runs in another thread, and its Deferred
    fires on the reactor thread with what the call returned.
    """
    threads = WorkerThreads(2)
    threads.start()
    try:
        run = PoolRunner(reactor, threads)  # type: ignore[arg-type]
        fired_in: list[int] = []

        def note_thread(ident: int) -> int:
            fired_in.append(threading.get_ident())
            return ident

        worker = await run(threading.get_ident).addCallback(note_thread)
        assert worker != threading.get_ident()
        assert fired_in == [threading.get_ident()]
    finally:
        threads.stop()


@ensure
async def test_an_exception_in_a_worker_reaches_the_caller() -> None:
    """
    What a call raises in a worker thread is raised again where its
    Deferred is awaited, with its type and message.
    """
    threads = WorkerThreads(1)
    threads.start()
    try:
        run = PoolRunner(reactor, threads)  # type: ignore[arg-type]

        def full() -> None:
            raise OSError(28, "No space left on device")

        with pytest.raises(OSError, match="No space left"):
            await run(full)
        assert await run(lambda x: x * 2, 21) == 42  # the thread goes on working
    finally:
        threads.stop()


def test_no_more_calls_run_at_once_than_there_are_threads() -> None:
    """
    With two threads, five blocking calls run two at a time; the others
    wait in the queue (what the busy and queue gauges report).
    """
    threads = WorkerThreads(2)
    threads.start()
    release = threading.Event()
    running = 0
    most = 0
    lock = threading.Lock()

    def block() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(10)
        with lock:
            running -= 1

    done, results = collector()
    try:
        for _ in range(5):
            threads.call(done, block)
        assert wait_for(lambda: threads.busy == 2 and threads.queued == 3, 5)
        release.set()
        for _ in range(5):
            assert results.get(timeout=10) == (True, None)
        assert most == 2
        assert wait_for(lambda: threads.busy == 0 and threads.queued == 0, 5)
    finally:
        release.set()
        threads.stop()


def test_calls_made_before_start_run_once_started() -> None:
    """
    Work queued before the threads start waits for them, then runs.
    """
    threads = WorkerThreads(1)
    done, results = collector()
    threads.call(done, lambda: "ran")
    time.sleep(0.05)
    assert results.empty()
    threads.start()
    try:
        assert results.get(timeout=10) == (True, "ran")
    finally:
        threads.stop()


def test_stop_finishes_queued_calls_ends_the_threads_and_refuses_more() -> None:
    """
    L{WorkerThreads.stop} returns once every call queued before it has run
    and every thread has ended; a call after it is refused.
    """
    threads = WorkerThreads(3, name="resticd-test-stop")
    threads.start()
    done, results = collector()
    for i in range(20):
        threads.call(done, time.sleep, 0.001)
    threads.stop()
    assert results.qsize() == 20
    assert not [t for t in threading.enumerate() if t.name.startswith("resticd-test-stop")]
    with pytest.raises(Stopped, match="stopped"):
        threads.call(done, time.sleep, 0)


def test_a_failing_result_handler_is_logged_and_the_thread_goes_on(logged: LogCapture) -> None:
    """
    When handing back a result fails, the error is logged and the thread
    keeps taking calls.
    """
    threads = WorkerThreads(1)
    threads.start()
    done, results = collector()

    def broken(ok: bool, result: Any) -> None:
        raise ValueError("handler broke")

    try:
        threads.call(broken, lambda: None)
        threads.call(done, lambda: "next")
        assert results.get(timeout=10) == (True, "next")
        assert any("handing back" in text for text in logged.texts(LogLevel.critical))
    finally:
        threads.stop()


def test_at_least_one_thread() -> None:
    """
    A pool of no threads would never run anything: it is refused.
    """
    with pytest.raises(ValueError):
        WorkerThreads(0)
