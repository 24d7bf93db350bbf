"""
TLS: certificates and keys from PEM files, and the server options built from
them.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL.crypto import X509
from OpenSSL.SSL import Error as OpenSSLError
from OpenSSL.SSL import WantReadError, ZeroReturnError
from twisted.internet.interfaces import IDelayedCall, IOpenSSLServerConnectionCreator, IProtocolFactory, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import Certificate, CertificateOptions, TLSVersion, trustRootFromCertificates
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from .logs import logger
from .sockets import write_now

log = logger(__name__)

#: What the --tls-min-version values (L{resticd.config.TLS_VERSIONS}) mean.
MIN_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}
#: Bytes asked of OpenSSL per read (it returns at most one 16 KiB record).
RECORD_READ = 1 << 15
#: Decrypted bytes gathered before they are handed to the protocol above.
BATCH = 1 << 20
#: Encrypted bytes handed to OpenSSL at a time. Its input buffer (a memory
#: BIO) grows to a third more than the most it was handed at once and stays
#: that large while the connection lasts: handed whole 1 MiB socket reads,
#: every connection that had uploaded something held 1.3 MiB while idle.
INPUT_PIECE = 1 << 16
#: Encrypted bytes gathered before they are sent.
WRITE_CHUNK = 1 << 18
#: Bytes of the protocol's writes encrypted at a time: OpenSSL's output
#: buffer (a memory BIO) too keeps the largest size it held (and a third
#: more) while the connection lasts.
OUTPUT_PIECE = 1 << 16
#: Room for TLS record headers and tags after L{WRITE_CHUNK} bytes.
RECORD_OVERHEAD = 1 << 12
#: Seconds a connection that resticd closes waits, once its TLS close alert
#: (close_notify) is sent, for the client's alert or its own close, before
#: the socket is closed anyway. Twisted would wait for the client's alert as
#: long as the connection lasts, and a client that holds an idle connection
#: without reading it (Python's http.client, curl between transfers, a host
#: gone from the network) never sends one: every such connection held a
#: stopping daemon for the whole --shutdown-timeout. TLS does not ask the
#: side that closes to wait for the other's alert; the short wait lets a
#: client still sending when it is answered read the answer before the
#: socket closes under it (Go's server waits half a second so).
CLOSE_WAIT = 1.0


class TLSConfigError(Exception):
    """
    The certificate or key cannot be used; the message says why.
    """


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"cannot read {path}: {e.strerror}") from None


def server_options(
    cert_path: str, key_path: str, min_version: str = "1.2", client_ca: str | None = None
) -> CertificateOptions:
    """
    TLS server options from a PEM certificate file (the server certificate
    first, then any intermediates) and a PEM key file (which may be the same
    file). With C{client_ca}, a PEM file of CA certificates, every client
    must present a certificate signed by one of them.

    @raise TLSConfigError: when a file is unreadable, holds no certificate or
        key, or the key does not belong to the certificate.
    """
    cert_data = _read(cert_path)
    key_data = cert_data if key_path == cert_path else _read(key_path)
    try:
        chain = x509.load_pem_x509_certificates(cert_data)
    except ValueError:
        raise TLSConfigError(f"{cert_path}: no PEM certificate found") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(f"{key_path}: no usable unencrypted PEM private key ({e})") from None
    verification: dict[str, object] = {}
    if client_ca is not None:
        try:
            authorities = x509.load_pem_x509_certificates(_read(client_ca))
        except ValueError:
            raise TLSConfigError(f"{client_ca}: no PEM certificate found") from None
        verification = {
            # A trust root makes Twisted verify the peer and require its
            # certificate.
            "trustRoot": trustRootFromCertificates([Certificate(X509.from_cryptography(c)) for c in authorities]),
        }
    options = CertificateOptions(
        # pyOpenSSL wants cryptography objects now; Twisted's annotations
        # still name the older pyOpenSSL types.
        privateKey=key,  # type: ignore[arg-type]
        certificate=chain[0],  # type: ignore[arg-type]
        extraCertChain=chain[1:],  # type: ignore[arg-type]
        raiseMinimumTo=MIN_VERSIONS[min_version],
        **verification,  # type: ignore[arg-type]
    )
    try:
        options.getContext()
    except Exception as e:
        raise TLSConfigError(f"{key_path} does not match {cert_path}: {e}") from None
    return options


def certificate_expiry(cert_path: str) -> float:
    """
    When the (first) certificate in C{cert_path} expires, as a Unix time.
    """
    certificate = x509.load_pem_x509_certificates(_read(cert_path))[0]
    return certificate.not_valid_after_utc.timestamp()


def _signature(paths: list[str]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((0, 0, 0))
        else:
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


@implementer(IOpenSSLServerConnectionCreator)
class ReloadingTLS:
    """
    Server TLS whose certificate, key and client CA can be replaced while
    the server runs: new handshakes use the new files, connections already
    open keep theirs. A broken new set is refused (and logged) and the old
    one stays.
    """

    def __init__(
        self,
        cert_path: str,
        key_path: str,
        min_version: str = "1.2",
        client_ca: str | None = None,
        loaded: Callable[[float], object] = lambda expiry: None,
    ) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.min_version = min_version
        self.client_ca = client_ca
        self.loaded = loaded
        self._files = [p for p in (cert_path, key_path, client_ca) if p is not None]
        self._signature = _signature(self._files)
        self.options = server_options(cert_path, key_path, min_version, client_ca)
        self.loaded(certificate_expiry(cert_path))

    def serverConnectionForTLS(self, protocol: Any) -> Any:
        return self.options.serverConnectionForTLS(protocol)

    def reload(self, force: bool = False) -> bool:
        """
        Load the files again if they changed (or always, with C{force});
        whether new ones are now in use (blocking: a few small reads).
        """
        signature = _signature(self._files)
        if signature == self._signature and not force:
            return False
        self._signature = signature
        try:
            options = server_options(self.cert_path, self.key_path, self.min_version, self.client_ca)
            expiry = certificate_expiry(self.cert_path)
        except (TLSConfigError, ValueError, IndexError) as e:
            log.error("not using the new TLS certificate: {why}; keeping the previous one", why=e)
            return False
        self.options = options
        self.loaded(expiry)
        log.info(
            "loaded TLS certificate {path}, valid until {until}",
            path=self.cert_path,
            until=datetime.datetime.fromtimestamp(expiry, datetime.timezone.utc).isoformat(),
        )
        return True


def whole_writes(connection: Any) -> None:
    """
    Have OpenSSL encrypt all of each write to C{connection} in one call, as
    many records as it takes, rather than return after each 16 KiB record:
    pyOpenSSL turns partial writes on, which only helps a write into a
    socket that may fill up; a memory BIO never does. (Per MiB sent, 64
    calls through pyOpenSSL's wrapper become 16; through pyOpenSSL's
    bindings, within the pinned pyopenssl range; left as it is if they are
    missing.)
    """
    from OpenSSL import _util

    clear = getattr(_util.lib, "SSL_clear_mode", None)
    partial = getattr(_util.lib, "SSL_MODE_ENABLE_PARTIAL_WRITE", None)
    ssl = getattr(connection, "_ssl", None)
    if clear is not None and partial is not None and ssl is not None:
        clear(ssl, partial)


class _Buffer:
    """
    A buffer OpenSSL reads into directly, through pyOpenSSL's bindings
    (within the pinned pyopenssl range): pyOpenSSL's own C{recv} and
    C{bio_read} read into a fresh buffer each time and copy it into
    C{bytes}. One per direction serves every connection: the event loop
    handles one at a time, and what is read is sent or copied before
    anything else runs. It also carries the other bindings its direction
    uses (handing OpenSSL its input without pyOpenSSL's wrapper, telling a
    read that needs more input from an error without raising).
    """

    def __init__(self, size: int) -> None:
        from OpenSSL import _util

        self.size = size
        self._buffer = bytearray(size)
        self.view = memoryview(self._buffer)
        self._pointer = _util.ffi.from_buffer(self._buffer)
        self._bio_read = _util.lib.BIO_read
        self._bio_write = _util.lib.BIO_write
        self._ssl_read = _util.lib.SSL_read
        self._get_error = _util.lib.SSL_get_error
        self._want_read = _util.lib.SSL_ERROR_WANT_READ
        #: A C pointer to the bytes of a buffer (no copy).
        self.pointer_to = _util.ffi.from_buffer

    def read_bio(self, bio: Any, offset: int = 0) -> int:
        """
        Move what the memory BIO C{bio} holds, as much as fits, into the
        buffer at C{offset}; the count (0 or less when it was empty).
        """
        count: int = self._bio_read(bio, self._pointer + offset, self.size - offset)
        return count

    def wants_more(self, ssl: Any, result: int) -> bool:
        """
        Whether C{result}, what C{SSL_read} returned on the TLS connection
        C{ssl}, means only that it needs more input first.
        """
        return bool(self._get_error(ssl, result) == self._want_read)

    def write_bio(self, bio: Any, data: Any, offset: int, count: int) -> int:
        """
        Hand C{count} bytes of C{data} (a pointer of L{pointer_to}) from
        C{offset} on to the memory BIO C{bio}; the count written (0 or less
        on failure).
        """
        written: int = self._bio_write(bio, data + offset, count)
        return written

    def read_ssl(self, ssl: Any, offset: int, count: int) -> int:
        """
        Decrypt up to C{count} bytes (at most one record) from the TLS
        connection C{ssl} into the buffer at C{offset}; C{SSL_read}'s result.
        """
        result: int = self._ssl_read(ssl, self._pointer + offset, count)
        return result


#: Where encrypted output goes on its way to the socket.
_out = _Buffer(WRITE_CHUNK + RECORD_OVERHEAD)
#: Where decrypted input is gathered on its way to the protocol above.
_in = _Buffer(BATCH + RECORD_READ)


class BatchingTLSProtocol(TLSMemoryBIOProtocol):
    """
    TLS that moves data in large pieces: everything decrypted from one
    socket read goes to the protocol above at once (up to L{BATCH} bytes),
    rather than one call per 16 KiB TLS record, so the HTTP layers run once
    per read, not 64 times per MiB of upload; and what the protocol writes
    is encrypted L{OUTPUT_PIECE} bytes per call (OpenSSL cuts it into
    records: L{whole_writes}), not one record per Python round, and handed
    to the socket L{WRITE_CHUNK} bytes at a time. OpenSSL is handed what
    arrives L{INPUT_PIECE} bytes at a time, so that its buffers stay small.
    """

    #: The call that closes the socket after L{CLOSE_WAIT}, once armed.
    _closing: IDelayedCall | None = None

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        whole_writes(self._tlsConnection)

    def _shutdownTLS(self) -> None:
        # twisted.protocols.tls.TLSMemoryBIOProtocol._shutdownTLS sends the
        # close alert and closes the socket only once the client's alert has
        # come: close it after CLOSE_WAIT seconds in any case.
        super()._shutdownTLS()
        if self._closing is None and not self._aborted and self.transport is not None:
            clock: IReactorTime = self.factory.clock  # type: ignore[attr-defined]
            self._closing = clock.callLater(CLOSE_WAIT, self._close_socket)

    def _close_socket(self) -> None:
        """
        Close the socket once what is queued for it is sent: the client did
        not answer resticd's close alert in time.
        """
        self._closing = None
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None
        super().connectionLost(reason)

    def _write(self, data: bytes) -> None:
        # twisted.protocols.tls.TLSMemoryBIOProtocol._write, with larger
        # pieces and no copies of them.
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        done = 0
        filled = 0
        send = self._tlsConnection.send
        while done < len(view):
            # One call encrypts the whole piece (see whole_writes; one record
            # per call where partial writes stay on); the output is gathered
            # and sent WRITE_CHUNK bytes at a time.
            end = min(done + OUTPUT_PIECE, len(view))
            try:
                while done < end:
                    done += send(view[done:end])
            except WantReadError:
                self._send_out(self._collect(filled))
                self._bufferedWrite(bytes(view[done:]))
                return
            except OpenSSLError:
                self._send_out(filled)
                self._tlsShutdownFinished(Failure())
                return
            filled = self._collect(filled)
            if filled >= WRITE_CHUNK:
                self._send_out(filled)
                filled = 0
        self._send_out(filled)

    def _flushSendBIO(self) -> None:
        self._send_out(self._collect(0))

    def _collect(self, filled: int) -> int:
        """
        Move what OpenSSL encrypted out of its memory BIO into the output
        buffer, after its first C{filled} bytes, sending the buffer whenever
        it is full; how many bytes it holds now, not sent yet. (The buffer
        is shared by all connections: the event loop runs one at a time.
        pyOpenSSL's bio_read copies into a fresh buffer and then into bytes.)
        """
        bio = self._tlsConnection._from_ssl
        while True:
            count = _out.read_bio(bio, filled)
            if count <= 0:
                return filled
            filled += count
            if filled == _out.size:
                self._send_out(filled)
                filled = 0

    def _send_out(self, filled: int) -> None:
        """
        Send the first C{filled} bytes of the output buffer: what the socket
        does not take at once is copied into the transport's queue.
        """
        if filled and self.transport is not None:
            write_now(self.transport, _out.view[:filled])

    def dataReceived(self, data: bytes) -> None:
        # twisted.protocols.tls.TLSMemoryBIOProtocol.dataReceived, with what
        # arrived handed to OpenSSL INPUT_PIECE bytes at a time, each piece
        # decrypted before the next: OpenSSL's input buffer (a memory BIO)
        # keeps the largest size it ever held for as long as the connection
        # lasts. What is decrypted still goes up together (L{_decrypt}).
        connection = self._tlsConnection
        pointer = _in.pointer_to(data)
        size = 0
        for start in range(0, len(data), INPUT_PIECE):
            if self._lostTLSConnection:
                break
            count = min(INPUT_PIECE, len(data) - start)
            written = _in.write_bio(connection._into_ssl, pointer, start, count)
            if written <= 0:  # out of memory: as pyOpenSSL's bio_write
                connection._handle_bio_errors(connection._into_ssl, written)
            if not self._handshakeDone:
                self._checkHandshakeStatus()
                if not self._handshakeDone:
                    continue
            if self._appSendBuffer:
                self._unbufferPendingWrites()
            size = self._decrypt(size)
        self._deliver(size)
        self._flushSendBIO()

    def _flushReceiveBIO(self) -> None:
        # twisted.protocols.tls.TLSMemoryBIOProtocol._flushReceiveBIO (called
        # as the connection ends), through L{_decrypt}.
        self._deliver(self._decrypt(0))
        self._flushSendBIO()

    def _decrypt(self, size: int) -> int:
        """
        Decrypt the records OpenSSL's input holds into the input buffer, one
        after the other after its first C{size} bytes, handing the buffer to
        the protocol above whenever it holds L{BATCH} bytes and as the TLS
        connection ends; how many bytes it holds now, not handed over yet.
        (pyOpenSSL's recv copies each record twice, and joining them would
        copy them again.)
        """
        connection = self._tlsConnection
        ssl = connection._ssl
        while not self._lostTLSConnection:
            result = _in.read_ssl(ssl, size, RECORD_READ)
            if result > 0:
                size += result
                if size >= BATCH:
                    self._deliver(size)
                    size = 0
                continue
            if _in.wants_more(ssl, result):
                break  # (without raising pyOpenSSL's WantReadError for it)
            try:
                connection._raise_ssl_error(ssl, result)
            except WantReadError:
                break
            except ZeroReturnError:
                self._deliver(size)
                size = 0
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except OpenSSLError:
                self._deliver(size)
                size = 0
                self._tlsShutdownFinished(Failure())
            else:  # no error for a read that returned nothing: nothing more
                break
        return size

    def _deliver(self, size: int) -> None:
        """
        Hand the first C{size} bytes of the input buffer to the protocol
        above, as a copy (the buffer is reused at once).
        """
        if size and not self._aborted:
            ProtocolWrapper.dataReceived(self, bytes(_in.view[:size]))


class BatchingTLSFactory(TLSMemoryBIOFactory):
    """
    A server-side L{TLSMemoryBIOFactory} of L{BatchingTLSProtocol}s, whose
    closing connections wait on C{clock} (the reactor by default).
    """

    protocol = BatchingTLSProtocol

    def __init__(
        self,
        contextFactory: IOpenSSLServerConnectionCreator,
        isClient: bool,
        wrappedFactory: IProtocolFactory,
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__(contextFactory, isClient, wrappedFactory, clock)
        self.clock: IReactorTime = self._clock
