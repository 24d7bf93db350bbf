"""
How the daemon uses memory: glibc's allocator keeps the large buffers of a
busy moment for the next one, and hands their memory back to the system
once the daemon is idle.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, StreamEnded
from h2.settings import SettingCodes
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import LogLevel

from resticd.memory import TRIM_INTERVAL, HeapTrim, MemoryTrim, each_of, heap_trimmer, resident_size
from resticd.threads import run_inline

from .daemon import Daemon, running
from .logcapture import LogCapture
from .tools import wait_for

MIB = 1 << 20

HEAP_CHECK = (
    "import ctypes, os\n"
    "from resticd.memory import keep_large_buffers\n"
    "applied = keep_large_buffers()\n"
    "buffer = bytearray(3 << 20)\n"
    "address = ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))\n"
    "heap = [line.split()[0] for line in open('/proc/self/maps') if line.rstrip().endswith('[heap]')]\n"
    "start, end = (int(x, 16) for x in heap[0].split('-')) if heap else (0, 0)\n"
    "print(applied, start <= address < end)\n"
)


def untuned_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}


def test_large_buffers_come_from_the_reusable_heap() -> None:
    """
    At startup the daemon has glibc keep buffers of a few MiB (socket reads,
    HTTP/2 frames) on its heap, where freed memory is reused, instead of
    mapping fresh pages for each one (each costing a page fault); without
    that, such a buffer gets its own mapping.
    """
    env = untuned_environment()
    tuned = subprocess.run([sys.executable, "-c", HEAP_CHECK], capture_output=True, text=True, timeout=60, env=env)
    assert tuned.stdout.split() == ["True", "True"], tuned.stdout + tuned.stderr
    untuned = HEAP_CHECK.replace("applied = keep_large_buffers()", "applied = False")
    plain = subprocess.run([sys.executable, "-c", untuned], capture_output=True, text=True, timeout=60, env=env)
    assert plain.stdout.split() == ["False", "False"], plain.stdout + plain.stderr


def test_allocator_tuning_of_the_environment_is_kept() -> None:
    """
    An administrator's own setting of glibc's thresholds (in GLIBC_TUNABLES
    or MALLOC_*_THRESHOLD_) is left alone.
    """
    for name, value in (("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576"), ("MALLOC_MMAP_THRESHOLD_", "1048576")):
        env = dict(os.environ, **{name: value})
        result = subprocess.run([sys.executable, "-c", HEAP_CHECK], capture_output=True, text=True, timeout=60, env=env)
        assert result.stdout.split()[0] == "False", result.stdout + result.stderr


TRIM_CHECK = (
    "import ctypes\n"
    "from resticd.memory import heap_trimmer, keep_large_buffers\n"
    "assert keep_large_buffers()\n"
    "libc = ctypes.CDLL(None)\n"
    "libc.malloc.restype = ctypes.c_void_p\n"
    "libc.malloc.argtypes = [ctypes.c_size_t]\n"
    "libc.free.argtypes = [ctypes.c_void_p]\n"
    "def rss():\n"
    "    return next(int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('VmRSS:'))\n"
    "start = rss()\n"
    # 1 MiB blocks, each below a block that stays: freed, they are in the
    # middle of the heap, which cannot shrink past the blocks still in use.
    "big = []\n"
    "kept = []\n"
    "for _ in range(64):\n"
    "    block = libc.malloc(1 << 20)\n"
    "    ctypes.memset(block, 1, 1 << 20)\n"
    "    big.append(block)\n"
    "    kept.append(libc.malloc(256 << 10))\n"
    "for block in big:\n"
    "    libc.free(block)\n"
    "freed = rss()\n"
    "trim = heap_trimmer()\n"
    "released = trim()\n"
    "print(start, freed, rss(), released)\n"
)


def test_a_trim_hands_free_memory_in_the_middle_of_the_heap_back() -> None:
    """
    Free memory the heap cannot give back by shrinking (64 MiB of freed
    blocks below blocks still in use) stays resident until the trim, and
    goes back to the system with it.
    """
    result = subprocess.run(
        [sys.executable, "-c", TRIM_CHECK], capture_output=True, text=True, timeout=60, env=untuned_environment()
    )
    start, freed, trimmed, released = result.stdout.split()
    assert int(freed) - int(start) >= 48, result.stdout
    assert int(trimmed) - int(start) <= 8, result.stdout
    assert released == "True", result.stdout


@dataclass
class Activity:
    count: int = 0
    started_total: int = 0

    def request(self) -> None:
        """One request that starts and ends between two checks."""
        self.started_total += 1


class Trims:
    """
    A stand-in for the heap trim: counts calls; raises when C{broken}.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.broken = False

    def __call__(self) -> bool:
        self.calls += 1
        if self.broken:
            raise OSError("trim broke")
        return True


class HeldRuns:
    """
    A runner that runs nothing: it keeps each call's function and a
    Deferred the test fires when it likes, as a worker still busy would.
    """

    def __init__(self) -> None:
        self.pending: list[Deferred[Any]] = []
        self.started: list[Any] = []

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        self.started.append(f)
        return d


def test_an_idle_daemon_trims_once_after_a_quiet_interval() -> None:
    """
    After some requests, the first check that finds none in flight and none
    started since the check before trims the heap, once; further quiet
    checks do not trim again, and an idle daemon that served nothing never
    trims.
    """
    activity, trims = Activity(), Trims()
    idle = MemoryTrim(activity, run_inline, trims)
    idle.check()
    idle.check()
    assert trims.calls == 0
    activity.request()
    idle.check()  # requests came since the previous check
    assert trims.calls == 0
    idle.check()  # a quiet interval
    assert trims.calls == 1
    idle.check()
    idle.check()
    assert trims.calls == 1
    activity.request()
    idle.check()
    idle.check()
    assert trims.calls == 2


def test_an_idle_trim_runs_every_part_and_says_whether_any_released_memory() -> None:
    """
    The daemon's idle trim (the staging buffers of direct writes, then
    glibc's heaps) runs every part, even after one has released memory, and
    reports a release when any part made one.
    """
    calls: list[str] = []

    def part(name: str, released: bool) -> Callable[[], bool]:
        def trim() -> bool:
            calls.append(name)
            return released

        return trim

    assert each_of([part("a", True), part("b", False)])() is True
    assert each_of([part("c", False), part("d", False)])() is False
    assert calls == ["a", "b", "c", "d"]


def test_no_idle_trim_while_a_request_is_in_flight_or_requests_keep_coming() -> None:
    """
    The idle trim waits: a long request in flight (a big upload) keeps it
    from running, however long it lasts, and so do requests that start
    between every two checks; with no trim for busy moments, nothing runs
    meanwhile.
    """
    activity, trims = Activity(), Trims()
    idle = MemoryTrim(activity, run_inline, trims)
    activity.started_total += 1
    activity.count = 1
    for _ in range(5):
        idle.check()
    assert trims.calls == 0
    activity.count = 0
    for _ in range(5):
        activity.request()
        idle.check()
    assert trims.calls == 0
    idle.check()
    assert trims.calls == 1


def test_while_requests_keep_coming_each_check_runs_the_busy_trim() -> None:
    """
    While a request is in flight, or new ones start between every two
    checks, each check runs the trim for busy moments and not the idle one;
    the first quiet check then runs the idle trim, once, and neither runs
    again until requests come back. A daemon that served nothing runs
    neither.
    """
    activity, idle, busy = Activity(), Trims(), Trims()
    trim = MemoryTrim(activity, run_inline, idle, busy)
    trim.check()
    trim.check()
    assert (idle.calls, busy.calls) == (0, 0)
    activity.started_total += 1
    activity.count = 1
    for _ in range(3):
        trim.check()
    assert (idle.calls, busy.calls) == (0, 3)
    activity.count = 0
    for _ in range(2):
        activity.request()
        trim.check()
    assert (idle.calls, busy.calls) == (0, 5)
    trim.check()
    assert (idle.calls, busy.calls) == (1, 5)
    trim.check()
    trim.check()
    assert (idle.calls, busy.calls) == (1, 5)


def test_a_busy_trim_under_way_holds_back_the_next_one_and_the_idle_one() -> None:
    """
    While a trim for busy moments still runs in its worker thread, neither
    the next busy check nor a quiet one starts another trim beside it; once
    it is done, trims start again (a busy check's, then a quiet check's
    idle one).
    """
    activity, idle, busy = Activity(), Trims(), Trims()
    held = HeldRuns()
    pending, started = held.pending, held.started
    trim = MemoryTrim(activity, held, idle, busy)
    activity.request()
    trim.check()
    activity.request()
    trim.check()
    trim.check()
    assert len(pending) == 1
    pending[0].callback(True)
    activity.request()
    trim.check()
    assert len(pending) == 2
    pending[1].callback(True)
    trim.check()
    assert started == [busy, busy, idle]


class Resident:
    """
    A stand-in for a process's resident size and its heap trim: the trim
    brings the size down to C{after_trim} and is counted.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.after_trim = size
        self.trims = 0

    def __call__(self) -> int:
        return self.size

    def trim(self) -> bool:
        self.trims += 1
        self.size = self.after_trim
        return True


def test_the_busy_heap_trim_waits_until_the_daemon_is_much_larger_than_when_idle() -> None:
    """
    The heap trim for busy moments trims only while the daemon is more than
    the limit larger than it was at the start, or after the last idle trim;
    a busy trim leaves that mark where it is (a burst may still be under way
    when it runs), an idle trim moves it to what is left afterwards.
    """
    resident = Resident(50 * MIB)
    heap = HeapTrim(resident.trim, 16 * MIB, resident)
    resident.size = 66 * MIB
    assert heap.busy() is False and resident.trims == 0
    resident.size, resident.after_trim = 67 * MIB, 60 * MIB
    assert heap.busy() is True and resident.trims == 1
    assert heap.busy() is False and resident.trims == 1
    resident.size, resident.after_trim = 70 * MIB, 55 * MIB
    assert heap.busy() is True and resident.trims == 2
    resident.size, resident.after_trim = 90 * MIB, 75 * MIB
    assert heap.idle() is True and resident.trims == 3
    resident.size = 91 * MIB
    assert heap.busy() is False and resident.trims == 3
    resident.size = 92 * MIB
    assert heap.busy() is True and resident.trims == 4


def test_resident_size_is_what_the_kernel_reports() -> None:
    """
    The daemon's own resident size, read from /proc/self/statm, agrees with
    the kernel's VmRSS and grows by what the process touches.
    """
    reported = status_mib(os.getpid(), "VmRSS")
    assert abs(resident_size() / MIB - reported) <= 4, (resident_size(), reported)
    before = resident_size()
    touched = bytearray(b"x" * (32 * MIB))
    assert resident_size() - before >= 30 * MIB
    del touched


def test_a_trim_under_way_is_not_started_again() -> None:
    """
    While a trim still runs in its worker thread, a later quiet check after
    new requests does not start a second one beside it.
    """
    activity, trims = Activity(), Trims()
    held = HeldRuns()
    pending = held.pending
    idle = MemoryTrim(activity, held, trims)
    activity.request()
    idle.check()
    idle.check()
    assert len(pending) == 1
    activity.request()
    idle.check()
    idle.check()
    assert len(pending) == 1
    pending[0].callback(True)
    activity.request()
    idle.check()
    idle.check()
    assert len(pending) == 2


def test_a_failing_trim_is_logged_and_later_ones_still_run(logged: LogCapture) -> None:
    """
    A trim that fails is logged once, as an error, and the next idle moment
    trims again.
    """
    activity, trims = Activity(), Trims()
    trims.broken = True
    idle = MemoryTrim(activity, run_inline, trims)
    activity.request()
    idle.check()
    idle.check()
    failures = [t for t in logged.texts(LogLevel.critical) if "memory back" in t]
    assert len(failures) == 1, logged.texts()
    trims.broken = False
    activity.request()
    idle.check()
    idle.check()
    assert trims.calls == 2


def test_a_runner_that_refuses_the_trim_is_logged_and_later_trims_still_run(logged: LogCapture) -> None:
    """
    A runner that raises instead of returning a Deferred (worker threads
    already stopped) is logged once as a failed trim, and does not keep
    later idle moments from trimming.
    """
    activity, trims = Activity(), Trims()
    refuse = [True]

    def runner(f: Any, *args: Any) -> Deferred[Any]:
        if refuse[0]:
            raise RuntimeError("the worker threads are stopped")
        return run_inline(f, *args)

    idle = MemoryTrim(activity, runner, trims)
    activity.request()
    idle.check()
    idle.check()
    assert len([t for t in logged.texts(LogLevel.critical) if "memory back" in t]) == 1
    refuse[0] = False
    activity.request()
    idle.check()
    idle.check()
    assert trims.calls == 1


def test_a_trim_runs_through_the_runner() -> None:
    """
    The trim (which takes the allocator's locks) runs through the runner it
    was given (the worker threads in the daemon), not on the caller's thread
    directly.
    """
    activity, trims = Activity(), Trims()
    ran: list[Any] = []

    def runner(f: Any, *args: Any) -> Deferred[Any]:
        ran.append(f)
        try:
            return succeed(f(*args))
        except Exception:
            return fail()

    idle = MemoryTrim(activity, runner, trims)
    activity.request()
    idle.check()
    idle.check()
    assert ran == [trims] and trims.calls == 1


def test_heap_trimmer_is_found_on_glibc() -> None:
    """
    On glibc (Linux, where the daemon runs and CI runs) the trim is there.
    """
    assert heap_trimmer() is not None


def status_mib(pid: int, field: str) -> float:
    """
    A memory size of process C{pid} from C{/proc/PID/status}, in MiB:
    C{VmRSS} (resident now) or C{VmHWM} (the peak of it).
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field}")


def resident_mib(pid: int) -> float:
    return status_mib(pid, "VmRSS")


def burst_of_uploads(daemon: Daemon) -> tuple[float, float, list[str]]:
    """
    Create the repository C{/r/} on C{daemon}, then upload 64 objects of
    8 MiB to it over 8 connections at once: the daemon's resident size in
    MiB before and after the burst (which grew it by 10 MiB at least), and
    the objects' names.
    """
    bodies = [os.urandom(8 * MIB) for _ in range(4)]
    objects = []
    for i in range(64):
        body = bodies[i % 4][:-8] + i.to_bytes(8, "big")
        objects.append((hashlib.sha256(body).hexdigest(), body))
    pid = daemon.process.pid
    c = http.client.HTTPConnection(daemon.host, daemon.port, timeout=30)
    c.request("POST", "/r/?create=true")
    assert c.getresponse().status == 200
    c.close()
    before = resident_mib(pid)

    def upload(share: int) -> None:
        c = http.client.HTTPConnection(daemon.host, daemon.port, timeout=30)
        for name, body in objects[share::8]:
            c.request("POST", f"/r/data/{name}", body=body)
            response = c.getresponse()
            response.read()
            assert response.status == 200
        c.close()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(upload, range(8)))
    after_burst = resident_mib(pid)
    assert after_burst - before >= 10, (before, after_burst)
    return before, after_burst, [name for name, _ in objects]


def test_memory_of_a_burst_of_uploads_goes_back_once_the_daemon_is_idle(tmp_path: Path) -> None:
    """
    A burst of concurrent 8 MiB uploads leaves the allocator holding memory
    for the next one (the daemon's resident size grows by some 20 MiB);
    within a few seconds of the last request it is handed back, and the
    resident size returns to about what it was before the burst.
    """
    with running(tmp_path, tls=False) as daemon:
        pid = daemon.process.pid
        before, after_burst, _ = burst_of_uploads(daemon)
        assert wait_for(lambda: resident_mib(pid) - before <= 4, 3 * TRIM_INTERVAL), (
            before,
            after_burst,
            resident_mib(pid),
        )


def test_memory_of_a_burst_of_uploads_goes_back_while_other_requests_keep_coming(tmp_path: Path) -> None:
    """
    After a burst of concurrent 8 MiB uploads, a client that never stops
    asking (HEAD after HEAD, as a server busy around the clock gets) does
    not keep the burst's memory in the daemon: within a few seconds the
    resident size is back near what it was before the burst, while the
    requests still come.
    """
    with running(tmp_path, tls=False) as daemon:
        pid = daemon.process.pid
        before, after_burst, names = burst_of_uploads(daemon)
        asking = http.client.HTTPConnection(daemon.host, daemon.port, timeout=30)
        deadline = time.monotonic() + 3 * TRIM_INTERVAL
        heads = 0
        while resident_mib(pid) - before > 8 and time.monotonic() < deadline:
            asking.request("HEAD", f"/r/data/{names[heads % len(names)]}")
            response = asking.getresponse()
            response.read()
            assert response.status == 200
            heads += 1
        asking.close()
        assert resident_mib(pid) - before <= 8, (before, after_burst, resident_mib(pid), heads)
        assert heads > 0


def peak_resident_mib(pid: int) -> float:
    return status_mib(pid, "VmHWM")


@pytest.mark.parametrize(("tls", "most"), [(False, 7), (True, 8)])
def test_a_128_mib_upload_raises_the_peak_memory_by_a_few_mib(tmp_path: Path, tls: bool, most: float) -> None:
    """
    One 128 MiB upload (restic's largest packs) is streamed to disk, not
    gathered: the daemon's peak resident memory while it comes in grows by
    a few MiB (its writes may fall BACKLOG bytes behind, not the whole write
    budget of all uploads; measured 3-6 MiB over plain HTTP, 4.7-6.4 over
    TLS, whose reads and decrypted pieces are a MiB), and the object is
    stored intact.
    """
    body = os.urandom(128 * MIB)
    name = hashlib.sha256(body).hexdigest()
    with running(tmp_path, tls=tls) as daemon:
        pid = daemon.process.pid
        conn: http.client.HTTPConnection
        if tls:
            context = ssl.create_default_context(cafile=str(daemon.cert))
            conn = http.client.HTTPSConnection(daemon.host, daemon.port, timeout=60, context=context)
        else:
            conn = http.client.HTTPConnection(daemon.host, daemon.port, timeout=60)
        conn.request("POST", "/r/?create=true")
        created = conn.getresponse()
        created.read()
        assert created.status == 200
        conn.request("HEAD", "/r/config")
        conn.getresponse().read()
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # the peak starts again from the current size
        before = peak_resident_mib(pid)
        conn.request("POST", f"/r/data/{name}", body=body)
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        grown = peak_resident_mib(pid) - before
        conn.close()
        with open(daemon.data / "r" / "data" / name[:2] / name, "rb") as stored:
            assert hashlib.sha256(stored.read()).hexdigest() == name
    assert grown <= most, f"peak RSS grew by {grown:.1f} MiB"


def test_idle_tls_connections_keep_no_large_buffers(tmp_path: Path) -> None:
    """
    Connections that each uploaded and downloaded 4 MiB over TLS and then
    stay open, idle (as clients keep them), hold little memory each: the
    daemon's resident size grows by under 16 MiB for 24 of them. (OpenSSL's
    input and output buffers keep the largest size they were handed for
    as long as a connection lasts: handed whole socket reads of up to a MiB
    and 256 KiB writes, these held 27 MiB.)
    """
    objects = []
    for i in range(24):
        body = os.urandom(4 * MIB)
        objects.append((hashlib.sha256(body).hexdigest(), body))
    with running(tmp_path) as daemon:
        pid = daemon.process.pid
        assert daemon.cert is not None
        context = ssl.create_default_context(cafile=str(daemon.cert))

        def conn() -> http.client.HTTPSConnection:
            return http.client.HTTPSConnection(daemon.host, daemon.port, timeout=30, context=context)

        def call(c: http.client.HTTPSConnection, method: str, path: str, body: bytes | None = None) -> bytes:
            c.request(method, path, body=body)
            response = c.getresponse()
            data = response.read()
            assert response.status == 200, (method, path, response.status)
            return data

        c = conn()
        call(c, "POST", "/r/?create=true")
        name, body = objects[0]
        call(c, "POST", f"/r/data/{name}", body)
        assert call(c, "GET", f"/r/data/{name}") == body
        c.close()
        before = resident_mib(pid)
        idle = []
        for name, body in objects:
            c = conn()
            call(c, "POST", f"/r/data/{name}", body)
            assert call(c, "GET", f"/r/data/{name}") == body
            idle.append(c)
        grown = resident_mib(pid) - before
        print(f"\n24 idle TLS connections after 4 MiB up and down: RSS {before:.0f} -> {before + grown:.0f} MiB")
        for c in idle:
            c.close()
    assert grown < 16, f"24 idle TLS connections hold {grown:.1f} MiB"


def store_objects(daemon: Daemon, context: ssl.SSLContext | None, bodies: list[bytes]) -> None:
    """
    Create the repository /r/ and upload C{bodies} into its data.
    """
    c: http.client.HTTPConnection
    if context is not None:
        c = http.client.HTTPSConnection(daemon.host, daemon.port, timeout=30, context=context)
    else:
        c = http.client.HTTPConnection(daemon.host, daemon.port, timeout=30)
    c.request("POST", "/r/?create=true")
    c.getresponse().read()
    for body in bodies:
        c.request("POST", f"/r/data/{hashlib.sha256(body).hexdigest()}", body=body)
        response = c.getresponse()
        response.read()
        assert response.status == 200
    c.close()


def stalled_client(daemon: Daemon, context: ssl.SSLContext | None) -> socket.socket:
    """
    A connection to the daemon that holds little of what it is sent
    unread (a 64 KiB receive buffer), under TLS when C{context} is given.
    """
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    raw.settimeout(30)
    raw.connect((daemon.host, daemon.port))
    return raw if context is None else context.wrap_socket(raw, server_hostname="localhost")


def growth_while_stalled(pid: int, client: socket.socket, asking: bytes, what: str) -> float:
    """
    Send C{asking} and read nothing for 2 s (the daemon read whole objects
    into memory in well under a second): how many MiB the daemon's peak
    resident size grew meanwhile (printed, with C{what}, under C{-s}).
    """
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # the peak starts again from the current size
    before = peak_resident_mib(pid)
    client.sendall(asking)
    time.sleep(2)
    grown = peak_resident_mib(pid) - before
    print(f"\n{what} to a client reading nothing: peak RSS {before:.0f} -> {before + grown:.0f} MiB")
    return grown


def pipelined_answers(data: bytes) -> list[tuple[bytes, bytes]]:
    """
    The status lines and bodies of the HTTP/1.1 answers in C{data}, one
    after another, each body as long as its Content-Length.
    """
    answers = []
    start = 0
    while start < len(data):
        end = data.index(b"\r\n\r\n", start)
        lines = data[start:end].split(b"\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:"))
        answers.append((lines[0], data[end + 4 : end + 4 + length]))
        start = end + 4 + length
    return answers


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_pipelined_answers_to_a_client_that_reads_nothing_are_not_gathered(tmp_path: Path, tls: bool) -> None:
    """
    A client that sends many GETs at once (pipelined), over TLS or plain
    TCP, and reads nothing makes the daemon hold a few MiB, not the objects
    it asked for: the requests wait while the client is behind on the
    answers before them. (A hundred GETs of a MiB and one of 64 MiB raised
    the peak by 160 MiB: small answers are written at once, and under TLS
    the large one was read whole.) Once the client reads, it gets every
    answer whole and in order.
    """
    small = os.urandom(MIB - 1000)
    large = os.urandom(64 * MIB)
    asked = [small] * 100 + [large]
    with running(tmp_path, tls=tls) as daemon:
        context = ssl.create_default_context(cafile=str(daemon.cert)) if tls else None
        store_objects(daemon, context, [small, large])
        with stalled_client(daemon, context) as client:
            asking = b"".join(
                b"GET /r/data/%s HTTP/1.1\r\nHost: localhost\r\n\r\n" % hashlib.sha256(body).hexdigest().encode() for body in asked
            )
            grown = growth_while_stalled(daemon.process.pid, client, asking, "101 pipelined answers")
            received = bytearray()
            while not received.endswith(large[-64:]):  # the end of the last answer
                chunk = client.recv(MIB)
                assert chunk, "the connection ended early"
                received += chunk
    assert pipelined_answers(bytes(received)) == [(b"HTTP/1.1 200 OK", body) for body in asked]
    assert grown <= 16, f"peak RSS grew by {grown:.1f} MiB while the client read nothing"


@pytest.mark.parametrize(("size", "count"), [(8 * MIB, 24), (MIB - 1000, 32)], ids=["8MiB", "1MiB"])
def test_an_http2_client_that_opens_its_windows_wide_and_reads_nothing_is_not_sent_ahead(
    tmp_path: Path, size: int, count: int
) -> None:
    """
    An HTTP/2 client that opens its flow-control windows as wide as HTTP/2
    allows, asks for an object on many streams at once (24 of 8 MiB, or
    32, as many as it may, of a MiB) and reads nothing makes the daemon
    hold a few MiB, not the objects: the answers of a connection are read
    no further than 4 MiB in all (and a read each) ahead of what it sends,
    and an answer small enough to be read at once is, only while that
    leaves the connection within 4 MiB. (Read whole into memory, the large
    answers raised the peak by 190 MiB, 25 with a MiB per answer; the small
    ones, read at once, by 34.) Once the client reads, every stream gets
    the whole object.
    """
    body = os.urandom(size)
    name = hashlib.sha256(body).hexdigest()
    streams = list(range(1, 2 * count, 2))
    with running(tmp_path) as daemon:
        assert daemon.cert is not None
        context = ssl.create_default_context(cafile=str(daemon.cert))
        store_objects(daemon, context, [body])
        context.set_alpn_protocols(["h2"])
        with stalled_client(daemon, context) as client:
            assert isinstance(client, ssl.SSLSocket) and client.selected_alpn_protocol() == "h2"
            h2 = H2Connection(H2Configuration(client_side=True))
            h2.initiate_connection()
            h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: (1 << 31) - 1, SettingCodes.MAX_FRAME_SIZE: 256 << 10})
            h2.increment_flow_control_window((1 << 31) - 1 - h2.outbound_flow_control_window)
            for stream in streams:
                request = [(":method", "GET"), (":path", f"/r/data/{name}"), (":scheme", "https"), (":authority", "localhost")]
                h2.send_headers(stream, request, end_stream=True)
            grown = growth_while_stalled(daemon.process.pid, client, h2.data_to_send(), f"{count} HTTP/2 answers")
            received: dict[int, bytearray] = {stream: bytearray() for stream in streams}
            ended: set[int] = set()
            while ended != set(streams):
                data = client.recv(MIB)
                assert data, "the connection ended early"
                for event in h2.receive_data(data):
                    if isinstance(event, DataReceived):
                        received[event.stream_id] += event.data
                        h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, StreamEnded):
                        ended.add(event.stream_id)
                client.sendall(h2.data_to_send())
    assert all(bytes(data) == body for data in received.values())
    assert grown <= 20, f"peak RSS grew by {grown:.1f} MiB while the client read nothing"
