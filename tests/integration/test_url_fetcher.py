"""The SSRF guard of URL mode, with real sockets and a resolver we control."""

from __future__ import annotations

import http.client
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import ThreadedResolver
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from captioner.adapters.urls import (
    BlockedAddressError,
    GuardedConnector,
    GuardedResolver,
    UrlFetcher,
    is_public_address,
)
from captioner.errors import PermanentError, TransientError
from tests import images
from tests.webserver import CountingSite, ImageSite


class FixedResolver(AbstractResolver):
    """Answers from a table, as a DNS server an attacker controls would."""

    def __init__(self, table: dict[str, str]) -> None:
        self.table = table
        self.system = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.table:
            return await self.system.resolve(host, port, family)
        address = self.table[host]
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        pass


@pytest.fixture
async def fetcher(site: ImageSite) -> AsyncIterator[UrlFetcher]:
    f = UrlFetcher.create(
        max_bytes=2_000_000,
        allowed_hosts=[f"127.0.0.1:{site.port}"],
        max_redirects=3,
        timeout=2,
        inner_resolver=FixedResolver(
            {
                "images.test": "127.0.0.1",
                "intranet.test": "10.1.2.3",
                "metadata.test": "169.254.169.254",
                "cgnat.test": "100.64.0.1",
            }
        ),
    )
    yield f
    await f.close()


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2001:4860:4860::8888", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.5.4", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::", False),  # 6to4 wrapping 127.0.0.1
    ],
)
def test_public_address_classification(address: str, public: bool) -> None:
    assert is_public_address(address) is public


async def test_allowed_host_serves_an_image(fetcher: UrlFetcher, site: ImageSite) -> None:
    data = await fetcher.fetch(site.url("/photos/chelsea.jpg"))
    assert data == images.photo("chelsea.jpg")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1/x.jpg",
        "http://[::1]:1/x.jpg",
        "http://169.254.169.254/computeMetadata/v1/",
        "http://10.0.0.8/x.jpg",
        "http://0x7f000001/x.jpg",
        "http://intranet.test/x.jpg",
        "http://metadata.test/computeMetadata/v1/",
        "http://cgnat.test/x.jpg",
    ],
)
async def test_internal_addresses_are_refused(fetcher: UrlFetcher, url: str) -> None:
    with pytest.raises(PermanentError) as info:
        await fetcher.fetch(url)
    assert info.value.reason in ("blocked-address", "bad-url")


async def test_redirect_to_loopback_is_refused(fetcher: UrlFetcher, site: ImageSite) -> None:
    with pytest.raises(PermanentError, match="not a public address") as info:
        await fetcher.fetch(site.url("/redirect?to=http://127.0.0.1:9/secret"))
    assert info.value.reason == "blocked-address"


async def test_redirect_to_a_name_resolving_to_a_private_address_is_refused(
    fetcher: UrlFetcher, site: ImageSite
) -> None:
    with pytest.raises(PermanentError, match="non-public") as info:
        await fetcher.fetch(site.url("/redirect?to=http://intranet.test/x.jpg"))
    assert info.value.reason == "blocked-address"


async def test_redirect_to_another_scheme_is_refused(fetcher: UrlFetcher, site: ImageSite) -> None:
    with pytest.raises(PermanentError, match="only http and https"):
        await fetcher.fetch(site.url("/redirect?to=file:///etc/passwd"))


async def test_redirects_are_capped(fetcher: UrlFetcher, site: ImageSite) -> None:
    with pytest.raises(PermanentError) as info:
        await fetcher.fetch(site.url("/loop"))
    assert info.value.reason == "too-many-redirects"


async def test_size_is_capped_while_streaming(fetcher: UrlFetcher, site: ImageSite) -> None:
    with pytest.raises(PermanentError) as info:
        await fetcher.fetch(site.url("/huge"))
    assert info.value.reason == "too-large"


async def test_time_is_capped(fetcher: UrlFetcher, site: ImageSite) -> None:
    with pytest.raises(TransientError, match="longer than 2s"):
        await fetcher.fetch(site.url("/slow"))


async def test_not_found_is_permanent(fetcher: UrlFetcher, site: ImageSite) -> None:
    with pytest.raises(PermanentError) as info:
        await fetcher.fetch(site.url("/missing"))
    assert info.value.reason == "url-404"


# Issue 11: the guard judges the address connected to, whatever the spelling.


@pytest.fixture
async def public_fetcher(gateway: CountingSite) -> AsyncIterator[UrlFetcher]:
    f = UrlFetcher.create(
        max_bytes=2_000_000,
        allowed_hosts=[f"public.test:{gateway.port}"],
        max_redirects=3,
        timeout=2,
        inner_resolver=FixedResolver({"public.test": "127.0.0.1"}),
    )
    yield f
    await f.close()


def spellings_of_loopback(port: int) -> list[str]:
    return [
        f"http://１２７．０．０．１:{port}/photos/chelsea.jpg",  # fullwidth digits and stops
        f"http://127。0。0。1:{port}/photos/chelsea.jpg",  # ideographic full stop
        f"http://127｡0｡0｡1:{port}/photos/chelsea.jpg",  # halfwidth ideographic full stop
        f"http://①②⑦.⓪.⓪.①:{port}/photos/chelsea.jpg",  # circled digits
        f"http://𝟏𝟐𝟕.0.0.1:{port}/photos/chelsea.jpg",  # mathematical bold digits
        f"http://１２７.0。0．1:{port}/photos/chelsea.jpg",  # mixed
        f"http://127.0.0.1.:{port}/photos/chelsea.jpg",  # root label
        f"http://2130706433:{port}/photos/chelsea.jpg",
        f"http://0x7f000001:{port}/photos/chelsea.jpg",
        f"http://0x7f.1:{port}/photos/chelsea.jpg",
        f"http://0177.0.0.1:{port}/photos/chelsea.jpg",
        f"http://127.1:{port}/photos/chelsea.jpg",
        f"http://[::ffff:127.0.0.1]:{port}/photos/chelsea.jpg",
        f"http://[::ffff:7f00:1]:{port}/photos/chelsea.jpg",
        f"http://[::127.0.0.1]:{port}/photos/chelsea.jpg",
        f"http://[64:ff9b::7f00:1]:{port}/photos/chelsea.jpg",
        f"http://[::1]:{port}/photos/chelsea.jpg",
    ]


SPELLING_IDS = [
    "fullwidth",
    "ideographic-stop",
    "halfwidth-stop",
    "circled",
    "math-bold",
    "mixed",
    "trailing-dot",
    "decimal",
    "hex",
    "hex-short",
    "octal",
    "short",
    "v4-mapped",
    "v4-mapped-hex",
    "v4-compatible",
    "nat64",
    "v6-loopback",
]


@pytest.mark.parametrize("index", range(len(SPELLING_IDS)), ids=SPELLING_IDS)
async def test_every_spelling_of_loopback_is_blocked_and_the_internal_server_sees_nothing(
    public_fetcher: UrlFetcher, internal: CountingSite, index: int
) -> None:
    before = len(internal.requests)
    url = spellings_of_loopback(internal.port)[index]
    with pytest.raises(PermanentError) as info:
        await public_fetcher.fetch(url)
    assert info.value.reason in ("blocked-address", "bad-url"), str(info.value)
    assert len(internal.requests) == before


def test_the_gateway_really_sends_a_fullwidth_location(
    gateway: CountingSite, internal: CountingSite
) -> None:
    """The redirect tests below only prove something if the spelling reaches the client."""
    target = f"http://１２７．０．０．１:{internal.port}/photos/chelsea.jpg"
    connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=5)
    connection.request("GET", "/raw-redirect?" + urlencode({"to": target}))
    response = connection.getresponse()
    connection.close()
    assert response.status == 302
    raw = response.msg.get_all("Location") or []
    assert [value.encode("latin-1").decode("utf-8") for value in raw] == [target]


@pytest.mark.parametrize(
    "location",
    [
        "http://１２７．０．０．１:{port}/photos/chelsea.jpg",
        "http://127。0。0。1:{port}/photos/chelsea.jpg",
        "http://[::ffff:127.0.0.1]:{port}/photos/chelsea.jpg",
        "http://[::127.0.0.1]:{port}/photos/chelsea.jpg",
        "//①②⑦.⓪.⓪.①:{port}/photos/chelsea.jpg",
        "http://0x7f.1:{port}/photos/chelsea.jpg",
    ],
    ids=["fullwidth", "ideographic-stop", "v4-mapped", "v4-compatible", "circled-relative", "hex"],
)
async def test_an_allowed_public_hop_redirecting_to_a_spelled_internal_address_is_blocked(
    public_fetcher: UrlFetcher, gateway: CountingSite, internal: CountingSite, location: str
) -> None:
    before, hops = len(internal.requests), len(gateway.requests)
    to = location.format(port=internal.port)
    with pytest.raises(PermanentError) as info:
        await public_fetcher.fetch(
            f"http://public.test:{gateway.port}/raw-redirect?{urlencode({'to': to})}"
        )
    assert info.value.reason == "blocked-address", str(info.value)
    assert len(gateway.requests) == hops + 1  # the first hop was fetched
    assert len(internal.requests) == before


async def test_the_allowed_name_still_serves_images(
    public_fetcher: UrlFetcher, gateway: CountingSite
) -> None:
    data = await public_fetcher.fetch(f"http://public.test:{gateway.port}/photos/chelsea.jpg")
    assert data == images.photo("chelsea.jpg")


async def test_a_redirect_with_credentials_is_refused_without_showing_them(
    public_fetcher: UrlFetcher, gateway: CountingSite
) -> None:
    to = f"http://admin:hunter2@public.test:{gateway.port}/photos/chelsea.jpg"
    with pytest.raises(PermanentError) as info:
        await public_fetcher.fetch(
            f"http://public.test:{gateway.port}/raw-redirect?{urlencode({'to': to})}"
        )
    assert info.value.reason == "bad-url"
    assert "hunter2" not in str(info.value)
    assert "admin" not in str(info.value)


async def test_the_socket_check_refuses_what_an_unchecking_resolver_lets_through(
    internal: CountingSite,
) -> None:
    """DNS rebinding, or any resolver that misses: the address connected to is judged."""
    before = len(internal.requests)
    unchecked = FixedResolver({"rebound.test": "127.0.0.1"})
    connector = GuardedConnector(GuardedResolver(), resolver=unchecked)
    async with aiohttp.ClientSession(connector=connector) as session:
        for url in (
            f"http://rebound.test:{internal.port}/photos/chelsea.jpg",
            f"http://１２７．０．０．１:{internal.port}/photos/chelsea.jpg",
        ):
            with pytest.raises(aiohttp.ClientConnectorError) as info:
                await session.get(URL(url))
            assert isinstance(info.value.os_error, BlockedAddressError)
    assert len(internal.requests) == before
