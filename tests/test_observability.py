"""
Observability: the Prometheus metrics (exact counts after a scripted session,
read from memory only), who may read /metrics, the metrics-only listener,
the health endpoints, the access log and its reopening, the one log line per
refused request, a real restic session measured end to end, and the shipped
Grafana dashboard, Prometheus configuration and alerting rules.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import resource
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from resticd.accesslog import AccessLog
from resticd.auth import Authenticator, Htpasswd
from resticd.certs import write_self_signed
from resticd.config import Config
from resticd.health import MinFree
from resticd.metrics import Children, Metrics
from resticd.service import ResticdService, make_metrics_site, make_site
from resticd.threads import WorkerThreads
from resticd.site import ResticSite
from resticd.threads import run_inline
from resticd.tls import certificate_expiry

from .daemon import Daemon, running, write_htpasswd
from .web import V2, Server, SiteClient, make_server, name_of, result
from .tools import required_program

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "etc" / "grafana" / "resticd.json"
RULES = ROOT / "etc" / "prometheus" / "resticd-rules.yml"
PROMETHEUS_CONFIG = ROOT / "etc" / "prometheus" / "prometheus.yml"

USERS = {"alice": "alice pw", "metrics": "metrics pw", "bob": "bob pw"}
#: Seconds a promtool or restic command may take.
COMMAND_TIMEOUT = 120
MIB = 1 << 20

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- helpers ---------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def parse_exposition(text: str) -> Samples:
    """
    Every sample of a Prometheus text exposition, by name and labels.
    """
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """
    The sample with exactly these labels, or None.
    """
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str, **labels: str) -> float:
    """
    The sum of the samples of C{name} whose labels include C{labels}.
    """
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def by_label(samples: Samples, name: str, label: str, **labels: str) -> dict[str, float]:
    """
    The samples of C{name} (those with C{labels}) keyed by one label's value.
    """
    want = set(labels.items())
    return {dict(ls)[label]: v for (n, ls), v in samples.items() if n == name and want <= ls}


async def scrape(client: SiteClient, **headers: str) -> Samples:
    reply = await client.get("/metrics", **headers)
    assert reply.code == 200, (reply.code, reply.body)
    assert (reply.header("content-type") or "").startswith("text/plain"), reply.headers
    return parse_exposition(reply.body.decode())


def authenticator_for(tmp_path: Path) -> Authenticator:
    """
    An authenticator over an htpasswd file of L{USERS}, checking inline.
    """
    htpasswd = Htpasswd(str(write_htpasswd(tmp_path / "htpasswd", USERS)))
    htpasswd.refresh()
    return Authenticator(htpasswd, run_inline, MemoryReactorClock())


class Clock:
    """
    A wall clock for the store's timestamps that moves only when told.
    """

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@implementer(ILogObserver)
class LogCapture:
    """
    Keeps every event it observes.
    """

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)


@contextmanager
def captured_logs() -> Iterator[list[LogEvent]]:
    """
    Every event logged in the block (the observer is removed after).
    """
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    try:
        yield capture.events
    finally:
        globalLogPublisher.removeObserver(capture)


def raw_request(site: Any, data: bytes, client: str = "10.1.2.3") -> bytes:
    """
    Send raw bytes to the site over an in-memory connection from C{client},
    then close it; what the server answered.
    """
    address = IPv4Address("TCP", client, 40000)
    protocol = site.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    protocol.connectionLost(Failure(ConnectionDone()))
    return cast(bytes, transport.value())


# -- the scripted session --------------------------------------------------------------

CONFIG = b"the repository config"
DATA = [bytes([i]) * size for i, size in enumerate((1000, 2000, 3000), 1)]
INDEX = b"i" * 500
KEY = b"k" * 300
SNAPSHOT = b"s" * 200
LOCK = b"l" * 100


async def session(server: Server, clock: Clock) -> dict[str, float]:
    """
    What a client does to repository /alice/ as alice: create it, upload a
    config and objects of every type, read some whole and some by range,
    delete a lock and a pack, upload a body that does not match its name,
    and get refused: no credentials, a wrong password, another user's
    repository. Returns when things happened (by the store's clock).
    """
    c = server.client
    alice = basic("alice", USERS["alice"])
    times: dict[str, float] = {}
    assert (await c.post("/alice/?create=true", authorization=alice)).code == 200
    assert (await c.post("/alice/config", CONFIG, authorization=alice)).code == 200
    for body in DATA:
        clock.now += 1
        assert (await c.post(f"/alice/data/{name_of(body)}", body, authorization=alice)).code == 200
    for kind, body in (("index", INDEX), ("keys", KEY), ("locks", LOCK)):
        clock.now += 1
        assert (await c.post(f"/alice/{kind}/{name_of(body)}", body, authorization=alice)).code == 200
    clock.now += 1
    times["snapshot"] = clock.now
    assert (await c.post(f"/alice/snapshots/{name_of(SNAPSHOT)}", SNAPSHOT, authorization=alice)).code == 200
    # Reads: two whole objects, one range, a HEAD, a missing object.
    whole = await c.get(f"/alice/data/{name_of(DATA[0])}", range="bytes=0-", authorization=alice)
    assert (whole.code, whole.body) == (206, DATA[0])
    piece = await c.get(f"/alice/data/{name_of(DATA[1])}", range="bytes=100-199", authorization=alice)
    assert (piece.code, len(piece.body)) == (206, 100)
    config = await c.get("/alice/config", range="bytes=0-", authorization=alice)
    assert (config.code, config.body) == (206, CONFIG)
    assert (await c.head(f"/alice/data/{name_of(DATA[2])}", authorization=alice)).code == 200
    assert (await c.get(f"/alice/data/{'0' * 64}", range="bytes=0-", authorization=alice)).code == 404
    # A listing is not an object read.
    assert (await c.get("/alice/data/", accept=V2, authorization=alice)).code == 200
    # Deletes.
    clock.now += 1
    assert (await c.delete(f"/alice/locks/{name_of(LOCK)}", authorization=alice)).code == 200
    clock.now += 1
    times["last write"] = clock.now
    assert (await c.delete(f"/alice/data/{name_of(DATA[2])}", authorization=alice)).code == 200
    # A body that is not what its name says.
    bad = await c.post(f"/alice/data/{name_of(b'what the name says')}", b"something else", authorization=alice)
    assert bad.code == 400
    # Refusals.
    assert (await c.get("/alice/config", range="bytes=0-")).code == 401
    assert (await c.get("/alice/config", range="bytes=0-", authorization=basic("alice", "wrong"))).code == 401
    assert (await c.get("/bob/config", range="bytes=0-", authorization=alice)).code == 403
    return times


#: Responses of L{session} by status code: create, config, 7 uploads, HEAD,
#: listing and 2 deletes are 200; 3 reads 206; one 404, 400 and 403; two 401.
SESSION_RESPONSES = {"200": 13, "206": 3, "404": 1, "400": 1, "401": 2, "403": 1}


def session_server(tmp_path: Path, **overrides: Any) -> tuple[Server, Clock]:
    server = make_server(
        str(tmp_path / "data"),
        authenticator=authenticator_for(tmp_path),
        prometheus=True,
        prometheus_no_auth=True,
        private_repos=True,
        **overrides,
    )
    clock = Clock()
    server.ctx.now = clock
    return server, clock


@pytest_twisted.ensureDeferred
async def test_metrics_count_exactly_what_happened(tmp_path):
    """
    After a scripted session, /metrics reports exactly what happened: objects
    and bytes read (whole and by range; HEADs, listings and misses are not
    reads), written and deleted per user, repository and type; stored bytes
    and objects per repository and type; responses by status code and
    requests by method, type and status class; the upload that failed
    verification; authentication failures by reason; no request still in
    flight but the scrape itself; and when the repository was last written
    and got its last snapshot.
    """
    server, clock = session_server(tmp_path)
    times = await session(server, clock)
    m = await scrape(server.client)

    def blob(op: str, kind: str, what: str = "") -> float | None:
        return value(m, f"rest_server_blob_{op}{what}_total", user="alice", repo="alice", type=kind)

    for kind, body in (("config", CONFIG), ("index", INDEX), ("keys", KEY), ("locks", LOCK), ("snapshots", SNAPSHOT)):
        assert (blob("write", kind), blob("write", kind, "_bytes")) == (1, len(body)), kind
    assert (blob("write", "data"), blob("write", "data", "_bytes")) == (3, 6000)
    assert total(m, "rest_server_blob_write_total") == 8
    assert (blob("read", "data"), blob("read", "data", "_bytes")) == (2, 1000 + 100)
    assert (blob("read", "config"), blob("read", "config", "_bytes")) == (1, len(CONFIG))
    assert total(m, "rest_server_blob_read_total") == 3
    assert (blob("delete", "locks"), blob("delete", "locks", "_bytes")) == (1, 100)
    assert (blob("delete", "data"), blob("delete", "data", "_bytes")) == (1, 3000)
    assert total(m, "rest_server_blob_delete_total") == 2

    stored = by_label(m, "resticd_repo_stored_bytes", "type", repo="alice")
    objects = by_label(m, "resticd_repo_objects", "type", repo="alice")
    # The lock was deleted: its type is empty again.
    assert stored == {"config": len(CONFIG), "data": 3000, "index": 500, "keys": 300, "snapshots": 200, "locks": 0}
    assert objects == {"config": 1, "data": 2, "index": 1, "keys": 1, "snapshots": 1, "locks": 0}

    assert by_label(m, "resticd_responses_total", "code") == SESSION_RESPONSES
    assert total(m, "resticd_request_duration_seconds_count") == sum(SESSION_RESPONSES.values())
    duration = "resticd_request_duration_seconds_count"
    assert value(m, duration, method="POST", type="data", status_class="2xx") == 3
    assert value(m, duration, method="POST", type="data", status_class="4xx") == 1
    # The 403 was routed to /bob/config; the 401s were refused before routing.
    assert value(m, duration, method="GET", type="config", status_class="4xx") == 1
    assert value(m, duration, method="GET", type="other", status_class="4xx") == 2
    assert value(m, duration, method="DELETE", type="locks", status_class="2xx") == 1
    assert value(m, "resticd_upload_verification_failures_total", repo="alice", type="data") == 1
    assert total(m, "resticd_upload_verification_failures_total") == 1
    assert by_label(m, "resticd_auth_failures_total", "reason") == {"missing": 1, "password": 1}
    assert value(m, "resticd_requests_aborted_total") == 0
    # The scrape itself is the only request in flight while it is answered,
    # and once it is done there is none.
    assert value(m, "resticd_requests_in_flight") == 1
    assert server.metrics is not None
    assert server.metrics.registry.get_sample_value("resticd_requests_in_flight") == 0

    assert value(m, "resticd_repo_last_write_timestamp_seconds", repo="alice") == times["last write"]
    assert value(m, "resticd_repo_last_snapshot_timestamp_seconds", repo="alice") == times["snapshot"]


def test_children_are_made_once_per_set_of_label_values() -> None:
    """
    The per-request counts go to the child prometheus_client makes for
    their label values the first time and to the same child after that;
    the registry exports what was counted, per set of values.
    """
    registry = CollectorRegistry()
    counter = Counter("things", "Things", ["a", "b"], registry=registry)
    children = Children(counter)
    first = children("x", "y")
    assert first is counter.labels("x", "y")
    assert children("x", "y") is first
    first.inc(2)
    children("x", "y").inc()
    children("x", "z").inc()
    assert registry.get_sample_value("things_total", {"a": "x", "b": "y"}) == 3
    assert registry.get_sample_value("things_total", {"a": "x", "b": "z"}) == 1


@pytest_twisted.ensureDeferred
async def test_deleting_a_snapshot_is_not_a_new_snapshot(tmp_path):
    """
    The last-snapshot timestamp says when a snapshot was last saved
    (what the "no backup for 26 h" alert relies on): `restic forget`
    deleting an old snapshot later does not move it, although it is a
    write. (After a restart the timestamp is read from the snapshot files'
    modification times, which a deletion does not change either.)
    """
    server, clock = session_server(tmp_path)
    alice = basic("alice", USERS["alice"])
    c = server.client
    assert (await c.post("/alice/?create=true", authorization=alice)).code == 200
    old, new = b"old snapshot", b"new snapshot"
    saved = clock.now
    for body in (old, new):
        assert (await c.post(f"/alice/snapshots/{name_of(body)}", body, authorization=alice)).code == 200
    clock.now += 3600
    assert (await c.delete(f"/alice/snapshots/{name_of(old)}", authorization=alice)).code == 200
    m = await scrape(c)
    assert value(m, "resticd_repo_last_write_timestamp_seconds", repo="alice") == clock.now
    assert value(m, "resticd_repo_last_snapshot_timestamp_seconds", repo="alice") == saved


@pytest_twisted.ensureDeferred
async def test_scrape_reads_memory_not_disk(tmp_path):
    """
    A scrape never walks the repositories: after the repository's files are
    removed behind the server's back, the stored bytes and objects it
    reports are those it counted as uploads and deletes happened.
    """
    server, clock = session_server(tmp_path)
    await session(server, clock)
    before = await scrape(server.client)
    shutil.rmtree(server.layout.repo_dir(("alice",)))
    after = await scrape(server.client)
    for name in ("resticd_repo_stored_bytes", "resticd_repo_objects"):
        counted = by_label(before, name, "type", repo="alice")
        assert counted["data"] > 0
        assert by_label(after, name, "type", repo="alice") == counted


@pytest_twisted.ensureDeferred
async def test_malformed_request_leaves_nothing_in_flight(tmp_path):
    """
    A request that twisted.web refuses itself (a malformed request line:
    400 and the connection closed) does not stay counted in
    resticd_requests_in_flight forever.
    """
    server, clock = session_server(tmp_path)
    answer = raw_request(server.site, b"GET /a b c HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert server.metrics is not None
    assert server.metrics.registry.get_sample_value("resticd_requests_in_flight") == 0


# -- who may read /metrics ---------------------------------------------------------


def auth_metrics_server(tmp_path: Path, **overrides: Any) -> Server:
    return make_server(str(tmp_path / "data"), authenticator=authenticator_for(tmp_path), **overrides)


@pytest_twisted.ensureDeferred
async def test_metrics_need_a_login(tmp_path):
    """
    With logins and --prometheus, /metrics answers 401 without credentials
    or with a wrong password, and the metrics to any valid user.
    """
    server = auth_metrics_server(tmp_path, prometheus=True)
    c = server.client
    for headers in ({}, {"authorization": basic("alice", "wrong")}):
        reply = await c.get("/metrics", **headers)
        assert reply.code == 401
        assert b"resticd_build_info" not in reply.body
    for user in ("alice", "metrics"):
        m = await scrape(c, authorization=basic(user, USERS[user]))
        assert total(m, "resticd_build_info") == 1


@pytest_twisted.ensureDeferred
async def test_metrics_without_login(tmp_path):
    """
    With --prometheus-no-auth, /metrics is served without credentials even
    though the repositories need a login. A server without TLS exports no
    certificate expiry.
    """
    server = auth_metrics_server(tmp_path, prometheus=True, prometheus_no_auth=True)
    m = await scrape(server.client)
    assert total(m, "resticd_build_info") == 1
    # Without TLS there is no certificate to expire (and nothing to alert on).
    assert not any(name.startswith("resticd_tls_certificate_expiry") for name, _ in m)
    assert (await server.client.get("/alice/config")).code == 401


@pytest_twisted.ensureDeferred
async def test_process_metrics_describe_the_daemon_process(tmp_path):
    """
    /metrics carries the standard process metrics rest-server's dashboards
    use (as Go's client exports them): the resident memory, CPU time, open
    file descriptors and their limit, and the start time, of the process
    serving the page.
    """
    server = auth_metrics_server(tmp_path, prometheus=True, prometheus_no_auth=True)
    m = await scrape(server.client)
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    assert 0.5 * rss <= total(m, "process_resident_memory_bytes") <= 2 * rss
    assert total(m, "process_cpu_seconds_total") > 0
    assert 3 <= total(m, "process_open_fds") <= len(os.listdir("/proc/self/fd")) + 8
    assert total(m, "process_max_fds") == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert abs(total(m, "process_start_time_seconds") - time.time()) < 24 * 3600


@pytest_twisted.ensureDeferred
async def test_private_repos_metrics_only_for_user_metrics(tmp_path):
    """
    With --private-repos, only the user `metrics` may read /metrics: other
    valid users get 403, no credentials 401.
    """
    server = auth_metrics_server(tmp_path, prometheus=True, private_repos=True)
    c = server.client
    m = await scrape(c, authorization=basic("metrics", USERS["metrics"]))
    assert total(m, "resticd_build_info") == 1
    for user in ("alice", "bob"):
        reply = await c.get("/metrics", authorization=basic(user, USERS[user]))
        assert reply.code == 403
        assert b"resticd_build_info" not in reply.body
    assert (await c.get("/metrics")).code == 401


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("with_metrics", [False, True], ids=["no-metrics", "metrics-elsewhere"])
async def test_no_metrics_on_listeners_without_prometheus(tmp_path, with_metrics):
    """
    Without --prometheus, /metrics on the main listeners is not the metrics
    (not even when --prometheus-listen serves them elsewhere): it is the
    repository /metrics/, which a GET does not list.
    """
    server = make_server(str(tmp_path / "data"))
    site = server.site
    if with_metrics:
        metrics = Metrics(CollectorRegistry(), server.ctx.usage, server.ctx.access, server.reactor)
        site = make_site(server.config, server.ctx, None, server.reactor, metrics=metrics)
    client = SiteClient(site)
    reply = await client.get("/metrics")
    assert reply.code in (404, 405)
    assert b"# TYPE" not in reply.body and b"rest_server" not in reply.body
    # It is an ordinary repository path.
    assert (await client.post("/metrics/?create=true")).code == 200
    assert os.path.isdir(server.layout.repo_dir(("metrics",)))


@pytest_twisted.ensureDeferred
async def test_metrics_site_serves_metrics_and_health_only(tmp_path):
    """
    The --prometheus-listen site serves /metrics and /-/ready and
    /-/healthy without any login (even when the repositories need one), and
    nothing else: repository paths are 404 and create nothing.
    """
    server = auth_metrics_server(tmp_path, prometheus=True)
    assert server.metrics is not None
    site = make_metrics_site(server.config, server.ctx, server.metrics, server.reactor)
    client = SiteClient(cast(ResticSite, site))
    m = await scrape(client)
    assert total(m, "resticd_build_info") == 1
    for path in ("/-/ready", "/-/healthy"):
        reply = await client.get(path)
        assert reply.code == 200, path
        assert json.loads(reply.body)["status"] in ("ready", "ok")
    for method, path in (
        ("GET", "/alice/config"),
        ("GET", "/data/"),
        ("GET", "/"),
        ("POST", "/alice/?create=true"),
        ("POST", f"/data/{name_of(b'x')}"),
        ("DELETE", "/alice/config"),
    ):
        reply = await client.request(method, path, b"x" if method == "POST" else None)
        assert reply.code == 404, (method, path, reply.code)
    assert not os.path.exists(server.layout.repo_dir(("alice",)))
    assert not os.path.exists(server.layout.type_dir((), "data"))


# -- health ----------------------------------------------------------------------------------


async def ready(client: SiteClient) -> tuple[int, dict[str, Any]]:
    reply = await client.get("/-/ready")
    assert reply.header("content-type") == "application/json"
    return reply.code, json.loads(reply.body)


@pytest_twisted.ensureDeferred
async def test_healthy_and_ready(tmp_path):
    """
    /-/healthy answers 200 with JSON; /-/ready answers 200 while the data
    directory is writable, has enough free space and its objects are
    counted; neither needs a login even when the repositories do.
    """
    server = auth_metrics_server(tmp_path)
    healthy = await server.client.get("/-/healthy")
    assert healthy.code == 200
    assert healthy.header("content-type") == "application/json"
    assert json.loads(healthy.body) == {"status": "ok"}
    assert await ready(server.client) == (200, {"status": "ready"})
    assert (await server.client.get("/-/nothing")).code == 404


@pytest_twisted.ensureDeferred
async def test_not_ready_without_free_space(tmp_path):
    """
    Below --min-free-space, /-/ready answers 503 with the reason in JSON,
    without a login.
    """
    server = auth_metrics_server(tmp_path, min_free_space=MinFree(fraction=1.0))
    code, body = await ready(server.client)
    assert code == 503
    assert body["status"] == "unavailable"
    assert len(body["reasons"]) == 1 and "free" in body["reasons"][0]
    assert (await server.client.get("/-/healthy")).code == 200


@pytest_twisted.ensureDeferred
async def test_not_ready_when_data_directory_unusable(tmp_path):
    """
    When the data directory cannot be written (here: it is gone), /-/ready
    answers 503 naming it.
    """
    server = make_server(str(tmp_path / "data"))
    shutil.rmtree(server.layout.root)
    code, body = await ready(server.client)
    assert code == 503
    assert any("not writable" in reason and server.layout.root in reason for reason in body["reasons"])


@pytest_twisted.ensureDeferred
async def test_not_ready_while_counting(tmp_path):
    """
    Until the stored objects are counted at startup, /-/ready answers 503
    saying so; once they are, 200.
    """
    server = make_server(str(tmp_path / "data"))
    server.ctx.ready.close()
    code, body = await ready(server.client)
    assert code == 503
    assert body["reasons"] == ["still counting stored objects"]
    server.ctx.ready.open()
    assert (await ready(server.client))[0] == 200


@pytest.mark.parametrize(
    "text, fraction, size",
    [
        ("1%", 0.01, 0),
        ("0.5%", 0.005, 0),
        (" 100 % ", 1.0, 0),
        ("10G", 0.0, 10 << 30),
        ("500M", 0.0, 500 << 20),
        ("1.5T", 0.0, int(1.5 * (1 << 40))),
        ("1048576", 0.0, 1 << 20),
    ],
)
def test_min_free_parse(text, fraction, size):
    """
    --min-free-space takes a percentage of the filesystem or a size in
    binary units.
    """
    assert MinFree.parse(text) == MinFree(fraction=fraction, bytes=size)


@pytest.mark.parametrize("text", ["101%", "-1%", "%", "ten", "5 parsecs", ""])
def test_min_free_parse_rejects(text):
    """
    Anything but a percentage up to 100% or a size is refused.
    """
    with pytest.raises(ValueError):
        MinFree.parse(text)


def test_min_free_required():
    """
    The free bytes required are the larger of the size and the fraction.
    """
    assert MinFree(fraction=0.1).required(1000) == 100
    assert MinFree(bytes=50).required(1000) == 50
    assert MinFree(fraction=0.1, bytes=500).required(1000) == 500


# -- the access log ----------------------------------------------------------------------

COMBINED = re.compile(
    r'(?P<host>\S+) - (?P<user>\S+) \[(?P<time>[^\]]+)\] "(?P<request>(?:[^"\\]|\\.)*)" (?P<code>\d{3}) (?P<size>\d+|-)'
    r' "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)"\Z'
)


def log_lines(path: Path) -> list[re.Match[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    matches = [COMBINED.match(line) for line in lines]
    assert all(matches), lines
    return cast(list[re.Match[str]], matches)


@pytest_twisted.ensureDeferred
async def test_access_log_combined_format_with_user(tmp_path):
    """
    With --log, every request is a line in Apache's combined format whose
    user field is the authenticated user (- for none), with the status and
    the bytes sent.
    """
    server = auth_metrics_server(tmp_path)
    path = tmp_path / "access.log"
    server.site.observers.append(AccessLog(str(path), server.reactor))
    c = server.client
    alice = basic("alice", USERS["alice"])
    assert (await c.post("/alice/?create=true", authorization=alice)).code == 200
    assert (await c.post("/alice/config", CONFIG, authorization=alice)).code == 200
    assert (await c.get("/alice/config", range="bytes=0-", authorization=alice, user_agent="restic/0.14.0")).code == 206
    assert (await c.get("/alice/config")).code == 401
    lines = log_lines(path)
    assert [(m["user"], m["request"], m["code"]) for m in lines] == [
        ("alice", "POST /alice/?create=true HTTP/1.1", "200"),
        ("alice", "POST /alice/config HTTP/1.1", "200"),
        ("alice", "GET /alice/config HTTP/1.1", "206"),
        ("-", "GET /alice/config HTTP/1.1", "401"),
    ]
    assert lines[2]["size"] == str(len(CONFIG))
    assert lines[2]["agent"] == "restic/0.14.0"
    assert lines[0]["host"] == "127.0.0.1"
    assert re.fullmatch(r"\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}", lines[0]["time"])


def test_access_log_escapes_quotes_and_control_bytes(tmp_path):
    """
    Quotes and backslashes in the request line, and quotes and control
    bytes (an ANSI escape) in headers, are escaped so that no client can
    forge or garble a log line; without authentication the user is -.
    """
    server = make_server(str(tmp_path / "data"))
    path = tmp_path / "access.log"
    server.site.observers.append(AccessLog(str(path), server.reactor))
    answer = raw_request(
        server.site,
        b'GET /r/a"b\\c HTTP/1.1\r\nHost: x\r\nUser-Agent: ev"il\x01\x1b[31m\r\nReferer: x" 200 1 "\r\n\r\n',
    )
    assert answer.startswith(b"HTTP/1.1 404")
    raw = path.read_bytes()
    assert raw.count(b"\n") == 1 and b"\x1b" not in raw and b"\x01" not in raw
    [line] = log_lines(path)
    assert line["host"] == "10.1.2.3"
    assert line["user"] == "-"
    assert line["request"] == 'GET /r/a\\"b\\\\c HTTP/1.1'
    assert line["agent"] == 'ev\\"il\\x01\\x1b[31m'
    assert line["referer"] == 'x\\" 200 1 \\"'
    assert line["code"] == "404"


def test_access_log_reopened_on_hangup(tmp_path):
    """
    After logrotate renames the access log away, SIGHUP (the service's
    hangup) makes resticd write the following lines to a new file at the
    configured path; the renamed file gets nothing more.
    """
    path = tmp_path / "access.log"
    config = Config(path=str(tmp_path / "data"), listen=(), access_log=str(path))
    service = ResticdService(config, MemoryReactorClock())
    service.prepare()
    try:
        raw_request(service.site, b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
        rotated = tmp_path / "access.log.1"
        os.rename(path, rotated)
        raw_request(service.site, b"GET /-/healthy?second HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not path.exists()
        result(service.hangup())
        raw_request(service.site, b"GET /-/healthy?third HTTP/1.1\r\nHost: x\r\n\r\n")
        assert [m["request"] for m in log_lines(rotated)] == [
            "GET /-/healthy HTTP/1.1",
            "GET /-/healthy?second HTTP/1.1",
        ]
        assert [m["request"] for m in log_lines(path)] == ["GET /-/healthy?third HTTP/1.1"]
    finally:
        assert service.access_log is not None
        service.access_log.close()


# -- one log line per refusal -------------------------------------------------------------


REFUSED = re.compile(r"refused (?P<status>\d{3}) (?P<method>[A-Z]+) (?P<path>\S+) for user (?P<user>\S+) from (?P<client>\S+): .+")


async def refusals(tmp_path: Path) -> tuple[list[tuple[int, str, str, str]], list[LogEvent]]:
    """
    A 401, 401, 403, 507 and 400 refusal, and some requests that are not
    refused, with everything logged meanwhile.
    """
    server = make_server(
        str(tmp_path / "data"), authenticator=authenticator_for(tmp_path), private_repos=True, max_size=4000
    )
    c = server.client
    alice = basic("alice", USERS["alice"])
    assert (await c.post("/alice/?create=true", authorization=alice)).code == 200
    big = b"b" * 5000
    expected = [
        (401, "GET", "/alice/config", "-"),
        (401, "GET", "/alice/keys/", "alice"),
        (403, "GET", "/bob/config", "alice"),
        (507, "POST", f"/alice/data/{name_of(big)}", "alice"),
        (400, "POST", f"/alice/data/{name_of(b'x')}", "alice"),
    ]
    with captured_logs() as events:
        assert (await c.get("/alice/config")).code == 401
        assert (await c.get("/alice/keys/", authorization=basic("alice", "nope"))).code == 401
        assert (await c.get("/bob/config", authorization=alice)).code == 403
        assert (await c.post(f"/alice/data/{name_of(big)}", big, authorization=alice)).code == 507
        assert (await c.post(f"/alice/data/{name_of(b'x')}", b"y", authorization=alice)).code == 400
        # Not refusals: a success and a miss.
        assert (await c.get("/alice/keys/", authorization=alice)).code == 200
        assert (await c.get("/alice/config", authorization=alice)).code == 404
    return expected, events


@pytest_twisted.ensureDeferred
async def test_each_refusal_logged_once(tmp_path):
    """
    Every refused request (401, 403, 507, 400) is logged exactly once as a
    warning `refused STATUS METHOD PATH for user U from ADDRESS: REASON`
    (what fail2ban matches); answered requests are not.
    """
    expected, events = await refusals(tmp_path)
    lines = [formatEvent(e) for e in events if formatEvent(e).startswith("refused ")]
    found = [REFUSED.fullmatch(line) for line in lines]
    assert all(found), lines
    assert [(int(m["status"]), m["method"], m["path"], m["user"]) for m in found if m] == expected
    assert all(m["client"] == "127.0.0.1" for m in found if m)
    assert all(e["log_level"] == LogLevel.warn for e in events if formatEvent(e).startswith("refused "))


@pytest_twisted.ensureDeferred
async def test_refusal_not_logged_twice(tmp_path):
    """
    A refusal is one warning, not the `refused` line plus another warning
    about the same request: the log has exactly as many warnings about
    requests as there were refusals.
    """
    expected, events = await refusals(tmp_path)
    warnings = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]
    for status, method, path, user in expected:
        about = [w for w in warnings if path in w]
        assert len(about) == 1, (status, about)


# -- a real restic session ---------------------------------------------------------------


@pytest.fixture(scope="module")
def restic_bin() -> str:
    """
    The restic executable: a test failure in CI when it is missing, a skip
    elsewhere.
    """
    return required_program("restic")


METRICS_SERVING = re.compile(r"resticd serving metrics of .+ on (?P<url>http://\S+)\s*$", re.M)


def metrics_url(daemon: Daemon, timeout: float = 10.0) -> str:
    """
    The URL of the daemon's --prometheus-listen endpoint, from its log.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = METRICS_SERVING.search(daemon.log())
        if found:
            return found.group("url")
        assert time.monotonic() < deadline, f"no metrics listener logged:\n{daemon.log()}"
        time.sleep(0.05)


def http_get(url: str | urllib.request.Request, **kwargs: Any) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=15, **kwargs) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def disk_objects(repo: Path) -> dict[str, dict[str, int]]:
    """
    The files under each type directory of a repository, with their sizes,
    and the config.
    """
    found: dict[str, dict[str, int]] = {}
    for kind in ("data", "index", "keys", "locks", "snapshots"):
        found[kind] = {}
        for directory, _, names in os.walk(repo / kind):
            for name in names:
                found[kind][name] = os.path.getsize(os.path.join(directory, name))
    found["config"] = {"config": os.path.getsize(repo / "config")}
    return found


def write_tree(root: Path, seed: int) -> None:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (root / f"big{i}.bin").write_bytes(rng.randbytes(MIB))
    for i in range(30):
        (root / "small" / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / "small" / f"d{i % 3}" / f"f{i}.txt").write_bytes(rng.randbytes(rng.randrange(1, 4000)))


@pytest.mark.restic
@pytest.mark.network
def test_restic_session_measured(tmp_path, restic_bin):
    """
    After a real restic session (init, backup, restore, a second backup of a
    changed tree, forget --prune) over HTTPS with a login, the metrics (read
    on the --prometheus-listen endpoint without a login, and on the main
    listener with one) agree with the disk and with what restic did: stored
    bytes and objects per type equal the files under the repository; every
    object stored was written once and is either still there or was
    deleted; prune's deletions are counted; and the last snapshot is the
    second backup's.
    """
    user, password = "alice", "alice pw"
    with running(
        tmp_path, "--prometheus", "--prometheus-listen", "tcp:0:interface=127.0.0.1", auth={user: password}
    ) as daemon:
        metrics = metrics_url(daemon) + "/metrics"
        assert daemon.cert is not None
        # The first "resticd serving" line is the main listener's, not the metrics one's.
        assert daemon.url.startswith("https://"), daemon.urls
        repo_url = f"rest:https://{user}:{password.replace(' ', '%20')}@{daemon.host}:{daemon.port}/repo"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESTIC_")}
        env.update(HOME=str(tmp_path / "home"), RESTIC_PASSWORD="pw", RESTIC_CACHE_DIR=str(tmp_path / "cache"))

        def restic(*args: str) -> str:
            argv = [restic_bin, "-r", repo_url, "--cacert", str(daemon.cert), *args]
            done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False)
            assert done.returncode == 0, f"restic {' '.join(args)}: {done.stdout}\n{done.stderr}"
            return done.stdout

        repo = daemon.data / "repo"
        source = tmp_path / "source"
        write_tree(source, 1)
        restic("init")
        restic("backup", str(source))
        restic("restore", "latest", "--target", str(tmp_path / "restored"))
        assert (tmp_path / "restored" / source.relative_to("/") / "big1.bin").read_bytes() == (source / "big1.bin").read_bytes()
        write_tree(source, 2)
        before_second = time.time()
        restic("backup", str(source))
        after_second = time.time()
        before_prune = disk_objects(repo)
        restic("forget", "--keep-last", "1", "--prune")
        after = disk_objects(repo)

        status, body = http_get(metrics)
        assert status == 200
        m = parse_exposition(body.decode())
        # The main listener serves the same metrics behind the login.
        tls = ssl.create_default_context(cafile=str(daemon.cert))
        assert http_get(f"{daemon.url}/metrics", context=tls)[0] == 401
        request = urllib.request.Request(f"{daemon.url}/metrics", headers={"Authorization": basic(user, password)})
        main_status, main_body = http_get(request, context=tls)
        assert main_status == 200 and b"resticd_repo_stored_bytes" in main_body

    removed = {kind: set(before_prune[kind]) - set(after[kind]) for kind in after}
    assert sum(len(v) for v in removed.values()) > 0, "prune removed nothing; the test needs it to"
    for kind, files in after.items():
        assert value(m, "resticd_repo_stored_bytes", repo="repo", type=kind) == sum(files.values()), kind
        assert value(m, "resticd_repo_objects", repo="repo", type=kind) == len(files), kind
        written = total(m, "rest_server_blob_write_total", repo="repo", type=kind)
        deleted = total(m, "rest_server_blob_delete_total", repo="repo", type=kind)
        assert deleted >= len(removed[kind]), kind
        assert written == len(files) + deleted, kind
        written_bytes = total(m, "rest_server_blob_write_bytes_total", repo="repo", type=kind)
        deleted_bytes = total(m, "rest_server_blob_delete_bytes_total", repo="repo", type=kind)
        assert written_bytes == sum(files.values()) + deleted_bytes, kind
    assert total(m, "rest_server_blob_write_total", user="alice", repo="repo") == total(m, "rest_server_blob_write_total")
    assert total(m, "rest_server_blob_read_total", repo="repo", type="data") > 0
    assert value(m, "resticd_upload_verification_failures_total", repo="repo", type="data") is None
    assert value(m, "resticd_requests_in_flight") == 0
    assert value(m, "resticd_tls_certificate_expiry_timestamp_seconds") == certificate_expiry(str(daemon.cert))
    last_snapshot = value(m, "resticd_repo_last_snapshot_timestamp_seconds", repo="repo")
    assert last_snapshot is not None
    # The daemon stamps with the same wall clock as this test.
    assert before_second <= last_snapshot <= after_second, (before_second, last_snapshot, after_second)
    newest = max(os.path.getmtime(repo / "snapshots" / name) for name in after["snapshots"])
    assert abs(last_snapshot - newest) < 0.5


# -- the shipped dashboard, scrape config and rules ------------------------------------------


def promtool() -> str:
    return required_program("promtool", "prometheus")


def run_promtool(*args: str) -> str:
    done = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def dashboard_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from dashboard_panels(panel.get("panels", []))


def dashboard_exprs() -> list[str]:
    """
    Every PromQL expression of the dashboard: its panels' queries and its
    template variables' label_values() queries.
    """
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard_panels(board["panels"]) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", text)
            assert match, text
            exprs.append(match.group(1))
    return exprs


def rule_exprs() -> list[str]:
    """
    The C{expr:} of every rule in the rules file (one line each; promtool
    checks that the file is what it should be).
    """
    return [m.group(1).strip() for m in re.finditer(r"^\s+expr:\s*(\S.*)$", RULES.read_text(), re.M)]


#: PromQL words that are not metric names.
PROMQL_WORDS = frozenset(
    "sum avg min max count rate irate increase delta histogram_quantile time by without on ignoring"
    " group_left group_right and or unless bool offset abs clamp_min clamp_max topk bottomk".split()
)


def metric_names(expr: str) -> set[str]:
    """
    The metric names an expression reads: its identifiers outside strings,
    label matchers, grouping clauses and ranges, less PromQL's own words.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text)) - PROMQL_WORDS
    assert not {w for w in words if w.startswith("$")}, expr
    return words


async def exported_samples(tmp_path: Path) -> set[str]:
    """
    The sample names a busy server exports: with TLS (certificate expiry),
    quotas of every scope, a thread pool, and traffic of every kind (so that
    labelled families have samples).
    """
    access = tmp_path / "access.toml"
    access.write_text('[default]\n"{user}" = ["read", "write"]\n[quota.users]\nalice = "1G"\n[quota.repos]\n"alice" = "1G"\n')
    server = make_server(
        str(tmp_path / "data"),
        authenticator=authenticator_for(tmp_path),
        prometheus=True,
        prometheus_no_auth=True,
        access_file=str(access),
        max_size=1 << 40,
    )
    assert server.metrics is not None
    cert, _ = write_self_signed(str(tmp_path / "tls"))
    server.metrics.set_certificate_expiry(certificate_expiry(cert))
    server.metrics.threads = WorkerThreads(2)
    clock = Clock()
    server.ctx.now = clock
    await session(server, clock)
    return {name for name, _ in await scrape(server.client)}


def test_dashboard_is_a_dashboard():
    """
    The Grafana dashboard is JSON with panels that all have queries against
    a data source chosen by a variable, and a `repo` variable listing the
    repositories.
    """
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [p for p in dashboard_panels(board["panels"]) if p["type"] != "row"]
    assert len(panels) >= 12
    assert all(p.get("targets") and p.get("title") for p in panels)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    repo_query = variables["repo"]["query"]
    assert re.fullmatch(r"label_values\(resticd_repo_stored_bytes(\{.*\})?, repo\)", repo_query["query"])
    ids = [p["id"] for p in dashboard_panels(board["panels"])]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_parse(tmp_path):
    """
    Every query of the dashboard is valid PromQL (checked by promtool, with
    Grafana's variables filled in).
    """
    exprs = dashboard_exprs()
    filled = [e.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$repo", ".*") for e in exprs]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text(json.dumps({"groups": [{"name": "d", "rules": [{"record": f"r{i}", "expr": e} for i, e in enumerate(filled)]}]}))
    assert f"SUCCESS: {len(exprs)} rules found" in run_promtool("check", "rules", str(rules))


def test_rules_and_config_pass_promtool():
    """
    `promtool check rules` and `promtool check config` accept the shipped
    files; every alert has a `for:` clause, a summary and a description.
    """
    out = run_promtool("check", "rules", str(RULES))
    alerts = re.findall(r"^\s+- alert: (\S+)$", RULES.read_text(), re.M)
    assert f"SUCCESS: {len(alerts)} rules found" in out
    assert len(rule_exprs()) == len(alerts)
    text = RULES.read_text()
    for field in ("for:", "summary:", "description:"):
        assert text.count(f" {field}") == len(alerts), field
    run_promtool("check", "config", str(PROMETHEUS_CONFIG))


def test_rules_cover_the_alerts():
    """
    The rules alert on: no snapshot for 26 hours, verification failures,
    server errors, a disk 90% full, a quota 90% full, a certificate expiring
    within 14 days, and a reactor lag p99 above 0.5 s for 10 minutes.
    """
    text = RULES.read_text()
    for pattern in (
        r"time\(\) - resticd_repo_last_snapshot_timestamp_seconds > 26 \* 3600",
        r"resticd_upload_verification_failures_total",
        r'resticd_responses_total\{code=~"5\.\."',
        r"1 - resticd_filesystem_avail_bytes / resticd_filesystem_size_bytes > 0\.9",
        r"resticd_quota_used_bytes / resticd_quota_limit_bytes > 0\.9",
        r"resticd_tls_certificate_expiry_timestamp_seconds - time\(\) < 14 \* 86400",
        r"histogram_quantile\(0\.99, .*resticd_reactor_lag_seconds_bucket.*\) > 0\.5\n\s+for: 10m",
    ):
        assert re.search(pattern, text), pattern


@pytest_twisted.ensureDeferred
async def test_shipped_queries_use_exported_metrics(tmp_path):
    """
    Every metric the dashboard and the alerting rules query is one resticd
    exports, under its exposed name (counters with _total, histograms as
    _bucket/_count/_sum): no query silently matches nothing.
    """
    exported = await exported_samples(tmp_path)
    referenced: dict[str, set[str]] = {}
    for source, exprs in (("dashboard", dashboard_exprs()), ("rules", rule_exprs())):
        for expr in exprs:
            for name in metric_names(expr):
                referenced.setdefault(name, set()).add(source)
    assert len(referenced) >= 15
    missing = {name: sources for name, sources in referenced.items() if name not in exported}
    assert not missing, f"not exported: {missing}\nexported: {sorted(exported)}"


def test_debug_events_pass_only_while_debugging() -> None:
    """
    resticd's debug events (one per upload, delete and repository change)
    reach the log only while debugging is on (C{--debug}); before and after,
    they are dropped.
    """
    from resticd.logs import logger, set_debug

    log = logger("resticd.resources")
    with captured_logs() as events:
        log.debug("hidden {n}", n=1)
        set_debug(True)
        try:
            log.debug("shown {n}", n=2)
        finally:
            set_debug(False)
        log.debug("hidden {n}", n=3)
    assert [formatEvent(e) for e in events] == ["shown 2"]
