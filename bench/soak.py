#!/usr/bin/env python3
"""
The long variants of resticd's fault tests, run by hand.

    .venv/bin/python bench/soak.py [--cycles 500] [--fuzz 200000] [--seconds N]

Four parts, each against the real daemon unless said otherwise:

crash   kill -9 cycles: client threads upload random objects as fast as they
        can, the daemon is SIGKILLed at a random moment and restarted over
        the same data directory; after every restart every acknowledged
        upload must be there intact, no file under a final name partial, no
        temp file in a repository or a listing, the spool empty
        (tests/test_crash.py's harness, for many more cycles).
restic  rounds of a restic backup (~100 MiB) whose server is SIGKILLed in
        the middle and restarted; then unlock, a second backup, check
        --read-data, restore and byte compare.
fuzz    the hypothesis fuzz target of tests/test_fuzz.py (in memory, against
        the real site), when that file exists; skipped with a note if not.
leak    thousands of misbehaving requests (uploads dropped mid-body, bodies
        shorter and longer than their Content-Length, downloads aborted,
        headers dropped half-way, a slowloris batch): the daemon's open file
        descriptors (/proc/PID/fd) and RSS must come back to their baseline,
        nothing may stay in the spool, and it must still serve.

At the end it prints one table; the exit status is 0 when nothing was found
and 1 otherwise. --seconds bounds the whole run: each part gets a share and
stops early (crash cycles and fuzz cases are counted as far as they got).
"""

from __future__ import annotations

import argparse
import http.client
import importlib
import os
import random
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.daemon import Daemon, running, sha256_hex  # noqa: E402
from tests.test_crash import (  # noqa: E402
    CycleStats,
    Findings,
    Ledger,
    Verifier,
    big_tree,
    restic_crash_round,
    run_cycles,
)

MIB = 1 << 20
#: Share of --seconds for each part, in the order they run.
SHARES = {"leak": 0.10, "restic": 0.20, "fuzz": 0.25, "crash": 0.45}
PARTS = tuple(SHARES)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Row:
    part: str
    metric: str
    value: str
    ok: bool = True


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, part: str, metric: str, value: object, ok: bool = True) -> None:
        self.rows.append(Row(part, metric, str(value), ok))

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def table(self) -> str:
        width = max((len(r.metric) for r in self.rows), default=10)
        vwidth = max((len(r.value) for r in self.rows), default=5)
        lines = [f"{'part':<7} {'metric':<{width}}  {'value':<{vwidth}}  verdict", "-" * (width + vwidth + 21)]
        for r in self.rows:
            lines.append(f"{r.part:<7} {r.metric:<{width}}  {r.value:<{vwidth}}  {'ok' if r.ok else 'FOUND'}")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


# -- crash -------------------------------------------------------------------------


@dataclass
class CrashTally:
    """
    Everything the crash part's verifications found, over all restarts.
    """

    lost: set[str] = field(default_factory=set)
    partial: set[str] = field(default_factory=set)
    stray: set[str] = field(default_factory=set)
    resurrected: set[str] = field(default_factory=set)
    spool: int = 0
    listings: int = 0
    reads: int = 0
    unexpected: list[str] = field(default_factory=list)
    bad_cycles: list[int] = field(default_factory=list)
    verified: int = 0
    expected: int = 0
    intact: int = 0


def crash_part(report: Report, tmp: Path, cycles: int, deadline: float | None, seed: int) -> None:
    data = tmp / "data"
    ledger = Ledger()
    verifier = Verifier(data)
    rng = random.Random(seed)
    tally = CrashTally()
    started = time.monotonic()

    def check(cycle: int, findings: Findings, stats: CycleStats) -> None:
        tally.verified += 1
        tally.lost.update(findings.lost)
        tally.partial.update(findings.partial)
        tally.stray.update(findings.stray)
        tally.resurrected.update(findings.resurrected)
        tally.spool += len(findings.spool)
        tally.listings += len(findings.listings)
        tally.reads += len(findings.reads)
        with ledger.lock:
            fresh = list(ledger.unexpected)
            ledger.unexpected.clear()
        tally.unexpected.extend(fresh)
        problems = findings.problems()
        if problems or fresh:
            tally.bad_cycles.append(cycle)
            log(f"crash: after kill {cycle}: {problems} {fresh[:3]}")
        missing = {line.split(" ", 1)[0].rstrip(":") for line in findings.lost}
        tally.expected = len(ledger.acked)
        tally.intact = len([o for o in ledger.acked.values() if o.url_path not in missing])
        if cycle and cycle % 10 == 0:
            rate = cycle / (time.monotonic() - started)
            log(
                f"crash: {cycle} kills, {ledger.acks} uploads acknowledged, {len(ledger.acked)} objects kept, "
                f"{stats.spool_leftovers_at_kill} spool files left by kills, {rate * 60:.0f} kills/min"
            )

    stats = CycleStats()
    error = None
    try:
        stats = run_cycles(tmp / "daemons", data, cycles, ledger, verifier, rng, check, deadline=deadline)
    except Exception as e:  # a daemon that would not start, a failed request of the harness
        error = f"{type(e).__name__}: {str(e)[:500]}"
        traceback.print_exc()
    survived = stats.cycles - len([c for c in tally.bad_cycles if c > 0])
    report.add(
        "crash",
        "kill -9 cycles survived",
        f"{survived}/{stats.cycles} (asked {cycles})",
        survived == stats.cycles and error is None,
    )
    if error:
        report.add("crash", "harness error", error, False)
    report.add("crash", "uploads acknowledged (200)", f"{ledger.acks} ({ledger.reuploads} re-uploads)")
    report.add(
        "crash",
        "acknowledged objects found intact",
        f"{tally.intact}/{tally.expected} at the last restart; {len(ledger.deleted)} deleted (200), "
        f"{len(ledger.uncertain)} deletes cut by a kill",
        tally.intact == tally.expected,
    )
    report.add("crash", "acknowledged uploads lost (ever)", len(tally.lost), not tally.lost)
    report.add("crash", "partial files under final names", len(tally.partial), not tally.partial)
    report.add("crash", "temp/stray files in repositories", len(tally.stray), not tally.stray)
    report.add("crash", "acknowledged deletes undone", len(tally.resurrected), not tally.resurrected)
    report.add(
        "crash",
        "spool leftovers once serving",
        f"{tally.spool} (kills left {stats.spool_leftovers_at_kill}, removed at startup)",
        not tally.spool,
    )
    report.add("crash", "listing mismatches", tally.listings, not tally.listings)
    report.add("crash", "bad reads of acknowledged objects", tally.reads, not tally.reads)
    report.add("crash", "non-200 answers / errors while up", len(tally.unexpected), not tally.unexpected)
    report.add("crash", "requests in flight at the kills", stats.killed_in_flight)
    report.add("crash", "files hashed", f"{verifier.files_hashed} in {tally.verified} verifications")
    for line in sorted(tally.lost)[:5] + sorted(tally.partial)[:5] + tally.unexpected[:5]:
        report.notes.append(f"crash: {line}")


# -- restic ------------------------------------------------------------------------


def restic_part(report: Report, tmp: Path, rounds: int, deadline: float | None, restic: str | None, seed: int) -> None:
    if restic is None:
        report.notes.append("restic: not installed; the restic rounds were skipped")
        report.add("restic", "kill-and-rerun rounds", "skipped (no restic)")
        return
    source = big_tree(tmp / "source", seed)
    rng = random.Random(seed)
    passed = 0
    ran = 0
    resumed = 0
    problems: list[str] = []
    for i in range(rounds):
        if deadline is not None and time.monotonic() > deadline and ran:
            break
        ran += 1
        started = time.monotonic()
        try:
            outcome = restic_crash_round(tmp / f"round{i}", restic, source, kill_fraction=rng.uniform(0.15, 0.8))
        except (AssertionError, Exception) as e:
            problems.append(f"round {i}: {type(e).__name__}: {str(e)[:800]}")
            log(f"restic: round {i} FAILED: {str(e)[:300]}")
            continue
        finally:
            shutil.rmtree(tmp / f"round{i}", ignore_errors=True)
        if outcome.first_exit == 0:
            resumed += 1
        if outcome.findings.problems():
            problems.append(f"round {i}: {outcome.findings.problems()}")
        else:
            passed += 1
        log(
            f"restic: round {i}: killed at {outcome.killed_at_bytes // MIB}/{outcome.total_bytes // MIB} MiB, "
            f"{outcome.spool_leftovers} spool files left, first backup exit {outcome.first_exit}, "
            f"{time.monotonic() - started:.0f} s"
        )
    report.add("restic", "kill-and-rerun rounds passed", f"{passed}/{ran}", passed == ran)
    report.add("restic", "backups that carried on through the crash", f"{resumed}/{ran}")
    report.notes.extend(f"restic: {p}" for p in problems)


# -- fuzz --------------------------------------------------------------------------


def failure_messages(error: BaseException) -> list[str]:
    """
    The first line of each failure hypothesis reports (one, or several in
    an exception group).
    """
    if isinstance(error, BaseExceptionGroup):
        return [m for sub in error.exceptions for m in failure_messages(sub)]
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return [type(error).__name__]
    # The first lines say what failed; a logged traceback ends with the error.
    shown = lines[:2] + (lines[-1:] if len(lines) > 2 else [])
    return [" | ".join(shown)[:400]]


def fuzz_part(report: Report, tmp: Path, total: int, deadline: float | None) -> None:
    try:
        fuzz = importlib.import_module("tests.test_fuzz")
    except ImportError as e:
        report.notes.append(f"fuzz: tests/test_fuzz.py is not there or does not import ({e}); skipped")
        report.add("fuzz", "cases tried", "skipped")
        return
    needed = ("cases", "Arena", "run_case", "VARIANTS")
    if not all(hasattr(fuzz, name) for name in needed):
        report.notes.append(f"fuzz: tests/test_fuzz.py lacks one of {needed}; skipped")
        report.add("fuzz", "cases tried", "skipped")
        return
    from hypothesis import HealthCheck, Verbosity, given, settings

    variants = sorted(fuzz.VARIANTS)
    # The server logs failures (which the fuzz target counts); keep Twisted
    # from also printing them on stderr.
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([], redirectStandardIO=False)
    arenas: dict[str, Any] = {}
    failures: dict[str, int] = {}
    escapes: dict[str, int] = {}
    chunk = max(1, min(5000, -(-total // len(variants))))
    asked = 0
    generation = 0
    tried_before = 0
    statuses: dict[int, int] = {}

    def arena(variant: str) -> Any:
        nonlocal generation
        if variant not in arenas:
            generation += 1
            arenas[variant] = fuzz.Arena.create(tmp / f"{variant}-{generation}", variant)
        return arenas[variant]

    per_variant: dict[str, int] = {}

    def retire(variant: str) -> None:
        nonlocal tried_before
        done = arenas.pop(variant)
        tried_before += done.cases
        per_variant[variant] = per_variant.get(variant, 0) + done.cases
        for code, count in done.statuses.items():
            statuses[code] = statuses.get(code, 0) + count
        shutil.rmtree(done.base, ignore_errors=True)

    examples: dict[str, str] = {}

    def one_case(variant: str, case: Any) -> None:
        """
        Run one case; a failure is counted (grouped by its message without
        the bodies it quotes) and the fuzz goes on rather than stopping at
        the first failure. What the failed case skipped (the spool, the
        surroundings, the planted files) is checked and restored here; an
        arena that cannot be restored is replaced.
        """
        current = arena(variant)
        try:
            fuzz.run_case(current, case)
            return
        except AssertionError as e:
            messages = failure_messages(e)
        spool = Path(current.root) / ".spool"
        left = os.listdir(spool) if spool.is_dir() else []
        if left:
            messages.append(f"spool files left after the connection closed: {len(left)}")
        try:
            current.check_surroundings()
            current.replant()
        except (AssertionError, OSError) as e:
            messages += failure_messages(e)
            retire(variant)
        for message in messages:
            key = re.sub(r"0x[0-9a-f]+|\d+", "N", re.sub(r"""\bb(['"]).*""", "...", message))
            kind = escapes if ("outside the data root" in message or "symlink" in message) else failures
            if key not in kind:
                examples[key] = message
                log(f"fuzz: {variant}: {message}")
            kind[key] = kind.get(key, 0) + 1

    while asked < total and not (deadline is not None and time.monotonic() > deadline):
        for variant in variants:
            n = min(chunk, total - asked)
            if n <= 0 or (deadline is not None and time.monotonic() > deadline):
                break
            asked += n

            @settings(
                max_examples=n,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
                verbosity=Verbosity.quiet,
            )
            @given(case=fuzz.cases())
            def run(case: Any) -> None:
                one_case(variant, case)

            run()
        log(f"fuzz: {tried_before + sum(a.cases for a in arenas.values())} cases so far")
    for variant in list(arenas):
        retire(variant)
    tried = tried_before
    report.add("fuzz", "cases tried", f"{tried} ({', '.join(f'{v} {n}' for v, n in sorted(per_variant.items()))})")
    report.add("fuzz", "escapes found (outside the root, distinct)", len(escapes), not escapes)
    report.add("fuzz", "other property failures (distinct)", len(failures), not failures)
    report.add("fuzz", "statuses seen", " ".join(f"{k}:{v}" for k, v in sorted(statuses.items())))
    report.notes.extend(
        f"fuzz: {count} x {examples[key]}" for key, count in list(escapes.items()) + list(failures.items())
    )


# -- leaks -------------------------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _abort(sock: socket.socket) -> None:
    """
    Close with a reset (SO_LINGER 0), as a crashed or killed client does.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _drain(sock: socket.socket, seconds: float) -> bytes:
    sock.settimeout(seconds)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, OSError):
        pass
    return out


_POOL = random.Random(7).randbytes(4 * MIB + 1)
MISBEHAVIOURS = ("drop-upload", "short-body", "long-body", "abort-download", "drop-headers")


def misbehave(kind: str, daemon: Daemon, rng: random.Random, big: str) -> None:
    sock = socket.create_connection((daemon.host, daemon.port), timeout=10)
    try:
        if kind == "drop-upload":
            length = rng.randrange(64 * 1024, 4 * MIB)
            name = "%064x" % rng.getrandbits(256)
            sock.sendall(b"POST /leak/data/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (name.encode(), length))
            sent = rng.randrange(0, length)
            sock.sendall(_POOL[:sent])
            time.sleep(rng.uniform(0, 0.01))  # let the server start on the body
            _abort(sock)
        elif kind == "short-body":
            length = rng.randrange(1024, 1 * MIB)
            name = "%064x" % rng.getrandbits(256)
            sock.sendall(b"POST /leak/data/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (name.encode(), length))
            sock.sendall(_POOL[: rng.randrange(0, length)])
            sock.shutdown(socket.SHUT_WR)
            _drain(sock, 5)
            sock.close()
        elif kind == "long-body":
            length = rng.randrange(1, 64 * 1024)
            body = rng.randbytes(length)
            sock.sendall(
                b"POST /leak/data/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (sha256_hex(body).encode(), length)
                + body
                + rng.randbytes(rng.randrange(1, 4096))
            )
            sock.shutdown(socket.SHUT_WR)
            _drain(sock, 5)
            sock.close()
        elif kind == "abort-download":
            sock.sendall(b"GET /leak/data/%s HTTP/1.1\r\nHost: x\r\nRange: bytes=0-\r\n\r\n" % big.encode())
            sock.recv(rng.randrange(1, 65536))
            _abort(sock)
        elif kind == "drop-headers":
            request = b"POST /leak/data/%064x HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" % rng.getrandbits(256)
            sock.sendall(request[: rng.randrange(1, len(request) - 1)])
            _abort(sock)
    except OSError:
        sock.close()


def slowloris(daemon: Daemon, connections: int, timeout: float, request_line: bool) -> tuple[int, float]:
    """
    C{connections} clients dripping one byte every 0.2 s: of a long request
    line (C{request_line}), or of a header after a complete request line.
    How many the server closed within C{3 * timeout + 10} seconds, and the
    longest it took.
    """
    if request_line:
        drip = b"GET /leak/data/" + b"0" * 64 + b"?" + b"x" * 1000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        first = b""
    else:
        first = b"POST /leak/data/" + b"0" * 64 + b" HTTP/1.1\r\nHost: x\r\n"
        drip = b"X-Drip: " + b"a" * 1000 + b"\r\n\r\n"
    socks = [socket.create_connection((daemon.host, daemon.port), timeout=10) for _ in range(connections)]
    for sock in socks:
        sock.sendall(first)
    started = time.monotonic()
    closed: dict[int, float] = {}
    i = 0
    while len(closed) < connections and time.monotonic() - started < timeout * 3 + 10:
        for n, sock in enumerate(socks):
            if n in closed:
                continue
            try:
                sock.sendall(drip[i : i + 1])
                sock.setblocking(False)
                try:
                    if sock.recv(4096) == b"":
                        closed[n] = time.monotonic() - started
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
            except OSError:
                closed[n] = time.monotonic() - started
        i += 1
        time.sleep(0.2)
    for sock in socks:
        sock.close()
    return len(closed), max(closed.values(), default=0.0)


@dataclass
class Peaks:
    """
    The most open fds and spool files seen while a storm ran.
    """

    fds: int = 0
    spool: int = 0


def storm(daemon: Daemon, requests: int, big: str, seed: int, threads: int = 4) -> Peaks:
    counter = iter(range(requests))
    lock = threading.Lock()
    peaks = Peaks()
    done = threading.Event()

    def worker(rng: random.Random) -> None:
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            misbehave(MISBEHAVIOURS[n % len(MISBEHAVIOURS)], daemon, rng, big)

    def monitor() -> None:
        while not done.wait(0.02):
            try:
                peaks.fds = max(peaks.fds, open_fds(daemon.pid))
                peaks.spool = max(peaks.spool, len(os.listdir(daemon.spool)))
            except OSError:
                pass

    workers = [threading.Thread(target=worker, args=(random.Random(seed + i),)) for i in range(threads)]
    watcher = threading.Thread(target=monitor)
    watcher.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    watcher.join()
    return peaks


def settle(pid: int, target: int, seconds: float = 15.0) -> int:
    deadline = time.monotonic() + seconds
    while True:
        n = open_fds(pid)
        if n <= target or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def leak_part(report: Report, tmp: Path, requests: int, seed: int) -> None:
    request_timeout = 3.0
    results: dict[str, Any] = {}
    try:
        with running(tmp / "daemon", "--request-timeout", str(request_timeout), tls=False, auth=None) as daemon:
            conn = http.client.HTTPConnection(daemon.host, daemon.port, timeout=30)
            conn.request("POST", "/leak/?create=true")
            assert conn.getresponse().read() is not None
            body = random.Random(seed).randbytes(8 * MIB)
            big = sha256_hex(body)
            conn.request("POST", f"/leak/data/{big}", body=body)
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
            conn.close()
            # Warm up (thread pool, buffers, caches), then take the baseline.
            storm(daemon, max(200, requests // 10), big, seed)
            time.sleep(1.0)
            daemon.wait_spool_empty(15)
            fds_before = settle(daemon.pid, 0, 2.0)
            rss_before = rss(daemon.pid)
            started = time.monotonic()
            # Two equal storms: a leak grows with each, a high-water mark
            # of the allocator does not.
            first = storm(daemon, requests // 2, big, seed + 1000)
            daemon.wait_spool_empty(15)
            settle(daemon.pid, fds_before, 15.0)
            rss_middle = rss(daemon.pid)
            last = storm(daemon, requests - requests // 2, big, seed + 2000)
            stormed = time.monotonic() - started
            slow_headers = slowloris(daemon, 10, request_timeout, request_line=False)
            slow_line = slowloris(daemon, 10, request_timeout, request_line=True)
            left = daemon.wait_spool_empty(15)
            fds_after = settle(daemon.pid, fds_before, 15.0)
            time.sleep(1.0)
            rss_after = rss(daemon.pid)
            # Still serving.
            conn = http.client.HTTPConnection(daemon.host, daemon.port, timeout=30)
            conn.request("GET", f"/leak/data/{big}", headers={"Range": "bytes=0-"})
            response = conn.getresponse()
            served = response.status == 206 and sha256_hex(response.read()) == big
            conn.close()
            stray = Findings()
            Verifier(daemon.data, ("leak",)).on_disk(stray)
            results["done"] = True
    except AssertionError as e:
        report.add("leak", "daemon log clean, exit 0", f"no: {str(e)[:300]}", False)
        if "done" not in results:
            return
    else:
        report.add("leak", "daemon log clean, exit 0", "yes")
    grew = rss_after - rss_before
    second = rss_after - rss_middle
    rss_ok = second <= 8 * MIB and grew <= max(16 * MIB, rss_before // 4)
    report.add("leak", "misbehaving requests", f"{requests} in {stormed:.0f} s ({', '.join(MISBEHAVIOURS)})")
    report.add(
        "leak",
        "open fds before/peak/after",
        f"{fds_before}/{max(first.fds, last.fds)}/{fds_after} (peak spool files {max(first.spool, last.spool)})",
        fds_after <= fds_before,
    )
    report.add(
        "leak",
        "RSS before/half-way/after",
        f"{rss_before / MIB:.1f}/{rss_middle / MIB:.1f}/{rss_after / MIB:.1f} MiB "
        f"({grew / MIB:+.1f}; second half {second / MIB:+.1f})",
        rss_ok,
    )
    report.add("leak", "spool leftovers", len(left), not left)
    report.add("leak", "partial/stray files", len(stray.partial) + len(stray.stray), not (stray.partial or stray.stray))
    for what, (closed, slowest) in (("headers", slow_headers), ("request line", slow_line)):
        report.add(
            "leak",
            f"slowloris dripping the {what}: closed",
            f"{closed}/10 within {3 * request_timeout + 10:g} s (slowest {slowest:.1f} s; --request-timeout {request_timeout:g})",
            closed == 10,
        )
    report.add("leak", "still serving afterwards", served, served)


# -- main --------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=500, help="kill -9 cycles (default 500)")
    parser.add_argument("--fuzz", type=int, default=200_000, help="fuzz cases to ask hypothesis for (default 200000)")
    parser.add_argument("--restic-rounds", type=int, default=3, help="restic kill-and-rerun rounds (default 3)")
    parser.add_argument("--leak-requests", type=int, default=5000, help="misbehaving requests of the leak check (default 5000)")
    parser.add_argument("--seconds", type=float, help="bound on the whole run; parts stop early when their share is spent")
    parser.add_argument("--only", nargs="+", choices=PARTS, metavar="PART", help=f"only these parts: {' '.join(PARTS)}")
    parser.add_argument("--seed", type=int, help="seed of the crash and leak parts (default: random, printed)")
    parser.add_argument("--tmpdir", help="where data directories go (default: $TMPDIR or /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--restic", default=shutil.which("restic"), help="the restic binary (default: restic on PATH)")
    return parser.parse_args(argv)


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    parts = args.only or list(PARTS)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    tmp = Path(tempfile.mkdtemp(prefix="resticd-soak-", dir=args.tmpdir))
    report = Report()
    started = time.monotonic()
    log(f"soak: parts {' '.join(parts)}, seed {seed}, in {tmp}")
    signal.signal(signal.SIGTERM, interrupted)
    shares = {p: SHARES[p] for p in parts}
    spent = 0.0
    runs: dict[str, Callable[[float | None], None]] = {
        "leak": lambda d: leak_part(report, tmp / "leak", args.leak_requests, seed),
        "restic": lambda d: restic_part(report, tmp / "restic", args.restic_rounds, d, args.restic, seed),
        "fuzz": lambda d: fuzz_part(report, tmp / "fuzz", args.fuzz, d),
        "crash": lambda d: crash_part(report, tmp / "crash", args.cycles, d, seed),
    }
    try:
        for part in parts:
            spent += shares[part] / sum(shares.values())
            deadline = started + args.seconds * spent if args.seconds else None
            part_started = time.monotonic()
            log(f"{part}: starting" + (f" (until +{deadline - started:.0f} s)" if deadline else ""))
            try:
                runs[part](deadline)
            except Exception as e:
                traceback.print_exc()
                report.add(part, "harness error", f"{type(e).__name__}: {str(e)[:300]}", False)
            log(f"{part}: done in {time.monotonic() - part_started:.0f} s")
            if not args.keep:
                shutil.rmtree(tmp / part, ignore_errors=True)
    except KeyboardInterrupt:
        report.notes.append("interrupted")
        print(report.table())
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"== resticd soak: {time.monotonic() - started:.0f} s, seed {seed} ==")
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
