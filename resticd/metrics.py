"""
Prometheus metrics.

rest-server's six blob counters keep their names and labels, so existing
dashboards keep working; everything else is named C{resticd_*} in base units.
Values come from memory only (request outcomes, the storage usage kept by
the store, the thread pool's counters): a scrape never walks the disk.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterator
from typing import Any

import twisted
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web import server

from . import __version__
from .access import Access
from .errors import PlainResource, VerificationFailed
from .paths import Repo
from .request import SpoolingRequest
from .threads import WorkerThreads
from .usage import ALL, Usage

#: Request duration buckets, seconds: from a cached HEAD to a 128 MiB upload.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: Reactor lag buckets, seconds.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
#: How often the reactor's lag is sampled, seconds.
LAG_INTERVAL = 0.5


def repo_name(repo: Repo) -> str:
    """
    A repository as a label value: its path without surrounding slashes, as
    rest-server labels it (C{""} for the root repository).
    """
    return "/".join(repo)


def status_class(code: int) -> str:
    """
    C{2xx}, C{4xx}, ... for a status code.
    """
    return f"{code // 100}xx"


class Children:
    """
    The children of a labelled metric by their label values, made by
    C{metric.labels} the first time and looked up in a dict after that:
    C{labels} checks and converts its values and takes a lock on every call
    (about 0.7 µs), and an answered request counts itself in up to four
    labelled metrics. The values must be strings, as C{labels} would make
    them; children are never removed.
    """

    def __init__(self, metric: MetricWrapperBase) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class Metrics:
    """
    Every metric of the daemon, in one registry.

    It is a request observer of the site (counts and times requests as they
    end) and owns collectors that read the storage usage, the quotas and the
    thread pool at scrape time.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        usage: Usage,
        access: Access,
        clock: IReactorTime,
        threads: WorkerThreads | None = None,
        root: str | None = None,
    ) -> None:
        self.registry = registry
        self.usage = usage
        self.access = access
        self.clock = clock
        self.threads = threads
        self.root = root
        labels = ["user", "repo", "type"]
        self.blob_read = Counter("rest_server_blob_read", "Objects read", labels, registry=registry)
        self.blob_read_bytes = Counter("rest_server_blob_read_bytes", "Bytes of objects read", labels, registry=registry)
        self.blob_write = Counter("rest_server_blob_write", "Objects written", labels, registry=registry)
        self.blob_write_bytes = Counter(
            "rest_server_blob_write_bytes", "Bytes of objects written", labels, registry=registry
        )
        self.blob_delete = Counter("rest_server_blob_delete", "Objects deleted", labels, registry=registry)
        self.blob_delete_bytes = Counter(
            "rest_server_blob_delete_bytes", "Bytes of objects deleted", labels, registry=registry
        )
        self.duration = Histogram(
            "resticd_request_duration_seconds",
            "Time from a request's first byte to its last answer byte",
            ["method", "type", "status_class"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge("resticd_requests_in_flight", "Requests being received or answered", registry=registry)
        self.responses = Counter("resticd_responses", "Responses by status code", ["code"], registry=registry)
        self.aborted = Counter(
            "resticd_requests_aborted", "Requests whose client went away before the answer", registry=registry
        )
        self.verification_failures = Counter(
            "resticd_upload_verification_failures",
            "Uploads refused because their sha256 is not their name",
            ["repo", "type"],
            registry=registry,
        )
        self.auth_failures = Counter(
            "resticd_auth_failures",
            "Failed authentications by reason (missing, password, certificate, proxy_header, throttled)",
            ["reason"],
            registry=registry,
        )
        self.reactor_lag = Histogram(
            "resticd_reactor_lag_seconds",
            "How late the reactor runs a timer: time spent blocked on something",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self._certificate_expiry: Gauge | None = None
        build = Gauge(
            "resticd_build_info",
            "Versions of resticd, Twisted and Python",
            ["version", "twisted", "python"],
            registry=registry,
        )
        build.labels(__version__, twisted.__version__, platform.python_version()).set(1)
        registry.register(_StateCollector(self))
        # process_resident_memory_bytes, process_cpu_seconds_total,
        # process_open_fds, ...: what rest-server's Go client exports too.
        ProcessCollector(registry=registry)
        self._reads = Children(self.blob_read)
        self._read_bytes = Children(self.blob_read_bytes)
        self._writes = Children(self.blob_write)
        self._write_bytes = Children(self.blob_write_bytes)
        self._deletes = Children(self.blob_delete)
        self._delete_bytes = Children(self.blob_delete_bytes)
        self._durations = Children(self.duration)
        self._responses = Children(self.responses)
        self._lag = LoopingCall(self._sample_lag)
        self._lag.clock = clock
        self._expected: float | None = None
        self._starts: dict[int, float] = {}

    def set_certificate_expiry(self, when: float) -> None:
        """
        Export when the served TLS certificate expires (only servers with TLS
        have this metric).
        """
        if self._certificate_expiry is None:
            self._certificate_expiry = Gauge(
                "resticd_tls_certificate_expiry_timestamp_seconds",
                "When the served TLS certificate expires (Unix time)",
                registry=self.registry,
            )
        self._certificate_expiry.set(when)

    # -- request observer ----------------------------------------------------

    def started(self, request: SpoolingRequest) -> None:
        self.in_flight.inc()
        self._starts[id(request)] = self.clock.seconds()

    def finished(self, request: SpoolingRequest, completed: bool) -> None:
        self.in_flight.dec()
        started = self._starts.pop(id(request), None)
        outcome = request.outcome
        target = outcome.target
        kind = (target.kind or "repo") if target is not None else "other"
        if outcome.auth_failure is not None:
            self.auth_failures.labels(outcome.auth_failure).inc()
        if not completed:
            self.aborted.inc()
            return
        code = request.code
        self._responses(str(code)).inc()
        method = request.method.decode("ascii", "replace") if request.method in _METHODS else "other"
        if started is not None:
            self._durations(method, kind, status_class(code)).observe(max(0.0, self.clock.seconds() - started))
        if target is None or target.name is None:
            return
        labels = (outcome.user or "", repo_name(target.repo), kind)
        if code in (200, 206) and request.method == b"GET":
            self._reads(*labels).inc()
            self._read_bytes(*labels).inc(request.sentLength)
        elif code == 200 and request.method == b"POST":
            self._writes(*labels).inc()
            self._write_bytes(*labels).inc(outcome.size)
        elif code == 200 and request.method == b"DELETE":
            self._deletes(*labels).inc()
            self._delete_bytes(*labels).inc(outcome.size)
        elif isinstance(outcome.error, VerificationFailed):
            self.verification_failures.labels(repo_name(target.repo), kind).inc()

    # -- reactor lag -----------------------------------------------------------

    def start(self) -> None:
        """
        Start sampling the reactor's lag.
        """
        self._expected = None
        self._lag.start(LAG_INTERVAL, now=True)

    def stop(self) -> None:
        if self._lag.running:
            self._lag.stop()

    def _sample_lag(self) -> None:
        now = self.clock.seconds()
        if self._expected is not None:
            self.reactor_lag.observe(max(0.0, now - self._expected))
        self._expected = now + LAG_INTERVAL

    def exposition(self) -> bytes:
        """
        The metrics in Prometheus' text format.
        """
        return generate_latest(self.registry)


_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"DELETE"})


class _StateCollector:
    """
    Gauges read at scrape time from memory: storage per repository and type,
    last writes, quotas, the thread pool, the data directory's filesystem.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        stored = GaugeMetricFamily("resticd_repo_stored_bytes", "Bytes stored per repository and type", labels=["repo", "type"])
        objects = GaugeMetricFamily("resticd_repo_objects", "Objects stored per repository and type", labels=["repo", "type"])
        for repo, kinds in sorted(m.usage.repos.items()):
            for kind, counts in sorted(kinds.items()):
                stored.add_metric([repo_name(repo), kind], counts.bytes)
                objects.add_metric([repo_name(repo), kind], counts.objects)
        yield stored
        yield objects
        yield _per_repo(
            "resticd_repo_last_write_timestamp_seconds",
            "When an object of the repository was last written or deleted (Unix time)",
            m.usage.last_write,
        )
        yield _per_repo(
            "resticd_repo_last_snapshot_timestamp_seconds",
            "When a snapshot was last saved to the repository (Unix time)",
            m.usage.last_snapshot,
        )
        yield from _quotas(m.usage, m.access)
        if m.threads is not None:
            yield GaugeMetricFamily("resticd_threadpool_size", "Worker threads", value=m.threads.size)
            yield GaugeMetricFamily("resticd_threadpool_busy", "Worker threads at work", value=m.threads.busy)
            yield GaugeMetricFamily("resticd_threadpool_queue", "Work waiting for a thread", value=m.threads.queued)
        if m.root is not None:
            try:
                fs = os.statvfs(m.root)
            except OSError:
                return
            yield GaugeMetricFamily(
                "resticd_filesystem_size_bytes", "Size of the data directory's filesystem", value=fs.f_blocks * fs.f_frsize
            )
            yield GaugeMetricFamily(
                "resticd_filesystem_avail_bytes",
                "Bytes free for resticd on the data directory's filesystem",
                value=fs.f_bavail * fs.f_frsize,
            )


def _per_repo(name: str, documentation: str, values: dict[Repo, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["repo"])
    for repo, value in sorted(values.items()):
        family.add_metric([repo_name(repo)], value)
    return family


def _quotas(usage: Usage, access: Access) -> Iterator[Metric]:
    limits = access.limits()
    limit = GaugeMetricFamily("resticd_quota_limit_bytes", "Storage limit per scope", labels=["scope", "name"])
    used = GaugeMetricFamily("resticd_quota_used_bytes", "Bytes stored per scope that has a limit", labels=["scope", "name"])
    if limits.total is not None:
        limit.add_metric(["all", ""], limits.total)
        used.add_metric(["all", ""], usage.scope_bytes(ALL))
    for user, value in sorted(limits.users.items()):
        limit.add_metric(["user", user], value)
        used.add_metric(["user", user], usage.scope_bytes(("user", user)))
    for repo in sorted(usage.repos):
        repo_limit = limits.repo(repo)
        if repo_limit is not None:
            limit.add_metric(["repo", repo_name(repo)], repo_limit)
            used.add_metric(["repo", repo_name(repo)], usage.repo_bytes(repo))
    yield limit
    yield used


class MetricsResource(PlainResource):
    """
    C{GET /metrics}: the Prometheus exposition.
    """

    isLeaf = True

    def __init__(self, exposition: Callable[[], bytes]) -> None:
        super().__init__()
        self.exposition = exposition

    def render_GET(self, request: server.Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.exposition()
