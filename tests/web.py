"""
Driving the real L{ResticSite} in memory: treq's request traversal agent with
our site (its request factory, spool and protocol negotiation) in place of a
plain L{Site}, and helpers to get results out of already-fired Deferreds.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from treq.client import HTTPClient
from treq.response import _Response
from treq.testing import RequestTraversalAgent, _SynchronousProducer
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from resticd.auth import Authenticator
from resticd.config import Config
from resticd.paths import Layout
from prometheus_client import CollectorRegistry

from resticd.metrics import Metrics
from resticd.resources import Context
from resticd.service import make_context, make_site, make_store
from resticd.site import ResticSite
from resticd.store import Store
from resticd.threads import Runner, run_inline
from resticd.usage import tally

V2 = "application/vnd.x.restic.rest.v2"
#: How many reactor turns a request may take in memory before a test fails.
PUMP_LIMIT = 10_000


def result(d: Deferred[Any]) -> Any:
    """
    The result of a Deferred that must have fired already.
    """
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "the Deferred has not fired"
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


class _SiteAgent(RequestTraversalAgent):
    def __init__(self, site: ResticSite) -> None:
        super().__init__(site.resource)
        self._serverFactory = site


@dataclass
class Reply:
    """
    A finished response: status, headers (lower-case names, first value) and
    the whole body.
    """

    code: int
    headers: dict[str, str]
    body: bytes
    #: The Content-Length the server sent (None when it sent none).
    length: int | None = None

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


class SiteClient:
    """
    Synchronous requests against a L{ResticSite} in memory.
    """

    def __init__(self, site: ResticSite) -> None:
        self.site = site
        self.agent = _SiteAgent(site)
        self.http = HTTPClient(agent=self.agent, data_to_body_producer=_SynchronousProducer)

    async def _pumped(self, d: Deferred[Any]) -> Any:
        """
        Move bytes between client and server, letting the reactor run (file
        producers are driven by the global cooperator) until C{d} fires.
        """
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        for _ in range(PUMP_LIMIT):
            self.agent.flush()
            if outcome:
                break
            await deferLater(reactor, 0, lambda: None)
        assert outcome, "no answer"
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]

    async def request(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Reply:
        """
        Send one request and return its complete reply; C{headers} use
        underscores for dashes (C{content_type="..."}).
        """
        hdrs: dict[bytes | str, list[bytes | str]] = {
            k.replace("_", "-").title(): [v] for k, v in headers.items()
        }
        d = self.http.request(method, "http://resticd.test" + path, data=body, headers=hdrs)
        response: _Response = await self._pumped(d)
        raw = await self._pumped(response.content())
        length = response.length if isinstance(response.length, int) else None
        if method == "HEAD":
            declared = response.headers.getRawHeaders("content-length")
            length = int(declared[0]) if declared else None
        return Reply(
            response.code,
            {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()},
            raw,
            length,
        )

    async def get(self, path: str, **headers: str) -> Reply:
        return await self.request("GET", path, None, **headers)

    async def head(self, path: str, **headers: str) -> Reply:
        return await self.request("HEAD", path, None, **headers)

    async def post(self, path: str, body: bytes = b"", **headers: str) -> Reply:
        return await self.request("POST", path, body, **headers)

    async def delete(self, path: str, **headers: str) -> Reply:
        return await self.request("DELETE", path, None, **headers)


def name_of(body: bytes) -> str:
    """
    The object name restic gives C{body}: its sha256 in hex.
    """
    return hashlib.sha256(body).hexdigest()


@dataclass
class Server:
    """
    A site over a data directory, with the store and a client for it.
    """

    config: Config
    store: Store
    site: ResticSite
    client: SiteClient
    reactor: MemoryReactorClock
    ctx: Context
    #: With prometheus=True: the metrics, in a registry of their own.
    metrics: Metrics | None = None

    @property
    def layout(self) -> Layout:
        return self.store.layout

    def spool_files(self) -> list[str]:
        return os.listdir(self.layout.spool_dir())


class HeldWrites:
    """
    A runner that queues work until L{release}, like a busy thread pool.
    """

    def __init__(self) -> None:
        self.queued: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.queued.append((d, f, args))
        return d

    def release(self) -> None:
        """
        Run the oldest queued call (which may queue the next one).
        """
        d, f, args = self.queued.pop(0)
        run_inline(f, *args).chainDeferred(d)

    def release_all(self) -> None:
        """
        Run queued calls, and those they queue, until none is left.
        """
        while self.queued:
            self.release()


def make_server(
    root: str,
    run: Runner = run_inline,
    authenticator: Authenticator | None = None,
    **overrides: Any,
) -> Server:
    """
    A prepared data directory at C{root} served by a site configured like
    C{Config(path=root, **overrides)}, its blocking work run by C{run};
    with C{prometheus=True}, with metrics in a fresh registry.
    """
    config = replace(Config(path=root), **overrides)
    store = make_store(config)
    store.prepare_root()
    ctx = make_context(config, store, run)
    ctx.access.refresh()
    ctx.usage.load(tally(store))
    reactor = MemoryReactorClock()
    metrics = None
    if config.prometheus:
        metrics = Metrics(CollectorRegistry(), ctx.usage, ctx.access, reactor, root=root)
    site = make_site(config, ctx, authenticator, reactor, metrics=metrics)
    return Server(config, store, site, SiteClient(site), reactor, ctx, metrics)


def http2_connection(server: Server, transport: StringTransport) -> tuple[Any, H2Connection]:
    """
    The site's protocol connected over C{transport}, on which HTTP/2 was
    negotiated, and an h2 client that has begun its connection (its
    preamble is not sent yet).
    """
    transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
    protocol = server.site.buildProtocol(transport.getPeer())
    assert protocol is not None
    protocol.makeConnection(transport)
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    return protocol, client
