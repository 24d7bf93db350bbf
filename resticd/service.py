"""
Wiring: the store, the access policy, the resource tree, the site, the
worker threads and the listeners, as one Twisted service.
"""

from __future__ import annotations

import os
import resource
import signal
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any


from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web.resource import IResource

from .access import Access, AccessFileSource, Policy
from .accesslog import AccessLog
from .auth import AuthGate, Authenticator, Htpasswd, Throttle
from .config import Config
from .errors import ErrorResource, Forbidden, NotFound
from .health import Health, readiness_problems
from .logs import RequestLogger, describe_address, logger, set_debug
from .memory import BUSY_GROWTH_LIMIT, TRIM_INTERVAL, HeapTrim, MemoryTrim, each_of, heap_trimmer, keep_large_buffers
from .paths import Layout, Target
from .request import RequestLimits, SpoolingRequest
from .resources import Context, RepoResource
from .site import QuietSite, ResticSite, SiteRoot
from .spool import Spool
from .store import Modes, Store
from .threads import PoolRunner, Runner, WorkerThreads
from .systemd import notify
from .usage import Usage, tally

if TYPE_CHECKING:
    from .metrics import Metrics
    from .tls import ReloadingTLS

log = logger(__name__)

#: How often the htpasswd and access files are checked for changes, in seconds.
RELOAD_CHECK_INTERVAL = 5.0
#: How often the TLS certificate, key and client CA files are checked for
#: changes (a renewal by certbot or an ACME client), in seconds.
TLS_CHECK_INTERVAL = 60.0
#: With --private-repos, the only user who may read /metrics (as in rest-server).
METRICS_USER = "metrics"


class Periodic(service.Service):
    """
    Calls C{f} every C{interval} seconds of C{clock} while running, the
    first time at once, and never two calls at a time (a call that returns
    a L{Deferred} is waited for); a call that fails is logged, and the next
    one still comes. (What C{twisted.application.internet.TimerService}
    does, without importing that module's client services and the state
    machine library they use: some 8 ms of every start.)
    """

    def __init__(self, interval: float, f: Callable[[], object], clock: IReactorTime) -> None:
        self.interval = interval
        self.f = f
        self.clock = clock
        self._loop: LoopingCall | None = None
        self._stopped: Deferred[Any] = succeed(None)

    def _call(self) -> Deferred[object]:
        return maybeDeferred(self.f).addErrback(lambda failure: log.failure("{task} failed", failure, task=self.name))

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._call)
        self._loop.clock = self.clock
        self._stopped = self._loop.start(self.interval, now=True)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self._stopped


class StartupError(Exception):
    """
    The daemon cannot start; the message says why, in one line.
    """


class StartupExit(SystemExit, Exception):
    """
    Ends the process with one line and exit status 1. It is also an
    L{Exception} so that a daemonizing twistd hands it to the waiting parent
    process (which prints it and exits 1) instead of leaving it hanging.
    """


def make_store(config: Config) -> Store:
    """
    The store of the configured data directory.
    """
    return Store(Layout(config.path), Modes.for_group(config.group_accessible))


def make_context(config: Config, store: Store, run: Runner, usage: Usage | None = None) -> Context:
    """
    What the resource tree shares: the store, the worker threads, the
    access policy of the flags (and access file), and the storage usage.
    """
    policy = Policy(
        append_only=config.append_only,
        private_repos=config.private_repos,
        allow_repo_delete=config.allow_repo_delete,
        verify_upload=config.verify_upload,
    )
    source = AccessFileSource(config.access_file) if config.access_file else None
    return Context(store, run, Access(policy, config.max_size, source), usage or Usage())


def make_site(
    config: Config,
    ctx: Context,
    authenticator: Authenticator | None = None,
    reactor: Any = None,
    throttle: Throttle | None = None,
    metrics: Metrics | None = None,
) -> ResticSite:
    """
    The site serving the repositories of C{ctx} (open to all, or behind the
    configured authentication), the health endpoints, and with
    C{--prometheus} the metrics. C{reactor} runs its timeouts and clocks its
    logs (the global reactor when L{None}).
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor

    def tree_for(user: str | None) -> IResource:
        return RepoResource(ctx, Target(()), user)

    authenticates = authenticator is not None or config.proxy_auth_username is not None or config.tls_client_ca is not None

    def gate(resource_for: Callable[[str | None], IResource]) -> IResource:
        if not authenticates:
            return resource_for(None)
        proxy = config.proxy_auth_username
        return AuthGate(
            resource_for,
            authenticator,
            proxy_header=proxy.encode("ascii") if proxy else None,
            client_cert=config.tls_client_ca is not None,
            throttle=throttle,
        )

    fixed = {b"-": health_resource(config, ctx)}
    if metrics is not None and config.prometheus:
        from .metrics import MetricsResource

        exposition = MetricsResource(metrics.exposition)

        def metrics_for(user: str | None) -> IResource:
            if config.private_repos and user != METRICS_USER:
                return ErrorResource(Forbidden(f"only the user {METRICS_USER} may read the metrics"))
            return exposition

        fixed[b"metrics"] = exposition if config.prometheus_no_auth else gate(metrics_for)
    # Uploads that are not verified are not hashed either.
    spool = Spool(ctx.store.layout.spool_dir(), ctx.store.modes.file, ctx.run, hashed=config.verify_upload)
    site = ResticSite(
        SiteRoot(gate(tree_for), fixed),
        spool,
        ctx.quota,
        http2=config.http2,
        reactor=reactor,
        limits=RequestLimits(
            max_body=config.max_blob_size,
            header_timeout=config.request_timeout,
            body_stall_timeout=config.request_timeout,
        ),
    )
    site.observers.append(RequestLogger(reactor, config.debug))
    if metrics is not None:
        site.observers.append(metrics)
    return site


def health_resource(config: Config, ctx: Context) -> IResource:
    """
    C{/-/healthy} and C{/-/ready} for the data directory of C{ctx}.
    """
    root = ctx.store.layout.root
    return Health(lambda: readiness_problems(root, config.min_free_space, ctx.ready.opened))


def make_metrics_site(config: Config, ctx: Context, metrics: Metrics, reactor: Any = None) -> QuietSite:
    """
    The site of C{--prometheus-listen}: metrics and health only, no
    repositories, no authentication.
    """
    from .metrics import MetricsResource

    fixed = {b"metrics": MetricsResource(metrics.exposition), b"-": health_resource(config, ctx)}
    return QuietSite(SiteRoot(ErrorResource(NotFound("not found")), fixed), reactor=reactor)


def raise_open_files_limit() -> None:
    """
    Allow as many open files as the system lets this process have: each
    connection and each upload in flight holds one.
    """
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warn("cannot raise the open files limit: {why}", why=e)


class InFlight:
    """
    Counts the requests being received or answered; L{drained} fires when
    there are none.
    """

    def __init__(self) -> None:
        self.count = 0
        #: Requests started since the daemon did.
        self.started_total = 0
        self._waiting: list[Deferred[None]] = []

    def started(self, request: SpoolingRequest) -> None:
        self.count += 1
        self.started_total += 1

    def finished(self, request: SpoolingRequest, completed: bool) -> None:
        self.count -= 1
        if self.count == 0:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def drained(self) -> Deferred[None]:
        if self.count == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d


#: Connections the kernel queues for a listener before resticd accepts them
#: (it caps this at net.core.somaxconn); Twisted's default is 50.
LISTEN_BACKLOG = 4096


def with_default_backlog(description: str) -> str:
    """
    C{description} with C{backlog=}L{LISTEN_BACKLOG} added to a C{tcp},
    C{tcp6} or C{unix} endpoint that does not set its own: a crowd of
    clients connecting at once (backups started by the same timer) is
    queued rather than refused or made to retry.
    """
    kind = description.partition(":")[0]
    if kind in ("tcp", "tcp6", "unix") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


class ResticdService(service.MultiService):
    """
    The whole daemon: prepares the data directory, listens, owns the worker
    thread pool, and reloads the users and access rules when their files
    change or on SIGHUP.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        set_debug(config.debug)
        self.config = config
        self.reactor = reactor
        self.threads = WorkerThreads(config.threads)
        self.run = PoolRunner(reactor, self.threads)
        self.store = make_store(config)
        self.ctx = make_context(config, self.store, self.run)
        self.authenticator: Authenticator | None = None
        if config.htpasswd_file is not None:
            self.authenticator = Authenticator(Htpasswd(config.htpasswd_file), self.run, reactor)
        if self.authenticator is not None or self.ctx.access.source is not None:
            reload = Periodic(RELOAD_CHECK_INTERVAL, self.reload, reactor)
            reload.setName("checking the users and access files for changes")
            reload.setServiceParent(self)
        self.metrics: Metrics | None = None
        if config.prometheus or config.prometheus_listen:
            # prometheus_client is imported only when metrics are served.
            from prometheus_client import CollectorRegistry

            from .metrics import Metrics

            self.metrics = Metrics(
                CollectorRegistry(), self.ctx.usage, self.ctx.access, reactor, self.threads, self.store.layout.root
            )
        self.site = make_site(config, self.ctx, self.authenticator, reactor, Throttle(reactor), self.metrics)
        self.access_log: AccessLog | None = None
        self.tls: ReloadingTLS | None = None
        self.in_flight = InFlight()
        self.site.observers.append(self.in_flight)
        # Once idle: the staging buffers of direct writes, and glibc's heaps;
        # while busy, the heaps when the daemon is much larger than when idle.
        trims = [self.site.spool.direct.release]
        heap_trim = heap_trimmer()
        busy_trim = None
        if heap_trim is not None:
            heap = HeapTrim(heap_trim, BUSY_GROWTH_LIMIT)
            trims.append(heap.idle)
            busy_trim = heap.busy
        memory_trim = MemoryTrim(self.in_flight, self.run, each_of(trims), busy_trim)
        trimming = Periodic(TRIM_INTERVAL, memory_trim.check, reactor)
        trimming.setName("the memory trim")
        trimming.setServiceParent(self)
        self.ports: list[IListeningPort] = []
        self._prepared = False
        self._previous_sighup: Any = None
        self._catching_sighup = False

    def reload(self) -> Deferred[None]:
        """
        Re-read the htpasswd and access files if they changed; a file that
        fails to load is logged and the previous one stays in force.
        """
        return Deferred.fromCoroutine(self._reload())

    def hangup(self) -> Deferred[None]:
        """
        What SIGHUP does: reopen the access log, load the TLS certificate and
        key again, and reload what L{reload} reloads.
        """
        if self.access_log is not None:
            try:
                self.access_log.reopen()
            except OSError as e:
                log.error("cannot reopen the access log {path}: {why}", path=self.access_log.path, why=e)
        if self.tls is not None:
            self._reload_tls(force=True)
        return self.reload()

    async def _reload(self) -> None:
        if self.authenticator is not None:
            await self.authenticator.reload()
        access = self.ctx.access
        if access.source is not None:
            try:
                if await self.run(access.refresh):
                    log.info("loaded access rules from {path}", path=access.source.path)
            except (OSError, ValueError) as e:
                log.error(
                    "cannot reload {path}: {why}; keeping the previous rules", path=access.source.path, why=e
                )

    def factory(self) -> IProtocolFactory:
        """
        The protocol factory for every listener: the site, wrapped in TLS
        when configured.
        """
        config = self.config
        if config.tls_cert is None or config.tls_key is None:
            return self.site
        # The TLS libraries are loaded only when TLS is served.
        from .tls import BatchingTLSFactory, ReloadingTLS, TLSConfigError

        try:
            self.tls = ReloadingTLS(
                config.tls_cert,
                config.tls_key,
                config.tls_min_version,
                config.tls_client_ca,
                self.metrics.set_certificate_expiry if self.metrics is not None else lambda expiry: None,
            )
        except TLSConfigError as e:
            raise StartupError(str(e)) from None
        tls_check = Periodic(TLS_CHECK_INTERVAL, self._reload_tls, self.reactor)
        tls_check.setName("checking the TLS files for changes")
        tls_check.setServiceParent(self)
        return BatchingTLSFactory(self.tls, False, self.site, self.reactor)

    def _reload_tls(self, force: bool = False) -> Deferred[bool]:
        assert self.tls is not None
        return self.run(self.tls.reload, force)

    def prepare(self) -> None:
        """
        Make the data directory ready, remove spool files a crash left behind,
        load the users and access rules and start listening (blocking: runs
        before the reactor serves anything).

        @raise StartupError: when any of it fails.
        """
        if self._prepared:
            return
        self._prepared = True
        try:
            self.store.prepare_root()
            removed = self.site.spool.clean()
        except OSError as e:
            raise StartupError(f"cannot use --path {self.config.path}: {e.strerror}") from None
        if removed:
            log.info("removed {count} unfinished uploads left from before", count=removed)
        self._check_secrets()
        raise_open_files_limit()
        keep_large_buffers()
        if self.authenticator is not None:
            try:
                self.authenticator.htpasswd.refresh()
            except (OSError, ValueError) as e:
                raise StartupError(f"cannot read htpasswd file {self.config.htpasswd_file}: {e}") from None
        try:
            self.ctx.access.refresh()
        except (OSError, ValueError) as e:
            raise StartupError(f"cannot load access file {self.config.access_file}: {e}") from None
        factory = self.factory()
        if self.config.access_log is not None:
            try:
                self.access_log = AccessLog(self.config.access_log, self.reactor)
            except OSError as e:
                raise StartupError(f"cannot open --log {self.config.access_log}: {e.strerror}") from None
            self.site.observers.append(self.access_log)
        for description in self.config.listen:
            self.ports.append(self._listen(description, factory))
        if self.config.prometheus_listen is not None:
            assert self.metrics is not None
            metrics_site = make_metrics_site(self.config, self.ctx, self.metrics, self.reactor)
            self.ports.append(self._listen(self.config.prometheus_listen, metrics_site, "http", "metrics"))

    def _check_secrets(self) -> None:
        """
        Warn about secrets (htpasswd file, TLS key) that other users can
        read.
        """
        for what, path in (("htpasswd file", self.config.htpasswd_file), ("TLS key", self.config.tls_key)):
            if path is None:
                continue
            try:
                mode = os.stat(path).st_mode
            except OSError:
                continue
            if mode & stat.S_IROTH:
                log.warn(
                    "the {what} {path} is readable by every user of this machine (mode {mode:o}): chmod o-r it",
                    what=what,
                    path=path,
                    mode=stat.S_IMODE(mode),
                )

    def _listen(
        self, description: str, factory: IProtocolFactory, scheme: str | None = None, what: str = "repositories"
    ) -> IListeningPort:
        outcome: list[IListeningPort | Failure] = []
        try:
            endpoint = serverFromString(self.reactor, with_default_backlog(description))
            endpoint.listen(factory).addBoth(outcome.append)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            # IndexError: a systemd: endpoint with no such socket passed in.
            raise StartupError(f"bad --listen {description!r}: {e or type(e).__name__}") from None
        port = outcome[0] if outcome else None
        if not IListeningPort.providedBy(port):
            why = port.getErrorMessage() if isinstance(port, Failure) else "did not start"
            raise StartupError(f"cannot listen on {description}: {why}")
        if scheme is None:
            scheme = "https" if self.config.tls else "http"
        log.info(
            "resticd serving {what} of {path} on {address}" if what != "repositories" else "resticd serving {path} on {address}",
            what=what,
            path=self.config.path,
            address=describe_address(port.getHost(), scheme),
        )
        return port

    async def _tally(self) -> None:
        """
        Count what is stored, in the thread pool; writes wait until it is done
        so that nothing is counted twice or missed.
        """
        try:
            counted = await self.run(tally, self.store)
        except Exception:
            log.failure("counting stored objects failed; usage and quotas start from zero")
        else:
            self.ctx.usage.load(counted)
            log.info(
                "{repos} repositories, {bytes} bytes stored",
                repos=len(counted.repos),
                bytes=counted.scope_bytes(("all",)),
            )
        self.ctx.ready.open()

    def _prepare_or_exit(self) -> None:
        try:
            self.prepare()
        except StartupError as e:
            raise StartupExit(f"resticd: error: {e}") from None

    def _catch_sighup(self) -> None:
        # Before the first port listens: once "serving" is logged, a SIGHUP
        # reloads rather than ends the daemon.
        if self._catching_sighup or not hasattr(signal, "SIGHUP"):
            return
        self._catching_sighup = True
        try:
            self._previous_sighup = signal.signal(
                signal.SIGHUP, lambda number, frame: self.reactor.callFromThread(self.hangup)
            )
        except ValueError:  # not the main thread (tests)
            self._previous_sighup = None

    def privilegedStartService(self) -> None:
        self._catch_sighup()
        self._prepare_or_exit()
        super().privilegedStartService()

    def startService(self) -> None:
        self._catch_sighup()
        self._prepare_or_exit()
        self.threads.start()
        if self.metrics is not None:
            self.metrics.start()
        self.ctx.ready.close()
        Deferred.fromCoroutine(self._tally())
        notify("READY=1")
        super().startService()

    def stopService(self) -> Deferred[None]:
        """
        Stop accepting connections, let the requests in flight finish (for at
        most C{--shutdown-timeout} seconds), then stop the worker threads.
        Uploads cut off by the shutdown are never published and their spool
        files are removed as their connections close.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        notify("STOPPING=1")
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        self._catching_sighup = False
        if self.metrics is not None:
            self.metrics.stop()
        ports, self.ports = self.ports, []
        await gatherResults([d for d in (port.stopListening() for port in ports) if d is not None])
        if self.in_flight.count:
            log.info(
                "waiting up to {timeout} s for {count} requests in flight",
                timeout=self.config.shutdown_timeout,
                count=self.in_flight.count,
            )
            drained = self.in_flight.drained()
            drained.addTimeout(self.config.shutdown_timeout, self.reactor)
            try:
                await drained
            except defer.TimeoutError:
                log.warn("{count} requests still in flight; closing them", count=self.in_flight.count)
        # Let every connection send what it has queued (the answers to the
        # last requests) and close, within what is left of the timeout.
        closed = self.site.close_connections()
        closed.addTimeout(max(1.0, self.config.shutdown_timeout), self.reactor)
        try:
            await closed
        except defer.TimeoutError:
            log.warn("{count} connections did not close in time", count=len(self.site.connections))
        await super().stopService()
        self.threads.stop()
        # A stop by SIGTERM or SIGINT is the normal way to end the daemon:
        # exit with status 0 rather than have twistd re-raise the signal.
        if getattr(self.reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            self.reactor._exitSignal = None
        log.info("resticd stopped")
