"""Where the gateway may POST a client's webhook: public addresses only, unless the operator
opens an internal target on purpose (``transcripts.webhook_allow``: CIDRs or host names).

Two checks, one rule:

- when the job is created, a ``webhook_url`` that could never be delivered is a 400 at once
  (a scheme other than http/https, credentials in the URL, ``localhost``, a non-public IP
  literal), and the auth header the client names must be a plain header it may set;
- when the webhook is sent, the check that counts: ``GuardedResolver`` drops every resolved
  address that is not allowed, so the connection can only be made to an address that passed
  (a name that resolves to 127.0.0.1, or that rebinds to it after the POST was accepted,
  fails to connect). aiohttp does not resolve IP literals, so ``target_refusal`` checks
  those before the POST.

"Public" is ``ipaddress``'s ``is_global`` with IPv4 addresses carried inside IPv6 unwrapped
first (IPv4-mapped, 6to4, NAT64 64:ff9b::/96), and multicast, reserved and site-local
refused as well; 100.64.0.0/10 (CGNAT) is not global.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from typing import Any

from aiohttp import hdrs
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_CHARS = 4096
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}")
# Headers a client may not choose: hop-by-hop ones, and those that frame or route the POST.
FORBIDDEN_HEADERS = frozenset(
    h.lower()
    for h in (
        hdrs.CONNECTION, hdrs.KEEP_ALIVE, hdrs.PROXY_AUTHENTICATE, hdrs.PROXY_AUTHORIZATION, hdrs.TE,
        hdrs.TRAILER, "Trailers", hdrs.TRANSFER_ENCODING, hdrs.UPGRADE, hdrs.HOST, hdrs.CONTENT_LENGTH,
        hdrs.CONTENT_TYPE, hdrs.CONTENT_ENCODING, hdrs.EXPECT, "Proxy-Connection",
    )
)  # fmt: skip


class Refused(ValueError):
    """A webhook target the gateway will not POST to; the message says why (for a 400)."""


class Blocked(OSError):
    """A name resolved to no allowed address: the connection is not made."""


def embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, NAT64), if any."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def is_public(addr: IPAddress) -> bool:
    if isinstance(addr, ipaddress.IPv6Address):
        inner = embedded_ipv4(addr)
        if inner is not None:
            return is_public(inner)
        if addr.is_site_local:
            return False
    return addr.is_global and not (
        addr.is_multicast
        or addr.is_reserved
        or addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_unspecified
    )


def ip_literal(host: str) -> IPAddress | None:
    """``host`` as an IP address if it is one, in any form a resolver would take as one
    (``127.1``, ``0x7f.1``, ``2130706433``, ``[::ffff:127.0.0.1]``, ``fe80::1%eth0``)."""
    host = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


class Policy:
    """The allow rule: public addresses, plus what ``webhook_allow`` opens."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.networks: list[IPNetwork] = []
        self.hosts: set[str] = set()
        for item in allow:
            try:
                self.networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.hosts.add(_host_key(item))

    def host_allowed(self, host: str) -> bool:
        return _host_key(host) in self.hosts

    def address_allowed(self, addr: IPAddress) -> bool:
        if is_public(addr):
            return True
        forms: list[IPAddress] = [addr]
        if isinstance(addr, ipaddress.IPv6Address) and (inner := embedded_ipv4(addr)) is not None:
            forms.append(inner)
        return any(a.version == n.version and a in n for a in forms for n in self.networks)

    def check_url(self, url: str) -> URL:
        """The parsed URL, or Refused: what can be decided without resolving a name."""
        if len(url) > MAX_URL_CHARS:
            raise Refused(f"webhook_url is longer than {MAX_URL_CHARS} characters")
        try:
            parsed = URL(url)
        except (ValueError, TypeError):
            raise Refused("webhook_url is not a valid URL") from None
        if parsed.scheme not in ("http", "https"):
            raise Refused("webhook_url must be an http:// or https:// URL")
        host = parsed.host
        if not host:
            raise Refused("webhook_url has no host")
        if parsed.user is not None or parsed.password is not None:
            raise Refused(
                "webhook_url must not carry credentials; use webhook_auth_header_name and "
                "webhook_auth_header_value"
            )
        if self.host_allowed(host):
            return parsed
        addr = ip_literal(host)
        if addr is not None:
            if not self.address_allowed(addr):
                raise Refused(f"webhook_url's host {host} is not a public address")
        elif _host_key(host) == "localhost" or _host_key(host).endswith(".localhost"):
            raise Refused(f"webhook_url's host {host} is not a public address")
        return parsed


def check_auth_header(name: Any, value: Any) -> None:
    """Refused unless ``name`` is a header token the client may choose and ``value`` is a
    header value (no CR, LF or NUL)."""
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise Refused("webhook_auth_header_name must be an HTTP header name (letters, digits, -)")
    if name.lower() in FORBIDDEN_HEADERS:
        raise Refused(f"webhook_auth_header_name cannot be {name}")
    if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
        raise Refused("webhook_auth_header_value must be a string without line breaks")


class GuardedResolver(AbstractResolver):
    """Resolves with ``inner`` (aiohttp's default) and keeps only allowed addresses: the
    connection is made to one of those or fails, so the check holds at connect time."""

    def __init__(self, policy: Policy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        if self._policy.host_allowed(host):
            return found
        kept = [
            r for r in found if (a := ip_literal(r["host"])) is not None and self._policy.address_allowed(a)
        ]
        if not kept:
            raise Blocked(f"{host} resolves to no allowed address")
        return kept

    async def close(self) -> None:
        await self._inner.close()


def _host_key(host: str) -> str:
    return host.lower().rstrip(".")
