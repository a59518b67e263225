"""Fetch images from the web without becoming a proxy into the network we run in (SSRF).

Only http and https; every hop of a redirect is checked; a host must resolve to
public addresses only (no loopback, private, link-local such as the metadata
server 169.254.169.254, carrier-grade NAT, multicast or reserved ranges). The
check runs inside the connector's resolver, so the address that was checked is
the address connected to: a DNS answer that changes between check and connect
(rebinding) is caught too. Size, redirects and time are capped.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from captioner.bodies import read_capped
from captioner.errors import PermanentError, TransientError

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "captioner/0.1 (+image captions; fetches only the URLs it is given)"


class BlockedAddressError(OSError):
    """A host resolved to an address we refuse to connect to."""


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if mapped is not None:
            ip = mapped
    return bool(ip.is_global) and not ip.is_multicast


class GuardedResolver(AbstractResolver):
    """Resolves like ``inner`` but refuses hosts with any non-public address."""

    def __init__(self, inner: AbstractResolver | None = None, allowed: Iterable[str] = ()) -> None:
        self._inner = inner or aiohttp.ThreadedResolver()
        self._allowed = frozenset(a.lower() for a in allowed)

    def allows(self, host: str, port: int) -> bool:
        host = host.lower().strip("[]")
        return host in self._allowed or f"{host}:{port}" in self._allowed

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self.allows(host, port):
            return results
        blocked = [r["host"] for r in results if not is_public_address(r["host"])]
        if blocked or not results:
            raise BlockedAddressError(
                f"{host} resolves to a non-public address ({', '.join(blocked) or 'none'})"
            )
        return results

    async def close(self) -> None:
        await self._inner.close()


class UrlFetcher:
    """Downloads one image from a URL with the limits above."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        resolver: GuardedResolver,
        *,
        max_bytes: int,
        max_redirects: int = 5,
        timeout: float = 30.0,
    ) -> None:
        self._session = session
        self._resolver = resolver
        self._max_bytes = max_bytes
        self._max_redirects = max_redirects
        self._timeout = timeout

    @classmethod
    def create(
        cls,
        *,
        max_bytes: int,
        allowed_hosts: Iterable[str] = (),
        inner_resolver: AbstractResolver | None = None,
        max_redirects: int = 5,
        timeout: float = 30.0,
        limit: int = 32,
    ) -> UrlFetcher:
        resolver = GuardedResolver(inner_resolver, allowed_hosts)
        connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False, limit=limit)
        session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            headers={"User-Agent": USER_AGENT, "Accept": "image/*"},
            trust_env=False,  # never route through a proxy taken from the environment
        )
        return cls(
            session, resolver, max_bytes=max_bytes, max_redirects=max_redirects, timeout=timeout
        )

    async def close(self) -> None:
        await self._session.close()

    async def fetch(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._follow(url)
        except TimeoutError:
            raise TransientError(f"{url[:200]} took longer than {self._timeout:g}s") from None

    async def _follow(self, url: str) -> bytes:
        for _ in range(self._max_redirects + 1):
            self._check_literal(url)
            try:
                async with self._session.get(url, allow_redirects=False) as response:
                    if response.status in _REDIRECTS:
                        location = response.headers.get("Location")
                        if not location:
                            raise PermanentError(
                                "url-bad-redirect", f"{url}: redirect without Location"
                            )
                        url = urljoin(url, location)
                        continue
                    return await self._read(url, response)
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, BlockedAddressError):
                    raise PermanentError("blocked-address", str(exc.os_error)) from None
                raise TransientError(f"cannot connect to {_host(url)}: {exc.os_error}") from None
            except aiohttp.InvalidURL as exc:
                raise PermanentError("bad-url", f"invalid URL {str(exc)[:200]}") from None
            except aiohttp.ClientError as exc:
                raise TransientError(f"fetching {url[:200]} failed: {exc!r}") from None
        raise PermanentError("too-many-redirects", f"more than {self._max_redirects} redirects")

    def _check_literal(self, url: str) -> None:
        """Schemes, and IP-literal hosts (which the connector does not resolve)."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise PermanentError("bad-url", f"{url[:200]}: only http and https are fetched")
        host = parts.hostname or ""
        if not host:
            raise PermanentError("bad-url", f"{url[:200]}: no host")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise PermanentError("bad-url", f"{url[:200]}: bad port") from None
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return  # a name: the guarded resolver checks what it resolves to
        if not self._resolver.allows(host, port) and not is_public_address(host):
            raise PermanentError("blocked-address", f"{host} is not a public address")

    async def _read(self, url: str, response: aiohttp.ClientResponse) -> bytes:
        if response.status == 429 or response.status >= 500:
            raise TransientError(f"{url[:200]} answered {response.status}")
        if response.status >= 400:
            raise PermanentError(
                f"url-{response.status}", f"{url[:200]} answered {response.status}"
            )
        return await read_capped(response, self._max_bytes)


def _host(url: str) -> Any:
    return urlsplit(url).hostname
