"""
Wiring: the store, the resource tree, the site, the worker threads and the
listeners, as one Twisted service.
"""

from __future__ import annotations

from typing import Any

from twisted.application import internet, service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorTime
from .logs import describe_address, logger, set_debug
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import IResource

from .auth import AuthGate, Authenticator, Htpasswd
from .config import Config
from .paths import Layout
from .resources import Context, Policy, RepoResource
from .site import ResticSite
from .spool import Spool
from .store import Modes, Store
from .threads import PoolRunner, Runner
from .tls import TLSConfigError, server_options

log = logger(__name__)

#: How often the htpasswd file is checked for changes, in seconds.
HTPASSWD_CHECK_INTERVAL = 5.0


class StartupError(Exception):
    """
    The daemon cannot start; the message says why, in one line.
    """


def make_store(config: Config) -> Store:
    """
    The store of the configured data directory.
    """
    return Store(Layout(config.path), Modes.for_group(config.group_accessible))


def make_site(
    config: Config,
    store: Store,
    run: Runner,
    authenticator: Authenticator | None = None,
    reactor: Any = None,
) -> ResticSite:
    """
    The site serving the repositories of C{store}: open to all, or behind
    Basic authentication when there is an C{authenticator}. C{reactor} runs
    its timeouts (the global reactor when L{None}).
    """
    ctx = Context(
        store=store,
        run=run,
        policy=Policy(verify_upload=config.verify_upload, allow_repo_delete=config.allow_repo_delete),
    )

    def tree_for(user: str | None) -> IResource:
        return RepoResource(ctx, (), user)

    root: IResource = tree_for(None) if authenticator is None else AuthGate(authenticator, tree_for)
    spool = Spool(store.layout.spool_dir(), store.modes.file)
    return ResticSite(root, spool, http2=config.http2, debug=config.debug, reactor=reactor)


class ResticdService(service.MultiService):
    """
    The whole daemon: prepares the data directory, listens, and owns the
    worker thread pool.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        set_debug(config.debug)
        self.config = config
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=config.threads, name="resticd-io")
        self.run = PoolRunner(reactor, self.pool)
        self.store = make_store(config)
        self.authenticator: Authenticator | None = None
        if config.htpasswd_file is not None:
            self.authenticator = Authenticator(Htpasswd(config.htpasswd_file), self.run, reactor)
            refresh = internet.TimerService(HTPASSWD_CHECK_INTERVAL, self._reload_users)
            refresh.setServiceParent(self)
        self.site = make_site(config, self.store, self.run, self.authenticator, reactor)
        self.ports: list[IListeningPort] = []
        self._prepared = False

    def _reload_users(self) -> Deferred[None]:
        assert self.authenticator is not None
        return Deferred.fromCoroutine(self.authenticator.reload())

    def factory(self) -> IProtocolFactory:
        """
        The protocol factory for every listener: the site, wrapped in TLS
        when configured.
        """
        config = self.config
        if config.tls_cert is None or config.tls_key is None:
            return self.site
        options = server_options(config.tls_cert, config.tls_key, config.tls_min_version)
        return TLSMemoryBIOFactory(options, False, self.site)

    def prepare(self) -> None:
        """
        Make the data directory ready, remove spool files a crash left behind,
        load the users and start listening (blocking: runs before the reactor
        serves anything).

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
        if self.authenticator is not None:
            try:
                self.authenticator.htpasswd.refresh()
            except (OSError, UnicodeDecodeError) as e:
                raise StartupError(f"cannot read htpasswd file {self.config.htpasswd_file}: {e}") from None
        try:
            factory = self.factory()
        except TLSConfigError as e:
            raise StartupError(str(e)) from None
        for description in self.config.listen:
            self.ports.append(self._listen(description, factory))

    def _listen(self, description: str, factory: IProtocolFactory) -> IListeningPort:
        outcome: list[IListeningPort | Failure] = []
        try:
            endpoint = serverFromString(self.reactor, description)
        except (ValueError, KeyError, TypeError) as e:
            raise StartupError(f"bad --listen {description!r}: {e}") from None
        endpoint.listen(factory).addBoth(outcome.append)
        port = outcome[0] if outcome else None
        if not IListeningPort.providedBy(port):
            why = port.getErrorMessage() if isinstance(port, Failure) else "did not start"
            raise StartupError(f"cannot listen on {description}: {why}")
        log.info(
            "resticd serving {path} on {address}",
            path=self.config.path,
            address=describe_address(port.getHost(), "https" if self.config.tls else "http"),
        )
        return port

    def _prepare_or_exit(self) -> None:
        try:
            self.prepare()
        except StartupError as e:
            raise SystemExit(f"resticd: error: {e}") from None

    def privilegedStartService(self) -> None:
        self._prepare_or_exit()
        super().privilegedStartService()

    def startService(self) -> None:
        self._prepare_or_exit()
        self.pool.start()
        super().startService()

    def stopService(self) -> Deferred[None]:
        stopping = [port.stopListening() for port in self.ports]
        self.ports = []
        d = super().stopService()

        def stop_pool(result: object) -> None:
            self.pool.stop()

        return gatherResults([d, *(s for s in stopping if s is not None)]).addBoth(stop_pool)
