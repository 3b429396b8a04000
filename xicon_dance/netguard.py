"""Network guard for input URLs: which addresses a download may reach, checked after DNS.

Contract:
- ``address_refusal(ip, allow_private) -> str``: why ``ip`` may not be contacted ('' if it may).
  Policy: an address is refused unless it is globally routable unicast; every range Python's
  ``ipaddress`` marks special (private, reserved, link/site-local, multicast, shared) is refused;
  IPv4 embedded in IPv6 (mapped, 6to4, Teredo, NAT64) is judged as IPv4; cloud metadata
  addresses (``METADATA_ADDRESSES``) are refused even with ``allow_private`` (no test needs them).
- ``GuardedResolver(allow_private)``: an aiohttp resolver that refuses a host when ANY of its
  answers is refused (raises ``ForbiddenAddress``), so every connection is checked after DNS.
- ``check_url_target(url, allow_private)``: per-hop scheme check and the check of IP-literal
  hosts (which aiohttp does not resolve), non-canonical IPv4 forms included.
- ``to_url(text)`` parses without re-encoding printable ASCII (a presigned URL's signature must
  survive); ``display_url(url)`` shows a URL without user info or query string (presigned URLs
  carry credentials there).
"""

from __future__ import annotations

import ipaddress
import re
import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "169.254.170.2",
        "169.254.169.253",
        "168.63.129.16",
        "100.100.100.200",
        "192.0.0.192",
        "fd00:ec2::254",
        "fd00:ec2::23",
    )
)
# NAT64 well-known prefix (RFC 6052): a NAT64 gateway turns an address in it into the IPv4
# address in its last 32 bits, so that embedded address is what is judged. (The local-use
# prefix 64:ff9b:1::/48 lies in ::/8, which is_reserved refuses.)
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")


class ForbiddenAddress(OSError):
    """A connection target that the SSRF policy refuses."""


def address_refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_private: bool) -> str:
    """Why ``ip`` may not be contacted ('' if it may)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return address_refusal(embedded, allow_private)
        if ip.teredo is not None:
            return address_refusal(ip.teredo[1], allow_private)
        if ip in _NAT64_WELL_KNOWN:
            return address_refusal(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF), allow_private)
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if allow_private:
        return ""
    for attr, label in (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private address"),
        ("is_reserved", "a reserved address"),
        ("is_site_local", "a site-local address"),  # fec0::/10: deprecated, still routed inside
    ):
        if getattr(ip, attr, False):  # is_site_local exists for IPv6 only
            return label
    if not ip.is_global:
        return "a non-public address"
    return ""


class GuardedResolver(AbstractResolver):
    """Resolves with the system resolver, then refuses if ANY answer is a forbidden address."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for res in results:
            ip = ipaddress.ip_address(res["host"].split("%", 1)[0])
            why = address_refusal(ip, self._allow_private)
            if why:
                raise ForbiddenAddress(f"{host} resolves to {why}")
        return results

    async def close(self) -> None:
        await self._inner.close()


def check_url_target(url: URL, allow_private: bool) -> None:
    """Scheme and IP-literal checks for one hop; raises ``ForbiddenAddress`` / ``ValueError``."""
    if url.scheme not in ("http", "https"):
        raise ValueError(f"uses the scheme {url.scheme or '(none)'}; only http and https work")
    host = (url.raw_host or "").strip("[]")
    if not host:
        raise ValueError("has no host name")
    ip = _ip_literal(host)
    if ip is not None:
        why = address_refusal(ip, allow_private)
        if why:
            raise ForbiddenAddress(f"{host} is {why}")


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    if re.fullmatch(r"[0-9a-fA-FxX.]+", host):
        try:  # legacy numeric forms such as 2130706433, 0x7f.1 or 127.1
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def to_url(text: str) -> URL:
    """Parse a URL; printable ASCII is kept byte for byte (a presigned URL's ``%2F`` must stay
    encoded or its signature breaks), anything else is percent-encoded."""
    if text.isascii() and text.isprintable():
        return URL(text, encoded=True)
    return URL(text)


def display_url(url: URL | str) -> str:
    """``scheme://host[:port]/path`` (path shortened), without user info or query string."""
    u = URL(str(url)) if not isinstance(url, URL) else url
    try:
        host = u.raw_host or ""
        origin = f"{u.scheme}://[{host}]" if ":" in host else f"{u.scheme}://{host}"
        if u.explicit_port is not None:
            origin += f":{u.explicit_port}"
    except ValueError:
        return "(unparsable URL)"
    path = u.raw_path if len(u.raw_path) <= 80 else u.raw_path[:77] + "..."
    return origin + path
