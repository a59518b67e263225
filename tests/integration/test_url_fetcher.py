"""The SSRF guard of URL mode, with real sockets and a resolver we control."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import ThreadedResolver
from aiohttp.abc import AbstractResolver, ResolveResult

from captioner.errors import PermanentError, TransientError
from captioner.urls import UrlFetcher, is_public_address
from tests import images
from tests.webserver import ImageSite


@pytest.fixture(scope="module")
def site() -> Iterator[ImageSite]:
    server = ImageSite().start()
    yield server
    server.stop()


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
