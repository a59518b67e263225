"""Fetch images from the web without becoming a proxy into the network we run in (SSRF).

Only http and https; every hop of a redirect is checked; the address connected to
must be public (no loopback, private, link-local such as the metadata server
169.254.169.254, carrier-grade NAT, multicast or reserved ranges, nor any of
those wrapped in IPv6: IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo).
Size, redirects and time are capped. URLs with credentials (``user:pass@``) are
refused, and a URL is never put in a message with its credentials.

The guard is in three places, each on what the HTTP stack really uses:

1. Before each hop, the URL is parsed once with yarl, which is what aiohttp
   connects with: yarl maps the host through IDNA / UTS-46, so fullwidth digits,
   ideographic full stops or circled digits become the ASCII literal
   ``127.0.0.1`` here, before the check, and that very ``URL`` object is what is
   requested. Legacy numeric forms (``2130706433``, ``0x7f.1``, ``0177.0.0.1``)
   are read as the address ``inet_aton`` would make of them.
2. The connector's resolver refuses names that resolve to non-public addresses
   (defence in depth: it never sees IP literals, see ``GuardedConnector``).
3. Decisive: the connector's socket factory judges the socket address each
   connection is about to ``connect()`` to, for every hop, whatever the spelling
   and whatever DNS answered (rebinding included).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

import aiohttp
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from yarl import URL

from captioner.adapters.bodies import read_capped
from captioner.errors import PermanentError, TransientError

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "captioner/0.1 (+image captions; fetches only the URLs it is given)"
BLOCKED = "not a public address"
# Said with every refusal: a loopback or private address is often the user's own
# test server, and this is the setting that lets it through.
_ALLOW_HINT = "; to fetch from it anyway, add its host:port to CAPTION_URL_ALLOWED_HOSTS"

# IPv6 ranges that carry an IPv4 address in their last 32 bits.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: where the v4 sits varies
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765 IPv4-translated
_LEGACY_IPV4 = re.compile(r"[0-9a-fx.]+", re.IGNORECASE)
# "scheme://userinfo@": greedy up to the last "@" before the path, query or fragment.
_USERINFO = re.compile(r"//[^/?#\s]*@")

# Whether the connection being made is to a host in the allowed list; set by
# GuardedConnector.connect for the request it connects, read by the socket factory.
_PERMITTED: ContextVar[bool] = ContextVar("captioner_url_permitted", default=False)


class BlockedAddressError(OSError):
    """A host resolved to, or is, an address we refuse to connect to."""


def redact(text: str | URL) -> str:
    """``text`` with the ``user:password@`` of every URL in it replaced by ``***@``.

    For URL strings and for messages that quote one; a URL without credentials
    comes back unchanged."""
    return _USERINFO.sub("//***@", str(text))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries, which is where packets may end up."""
    value = int(ip)
    low32 = ipaddress.IPv4Address(value & 0xFFFFFFFF)
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d, connects to a.b.c.d on dual-stack
        found.append(ip.ipv4_mapped)
    if value >> 32 == 0:  # ::a.b.c.d, IPv4-compatible (deprecated, still routed by some)
        found.append(low32)
    if ip in _SIIT or ip in _NAT64:
        found.append(low32)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    return found


def is_public_address(address: str) -> bool:
    """Whether connecting to ``address`` (an IP literal) can only reach the public internet."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL or int(ip) <= 1:  # local-use NAT64; "::" and "::1"
            return False
        candidates += _embedded_ipv4(ip)
    return all(c.is_global and not c.is_multicast for c in candidates)


def literal_address(host: str) -> str | None:
    """The address a host as yarl gives it (``URL.raw_host``) denotes if it is an IP
    literal, in any spelling the stack below would accept; None for a name."""
    bare = host.strip("[]").rstrip(".")
    try:
        return str(ipaddress.ip_address(bare.split("%", 1)[0]))
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(bare):
        try:  # what getaddrinfo makes of 2130706433, 0x7f.1, 0177.0.0.1, 127.1
            return socket.inet_ntoa(socket.inet_aton(bare))
        except OSError:
            return None
    return None


def _allowed_entry(entry: str) -> tuple[str, int | None]:
    """``host`` or ``host:port`` (``[v6]:port`` too), normalised as yarl normalises hosts."""
    entry = entry.strip().lower()
    try:
        url = URL(f"http://{entry}")
        if url.raw_host:
            return url.raw_host, url.explicit_port
    except ValueError:
        pass
    return entry.strip("[]"), None


class GuardedResolver(AbstractResolver):
    """Resolves like ``inner`` but refuses hosts with any non-public address."""

    def __init__(self, inner: AbstractResolver | None = None, allowed: Iterable[str] = ()) -> None:
        self._inner = inner or aiohttp.ThreadedResolver()
        self._allowed = frozenset(_allowed_entry(a) for a in allowed if a.strip())

    def allows(self, host: str, port: int) -> bool:
        """Whether ``host`` (as yarl spells it) on ``port`` is in the allowed list."""
        host = host.lower().strip("[]")
        return (host, None) in self._allowed or (host, port) in self._allowed

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


def _guarded_socket(addr_info: AddrInfoType) -> socket.socket:
    """aiohappyeyeballs calls this for each address just before ``sock_connect``: the
    last point where the address actually connected to can be judged."""
    family, type_, proto, _, sockaddr = addr_info
    address = str(sockaddr[0])
    if not _PERMITTED.get() and not is_public_address(address):
        raise BlockedAddressError(f"{address} is {BLOCKED}")
    return socket.socket(family=family, type=type_, proto=proto)


class GuardedConnector(aiohttp.TCPConnector):
    """A TCPConnector that judges the socket address of every connection it opens.

    The resolver check alone is not enough: aiohttp never asks the resolver about
    an IP literal (``TCPConnector._resolve_host`` in aiohttp/connector.py returns
    the host as is when ``helpers.is_ip_address(host)``), and yarl turns spellings
    such as ``１２７．０．０．１`` into such a literal. So every connection also goes
    through ``_guarded_socket`` (aiohttp's ``socket_factory``, handed the resolved
    address info for every connection, literals included).

    ``resolver`` replaces ``guard`` as the resolver, for tests that prove the socket
    check holds on its own; ``guard`` still says which hosts are allowed.
    """

    def __init__(
        self, guard: GuardedResolver, *, resolver: AbstractResolver | None = None, **kwargs: Any
    ) -> None:
        super().__init__(
            resolver=resolver or guard,
            use_dns_cache=False,
            socket_factory=_guarded_socket,
            **kwargs,
        )
        self._guard = guard

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> Connection:
        # Connections are made in this task (or in tasks that copy its context), so
        # the socket factory sees the permission of the request it connects.
        permitted = self._guard.allows(req.url.raw_host or "", req.port or 0)
        token = _PERMITTED.set(permitted)
        try:
            return await super().connect(req, traces, timeout)
        finally:
            _PERMITTED.reset(token)


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
        session = aiohttp.ClientSession(
            connector=GuardedConnector(resolver, limit=limit),
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
            raise TransientError(
                f"{redact(url)[:200]} took longer than {self._timeout:g}s"
            ) from None

    async def _follow(self, url: str) -> bytes:
        target = self._parse(url)
        for _ in range(self._max_redirects + 1):
            self._check(target)
            shown = redact(target)[:200]
            try:
                async with self._session.get(target, allow_redirects=False) as response:
                    if response.status in _REDIRECTS:
                        location = response.headers.get("Location")
                        if not location:
                            raise PermanentError(
                                "url-bad-redirect", f"{shown}: redirect without Location"
                            )
                        target = self._parse(location, base=target)
                        continue
                    return await self._read(shown, response)
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, BlockedAddressError) or BLOCKED in str(exc.os_error):
                    raise PermanentError(
                        "blocked-address", redact(str(exc.os_error)) + _ALLOW_HINT
                    ) from None
                raise TransientError(
                    f"cannot connect to {target.raw_host}: {redact(str(exc.os_error))}"
                ) from None
            except aiohttp.InvalidURL as exc:
                raise PermanentError("bad-url", f"invalid URL {redact(str(exc))[:200]}") from None
            except aiohttp.ClientError as exc:
                raise TransientError(f"fetching {shown} failed: {redact(repr(exc))}") from None
        raise PermanentError("too-many-redirects", f"more than {self._max_redirects} redirects")

    @staticmethod
    def _parse(text: str, base: URL | None = None) -> URL:
        """The URL as aiohttp would request it (yarl normalises the host: IDNA/UTS-46)."""
        try:
            url = URL(text)
            return base.join(url) if base is not None else url
        except (ValueError, UnicodeError, TypeError):
            raise PermanentError("bad-url", f"{redact(text)[:200]!r} is not a valid URL") from None

    def _check(self, url: URL) -> None:
        """Scheme, credentials, and the host as the stack will see it."""
        if url.scheme not in ("http", "https"):
            raise PermanentError("bad-url", f"{redact(url)[:200]}: only http and https are fetched")
        if url.raw_user is not None or url.raw_password is not None:
            raise PermanentError(
                "bad-url", f"{redact(url)[:200]}: URLs with credentials are not fetched"
            )
        host = url.raw_host or ""
        if not host:
            raise PermanentError("bad-url", f"{redact(url)[:200]}: no host")
        port = url.port or (443 if url.scheme == "https" else 80)
        if self._resolver.allows(host, port):
            return
        address = literal_address(host)
        if address is not None and not is_public_address(address):
            raise PermanentError("blocked-address", f"{host} ({address}) is {BLOCKED}{_ALLOW_HINT}")
        # A name: the guarded resolver checks what it resolves to, the socket factory
        # what is connected to.

    async def _read(self, shown: str, response: aiohttp.ClientResponse) -> bytes:
        if response.status == 429 or response.status >= 500:
            raise TransientError(f"{shown} answered {response.status}")
        if response.status >= 400:
            raise PermanentError(f"url-{response.status}", f"{shown} answered {response.status}")
        return await read_capped(response, self._max_bytes)
