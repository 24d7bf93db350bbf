#!/usr/bin/env python3
"""
Side-by-side benchmark of resticd and the peer server, ``rclone serve restic``.

Run by hand, never from the test suite::

    .venv/bin/python bench/run.py [--quick] [--only WORKLOAD ...] [--rounds N]
                                  [--http | --https] [--json FILE]

In one run it starts resticd and the peer on fresh data directories, one at a
time, alternating them over several rounds (ABBA order), drives the same
workloads against both and prints one table per protocol (plain http, https):
median value, speed ratio (peer_time / resticd_time, so > 1 always means that
resticd is faster), server CPU per unit of work and peak RSS of both servers.
See bench/README.md for how to read it.

Standard library only (plus the ``resticd`` package for its version and its
self-signed certificate helper). The HTTP/1.1 client is a minimal keep-alive
client on raw sockets, so that the Python client stays cheap next to the
servers on a small machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import http.client
import fcntl
import json
import mmap
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
OBJECT_SIZE = 8 * MiB
V2 = "application/vnd.x.restic.rest.v2"
CLIENTS = 8
CLK_TCK = os.sysconf("SC_CLK_TCK")
WORKLOADS = ("upload", "download", "cold", "range", "head", "stalled", "small", "fsync", "restic")
#: The workloads that use the 8 MiB objects (uploaded, untimed, when upload is not run).
NEEDS_OBJECTS = {"upload", "download", "cold", "range", "head", "stalled"}
SERVERS = ("resticd", "rclone")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
MAX_ERRORS = 20
RSS_LIMIT = 100 * MiB
NOISY = 0.10  # other processes' share of the machine worth a warning
RESTIC_PASSWORD = "resticd-bench"

RESTICD_SERVING = re.compile(r"resticd serving .+ on (https?://\S+)")
RCLONE_SERVING = re.compile(r"Serving restic REST API on (https?://\S+)")
URL_PORT = re.compile(r"https?://[^/]+:(\d+)")


@dataclass(frozen=True)
class Sizes:
    """How much work each workload does (per server, per round)."""

    upload_objects: int  # of OBJECT_SIZE bytes
    range_requests: int
    head_requests: int
    small_objects: int
    list_repeats: int
    fsync_files: int
    tree_big_mib: int  # big random files of the restic tree
    tree_small_files: int  # small files (1 B - 32 KiB) of the restic tree


FULL = Sizes(128, 20_000, 20_000, 50_000, 3, 2_000, 400, 6_000)
QUICK = Sizes(16, 2_000, 3_000, 3_000, 1, 300, 48, 800)


# --------------------------------------------------------------------------
# Processes: every child is tracked by pid and stopped by pid.

LIVE: dict[int, subprocess.Popen[bytes]] = {}


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int | None:
    """SIGTERM, a bounded wait, then SIGKILL. The exit status, None if killed."""
    try:
        if proc.poll() is not None:
            return proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
            return None
    finally:
        LIVE.pop(proc.pid, None)


def stop_all() -> None:
    for proc in list(LIVE.values()):
        stop_process(proc, 5.0)


def spawn(argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # Ctrl-C reaches only us; we stop children by pid
        )
    LIVE[proc.pid] = proc
    return proc


def run_command(argv: Sequence[str], log_path: Path, env: dict[str, str], timeout: float) -> tuple[int, float, float]:
    """Run a command to its end: (exit status, wall seconds, its CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = spawn(argv, log_path, env)
    try:
        status = proc.wait(timeout)
    except BaseException:
        stop_process(proc, 5.0)
        raise
    elapsed = time.perf_counter() - t0
    LIVE.pop(proc.pid, None)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return status, elapsed, cpu


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------
# A minimal HTTP/1.1 keep-alive client (plain or TLS).


class HTTPFailure(Exception):
    pass


class Client:
    def __init__(self, port: int, tls: ssl.SSLContext | None, host: str = "127.0.0.1", timeout: float = 120.0):
        self.addr = (host, port)
        self.tls = tls
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.host_header = f"Host: {host}:{port}\r\n"
        self.scratch = memoryview(bytearray(MiB))
        self.requests_on_conn = 0
        self.reconnects = 0

    def connect(self) -> None:
        sock = socket.create_connection(self.addr, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_hostname=self.addr[0])
        self.sock = sock
        self.buf = bytearray()
        self.requests_on_conn = 0

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None

    def request(
        self,
        method: str,
        path: str,
        headers: str = "",
        body: bytes | Sequence[bytes | memoryview] = b"",
        keep_body: bool = True,
    ) -> tuple[int, dict[str, str], bytes | None, int]:
        """
        Send one request, read its whole response: (status, headers with
        lower-case names, body or None when not kept, body length). A reused
        connection that the server closed before answering is retried once.
        """
        for attempt in (0, 1):
            if self.sock is None:
                self.connect()
            reused = self.requests_on_conn > 0
            try:
                self._send(method, path, headers, body)
                self.requests_on_conn += 1
                return self._response(method, keep_body)
            except _ClosedBeforeResponse:
                self.close()
                if not reused or attempt:
                    raise HTTPFailure(f"{method} {path}: connection closed before a response")
                self.reconnects += 1
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def _send(self, method: str, path: str, headers: str, body: bytes | Sequence[bytes | memoryview]) -> None:
        assert self.sock is not None
        parts = [body] if isinstance(body, (bytes, bytearray, memoryview)) else list(body)
        length = sum(len(p) for p in parts)
        head = f"{method} {path} HTTP/1.1\r\n{self.host_header}{headers}"
        if length or method in ("POST", "PUT"):
            head += f"Content-Length: {length}\r\n"
        data = (head + "\r\n").encode("latin-1")
        if length <= 64 * KiB:
            self.sock.sendall(data + b"".join(parts))
        else:
            self.sock.sendall(data)
            for part in parts:
                self.sock.sendall(part)

    def _recv_more(self) -> bool:
        assert self.sock is not None
        chunk = self.sock.recv(256 * KiB)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def _response(self, method: str, keep_body: bool) -> tuple[int, dict[str, str], bytes | None, int]:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if not self._recv_more():
                if not self.buf:
                    raise _ClosedBeforeResponse()
                raise HTTPFailure(f"connection closed in the middle of the response headers: {bytes(self.buf[:200])!r}")
        lines = bytes(self.buf[:end]).split(b"\r\n")
        del self.buf[: end + 4]
        try:
            status = int(lines[0].split(None, 2)[1])
        except (IndexError, ValueError):
            raise HTTPFailure(f"bad status line {lines[0]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        body: bytes | None = b""
        length = 0
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            pass
        elif "content-length" in headers:
            length = int(headers["content-length"])
            body = self._read_exact(length, keep_body)
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body, length = self._read_chunked(keep_body)
        else:
            while self._recv_more():
                pass
            body = bytes(self.buf)
            length = len(body)
            self.buf = bytearray()
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body if keep_body else None, length

    def _read_exact(self, n: int, keep: bool) -> bytes | None:
        if len(self.buf) >= n:
            data = bytes(self.buf[:n])
            del self.buf[:n]
            return data
        assert self.sock is not None
        if keep:
            while len(self.buf) < n:
                if not self._recv_more():
                    raise HTTPFailure(f"body ended after {len(self.buf)} of {n} bytes")
            data = bytes(self.buf[:n])
            del self.buf[:n]
            return data
        got = len(self.buf)
        self.buf = bytearray()
        mv = self.scratch
        while got < n:
            k = self.sock.recv_into(mv, min(n - got, len(mv)))
            if not k:
                raise HTTPFailure(f"body ended after {got} of {n} bytes")
            got += k
        return None

    def _read_line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            if not self._recv_more():
                raise HTTPFailure("connection closed inside a chunked body")

    def _read_chunked(self, keep: bool) -> tuple[bytes | None, int]:
        out = bytearray()
        total = 0
        while True:
            size = int(self._read_line().split(b";")[0], 16)
            if size == 0:
                while self._read_line():
                    pass
                return (bytes(out) if keep else None), total
            data = self._read_exact(size, keep)
            if keep and data is not None:
                out += data
            total += size
            self._read_line()


class _ClosedBeforeResponse(Exception):
    pass


def describe(method: str, path: str, status: int, headers: dict[str, str], body: bytes | None) -> str:
    snippet = (body or b"")[:200].decode("latin-1", "replace").strip()
    return f"{method} {path} -> {status} {headers.get('content-type', '')!s} {snippet!r}"


# --------------------------------------------------------------------------
# Servers.


@dataclass
class Server:
    kind: str  # "resticd" or "rclone"
    proto: str  # "http" or "https"
    base: Path
    cert: Path
    key: Path
    tls_ctx: ssl.SSLContext | None
    resticd_args: list[str]
    rclone_bin: str
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    url: str = ""
    startup: float = 0.0
    exit_status: int | None = None
    rss_reset_works: bool = True

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def log_path(self) -> Path:
        return self.base / "server.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        if self.kind == "resticd":
            argv = [str(Path(sys.executable).parent / "twistd"), "--nodaemon", "--pidfile=", "--logfile=-",
                    "resticd", "--path", str(self.data), "--no-auth", "--listen", "tcp:0:interface=127.0.0.1"]
            if self.proto == "https":
                argv += ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]
            return argv + self.resticd_args
        argv = [self.rclone_bin, "serve", "restic", str(self.data), "--addr", "127.0.0.1:0"]
        if self.proto == "https":
            argv += ["--cert", str(self.cert), "--key", str(self.key)]
        return argv

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.data.mkdir()
        env = dict(os.environ, PYTHONUNBUFFERED="1", RCLONE_CONFIG=str(self.base / "rclone.conf"))
        pattern = RESTICD_SERVING if self.kind == "resticd" else RCLONE_SERVING
        t0 = time.perf_counter()
        self.proc = spawn(self.argv(), self.log_path, env, cwd=self.base)
        deadline = t0 + START_TIMEOUT
        while True:
            match = pattern.search(self.log_path.read_text(errors="replace"))
            if match:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode} before serving:\n{log_tail(self.log_path)}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{self.kind} did not log its address within {START_TIMEOUT} s:\n{log_tail(self.log_path)}")
            time.sleep(0.005)
        self.url = match.group(1).rstrip("/")
        port = URL_PORT.match(self.url)
        assert port, self.url
        self.port = int(port.group(1))
        while True:  # first answer, whatever its status
            try:
                client = self.client(timeout=5)
                client.request("HEAD", "/bench-startup/config")
                client.close()
                break
            except (OSError, HTTPFailure):
                if self.proc.poll() is not None or time.perf_counter() > deadline:
                    raise
                time.sleep(0.005)
        self.startup = time.perf_counter() - t0

    def client(self, timeout: float = 120.0) -> Client:
        return Client(self.port, self.tls_ctx, timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def reset_peak(self) -> None:
        self.rss_reset_works = reset_peak_rss(self.pid) and self.rss_reset_works

    def peak_rss(self) -> int | None:
        kib = proc_status_kib(self.pid, "VmHWM")
        return None if kib is None else kib * KiB

    def stop(self) -> None:
        if self.proc is not None:
            died = self.proc.poll()
            status = stop_process(self.proc)
            self.exit_status = died if died is not None else status

    def log_problems(self) -> list[str]:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        problems = []
        for marker in ("Traceback (most recent call last)", "Unhandled Error", "panic:"):
            i = text.find(marker)
            if i >= 0:
                problems.append(f"{self.kind} log contains {marker!r}:\n" + text[max(0, i - 300): i + 2500])
        return problems


# --------------------------------------------------------------------------
# Measurements.


@dataclass
class Sample:
    metric: str
    server: str
    proto: str
    round: int
    elapsed: float | None = None  # seconds (time to first byte for list_ttfb)
    amount: float = 1.0  # units of work: bytes or requests or 1
    cpu: float | None = None  # server CPU seconds
    rss: int | None = None  # server peak RSS bytes during the workload
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def machine_cpu() -> tuple[float, float]:
    """Busy and stolen CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def wait_idle(limit: float) -> float:
    """
    Wait (at most C{limit} seconds) until the machine stays below 10 % busy for
    a whole second; the seconds waited. Nothing of ours runs meanwhile.
    """
    if limit <= 0:
        return 0.0
    t0 = time.perf_counter()
    cores = os.cpu_count() or 1
    while True:
        busy0, _ = machine_cpu()
        time.sleep(1.0)
        busy1, _ = machine_cpu()
        waited = time.perf_counter() - t0
        if busy1 - busy0 < 0.10 * cores or waited >= limit:
            return waited


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Measure:
    """
    Server CPU and peak RSS around one workload, and the CPU that other
    processes of the machine used meanwhile (machine busy time minus the
    server, this process and its reaped children such as restic).
    """

    def __init__(self, server: Server):
        self.server = server

    def __enter__(self) -> "Measure":
        self.server.reset_peak()
        self.cpu0 = self.server.cpu()
        self.self0 = time.process_time()
        self.children0 = children_cpu()
        self.machine0, self.steal0 = machine_cpu()
        self.t0 = time.perf_counter()
        return self

    cpu: float | None
    rss: int | None

    def __exit__(self, *exc: object) -> None:
        self.elapsed = time.perf_counter() - self.t0
        machine, steal = machine_cpu()
        self.client_cpu = time.process_time() - self.self0  # this process: the Python client threads
        self.steal = steal - self.steal0
        mine = self.client_cpu + children_cpu() - self.children0
        try:
            self.cpu = self.server.cpu() - self.cpu0
            self.rss = self.server.peak_rss()
        except OSError:  # the server died
            self.cpu, self.rss = None, None
        self.other_cpu = max(0.0, machine - self.machine0 - mine - (self.cpu or 0.0))

    def noise(self) -> dict[str, float]:
        """Other processes' CPU and stolen time, as a share of the machine's capacity meanwhile."""
        capacity = self.elapsed * (os.cpu_count() or 1)
        return {"other_cpu": round(self.other_cpu, 3), "other_share": round(self.other_cpu / capacity, 4) if capacity else 0.0,
                "steal": round(self.steal, 3)}

    def noise_note(self) -> str:
        n = self.noise()
        if n["other_share"] < NOISY or n["other_cpu"] < 0.1:
            return ""
        return f"  [other processes used {n['other_cpu']:.1f} CPU-s = {n['other_share']:.0%} of the machine]"


class Errors:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[str] = []
        self.count = 0
        self.abort = threading.Event()

    def add(self, message: str) -> None:
        with self.lock:
            self.count += 1
            if len(self.items) < 3:
                self.items.append(message)
            if self.count >= MAX_ERRORS:
                self.abort.set()

    def summary(self) -> str | None:
        if not self.count:
            return None
        return f"{self.count} failed request(s); first: " + " | ".join(self.items)


def run_clients(
    server: Server,
    items: Sequence[Any],
    work: Callable[[Client, Any, Errors], None],
    clients: int = CLIENTS,
) -> tuple[Measure, Errors, int]:
    """
    Spread C{items} over C{clients} threads, each with its own keep-alive
    connection (opened before the clock starts), and measure the server.
    """
    errors = Errors()
    ready = threading.Barrier(clients + 1)
    go = threading.Event()
    reconnects = [0]

    def thread(share: Sequence[Any]) -> None:
        client = server.client()
        try:
            try:
                client.connect()
            finally:
                ready.wait(60)
            go.wait()
            for item in share:
                if errors.abort.is_set():
                    break
                try:
                    work(client, item, errors)
                except (OSError, HTTPFailure, ValueError) as e:
                    errors.add(f"{type(e).__name__}: {e}")
        except threading.BrokenBarrierError:
            errors.add("a client thread did not get ready")
        except Exception as e:  # pragma: no cover - reported, not raised
            errors.add(f"client thread crashed: {type(e).__name__}: {e}")
        finally:
            reconnects[0] += client.reconnects
            client.close()

    threads = [threading.Thread(target=thread, args=(items[k::clients],), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    ready.wait(60)
    with Measure(server) as m:
        go.set()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
    return m, errors, reconnects[0]


class BigObjects:
    """
    C{count} distinct OBJECT_SIZE objects made from 4 random buffers by
    changing their last 8 bytes; names are computed up front from sha256
    mid-states, so neither naming nor sending copies 8 MiB.
    """

    def __init__(self, count: int, seed: int = 6):
        rnd = random.Random(seed)
        self.bases = [b"".join(rnd.randbytes(MiB) for _ in range(OBJECT_SIZE // MiB)) for _ in range(4)]
        heads = [hashlib.sha256(memoryview(b)[:-8]) for b in self.bases]
        self.suffixes = [struct.pack(">II", 0x5E57, i) for i in range(count)]
        self.names = []
        for i, suffix in enumerate(self.suffixes):
            h = heads[i % 4].copy()
            h.update(suffix)
            self.names.append(h.hexdigest())

    def parts(self, i: int) -> tuple[memoryview, bytes]:
        return memoryview(self.bases[i % 4])[:-8], self.suffixes[i]

    def content(self, i: int) -> bytes:
        return self.bases[i % 4][:-8] + self.suffixes[i]


class SmallObjects:
    def __init__(self, count: int, seed: int = 7):
        rnd = random.Random(seed)
        pool = rnd.randbytes(KiB)
        self.bodies = [pool[: rnd.randint(56, KiB - 8)] + struct.pack(">Q", i) for i in range(count)]
        self.names = [hashlib.sha256(b).hexdigest() for b in self.bodies]


ACCEPT = f"Accept: {V2}\r\n"


def expect_status(errors: Errors, method: str, path: str, result: tuple[int, dict[str, str], bytes | None, int], ok: Iterable[int]) -> bool:
    status, headers, body, _ = result
    if status not in ok:
        errors.add(describe(method, path, status, headers, body))
        return False
    return True


def create_repo(server: Server, repo: str) -> None:
    client = server.client()
    try:
        result = client.request("POST", f"/{repo}/?create=true", ACCEPT)
        if result[0] != 200:
            raise HTTPFailure("create: " + describe("POST", f"/{repo}/?create=true", *result[:3]))
    finally:
        client.close()


def wl_upload(server: Server, objects: BigObjects, count: int) -> tuple[Measure, Errors, int]:
    def work(client: Client, i: int, errors: Errors) -> None:
        path = f"/r/data/{objects.names[i]}"
        result = client.request("POST", path, ACCEPT, objects.parts(i))
        expect_status(errors, "POST", path, result, (200,))

    return run_clients(server, range(count), work)


def wl_download(server: Server, objects: BigObjects, count: int) -> tuple[Measure, Errors, int]:
    def work(client: Client, i: int, errors: Errors) -> None:
        path = f"/r/data/{objects.names[i]}"
        result = client.request("GET", path, ACCEPT + "Range: bytes=0-\r\n", keep_body=False)
        if expect_status(errors, "GET", path, result, (200, 206)) and result[3] != OBJECT_SIZE:
            errors.add(f"GET {path} (bytes=0-): {result[3]} bytes instead of {OBJECT_SIZE}")

    return run_clients(server, range(count), work)


def each_file(root: Path, action: Callable[[int], object]) -> int:
    """
    Call C{action} with a descriptor of every file under C{root} that can
    be opened; how many files.
    """
    count = 0
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                action(fd)
                count += 1
            finally:
                os.close(fd)
    return count


def evict_tree(root: Path) -> int:
    """
    Take every file under C{root} out of the page cache (written out first:
    only clean pages can be dropped); how many files.
    """

    def evict(fd: int) -> None:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    return each_file(root, evict)


def cache_tree(root: Path) -> int:
    """
    Read every file under C{root} into the page cache, through a buffer of
    this process, so that the CPU has touched every page; how many files.

    On a virtual machine whose host takes back free memory, pages the disk
    has just filled (read without a copy, as sendfile(2) to /dev/null does)
    can be slow to copy the first time a CPU reads them: seen here, a
    server's copies out of them took up to 6 times the CPU in some runs and
    not in others (bench/README.md, Noise). rclone's objects were copied
    into the page cache by its uploads; resticd's bypass it (O_DIRECT) and
    come from the disk. Touched here, both servers' rows serve from the same
    kind of memory.
    """
    scratch = bytearray(MiB)

    def read_through(fd: int) -> None:
        while os.readv(fd, [scratch]):
            pass

    return each_file(root, read_through)


def wl_cold(server: Server, objects: BigObjects, count: int) -> tuple[Measure, Errors, int, list[float]]:
    """
    The download workload with none of the objects in the page cache, while
    one more client sends a HEAD every 2 ms: how long others wait while the
    server reads from the disk. The HEAD latencies come back too.
    """
    evict_tree(server.data)
    latencies: list[float] = []
    done = threading.Event()
    probe_errors = Errors()

    def probe() -> None:
        client = server.client()
        path = f"/r/data/{objects.names[0]}"
        try:
            while not done.is_set():
                t0 = time.perf_counter()
                result = client.request("HEAD", path, ACCEPT)
                latencies.append(time.perf_counter() - t0)
                expect_status(probe_errors, "HEAD", path, result, (200,))
                time.sleep(0.002)
        except (OSError, HTTPFailure) as e:
            probe_errors.add(f"HEAD during cold downloads: {type(e).__name__}: {e}")
        finally:
            client.close()

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        m, errors, reconnects = wl_download(server, objects, count)
    finally:
        done.set()
        prober.join(30)
    for item in probe_errors.items:
        errors.add(item)
    return m, errors, reconnects, latencies


def percentile(values: Sequence[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def wl_range(server: Server, objects: BigObjects, available: int, count: int, seed: int) -> tuple[Measure, Errors, int]:
    rnd = random.Random(seed)
    items = []
    for _ in range(count):
        length = rnd.randint(4 * KiB, 64 * KiB)
        start = rnd.randrange(0, OBJECT_SIZE - length + 1)
        items.append((rnd.randrange(available), start, start + length - 1))

    def work(client: Client, item: tuple[int, int, int], errors: Errors) -> None:
        i, a, b = item
        path = f"/r/data/{objects.names[i]}"
        result = client.request("GET", path, f"{ACCEPT}Range: bytes={a}-{b}\r\n", keep_body=False)
        if not expect_status(errors, "GET", path, result, (206,)):
            return
        want = f"bytes {a}-{b}/{OBJECT_SIZE}"
        if result[3] != b - a + 1 or result[1].get("content-range") != want:
            errors.add(f"GET {path} bytes={a}-{b}: {result[3]} bytes, Content-Range {result[1].get('content-range')!r}, wanted {want!r}")

    m, errors, rc = run_clients(server, items, work)
    return m, errors, rc


def wl_head(server: Server, objects: BigObjects, available: int, count: int, seed: int) -> tuple[Measure, Errors, int]:
    rnd = random.Random(seed)
    items = [rnd.randrange(available) for _ in range(count)]

    def work(client: Client, i: int, errors: Errors) -> None:
        path = f"/r/data/{objects.names[i]}"
        result = client.request("HEAD", path, ACCEPT)
        if expect_status(errors, "HEAD", path, result, (200,)) and result[1].get("content-length") != str(OBJECT_SIZE):
            errors.add(f"HEAD {path}: Content-Length {result[1].get('content-length')!r}, wanted {OBJECT_SIZE}")

    return run_clients(server, items, work)


#: How long a stalled client reads nothing before its peak is taken.
STALL = 2.0
#: Objects a stalled client asks for at once: pipelined over HTTP/1.1, on
#: as many streams over HTTP/2.
STALLED_ASKS = 24


def stalled_socket(server: Server, alpn: str) -> socket.socket:
    """
    A connection to C{server} that holds little of what it is sent unread
    (a 64 KiB receive buffer), under TLS with C{alpn} over https.
    """
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
    raw.settimeout(60)
    raw.connect(("127.0.0.1", server.port))
    if server.proto != "https":
        return raw
    context = ssl.create_default_context(cafile=str(server.cert))
    context.set_alpn_protocols([alpn])
    return context.wrap_socket(raw, server_hostname="localhost")


def stalled_growth(server: Server, conn: socket.socket, asking: bytes) -> int:
    """
    Send C{asking} on C{conn}, read nothing for L{STALL} seconds: how much
    the server's peak resident size grew meanwhile, in bytes.
    """
    server.reset_peak()
    before = (proc_status_kib(server.pid, "VmRSS") or 0) * KiB
    conn.sendall(asking)
    time.sleep(STALL)
    return max(0, (server.peak_rss() or 0) - before)


def wl_stalled_pipelined(server: Server, objects: BigObjects, available: int) -> tuple[int, str | None]:
    """
    A client that pipelines GETs of every MiB of L{STALLED_ASKS} objects
    (ranges, each small enough to be answered at once) over HTTP/1.1 and
    reads nothing for a while: the server's peak growth meanwhile, and what
    was wrong with the answers once read (or None).
    """
    asks = [(i, offset) for i in range(min(STALLED_ASKS, available)) for offset in range(0, OBJECT_SIZE, MiB)]
    with stalled_socket(server, "http/1.1") as conn:
        asking = b"".join(
            b"GET /r/data/%s HTTP/1.1\r\nHost: localhost\r\nRange: bytes=%d-%d\r\n\r\n"
            % (objects.names[i].encode(), offset, offset + MiB - 1)
            for i, offset in asks
        )
        growth = stalled_growth(server, conn, asking)
        reader = Client(server.port, None)  # (for its response parser, on this connection)
        reader.sock = conn
        for i, offset in asks:
            status, _, body, _ = reader._response("GET", True)
            if status != 206 or body != objects.content(i)[offset : offset + MiB]:
                return growth, f"object {i} at {offset}: {status}, {len(body or b'')} bytes, content differs"
    return growth, None


def wl_stalled_h2(server: Server, objects: BigObjects, available: int) -> tuple[int, str | None]:
    """
    An HTTP/2 client that opens its windows as wide as HTTP/2 allows, asks
    for L{STALLED_ASKS} objects on as many streams and reads nothing for a
    while: the server's peak growth meanwhile, and what was wrong with the
    answers once read (or None).
    """
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    count = min(STALLED_ASKS, available)
    with stalled_socket(server, "h2") as conn:
        if getattr(conn, "selected_alpn_protocol", lambda: None)() != "h2":
            return 0, "the server did not negotiate h2"
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: (1 << 31) - 1})
        client.increment_flow_control_window((1 << 31) - 1 - client.outbound_flow_control_window)
        streams = {}
        for i in range(count):
            stream = client.get_next_available_stream_id()
            path = f"/r/data/{objects.names[i]}"
            client.send_headers(stream, [(":method", "GET"), (":path", path), (":scheme", "https"), (":authority", "localhost")], end_stream=True)
            streams[stream] = i
        growth = stalled_growth(server, conn, client.data_to_send())
        received: dict[int, list[bytes]] = {stream: [] for stream in streams}
        ended: set[int] = set()
        while len(ended) < count:
            data = conn.recv(MiB)
            if not data:
                return growth, f"the connection ended after {len(ended)} of {count} answers"
            for event in client.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    received[event.stream_id].append(event.data)
                    client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)
                elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    return growth, f"the server ended a stream or the connection: {event}"
            conn.sendall(client.data_to_send())
        for stream, i in streams.items():
            if b"".join(received[stream]) != objects.content(i):
                return growth, f"stream {stream}: content differs"
    return growth, None


def wl_small(server: Server, small: SmallObjects) -> tuple[Measure, Errors, int]:
    def work(client: Client, i: int, errors: Errors) -> None:
        path = f"/s/data/{small.names[i]}"
        result = client.request("POST", path, ACCEPT, small.bodies[i])
        expect_status(errors, "POST", path, result, (200,))

    return run_clients(server, range(len(small.names)), work)


def v2_listing(server: Server, path: str) -> tuple[float, float, bytes, int, str]:
    """One v2 listing with http.client: (total s, first body byte s, body, status, content type)."""
    if server.tls_ctx is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=600, context=server.tls_ctx)
    try:
        conn.connect()
        t0 = time.perf_counter()
        conn.request("GET", path, headers={"Accept": V2})
        resp = conn.getresponse()
        first = resp.read(1)
        ttfb = time.perf_counter() - t0
        body = first + resp.read()
        total = time.perf_counter() - t0
        return total, ttfb, body, resp.status, resp.getheader("Content-Type", "")
    finally:
        conn.close()


def check_listing(body: bytes, status: int, ctype: str, expected: dict[str, int]) -> str | None:
    if status != 200:
        return f"listing answered {status}: {body[:200]!r}"
    if ctype != V2:
        return f"listing Content-Type {ctype!r}, wanted {V2!r}"
    try:
        entries = json.loads(body)
        got = {e["name"]: e["size"] for e in entries}
    except (ValueError, TypeError, KeyError) as e:
        return f"listing is not a v2 JSON list: {e}: {body[:200]!r}"
    if got != expected:
        missing = len(set(expected) - set(got))
        extra = len(set(got) - set(expected))
        wrong = sum(1 for k, v in got.items() if k in expected and expected[k] != v)
        return f"listing has {len(got)} entries (missing {missing}, unexpected {extra}, wrong size {wrong}), wanted {len(expected)}"
    return None


# --------------------------------------------------------------------------
# The fsync baseline (no server).


def store_durably(tmp: Path, final: Path, parts: Sequence[bytes | memoryview], direct: bool = False) -> None:
    """
    What a server that makes uploads durable does with one: create C{tmp},
    write C{parts}, fsync, rename to C{final}, fsync C{final}'s directory.
    With C{direct}, C{parts} are written with O_DIRECT through a page-aligned
    buffer, whole 4 KiB blocks at a time, the rest through the page cache
    (as resticd writes large uploads); through the page cache alone where
    the filesystem refuses O_DIRECT.
    """
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | (os.O_DIRECT if direct else 0), 0o600)
    except OSError as e:
        if not direct or e.errno != errno.EINVAL:
            raise
        fd, direct = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), False
    try:
        if direct:
            parts = write_direct(fd, parts)
        for part in parts:
            os.write(fd, part)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


_direct_buffers = threading.local()


def write_direct(fd: int, parts: Sequence[bytes | memoryview]) -> list[bytes]:
    """
    Write the whole 4 KiB blocks of C{parts} to C{fd} (opened with O_DIRECT)
    through this thread's page-aligned buffer, in one call, and clear
    O_DIRECT; the rest, to be written through the page cache.
    """
    size = sum(len(part) for part in parts)
    buffer: mmap.mmap | None = getattr(_direct_buffers, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _direct_buffers.buffer = mmap.mmap(-1, max(size, 4096))
    offset = 0
    for part in parts:
        buffer[offset : offset + len(part)] = part
        offset += len(part)
    whole = size - size % 4096
    with memoryview(buffer) as view:
        os.write(fd, view[:whole])
        rest = bytes(view[whole:size])
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
    return [rest] if rest else []


def timed_threads(count: int, threads: int, one: Callable[[int], None]) -> float:
    """
    Seconds it takes C{threads} threads to call C{one} on C{0 .. count-1}
    (thread k takes k, k + threads, ...); the first failure is raised.
    """
    failures: list[BaseException] = []

    def worker(indexes: Sequence[int]) -> None:
        try:
            for i in indexes:
                one(i)
        except BaseException as e:
            failures.append(e)

    workers = [threading.Thread(target=worker, args=(range(k, count, threads),), daemon=True) for k in range(threads)]
    t0 = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        while t.is_alive():
            t.join(0.5)
    elapsed = time.perf_counter() - t0
    if failures:
        raise failures[0]
    return elapsed


def fsync_rate(directory: Path, files: int, threads: int) -> float:
    """Files per second of create+write+fsync+rename+fsync(dir), small files."""
    spool = directory / "spool"
    spool.mkdir(parents=True)
    for i in range(256):
        (directory / f"{i:02x}").mkdir()
    rnd = random.Random(threads)
    bodies = [rnd.randbytes(rnd.randint(64, KiB)) for _ in range(files)]
    names = [hashlib.sha256(b).hexdigest() for b in bodies]

    def one(i: int) -> None:
        store_durably(spool / f"{names[i]}.tmp", directory / names[i][:2] / names[i], [bodies[i]])

    return files / timed_threads(files, threads, one)


def durable_upload_rate(directory: Path, objects: BigObjects, count: int, threads: int) -> float:
    """
    MiB/s of what a server that verifies and fsyncs uploads does per object,
    with no HTTP and no client: sha256 + create + write (with O_DIRECT, the
    faster way here) + fsync + rename + fsync(dir) of C{count} OBJECT_SIZE
    objects, C{threads} at a time (hashlib and write release the GIL, so
    this uses every core).
    """
    spool = directory / "spool"
    spool.mkdir(parents=True)

    def one(i: int) -> None:
        head, tail = objects.parts(i)
        digest = hashlib.sha256(head)
        digest.update(tail)
        name = digest.hexdigest()
        store_durably(spool / name, directory / name, [head, tail], direct=True)

    return count * OBJECT_SIZE / MiB / timed_threads(count, threads, one)


# --------------------------------------------------------------------------
# The restic tree and the restic client.


def generate_tree(root: Path, sizes: Sizes, seed: int = 500) -> tuple[int, int]:
    """Big random files plus many small ones; (files, bytes)."""
    rnd = random.Random(seed)
    files = total = 0
    big = root / "big"
    big.mkdir(parents=True)
    remaining = sizes.tree_big_mib * MiB
    while remaining > 0:
        size = min(remaining, rnd.randint(1 * MiB, 48 * MiB))
        with open(big / f"file{files:03d}.bin", "wb") as f:
            left = size
            while left:
                n = min(left, 4 * MiB)
                f.write(rnd.randbytes(n))
                left -= n
        remaining -= size
        files += 1
        total += size
    for i in range(sizes.tree_small_files):
        d = root / "small" / f"d{i % 60:02d}" / f"e{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        size = rnd.randint(1, 32 * KiB)
        (d / f"f{i:05d}.dat").write_bytes(rnd.randbytes(size))
        files += 1
        total += size
    return files, total


def tree_stats(root: Path) -> tuple[int, int]:
    files = total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            files += 1
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return files, total


def established(port: int) -> int:
    """Established TCP connections whose local port is C{port} (server side)."""
    suffix = f":{port:04X}"
    count = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split(None, 4)
                    if parts[3] == "01" and parts[1].endswith(suffix):
                        count += 1
        except OSError:
            pass
    return count


class ConnectionSampler:
    """The most connections the server had at once, sampled every 50 ms."""

    def __init__(self, port: int):
        self.port = port
        self.most = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.is_set():
            self.most = max(self.most, established(self.port))
            self.done.wait(0.05)

    def __enter__(self) -> "ConnectionSampler":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(1)


RESTIC_STEPS = ("restic_init", "restic_backup", "restic_rebackup", "restic_restore", "restic_check")


def wl_restic(server: Server, restic_bin: str, tree: Path, tree_files: int, tree_bytes: int, rnd: int, cert: Path) -> list[Sample]:
    scheme = "https" if server.proto == "https" else "http"
    work = server.base / "restic"
    work.mkdir()
    env = dict(os.environ, RESTIC_PASSWORD=RESTIC_PASSWORD, RESTIC_REPOSITORY=f"rest:{scheme}://127.0.0.1:{server.port}/restic/",
               HOME=str(work), XDG_CACHE_HOME=str(work / "xdg-cache"))
    common = [restic_bin, "--cache-dir", str(work / "cache")]
    if server.proto == "https":
        common += ["--cacert", str(cert)]
    restore = work / "restore"
    steps = [
        ("restic_init", common + ["init"]),
        ("restic_backup", common + ["backup", "--host", "bench", str(tree)]),
        ("restic_rebackup", common + ["backup", "--host", "bench", str(tree)]),
        ("restic_restore", common + ["restore", "latest", "--target", str(restore)]),
        ("restic_check", common + ["check", "--read-data"]),
    ]
    samples = []
    failed: str | None = None
    for name, argv in steps:
        sample = Sample(name, server.kind, server.proto, rnd)
        samples.append(sample)
        if failed:
            sample.error = f"skipped: {failed}"
            continue
        log = work / f"{name}.log"
        with ConnectionSampler(server.port) as conns, Measure(server) as m:
            status, wall, client_cpu = run_command(argv, log, env, timeout=3600)
        sample.elapsed, sample.cpu, sample.rss = wall, m.cpu, m.rss
        sample.extra["client_cpu"] = round(client_cpu, 3)
        sample.extra["max_connections"] = conns.most
        sample.extra.update(m.noise())
        if status != 0:
            sample.error = f"{' '.join(argv[len(common):])} exited with {status}:\n{log_tail(log, 15)}"
            failed = f"{name} failed"
        elif name == "restic_restore":
            got = tree_stats(restore)
            if got != (tree_files, tree_bytes):
                sample.error = f"restore has {got[0]} files / {got[1]} bytes, the tree {tree_files} / {tree_bytes}"
        if not server.alive():
            sample.error = (sample.error or "") + f" [server exited with {server.proc.returncode if server.proc else '?'}]"
            failed = "server died"
    return samples


# --------------------------------------------------------------------------
# One server, one round: every selected workload in order.


@dataclass
class Context:
    args: argparse.Namespace
    sizes: Sizes
    only: set[str]
    root: Path
    cert: Path
    key: Path
    objects: BigObjects | None
    small: SmallObjects | None
    tree: Path | None
    tree_files: int
    tree_bytes: int
    samples: list[Sample]
    problems: list[str]


def say(message: str, start: list[float] = [time.perf_counter()]) -> None:
    elapsed = time.perf_counter() - start[0]
    print(f"[{int(elapsed) // 60:3d}:{int(elapsed) % 60:02d}] {message}", flush=True)


def server_round(ctx: Context, kind: str, proto: str, rnd: int) -> None:
    base = ctx.root / f"r{rnd}-{proto}-{kind}"
    tls_ctx = None
    if proto == "https":
        tls_ctx = ssl.create_default_context(cafile=str(ctx.cert))
        tls_ctx.set_alpn_protocols(["http/1.1"])
    server = Server(kind, proto, base, ctx.cert, ctx.key, tls_ctx, ctx.args.resticd_args, ctx.args.rclone)
    label = f"round {rnd} {proto:5s} {kind:7s}"
    waited = wait_idle(ctx.args.wait_idle)
    if waited > 1.5:
        say(f"{label} waited {waited:.0f} s for the machine to be idle" + (" (gave up)" if waited >= ctx.args.wait_idle else ""))
    t_run = time.perf_counter()

    def add(sample: Sample, note: str) -> None:
        ctx.samples.append(sample)
        say(f"{label} {sample.metric:16s} {note}" + (f"  ERROR: {sample.error}" if sample.error else ""))

    def sample_of(metric: str, m: Measure, errors: Errors | None, amount: float, reconnects: int = 0) -> Sample:
        s = Sample(metric, kind, proto, rnd, m.elapsed, amount, m.cpu, m.rss)
        if errors is not None:
            s.error = errors.summary()
        s.extra["client_cpu"] = round(m.client_cpu, 3)
        s.extra.update(m.noise())
        if reconnects:
            s.extra["reconnects"] = reconnects
        if not server.alive():
            s.error = (s.error or "") + f" [server exited with {server.proc.returncode if server.proc else '?'}]"
        return s

    try:
        server.start()
        ctx.samples.append(Sample("startup", kind, proto, rnd, server.startup))
        say(f"{label} serving {server.url} (first answer after {server.startup * 1000:.0f} ms)")
        needs_objects = ctx.only & NEEDS_OBJECTS
        uploaded = 0
        if needs_objects:
            create_repo(server, "r")
            assert ctx.objects is not None
            count = ctx.sizes.upload_objects
            m, errors, rc = wl_upload(server, ctx.objects, count)
            s = sample_of("upload", m, errors, count * OBJECT_SIZE, rc)
            if "upload" in ctx.only:
                add(s, f"{count * OBJECT_SIZE / MiB / m.elapsed:8.1f} MiB/s  cpu {fmt(s.cpu)} s, client cpu {m.client_cpu:.2f} s{m.noise_note()}")
            if s.error:
                raise RuntimeError("the upload failed (see its row); download, range and HEAD skipped")
            # untimed spot check of the content
            client = server.client()
            for i in (0, count - 1):
                path = f"/r/data/{ctx.objects.names[i]}"
                status, headers, body, _ = client.request("GET", path, ACCEPT + "Range: bytes=0-\r\n")
                if status not in (200, 206) or body != ctx.objects.content(i):
                    raise RuntimeError(f"GET {path} after upload: {status}, {len(body or b'')} bytes, content differs")
            client.close()
            uploaded = count
            # Whichever way a server wrote them (resticd: past the page cache,
            # with O_DIRECT), the download, range and HEAD rows serve the
            # objects from memory, the cold row from the disk.
            cache_tree(server.data)
        if "download" in ctx.only and ctx.objects is not None:
            m, errors, rc = wl_download(server, ctx.objects, uploaded)
            s = sample_of("download", m, errors, uploaded * OBJECT_SIZE, rc)
            add(s, f"{uploaded * OBJECT_SIZE / MiB / m.elapsed:8.1f} MiB/s  cpu {fmt(s.cpu)} s, client cpu {m.client_cpu:.2f} s{m.noise_note()}")
        if "cold" in ctx.only and ctx.objects is not None:
            m, errors, rc, latencies = wl_cold(server, ctx.objects, uploaded)
            s = sample_of("cold", m, errors, uploaded * OBJECT_SIZE, rc)
            add(s, f"{uploaded * OBJECT_SIZE / MiB / m.elapsed:8.1f} MiB/s  cpu {fmt(s.cpu)} s, client cpu {m.client_cpu:.2f} s{m.noise_note()}")
            p99 = percentile(latencies, 0.99)
            s = Sample("cold_head", kind, proto, rnd, p99, 1, None, None, None if p99 is not None else "no HEAD answered")
            s.extra["median"] = percentile(latencies, 0.5)
            s.extra["count"] = len(latencies)
            add(s, f"{(p99 or 0) * 1000:8.1f} ms  (99th percentile of {len(latencies)} HEADs; median {(s.extra['median'] or 0) * 1000:.1f} ms)")
        if "range" in ctx.only and ctx.objects is not None:
            n = ctx.sizes.range_requests
            m, errors, rc = wl_range(server, ctx.objects, uploaded, n, seed=rnd)
            s = sample_of("range", m, errors, n, rc)
            add(s, f"{n / m.elapsed:8.0f} req/s  cpu {fmt(s.cpu)} s, client cpu {m.client_cpu:.2f} s{m.noise_note()}")
        if "head" in ctx.only and ctx.objects is not None:
            n = ctx.sizes.head_requests
            m, errors, rc = wl_head(server, ctx.objects, uploaded, n, seed=rnd)
            s = sample_of("head", m, errors, n, rc)
            add(s, f"{n / m.elapsed:8.0f} req/s  cpu {fmt(s.cpu)} s, client cpu {m.client_cpu:.2f} s{m.noise_note()}")
        if "stalled" in ctx.only and ctx.objects is not None:
            stalls = [("stalled_h1", wl_stalled_pipelined)]
            if proto == "https":
                stalls.append(("stalled_h2", wl_stalled_h2))
            for metric, workload in stalls:
                growth, problem = workload(server, ctx.objects, uploaded)
                # (at least 1 MiB: a ratio to nothing says nothing)
                s = Sample(metric, kind, proto, rnd, STALL, max(growth, MiB), None, server.peak_rss(), problem)
                s.extra["growth"] = growth
                add(s, f"{growth / MiB:8.1f} MiB more resident while a client read nothing")
        if "small" in ctx.only and ctx.small is not None:
            create_repo(server, "s")
            n = len(ctx.small.names)
            m, errors, rc = wl_small(server, ctx.small)
            s = sample_of("small", m, errors, n, rc)
            add(s, f"{n / m.elapsed:8.0f} obj/s  cpu {fmt(s.cpu)} s, client cpu {m.client_cpu:.2f} s{m.noise_note()}")
            if not s.error:
                expected = {name: len(body) for name, body in zip(ctx.small.names, ctx.small.bodies)}
                totals, ttfbs, cpus, rsss, noises, listing_error = [], [], [], [], [], None
                for _ in range(ctx.sizes.list_repeats):
                    with Measure(server) as m:
                        total, ttfb, body, status, ctype = v2_listing(server, "/s/data/")
                    listing_error = listing_error or check_listing(body, status, ctype, expected)
                    totals.append(total)
                    ttfbs.append(ttfb)
                    cpus.append(m.cpu)
                    rsss.append(m.rss)
                    noises.append(m.noise()["other_share"])
                s = Sample("list", kind, proto, rnd, statistics.median(totals), 1, median_or_none(cpus), max_or_none(rsss), listing_error)
                s.extra["all"] = [round(t, 4) for t in totals]
                s.extra["other_share"] = max(noises)
                add(s, f"{s.elapsed:8.3f} s  ({n} objects; all: {', '.join(f'{t:.3f}' for t in totals)})")
                s = Sample("list_ttfb", kind, proto, rnd, statistics.median(ttfbs), 1, None, None, listing_error)
                s.extra["all"] = [round(t, 4) for t in ttfbs]
                add(s, f"{(s.elapsed or 0) * 1000:8.1f} ms to the first body byte")
        if "restic" in ctx.only and ctx.tree is not None:
            for s in wl_restic(server, ctx.args.restic, ctx.tree, ctx.tree_files, ctx.tree_bytes, rnd, ctx.cert):
                add(s, f"{fmt(s.elapsed, '8.2f')} s  cpu {fmt(s.cpu)} s  (restic cpu {s.extra.get('client_cpu', '-')} s, at most {s.extra.get('max_connections', '-')} TCP connections)"
                       + (f"  [other processes used {s.extra['other_share']:.0%} of the machine]" if s.extra.get("other_share", 0) >= NOISY and s.extra.get("other_cpu", 0) >= 0.1 else ""))
    except (RuntimeError, OSError, HTTPFailure, threading.BrokenBarrierError) as e:
        message = f"{label}: {type(e).__name__}: {e}"
        if server.proc is not None and not server.alive():
            message += f"\n  the server exited with {server.proc.returncode}; log tail:\n{log_tail(server.log_path)}"
        ctx.problems.append(message)
        say(f"{label} ABORTED: {message}")
    finally:
        server.stop()
        if server.proc is not None:
            if server.exit_status not in (0, None) and kind == "resticd":
                ctx.problems.append(f"{label}: resticd exited with status {server.exit_status} on SIGTERM")
            if server.exit_status is None:
                ctx.problems.append(f"{label}: {kind} ignored SIGTERM for {STOP_TIMEOUT} s and was killed")
            for p in server.log_problems():
                ctx.problems.append(f"{label}: {p}")
        if not server.rss_reset_works:
            ctx.problems.append(f"{label}: could not reset VmHWM (clear_refs); RSS is the lifetime peak")
        if not ctx.args.keep:
            shutil.rmtree(base, ignore_errors=True)
        say(f"{label} done in {time.perf_counter() - t_run:.1f} s")


def median_or_none(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def max_or_none(values: Iterable[int | None]) -> int | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


# --------------------------------------------------------------------------
# The table.


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    kind: str  # "bytes" (throughput MiB/s), "req" (per second), "time" (s), "ms" (time in ms), "mib" (memory grown)
    unit: str
    cpu_unit: str  # "GiB", "1000", "total" or ""


METRICS = [
    Metric("startup", "startup, first answer", "ms", "ms", ""),
    Metric("upload", "upload 8 MiB x8", "bytes", "MiB/s", "GiB"),
    Metric("download", "download 8 MiB x8", "bytes", "MiB/s", "GiB"),
    Metric("cold", "cold download 8 MiB x8", "bytes", "MiB/s", "GiB"),
    Metric("cold_head", "HEAD p99 during it", "ms", "ms", ""),
    Metric("range", "range 4-64 KiB x8", "req", "req/s", "1000"),
    Metric("head", "HEAD x8", "req", "req/s", "1000"),
    Metric("stalled_h1", "stalled pipelined GETs", "mib", "MiB", ""),
    Metric("stalled_h2", "stalled HTTP/2 streams", "mib", "MiB", ""),
    Metric("small", "small uploads x8", "req", "obj/s", "1000"),
    Metric("list", "v2 listing, total", "time", "s", "total"),
    Metric("list_ttfb", "v2 listing, 1st byte", "ms", "ms", ""),
    Metric("restic_init", "restic init", "time", "s", "total"),
    Metric("restic_backup", "restic backup", "time", "s", "total"),
    Metric("restic_rebackup", "restic re-backup", "time", "s", "total"),
    Metric("restic_restore", "restic restore", "time", "s", "total"),
    Metric("restic_check", "restic check --read-data", "time", "s", "total"),
]


def value_of(metric: Metric, s: Sample) -> float:
    assert s.elapsed is not None
    if metric.kind == "bytes":
        return s.amount / MiB / s.elapsed
    if metric.kind == "req":
        return s.amount / s.elapsed
    if metric.kind == "ms":
        return s.elapsed * 1000
    if metric.kind == "mib":
        return s.amount / MiB
    return s.elapsed


def cpu_of(metric: Metric, s: Sample) -> float | None:
    if s.cpu is None or not metric.cpu_unit:
        return None
    if metric.cpu_unit == "GiB":
        return s.cpu / (s.amount / GiB)
    if metric.cpu_unit == "1000":
        return s.cpu / s.amount * 1000
    return s.cpu


def speed(metric: Metric, resticd: float, peer: float) -> float:
    """peer_time / resticd_time: > 1 means resticd is faster."""
    if metric.kind in ("bytes", "req"):
        return resticd / peer
    return peer / resticd


def build_rows(samples: list[Sample], protos: Sequence[str], fsync: dict[str, list[float]],
               durable: list[float]) -> list[dict[str, Any]]:
    rows = []
    for proto in protos:
        for metric in METRICS:
            row: dict[str, Any] = {"proto": proto, "metric": metric.key, "label": metric.label, "unit": metric.unit,
                                   "cpu_unit": metric.cpu_unit}
            per_round: dict[str, dict[int, float]] = {}
            present = False
            for server in SERVERS:
                mine = [s for s in samples if s.metric == metric.key and s.proto == proto and s.server == server]
                present = present or bool(mine)
                good = [s for s in mine if not s.error and s.elapsed]
                values = [value_of(metric, s) for s in good]
                cpus = [c for c in (cpu_of(metric, s) for s in good) if c is not None]
                rsss = [s.rss for s in mine if s.rss is not None]
                per_round[server] = {s.round: value_of(metric, s) for s in good}
                row[server] = {
                    "values": [round(v, 4) for v in values],
                    "median": statistics.median(values) if values else None,
                    "cpu_per_unit": statistics.median(cpus) if cpus else None,
                    "peak_rss": max(rsss) if rsss else None,
                    "failures": [s.error for s in mine if s.error],
                }
                if metric.key.startswith("restic_"):
                    row[server]["max_connections"] = [s.extra.get("max_connections") for s in mine]
            if not present:
                continue
            a, b = row["resticd"]["median"], row["rclone"]["median"]
            row["speed_ratio"] = speed(metric, a, b) if a and b else None
            pairs = [speed(metric, per_round["resticd"][r], per_round["rclone"][r])
                     for r in per_round["resticd"] if r in per_round["rclone"] and per_round["rclone"][r] and per_round["resticd"][r]]
            row["speed_ratio_rounds"] = [round(p, 3) for p in pairs]
            row["target"] = target(metric.key, proto, row, fsync, durable)
            rows.append(row)
    return rows


def target(key: str, proto: str, row: dict[str, Any], fsync: dict[str, list[float]], durable: list[float]) -> str:
    """The target for this row (bench/README.md, Targets), and whether the medians meet it."""
    ratio = row.get("speed_ratio")
    r, p = row["resticd"], row["rclone"]

    def mark(ok: bool | None) -> str:
        return "" if ok is None else (" ok" if ok else " MISS")

    if key == "startup":
        return "<=300 ms" + mark(None if r["median"] is None else r["median"] <= 300)
    if ratio is None:
        return ""
    if key == "upload":
        cpu_ok = None
        if r["cpu_per_unit"] is not None and p["cpu_per_unit"] is not None:
            cpu_ok = r["cpu_per_unit"] <= p["cpu_per_unit"] + 0.85
        bound = ""
        if durable and r["median"] is not None:
            row["vs_durable_baseline"] = rel = r["median"] / statistics.median(durable)
            bound = f" ({rel:.2f}x durable baseline)"
        return f">=0.6x{mark(ratio >= 0.6)}; cpu<=peer+0.85{mark(cpu_ok)}{bound}"
    if key == "download":
        if proto == "http":
            cpu_ok = None
            if r["cpu_per_unit"] is not None and p["cpu_per_unit"] is not None:
                cpu_ok = r["cpu_per_unit"] <= p["cpu_per_unit"]
            return f">=1.2x{mark(ratio >= 1.2)}; cpu<=peer{mark(cpu_ok)}"
        return f">=0.9x{mark(ratio >= 0.9)}"
    if key == "cold":
        return "(printed, not judged)"
    if key == "cold_head":
        return "<=50 ms" + mark(None if r["median"] is None else r["median"] <= 50)
    if key == "range":
        return f">=1.0x{mark(ratio >= 1.0)}"
    if key == "head":
        return f">=0.25x{mark(ratio >= 0.25)}"
    if key in ("stalled_h1", "stalled_h2"):
        return "<=16 MiB" + mark(None if r["median"] is None else r["median"] <= 16)
    if key == "small":
        base = fsync.get("1") or []
        if not base or r["median"] is None:
            return ">=0.8x fsync rate (no baseline)"
        rel = r["median"] / statistics.median(base)
        row["vs_fsync_1thread"] = rel
        return f"{rel:.2f}x fsync rate, >=0.8x{mark(rel >= 0.8)}"
    if key == "list":
        return "(printed, not judged)"
    if key == "list_ttfb":
        return "<=50 ms" + mark(None if r["median"] is None else r["median"] <= 50)
    if key in ("restic_backup", "restic_restore", "restic_check"):
        return f"time <=1.10x peer (>=0.91x){mark(ratio >= 1 / 1.10)}"
    return ""


def mib(value: int | None, limit: bool = True) -> str:
    return "-" if value is None else f"{value / MiB:.0f}{'!' if limit and value > RSS_LIMIT else ''}"


def ratiofmt(ratio: float | None) -> str:
    if not ratio:
        return "-"
    return f"{ratio:.0f}x" if ratio >= 100 else f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"


def print_table(rows: list[dict[str, Any]], protos: Sequence[str]) -> None:
    header = (f"{'workload':26s} {'unit':6s} {'resticd':>9s} {'rclone':>9s} {'speed':>6s} {'(per round)':18s} "
              f"{'cpu resticd':>11s} {'cpu rclone':>10s} {'cpu unit':9s} {'rss MiB r/p':>11s}  target")
    for proto in protos:
        mine = [r for r in rows if r["proto"] == proto]
        if not mine:
            continue
        print()
        print(f"== {proto} ==  speed = peer_time / resticd_time (> 1: resticd faster); values are medians over rounds")
        print(header)
        print("-" * len(header))
        for row in mine:
            r, p = row["resticd"], row["rclone"]
            spec = ".0f" if row["unit"] in ("req/s", "obj/s", "ms") and (r["median"] or 0) >= 100 else ".3f" if row["unit"] in ("s", "ms") else ".1f"
            cpu_unit = {"GiB": "s/GiB", "1000": "s/1000req", "total": "s", "": ""}[row["cpu_unit"]]
            ratio = row.get("speed_ratio")
            rounds = row.get("speed_ratio_rounds") or []
            spread = f"({ratiofmt(min(rounds))[:-1]}-{ratiofmt(max(rounds))[:-1]})" if len(rounds) > 1 else ""
            rv = "FAIL" if r["failures"] and r["median"] is None else fmt(r["median"], spec)
            pv = "FAIL" if p["failures"] and p["median"] is None else fmt(p["median"], spec)
            if r["failures"] and r["median"] is not None:
                rv += "*"
            if p["failures"] and p["median"] is not None:
                pv += "*"
            print(f"{row['label']:26s} {row['unit']:6s} {rv:>9s} {pv:>9s} "
                  f"{ratiofmt(ratio):>6s} {spread:18s} "
                  f"{fmt(r['cpu_per_unit'], '.3f'):>11s} {fmt(p['cpu_per_unit'], '.3f'):>10s} {cpu_unit:9s} "
                  f"{mib(r['peak_rss']) + '/' + mib(p['peak_rss'], False):>11s}  {row.get('target', '')}")
        conns = []
        for server in SERVERS:
            steps = []
            for key in RESTIC_STEPS:
                found = [r for r in mine if r["metric"] == key]
                if found:
                    steps.append("/".join(str(c) for c in found[0][server].get("max_connections", [])) or "-")
            if steps:
                conns.append(f"{server} {' '.join(steps)}")
        if conns:
            print(f"restic: most TCP connections at once per step (init backup re-backup restore check; per round): {'; '.join(conns)}")
    if any(row[server]["failures"] for row in rows for server in SERVERS):
        print("\n* = some rounds failed (see FAILURES)")
    if any((row["resticd"]["peak_rss"] or 0) > RSS_LIMIT for row in rows):
        print("! = resticd's peak RSS above 100 MiB (the target)")


# --------------------------------------------------------------------------
# Environment.


def command_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=30).stdout
        return out.strip().splitlines()[0] if out.strip() else "?"
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable ({e})"


def free_page_reporting() -> str:
    """
    Whether this (virtual) machine hands free memory back to its host. When
    it does, memory that has stayed free for a few seconds must be supplied
    afresh by the host when it is next used, which is slow: how much of a
    workload pays for it depends on how it allocates memory (see
    bench/README.md), and no warming-up survives the idle waits.
    """
    order = Path("/sys/module/page_reporting/parameters/page_reporting_order")
    balloons = Path("/sys/bus/virtio/drivers/virtio_balloon")
    if not balloons.exists():
        return "no virtio balloon"
    try:
        reporting_order = int(order.read_text())
    except (OSError, ValueError):
        return "unknown (virtio balloon present)"
    return f"likely (virtio balloon; free blocks of {4 << reporting_order} KiB and more are reported)"


def server_openssl() -> str:
    """The OpenSSL that resticd's TLS runs on: pyOpenSSL's, which is the one
    bundled with the cryptography wheel, not necessarily the system's that
    Python's ssl module (the benchmark's client) uses."""
    try:
        from OpenSSL import SSL

        return SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    except Exception:
        return "?"


def environment(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    import resticd
    import twisted

    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for module in ("OpenSSL", "h2", "cryptography"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:
            versions[module] = "?"
    fs = "?"
    try:
        best = ""
        target = str(root.resolve())
        for line in open("/proc/mounts"):
            dev, mount, fstype = line.split()[:3]
            if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, fs = mount, f"{fstype} on {dev} (mounted at {mount})"
    except OSError:
        pass
    git = command_version(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "resticd": f"{resticd.__version__} (git {git})",
        "twisted": twisted.__version__,
        "pyopenssl": versions["OpenSSL"],
        "h2": versions["h2"],
        "cryptography": versions["cryptography"],
        "openssl_resticd": server_openssl(),
        "openssl_client": ssl.OPENSSL_VERSION,
        "rclone": command_version([args.rclone, "version"]),
        "restic": command_version([args.restic, "version"]),
        "data_filesystem": fs,
        "free_page_reporting": free_page_reporting(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "tmp": str(root),
    }


# --------------------------------------------------------------------------


def warm_memory(root: Path, gib: float) -> float:
    """
    Write C{gib} GiB to a file below C{root} and delete it; return the
    seconds it took. On a virtual machine the host backs guest memory on
    first touch, which makes the first write of fresh page-cache pages
    several times slower (seen here: 2.9 s for the first GiB written,
    0.2 s for later ones): whichever server writes first would pay for it.
    """
    started = time.perf_counter()
    path = root / "warm-memory"
    block = bytes(MiB)
    with open(path, "wb") as f:
        for _ in range(int(gib * 1024)):
            f.write(block)
    path.unlink()
    return time.perf_counter() - started


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round with small sizes: a smoke run (~2 minutes)")
    parser.add_argument("--only", nargs="+", choices=WORKLOADS, metavar="WORKLOAD",
                        help=f"run only these workloads ({', '.join(WORKLOADS)})")
    parser.add_argument("--rounds", type=int, help="rounds per server (default 3, 1 with --quick)")
    proto = parser.add_mutually_exclusive_group()
    proto.add_argument("--https", action="store_true", help="only https (default: plain http and https)")
    proto.add_argument("--http", action="store_true", help="only plain http")
    parser.add_argument("--json", metavar="FILE", help="also write the table and every sample as JSON")
    parser.add_argument("--tmpdir", metavar="DIR", help="where the data dirs go (default: $TMPDIR or /tmp); sets the filesystem measured")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories (logs, data) for inspection")
    parser.add_argument("--resticd-args", default="", metavar="ARGS", type=shlex.split,
                        help="extra resticd options, e.g. --resticd-args='--no-http2'")
    parser.add_argument("--wait-idle", type=float, default=60.0, metavar="SECONDS",
                        help="before each server run, wait up to this long for the machine to be idle (<10%% busy for 1 s); 0: don't (default 60)")
    parser.add_argument("--warm-memory", type=float, default=4.0, metavar="GIB",
                        help="before measuring, write and delete this many GiB in the data filesystem, so that no server "
                        "pays for the first touch of memory pages (slow on virtual machines; it does not last where the VM reports free memory to its host); 0: don't (default 4)")
    parser.add_argument("--rclone", default="rclone", help="the rclone binary (default: rclone)")
    parser.add_argument("--restic", default="restic", help="the restic binary (default: restic)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    only = set(args.only or WORKLOADS)
    protos = ["https"] if args.https else ["http"] if args.http else ["http", "https"]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGHUP, on_sigterm)
    t_start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="resticd-bench-", dir=args.tmpdir))
    status = 0
    try:
        from resticd.certs import write_self_signed

        env = environment(args, root)
        print("resticd benchmark (bench/run.py)")
        for k, v in env.items():
            print(f"  {k:19s} {v}")
        print(f"  {'mode':19s} {'quick' if args.quick else 'full'}, {args.rounds} round(s), {', '.join(protos)}, "
              f"workloads: {', '.join(w for w in WORKLOADS if w in only)}, {CLIENTS} concurrent clients")
        print(f"  {'sizes':19s} {sizes}")
        if args.resticd_args:
            print(f"  {'resticd args':19s} {' '.join(args.resticd_args)}")
        print(flush=True)

        cert_file, key_file = write_self_signed(str(root / "tls"))
        objects = small = tree = None
        tree_files = tree_bytes = 0
        t = time.perf_counter()
        if only & NEEDS_OBJECTS:
            objects = BigObjects(sizes.upload_objects)
        if "small" in only:
            small = SmallObjects(sizes.small_objects)
        if objects or small:
            say(f"objects prepared in {time.perf_counter() - t:.1f} s")
        if "restic" in only:
            t = time.perf_counter()
            tree = root / "tree"
            tree_files, tree_bytes = generate_tree(tree, sizes)
            say(f"restic tree: {tree_files} files, {tree_bytes / MiB:.0f} MiB, generated in {time.perf_counter() - t:.1f} s")

        if args.warm_memory > 0:
            seconds = warm_memory(root, args.warm_memory)
            say(f"wrote and deleted {args.warm_memory:g} GiB to warm the page cache's memory in {seconds:.1f} s")

        ctx = Context(args, sizes, only, root, Path(cert_file), Path(key_file), objects, small, tree, tree_files, tree_bytes, [], [])
        fsync: dict[str, list[float]] = {"1": [], str(CLIENTS): []}
        durable: list[float] = []
        for rnd in range(1, args.rounds + 1):
            if only & {"fsync", "small"}:
                for threads in (1, CLIENTS):
                    d = root / f"fsync-{rnd}-{threads}"
                    waited = wait_idle(args.wait_idle)
                    if waited > 1.5:
                        say(f"round {rnd} fsync baseline: waited {waited:.0f} s for the machine to be idle")
                    rate = fsync_rate(d, sizes.fsync_files, threads)
                    shutil.rmtree(d, ignore_errors=True)
                    fsync[str(threads)].append(rate)
                    say(f"round {rnd} fsync baseline, {threads} thread(s): {rate:.0f} files/s")
            if "upload" in only and objects is not None:
                d = root / f"durable-{rnd}"
                waited = wait_idle(args.wait_idle)
                if waited > 1.5:
                    say(f"round {rnd} durable upload baseline: waited {waited:.0f} s for the machine to be idle")
                rate = durable_upload_rate(d, objects, sizes.upload_objects, CLIENTS)
                shutil.rmtree(d, ignore_errors=True)
                durable.append(rate)
                say(f"round {rnd} durable upload baseline, {CLIENTS} threads: {rate:.0f} MiB/s")
            if only - {"fsync"}:
                order = SERVERS if rnd % 2 else SERVERS[::-1]
                for proto in protos:
                    for kind in order:
                        server_round(ctx, kind, proto, rnd)

        rows = build_rows(ctx.samples, protos, fsync, durable)
        total = time.perf_counter() - t_start
        print()
        print(f"Results ({args.rounds} round(s), {total / 60:.1f} min in all)")
        if fsync["1"]:
            print()
            print(f"fsync baseline (no server; create+write+fsync+rename+fsync(dir) of <=1 KiB files, {sizes.fsync_files} files, {env['data_filesystem']}):")
            for nthreads, rates in fsync.items():
                if rates:
                    print(f"  {nthreads} thread(s): median {statistics.median(rates):.0f} files/s  (rounds: {', '.join(f'{r:.0f}' for r in rates)})")
        if durable:
            print()
            print(f"durable upload baseline (no server, no client; sha256 + create + O_DIRECT write + fsync + rename + fsync(dir) "
                  f"of {sizes.upload_objects} x 8 MiB, {CLIENTS} threads): median {statistics.median(durable):.0f} MiB/s  "
                  f"(rounds: {', '.join(f'{r:.0f}' for r in durable)})")
        if rows:
            print_table(rows, protos)
        shares = [(sm.extra["other_share"], sm) for sm in ctx.samples if "other_share" in sm.extra]
        if shares:
            noisy = sorted((x for x in shares if x[0] >= NOISY and x[1].extra.get("other_cpu", 1) >= 0.1), key=lambda x: -x[0])
            print(f"\nOther processes' CPU during the measurements (share of the machine): median "
                  f"{statistics.median(x[0] for x in shares):.0%}, max {max(x[0] for x in shares):.0%}; "
                  f"{len(noisy)} of {len(shares)} measurements at {NOISY:.0%} or more"
                  + (": " + ", ".join(f"{sm.proto} {sm.metric} {sm.server} r{sm.round} {x:.0%}" for x, sm in noisy[:12]) if noisy else "")
                  + ("" if not noisy else " -- the machine was not idle; treat those rows with care"))
        print(f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        failures = [(row, server) for row in rows for server in SERVERS if row[server]["failures"]]
        if failures or ctx.problems:
            status = 1
            print("\nFAILURES")
            for row, server in failures:
                for f in row[server]["failures"]:
                    print(f"  {row['proto']} {row['metric']} {server}: {f}")
            for p in ctx.problems:
                print("  " + p.replace("\n", "\n    "))
        if args.json:
            out = {
                "env": env,
                "args": {k: v for k, v in vars(args).items()},
                "sizes": dataclasses.asdict(sizes),
                "duration_s": round(total, 1),
                "fsync_files_per_s": fsync,
                "durable_upload_mib_per_s": durable,
                "rows": rows,
                "samples": [vars(s) for s in ctx.samples],
                "problems": ctx.problems,
            }
            Path(args.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
            print(f"\nJSON written to {args.json}")
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({str(e) or 'Ctrl-C'}); stopping servers and cleaning up", file=sys.stderr)
        status = 130
    finally:
        stop_all()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
