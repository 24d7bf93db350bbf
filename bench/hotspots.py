#!/usr/bin/env python3
"""
Where resticd spends its time on one workload, run by hand::

    .venv/bin/python bench/hotspots.py upload|download|range|head|small|list [--https] [--with perf|py-spy] [--count N] [--objects N]
    .venv/bin/python bench/hotspots.py requests [--count N]
    .venv/bin/python bench/hotspots.py h2-receive [--count N]
    .venv/bin/python bench/hotspots.py h2-send [--count N]
    .venv/bin/python bench/hotspots.py tls-receive [--count N]
    .venv/bin/python bench/hotspots.py backups [--https] [--count N] [--disk-mib-s M]

For C{upload}, C{download}, C{range}, C{head} and C{small} (small durable
uploads, as bench/run.py makes them) it starts one daemon (the
way bench/run.py does, on a fresh data directory, plain http or https),
uploads what the workload needs, then drives the workload with 8 concurrent
clients and prints the throughput and the daemon's CPU time per unit
(C{list} writes small objects straight into a repository and times v2
listings of them, one client). With
C{--with perf} (Linux C{perf}) or C{--with py-spy}, that profiler records
the daemon during the measured part only, and the heaviest functions are
printed. C{requests} measures and profiles (C{cProfile}) the Python cost of
one HEAD and one range answer inside this process, through the real site
but without sockets, then measures it again with metrics on. C{h2-receive}
measures, in this process, the CPU time
resticd's HTTP/2 connection takes to receive an upload's DATA frames, against
the h2 library's own connection, for reads of several sizes. C{h2-send}
measures, in this process, the CPU time resticd takes to send whole objects
over HTTP/2 in 16 KiB frames (as restic's Go client takes them), one answer
at a time and four at once, through the real site. C{tls-receive} measures,
in this process, the CPU time resticd's TLS layer takes to decrypt an
upload and hand it up, against Twisted's own, for socket reads of several
sizes. C{backups} has N restic
clients back up at once, each a tree of its own, to a daemon whose disk
writes are throttled (as root, through a cgroup's C{blkio} or C{io}
controller: a disk slower than the network), and prints the daemon's
peak resident size: what uploads held while they waited for the disk.
No peer server: bench/run.py is the comparison; this
is the microscope for a change (run it on two checkouts to compare them,
as bench/README.md shows).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import random
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402  (bench/run.py: its server, client and workloads)

SERVED = ("upload", "download", "range", "head", "small", "list")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Where resticd spends its time on one workload (run by hand; see bench/README.md).")
    parser.add_argument("workload", choices=(*SERVED, "requests", "h2-receive", "h2-send", "tls-receive", "backups"))
    parser.add_argument("--https", action="store_true", help="serve https (default: plain http)")
    parser.add_argument("--with", dest="profiler", choices=("perf", "py-spy"), help="record the daemon with this profiler")
    parser.add_argument("--count", type=int, help="8 MiB objects (upload, download), requests (range, head, requests), small objects (small, list), MiB (h2-receive, h2-send, tls-receive) or restic clients (backups); defaults: 128, 128, 20000, 20000, 2000, 10000, 50000, 512, 256, 256, 8")
    parser.add_argument("--disk-mib-s", type=int, default=30, help="backups: the daemon's disk writes are throttled to this many MiB/s (default 30; 0: not throttled)")
    parser.add_argument("--tree-mib", type=int, default=64, help="backups: MiB of random files each client backs up (default 64)")
    parser.add_argument("--delay-ms", type=float, default=0, help="backups: the clients reach the daemon through bench/delay.py, which delays every byte this many ms each way (default 0: directly)")
    parser.add_argument("--objects", type=int, default=16,
                        help="8 MiB objects that range and HEAD requests spread over (default 16; bench/run.py uses 128, "
                             "whose page-cache pages are then mostly out of the CPU caches)")
    parser.add_argument("--out", type=Path, help="keep the profiler's recording here (default: a temporary file)")
    parser.add_argument("--top", type=int, default=30, help="functions to print (default 30)")
    parser.add_argument("--warm-memory", type=float, default=2.0, metavar="GIB",
                        help="first write and delete this many GiB in the data filesystem, as bench/run.py does, so that "
                             "the daemon does not pay for the first touch of memory pages on a virtual machine (default 2; 0: don't)")
    parser.add_argument("--resticd-args", type=str, default="", help="extra resticd options, e.g. --resticd-args='--no-verify-upload'")
    return parser.parse_args(argv)


DEFAULT_COUNT = {"upload": 128, "download": 128, "range": 20_000, "head": 20_000, "small": 10_000, "list": 50_000, "requests": 2_000, "h2-receive": 512, "h2-send": 256, "tls-receive": 256, "backups": 8}
#: Listings measured by the list workload (after one unmeasured).
LISTINGS = 7


def start_recording(profiler: str, pid: int, out: Path) -> subprocess.Popen[bytes]:
    if profiler == "perf":
        argv = ["perf", "record", "-F", "999", "-g", "-o", str(out), "-p", str(pid)]
    else:
        # Only stacks holding the GIL: the Python work (idle worker threads and
        # system calls, which release it, are left to perf).
        argv = ["py-spy", "record", "--gil", "-r", "250", "-f", "raw", "-o", str(out), "-p", str(pid)]
    if shutil.which(argv[0]) is None:
        raise SystemExit(f"hotspots.py: {argv[0]} is not on PATH")
    recorder = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    time.sleep(1.0)  # attached before the clock starts
    if recorder.poll() is not None:
        raise SystemExit(f"hotspots.py: {argv[0]} failed: {recorder.stderr.read().decode() if recorder.stderr else ''}")
    return recorder


def stop_recording(recorder: subprocess.Popen[bytes]) -> None:
    recorder.send_signal(signal.SIGINT)
    try:
        recorder.wait(60)
    except subprocess.TimeoutExpired:
        recorder.kill()
        recorder.wait(10)


def print_perf(out: Path, top: int) -> None:
    report = subprocess.run(
        ["perf", "report", "-i", str(out), "--no-children", "-g", "none", "--sort", "dso,sym", "--stdio"],
        capture_output=True, text=True, timeout=300,
    )
    # Lines look like "  7.70%  [kernel.kallsyms]  [k] _raw_spin_unlock_irqrestore".
    by_dso: dict[str, float] = {}
    by_symbol: dict[tuple[str, str], float] = {}
    for line in report.stdout.splitlines():
        match = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[.\]\s+(.*)", line)
        if not match:
            continue
        share, dso, symbol = float(match[1]), match[2], match[3].strip()
        if re.fullmatch(r"0x[0-9a-f]+", symbol):
            # A library without symbols (libcrypto's assembly, for one)
            # would fill the table with one line per address.
            symbol = "(addresses without a symbol)"
        by_dso[dso] = by_dso.get(dso, 0.0) + share
        by_symbol[dso, symbol] = by_symbol.get((dso, symbol), 0.0) + share
    print("-- by library")
    for dso, share in sorted(by_dso.items(), key=lambda item: -item[1])[:8]:
        print(f"{share:6.2f}%  {dso}")
    print("-- by function")
    for (dso, symbol), share in sorted(by_symbol.items(), key=lambda item: -item[1])[:top]:
        print(f"{share:6.2f}%  {dso:<24.24}  {symbol}")


def print_py_spy(out: Path, top: int) -> None:
    """Self and inclusive shares of the sampled stacks (py-spy's raw format: 'frame;frame;... count')."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        total += int(samples)
        own[frames[-1]] += int(samples)
        for frame in set(frames):
            inclusive[frame] += int(samples)
    if not total:
        print("no samples")
        return
    for title, counter in (("self", own), ("inclusive", inclusive)):
        print(f"-- {title} (share of {total} samples)")
        for frame, count in counter.most_common(top):
            print(f"{100 * count / total:5.1f}%  {frame}")


def print_recording(args: argparse.Namespace, out: Path) -> None:
    """
    The heaviest functions of the profiler's recording in C{out}, if one was
    made, and where it is kept if asked to keep it.
    """
    if args.profiler == "perf":
        print_perf(out, args.top)
    elif args.profiler == "py-spy":
        print_py_spy(out, args.top)
    if args.profiler and args.out:
        print(f"recording kept in {out}")


def served(args: argparse.Namespace) -> None:
    from resticd.certs import write_self_signed

    count = args.count or DEFAULT_COUNT[args.workload]
    proto = "https" if args.https else "http"
    root = Path(tempfile.mkdtemp(prefix="resticd-profile-"))
    server = None
    try:
        cert, key = write_self_signed(str(root / "tls"))
        tls = None
        if args.https:
            tls = ssl.create_default_context(cafile=cert)
            tls.set_alpn_protocols(["http/1.1"])
        server = run.Server("resticd", proto, root / "server", Path(cert), Path(key), tls, args.resticd_args.split(), "rclone")
        if args.warm_memory > 0:
            print(f"warmed {args.warm_memory:g} GiB of memory in {run.warm_memory(root, args.warm_memory):.1f} s")
        server.start()
        run.create_repo(server, "r")
        if args.workload == "small":
            run.create_repo(server, "s")
        if args.workload == "list":
            listed(args, server, count, root)
            return
        # Uploads store their own objects; downloads read as many as they
        # fetch; ranges and HEADs spread over --objects.
        stored = {"upload": 0, "small": 0, "download": count}.get(args.workload, args.objects)
        objects = run.BigObjects(count if args.workload == "upload" else stored)
        if stored:
            _, errors, _ = run.wl_upload(server, objects, stored)
            if errors.count:
                raise SystemExit(f"hotspots.py: uploading the objects failed: {errors.summary()}")
            run.cache_tree(server.data)  # served from memory, as bench/run.py does
        out = args.out or root / ("perf.data" if args.profiler == "perf" else "py-spy.txt")
        recorder = start_recording(args.profiler, server.pid, out) if args.profiler else None
        try:
            if args.workload == "upload":
                m, errors, _ = run.wl_upload(server, objects, count)
            elif args.workload == "download":
                m, errors, _ = run.wl_download(server, objects, count)
            elif args.workload == "small":
                m, errors, _ = run.wl_small(server, run.SmallObjects(count))
            elif args.workload == "range":
                m, errors, _ = run.wl_range(server, objects, stored, count, seed=1)
            else:
                m, errors, _ = run.wl_head(server, objects, stored, count, seed=1)
        finally:
            if recorder is not None:
                stop_recording(recorder)
        if errors.count:
            raise SystemExit(f"hotspots.py: the workload failed: {errors.summary()}")
        cpu = m.cpu or 0.0
        if args.workload in ("upload", "download"):
            gib = count * run.OBJECT_SIZE / run.GiB
            print(f"{args.workload} over {proto}: {count * run.OBJECT_SIZE / run.MiB / m.elapsed:.0f} MiB/s, "
                  f"daemon CPU {cpu / gib:.3f} s/GiB, peak RSS {(m.rss or 0) / run.MiB:.0f} MiB")
        else:
            print(f"{args.workload} over {proto}: {count / m.elapsed:.0f} requests/s, "
                  f"daemon CPU {cpu / count * 1e6:.1f} µs/request, peak RSS {(m.rss or 0) / run.MiB:.0f} MiB")
        print_recording(args, out)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def listed(args: argparse.Namespace, server: run.Server, count: int, root: Path) -> None:
    """
    The list workload: C{count} small objects written straight into
    repository /r/'s data directories (as many uploads would leave them),
    then L{LISTINGS} v2 listings of them, one after another.
    """
    small = run.SmallObjects(count)
    for name, body in zip(small.names, small.bodies):
        (server.data / "r" / "data" / name[:2] / name).write_bytes(body)
    expected = {name: len(body) for name, body in zip(small.names, small.bodies)}
    run.v2_listing(server, "/r/data/")  # directories and inodes into memory
    out = args.out or root / ("perf.data" if args.profiler == "perf" else "py-spy.txt")
    recorder = start_recording(args.profiler, server.pid, out) if args.profiler else None
    totals, firsts, cpus, rss = [], [], [], 0
    try:
        for _ in range(LISTINGS):
            with run.Measure(server) as m:
                total, first, body, status, ctype = run.v2_listing(server, "/r/data/")
            problem = run.check_listing(body, status, ctype, expected)
            if problem:
                raise SystemExit(f"hotspots.py: the listing is wrong: {problem}")
            totals.append(total)
            firsts.append(first)
            cpus.append(m.cpu or 0.0)
            rss = max(rss, m.rss or 0)
    finally:
        if recorder is not None:
            stop_recording(recorder)
    proto = "https" if args.https else "http"
    print(f"list over {proto}: {count} objects in {statistics.median(totals) * 1000:.0f} ms "
          f"(all: {', '.join(f'{t * 1000:.0f}' for t in totals)}), first byte after {statistics.median(firsts) * 1000:.1f} ms, "
          f"daemon CPU {statistics.median(cpus) * 1000:.0f} ms per listing, peak RSS {rss / run.MiB:.0f} MiB")
    print_recording(args, out)


class InProcess:
    """
    The real site over in-memory transports, for the workloads measured in
    this process: a data directory under C{root} (repository C{/r/}).
    """

    def __init__(self, root: str, prometheus: bool = False) -> None:
        from tests.web import make_server

        self.site = make_server(os.path.join(root, "data"), prometheus=prometheus).site

    def connect(self, negotiated: bytes | None = None) -> tuple[Any, Any]:
        """
        A new connection to the site and its transport (a StringTransport:
        what the site writes gathers there); C{negotiated=b"h2"} makes it
        HTTP/2 as ALPN would.
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.testing import StringTransport

        address = IPv4Address("TCP", "127.0.0.1", 40000)
        channel = self.site.buildProtocol(address)
        transport: Any = StringTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 8000))
        transport.negotiatedProtocol = negotiated
        channel.makeConnection(transport)
        return channel, transport

    @staticmethod
    def answer(channel: Any, transport: Any, raw: bytes) -> bytes:
        """
        What the site writes on C{channel} for the request bytes C{raw}.
        """
        channel.dataReceived(raw)
        out: bytes = transport.value()
        transport.clear()
        return out

    def store(self, seeds: Sequence[int]) -> list[bytes]:
        """
        Create the repository and upload one 8 MiB object per seed (its
        bytes from C{random.Random(seed)}); their names.
        """
        channel, transport = self.connect()
        raws = [b"POST /r/?create=true HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"]
        names = []
        for seed in seeds:
            body = random.Random(seed).randbytes(run.OBJECT_SIZE)
            name = hashlib.sha256(body).hexdigest().encode()
            names.append(name)
            raws.append(b"POST /r/data/%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (name, len(body), body))
        for raw in raws:
            reply = self.answer(channel, transport, raw)
            if not reply.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"hotspots.py: setting up failed: {reply[:200]!r}")
        return names


def requests(args: argparse.Namespace) -> None:
    """
    HEAD and range answers through the real site over an in-memory
    transport: Python only; profiled as resticd runs by default, then timed
    again with metrics on (C{--prometheus}: every answer is counted).
    """
    count = args.count or DEFAULT_COUNT["requests"]
    for prometheus in (False, True):
        root = tempfile.mkdtemp(prefix="resticd-profile-")
        try:
            answer_requests(InProcess(root, prometheus), count, args.top, profile=not prometheus)
        finally:
            shutil.rmtree(root, ignore_errors=True)


def answer_requests(site: InProcess, count: int, top: int, profile: bool) -> None:
    """
    Time C{count} HEADs and C{count} range GETs of one stored object on
    C{site}, one connection; with C{profile}, profile them once more.
    """
    [name] = site.store([2])
    channel, transport = site.connect()

    def answer(raw: bytes) -> bytes:
        return site.answer(channel, transport, raw)

    rnd = random.Random(1)
    kinds: dict[str, list[bytes]] = {"HEAD": [], "range": []}
    for _ in range(count):
        kinds["HEAD"].append(b"HEAD /r/data/%s HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAccept: %s\r\n\r\n" % (name, run.V2.encode()))
        length = rnd.randint(4 * run.KiB, 64 * run.KiB)
        start = rnd.randrange(0, run.OBJECT_SIZE - length + 1)
        kinds["range"].append(b"GET /r/data/%s HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nAccept: %s\r\nRange: bytes=%d-%d\r\n\r\n"
                              % (name, run.V2.encode(), start, start + length - 1))
    setting = "" if profile else ", with --prometheus"
    for kind, raws in kinds.items():
        for raw in raws[:200]:  # warm up
            answer(raw)
        started = time.process_time()
        for raw in raws:
            answer(raw)
        spent = time.process_time() - started
        print(f"{kind}{setting}: {spent / len(raws) * 1e6:.1f} µs of CPU per answer (in process, no sockets)")
        if not profile:
            continue
        profiler = cProfile.Profile()
        profiler.enable()
        for raw in raws:
            answer(raw)
        profiler.disable()
        print(f"-- {kind}: by own time")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def h2_receive(args: argparse.Namespace) -> None:
    """
    CPU time per GiB to receive one upload's DATA frames (256 KiB, as Go's
    HTTP/2 client sends them to resticd) on resticd's HTTP/2 connection and
    on the h2 library's, the same bytes cut into reads of several sizes.
    """
    import h2.config
    import h2.connection
    import h2.events
    from resticd.h2 import MAX_FRAME_SIZE, ResticH2Connection, announce_settings
    from resticd.memory import keep_large_buffers

    keep_large_buffers()  # as the daemon does at startup

    def server(ours: bool) -> h2.connection.H2Connection:
        """
        A server connection that has sent resticd's settings (see
        data_to_send), and a connection window that takes the whole upload
        (resticd lends its windows from a pool: see resticd.windows).
        """
        conn = ResticH2Connection().conn if ours else h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        announce_settings(conn)
        conn.increment_flow_control_window((1 << 31) - 1 - conn.inbound_flow_control_window)
        return conn

    # What the client sends: its preamble and settings, the acknowledgement of
    # the server's settings, a request's headers, then its body in frames.
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    opening = client.data_to_send()
    peer = server(ours=False)
    peer.receive_data(opening)
    client.receive_data(peer.data_to_send())
    client.send_headers(1, [(":method", "POST"), (":path", "/r/data/x"), (":scheme", "https"), (":authority", "h")])
    opening += client.data_to_send()
    frame = random.Random(3).randbytes(MAX_FRAME_SIZE)
    header = MAX_FRAME_SIZE.to_bytes(3, "big") + bytes([0, 0]) + (1).to_bytes(4, "big")
    frames = (args.count or DEFAULT_COUNT["h2-receive"]) * run.MiB // MAX_FRAME_SIZE
    wire = (header + frame) * frames
    body = frames * MAX_FRAME_SIZE
    print(f"receiving {body // run.MiB} MiB of 256 KiB DATA frames, CPU seconds per GiB (in process;"
          " h2: the h2 library's connection, as Twisted uses it):")
    print(f"{'read size':>10}  {'resticd':>8}  {'h2':>8}")
    for read in (16 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20):
        costs = []
        for ours in (True, False):
            conn = server(ours)
            conn.data_to_send()
            # (h2 refuses frames larger than 16 KiB in the read that
            # acknowledges its larger frame size: that comes in a read of its own.)
            conn.receive_data(opening)
            received = 0
            started = time.process_time()
            for at in range(0, len(wire), read):
                for event in conn.receive_data(wire[at : at + read]):
                    if isinstance(event, h2.events.DataReceived):
                        received += event.flow_controlled_length
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                conn.data_to_send()
            costs.append((time.process_time() - started) * run.GiB / received)
            assert received == body
        print(f"{read >> 10:>7} KiB  {costs[0]:8.3f}  {costs[1]:8.3f}")


def tls_receive(args: argparse.Namespace) -> None:
    """
    CPU time per GiB to decrypt an upload sent over TLS (the client's
    16 KiB records, as OpenSSL and Go send them) and hand it to the protocol
    above, on resticd's TLS layer (L{resticd.tls.BatchingTLSProtocol}) and on
    Twisted's own, for socket reads of several sizes. Encrypting is not
    timed; the protocol above only counts what it gets.
    """
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.ssl import Certificate, optionsForClientTLS
    from twisted.internet.task import Clock
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.test.iosim import connectedServerAndClient

    from resticd.certs import write_self_signed
    from resticd.memory import keep_large_buffers
    from resticd.tls import BatchingTLSFactory, ReloadingTLS

    keep_large_buffers()  # as the daemon does at startup

    class Counter(Protocol):
        received = 0
        calls = 0

        def dataReceived(self, data: bytes) -> None:
            self.received += len(data)
            self.calls += 1

    root = Path(tempfile.mkdtemp(prefix="resticd-tls-"))
    try:
        cert, key = write_self_signed(str(root))
        with open(cert, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        creator = ReloadingTLS(cert, key)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    total = (args.count or DEFAULT_COUNT["tls-receive"]) * run.MiB
    piece = random.Random(3).randbytes(run.MiB)

    ciphers: set[str] = set()

    def cost(ours: bool, read: int) -> tuple[float, float]:
        """
        CPU seconds per GiB, and calls of the protocol above per MiB, for
        one server connection receiving C{total} bytes in reads of C{read}.
        """
        above, client = Counter(), Counter()
        wrapped = Factory.forProtocol(lambda: above)
        factory = BatchingTLSFactory(creator, False, wrapped, Clock()) if ours else TLSMemoryBIOFactory(creator, False, wrapped)
        client_factory = TLSMemoryBIOFactory(optionsForClientTLS("localhost", trust), True, Factory.forProtocol(lambda: client))
        client_tls, server_tls, pump = connectedServerAndClient(
            lambda: factory.buildProtocol(None), lambda: client_factory.buildProtocol(None)
        )
        pump.flush()
        ciphers.add(str(server_tls._tlsConnection.get_cipher_name()))
        seconds = 0.0
        for _ in range(0, total, 64 * run.MiB):  # encrypted 64 MiB at a time, untimed
            for _ in range(64):
                client_tls.write(piece)
            wire = pump.clientIO.getOutBuffer()
            started = time.process_time()
            for at in range(0, len(wire), read):
                server_tls.dataReceived(wire[at : at + read])
            seconds += time.process_time() - started
        assert above.received == total, (above.received, total)
        return seconds * run.GiB / total, above.calls * run.MiB / total

    print(f"receiving {total // run.MiB} MiB over TLS, CPU seconds per GiB and calls of the protocol above per MiB"
          " (in process; twisted: Twisted's own TLS layer):")
    print(f"{'read size':>10}  {'resticd':>8}  {'calls':>6}  {'twisted':>8}  {'calls':>6}")
    for read in (64 << 10, 256 << 10, 1 << 20, 2 << 20):
        (ours, our_calls), (theirs, their_calls) = cost(True, read), cost(False, read)
        print(f"{read >> 10:>7} KiB  {ours:8.3f}  {our_calls:6.1f}  {theirs:8.3f}  {their_calls:6.1f}")
    print(f"cipher: {', '.join(sorted(ciphers))}")


def h2_send(args: argparse.Namespace) -> None:
    """
    CPU time per GiB resticd takes to send 8 MiB objects from the page cache
    over HTTP/2 (no TLS), through the real site, to a client that takes
    16 KiB frames and opens its windows as Go's does: one answer at a time,
    then four at once on one connection. Only the server's calls are timed
    (the client, the h2 library, parses what it gets between them).
    """
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings
    from twisted.internet import reactor
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    root = tempfile.mkdtemp(prefix="resticd-profile-")
    try:
        site = InProcess(root)
        site.site.reactor = reactor  # Twisted's HTTP/2 send loop and producers run on the global reactor
        names = site.store(range(4))
        run.cache_tree(Path(root))
        total = (args.count or DEFAULT_COUNT["h2-send"]) * run.MiB
        print("sending 8 MiB objects over HTTP/2 in 16 KiB frames, resticd's CPU seconds per GiB (in process, no TLS):")
        for streams in (1, 4):
            spent = 0.0
            sent = 0
            while sent < total:
                server, wire = site.connect(b"h2")
                client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
                client.initiate_connection()
                client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 4 << 20})
                client.increment_flow_control_window(1 << 30)
                for number in range(streams):
                    path = b"/r/data/" + names[number % len(names)]
                    headers = [(b":method", b"GET"), (b":path", path), (b":scheme", b"https"), (b":authority", b"x")]
                    client.send_headers(client.get_next_available_stream_id(), headers, end_stream=True)
                pending = client.data_to_send()
                ended = 0
                while ended < streams:
                    started = time.process_time()
                    if pending:
                        server.dataReceived(pending)
                    reactor.runUntilCurrent()  # type: ignore[attr-defined]
                    out = wire.value()
                    wire.clear()
                    spent += time.process_time() - started
                    for event in client.receive_data(out):
                        if isinstance(event, h2.events.DataReceived):
                            sent += event.flow_controlled_length
                            client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        elif isinstance(event, h2.events.StreamEnded):
                            ended += 1
                    pending = client.data_to_send()
                server.connectionLost(Failure(ConnectionDone()))
            print(f"{streams} answer(s) at a time: {spent * run.GiB / sent:.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def throttled(pid: int, device: str, rate: int) -> Path | None:
    """
    Put process C{pid} (all its threads) in a cgroup whose writes to block
    device C{device} ("major:minor") go at most C{rate} bytes per second:
    cgroup v1's blkio controller or v2's io controller, as root. The cgroup,
    or None when neither can be used.
    """
    v1 = Path("/sys/fs/cgroup/blkio")
    v2 = Path("/sys/fs/cgroup")
    try:
        if (v1 / "blkio.throttle.write_bps_device").exists():
            group = v1 / f"resticd-bench-{os.getpid()}"
            group.mkdir(exist_ok=True)
            (group / "blkio.throttle.write_bps_device").write_text(f"{device} {rate}\n")
        elif "io" in (v2 / "cgroup.controllers").read_text().split():
            (v2 / "cgroup.subtree_control").write_text("+io")
            group = v2 / f"resticd-bench-{os.getpid()}"
            group.mkdir(exist_ok=True)
            (group / "io.max").write_text(f"{device} wbps={rate}\n")
        else:
            return None
        (group / "cgroup.procs").write_text(str(pid))
        return group
    except OSError as e:
        print(f"hotspots.py: cannot throttle the disk ({e}); measuring without")
        return None


def backups(args: argparse.Namespace) -> None:
    """
    N restic clients back up at once, each its own tree of random files,
    to one daemon whose disk writes are throttled, directly or through
    bench/delay.py: the daemon's peak resident size, and how long it took.
    """
    from resticd.certs import write_self_signed

    count = args.count or DEFAULT_COUNT["backups"]
    proto = "https" if args.https else "http"
    restic = shutil.which("restic")
    if restic is None:
        raise SystemExit("hotspots.py: backups needs restic on PATH")
    root = Path(tempfile.mkdtemp(prefix="resticd-profile-"))
    server = None
    group = None
    proxy = None
    try:
        cert, key = write_self_signed(str(root / "tls"))
        rnd = random.Random(7)
        trees = []
        for client in range(count):
            tree = root / f"tree{client}"
            tree.mkdir()
            for at in range(0, args.tree_mib, 8):
                (tree / f"f{at}").write_bytes(rnd.randbytes(min(8, args.tree_mib - at) * run.MiB))
            trees.append(tree)
        tls = ssl.create_default_context(cafile=cert) if args.https else None
        server = run.Server("resticd", proto, root / "server", Path(cert), Path(key), tls, args.resticd_args.split(), "rclone")
        server.start()
        stat = os.stat(server.data)
        device = f"{os.major(stat.st_dev)}:{os.minor(stat.st_dev)}"
        if args.disk_mib_s > 0:
            group = throttled(server.pid, device, args.disk_mib_s * run.MiB)
        common = [restic, "--cacert", cert] if args.https else [restic]
        port = server.port
        if args.delay_ms > 0:
            proxy = subprocess.Popen([sys.executable, str(Path(__file__).with_name("delay.py")), "--to", str(port), "--delay-ms", str(args.delay_ms)],
                                     stdout=subprocess.PIPE, text=True)
            assert proxy.stdout is not None
            port = int(proxy.stdout.readline().split()[-1])

        def env(client: int) -> dict[str, str]:
            work = root / f"work{client}"
            return dict(os.environ, RESTIC_PASSWORD=run.RESTIC_PASSWORD, HOME=str(work), XDG_CACHE_HOME=str(work / "cache"),
                        RESTIC_REPOSITORY=f"rest:{proto}://127.0.0.1:{port}/r{client}/")

        for client in range(count):
            subprocess.run([*common, "init", "-q"], env=env(client), check=True, capture_output=True)
        before = run.proc_status_kib(server.pid, "VmRSS") or 0
        run.reset_peak_rss(server.pid)
        cpu = run.proc_cpu(server.pid)
        started = time.monotonic()
        clients = [subprocess.Popen([*common, "backup", "-q", str(tree)], env=env(client), stdout=subprocess.DEVNULL)
                   for client, tree in enumerate(trees)]
        failed = [client for client, proc in enumerate(clients) if proc.wait() != 0]
        elapsed = time.monotonic() - started
        peak = run.proc_status_kib(server.pid, "VmHWM") or 0
        cpu = run.proc_cpu(server.pid) - cpu
        if failed:
            raise SystemExit(f"hotspots.py: the backups of clients {failed} failed")
        disk = f"disk writes throttled to {args.disk_mib_s} MiB/s" if group is not None else "disk not throttled"
        if proxy is not None:
            disk += f", {2 * args.delay_ms:g} ms round trips"
        print(f"{count} restic backups of {args.tree_mib} MiB at once over {proto} ({disk}{', ' + args.resticd_args if args.resticd_args else ''}): "
              f"{elapsed:.1f} s, daemon CPU {cpu:.2f} s, RSS {before / 1024:.0f} MiB before, peak {peak / 1024:.0f} MiB")
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(timeout=10)
        if server is not None:
            server.stop()
        if group is not None:
            try:
                group.rmdir()
            except OSError:
                pass
        shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, run.on_sigterm)
    try:
        if args.workload == "requests":
            requests(args)
        elif args.workload == "h2-receive":
            h2_receive(args)
        elif args.workload == "h2-send":
            h2_send(args)
        elif args.workload == "tls-receive":
            tls_receive(args)
        elif args.workload == "backups":
            backups(args)
        else:
            served(args)
    except KeyboardInterrupt:
        run.stop_all()
        return 130
    finally:
        run.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
