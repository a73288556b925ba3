"""TLS on the listener: one server ``SSLContext`` built from ``listen.tls``, re-readable in place.

``server_context(tls)`` builds it (a ``ServerTls``: the context and its certificate): TLS
1.2 or later, the standard library's server defaults (``ssl.create_default_context(
Purpose.CLIENT_AUTH)``: no client certificates asked, modern ciphers), ALPN ``http/1.1``
(the only protocol the listener speaks), and the certificate chain and key.
``reload_tls(served, tls)`` loads the (renewed) files into the SAME context: every handshake
after it presents the new certificate; connections already open keep the one they were
made with. Both check the files first (readable, PEM, unencrypted key, key matching the
certificate), so a bad file raises ``TlsError`` naming the key path::

    listen.tls.cert_file: cannot read /etc/gw/cert.pem: No such file or directory

and a context that is being reloaded is left as it was.

``ListenSite`` serves one bound socket, over TLS when given a context, with a handshake
timeout: a client that connects and never finishes its handshake is dropped after
``HANDSHAKE_TIMEOUT_S`` (asyncio's default is 60 s); other clients never wait for it.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from .config import Tls

HANDSHAKE_TIMEOUT_S = 10.0


class TlsError(ValueError):
    """The certificate or key cannot be served; the message names the key path and the reason."""


@dataclass
class ServerTls:
    """The listener's context and the certificate it serves (kept for the log lines)."""

    context: ssl.SSLContext
    certificate: x509.Certificate

    def describe(self) -> str:
        """Names and expiry of the certificate served, for the startup and reload log lines."""
        cert = self.certificate
        try:
            sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [f"DNS:{n}" for n in sans.get_values_for_type(x509.DNSName)]
            names += [f"IP:{n}" for n in sans.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            names = [f"CN:{a.value!s}" for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        expires = cert.not_valid_after_utc
        text = (
            f"certificate {cert.subject.rfc4514_string()} for {', '.join(names) or 'no name'}, "
            f"expires {expires:%Y-%m-%d %H:%M} UTC"
        )
        if expires < datetime.datetime.now(datetime.UTC):
            text += " (EXPIRED: clients will refuse it)"
        return text


# The listener's TLS on the app (when listen.tls is set), for the reload handler:
# ``reload_tls(app[SERVED_TLS], new_config.listen.tls)``.
SERVED_TLS: web.AppKey[ServerTls] = web.AppKey("served_tls", ServerTls)


def server_context(tls: Tls) -> ServerTls:
    """A server context serving ``tls``'s certificate. ``TlsError`` if it cannot."""
    certificate = check(tls)
    context = _new_context()
    _load(context, tls)
    return ServerTls(context, certificate)


def reload_tls(served: ServerTls, tls: Tls) -> str:
    """Load ``tls``'s files (again) into ``served.context``, the context the listener serves:
    new handshakes present the new certificate, open connections are untouched. Returns the
    new certificate's description for the log. ``TlsError`` (and nothing changed) if the
    files cannot be served. For the reload handler (SIGHUP, ``POST /admin/v1/reload``)."""
    certificate = check(tls)
    _load(served.context, tls)
    served.certificate = certificate
    return served.describe()


def check(tls: Tls) -> x509.Certificate:
    """The leaf certificate of ``tls``, once its files are known to be servable (``TlsError``
    naming the key path otherwise). Loads into a throwaway context: nothing served changes."""
    cert_pem = _read("cert_file", tls.cert_file)
    key_pem = _read("key_file", tls.key_file)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TlsError(f"listen.tls.cert_file: {tls.cert_file} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TlsError(
            f"listen.tls.key_file: {tls.key_file} is encrypted with a passphrase; the gateway needs "
            "an unencrypted key (openssl pkey -in KEY -out PLAIN), readable by its user only"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsError(f"listen.tls.key_file: {tls.key_file} holds no PEM private key") from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
        raise TlsError(
            f"listen.tls.key_file: {tls.key_file} does not match the certificate in "
            f"listen.tls.cert_file ({tls.cert_file})"
        )
    _load(_new_context(), tls)
    return chain[0]


def _read(name: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"listen.tls.{name}: cannot read {path}: {exc.strerror or exc}") from None


def _new_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    return context


class _Encrypted(Exception):
    pass


def _no_passphrase() -> bytes:
    raise _Encrypted()  # never prompt on a terminal for one


def _load(context: ssl.SSLContext, tls: Tls) -> None:
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_passphrase)
    except _Encrypted:
        raise TlsError(f"listen.tls.key_file: {tls.key_file} is encrypted with a passphrase") from None
    except ssl.SSLError as exc:
        raise TlsError(
            f"listen.tls.cert_file: {tls.cert_file} cannot be served with listen.tls.key_file "
            f"{tls.key_file}: {exc.reason or exc}"
        ) from None
    except OSError as exc:  # a file replaced between the check and the load
        raise TlsError(f"listen.tls.cert_file: cannot read {tls.cert_file}: {exc.strerror or exc}") from None


class ListenSite(web.SockSite):
    """A bound socket, served over TLS when given a context, with a handshake timeout."""

    __slots__ = ("_handshake_timeout_s",)

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        *,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context, backlog=backlog)
        self._handshake_timeout_s = handshake_timeout_s

    async def start(self) -> None:
        if self._ssl_context is None:
            await super().start()
            return
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server,
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self._handshake_timeout_s,
        )
