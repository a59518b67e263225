"""The SSRF guard of URL mode judges the address, not its spelling (issue 11).

Hypothesis writes internal addresses the ways the HTTP stack would accept them:
fullwidth digits and full stops, ideographic full stops, circled digits (all of
which yarl maps to ASCII through IDNA / UTS-46), legacy integer forms, and IPv6
forms that carry an IPv4 address. Every one must be refused before a byte goes
out: a real listening socket on 127.0.0.1 (and ::1) proves no connection was made.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import select
import socket
from collections.abc import Iterator

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from captioner.adapters.urls import (
    BlockedAddressError,
    GuardedConnector,
    GuardedResolver,
    UrlFetcher,
    is_public_address,
    literal_address,
    redact,
)
from captioner.errors import PermanentError

# Each ASCII digit and the characters UTS-46 maps to it.
DIGITS: dict[str, list[str]] = {
    d: [
        d,
        chr(0xFF10 + int(d)),  # fullwidth U+FF10..FF19
        "⓪" if d == "0" else chr(0x2460 + int(d) - 1),  # circled digits
        chr(0x1D7CE + int(d)),  # mathematical bold digits
    ]
    for d in "0123456789"
}
# "10".."20" as one circled number (U+2469..2473), which UTS-46 maps to two digits.
CIRCLED_NUMBERS = {str(n): chr(0x2460 + n - 1) for n in range(10, 21)}
DOTS = [".", "．", "。", "｡"]  # full stop, fullwidth, ideographic, halfwidth ideographic

INTERNAL_V4 = st.one_of(
    st.just(ipaddress.IPv4Address("127.0.0.1")),
    st.integers(0x7F000000, 0x7FFFFFFF).map(ipaddress.IPv4Address),  # 127/8
    st.integers(0x0A000000, 0x0AFFFFFF).map(ipaddress.IPv4Address),  # 10/8
    st.integers(0xAC100000, 0xAC1FFFFF).map(ipaddress.IPv4Address),  # 172.16/12
    st.integers(0xC0A80000, 0xC0A8FFFF).map(ipaddress.IPv4Address),  # 192.168/16
    st.integers(0x64400000, 0x647FFFFF).map(ipaddress.IPv4Address),  # 100.64/10
    st.integers(0xA9FE0000, 0xA9FEFFFF).map(ipaddress.IPv4Address),  # 169.254/16
    st.sampled_from(["169.254.169.254", "0.0.0.0"]).map(ipaddress.IPv4Address),
)
PUBLIC_V4 = st.sampled_from(["8.8.8.8", "1.1.1.1", "142.250.74.78", "93.184.216.34"]).map(
    ipaddress.IPv4Address
)


@st.composite
def spelled_number(draw: st.DrawFn, digits: str) -> str:
    if digits in CIRCLED_NUMBERS and draw(st.booleans()):
        return CIRCLED_NUMBERS[digits]
    return "".join(draw(st.sampled_from(DIGITS[d])) for d in digits)


@st.composite
def unicode_ipv4(draw: st.DrawFn, address: ipaddress.IPv4Address) -> str:
    """Dotted quad with each digit and dot drawn from what UTS-46 maps to ASCII."""
    octets = [draw(spelled_number(o)) for o in str(address).split(".")]
    host = octets[0]
    for octet in octets[1:]:
        host += draw(st.sampled_from(DOTS)) + octet
    root = draw(st.integers(0, 3)) == 0  # sometimes a root label, in any spelling of the dot
    return host + (draw(st.sampled_from(DOTS)) if root else "")


@st.composite
def legacy_ipv4(draw: st.DrawFn, address: ipaddress.IPv4Address) -> str:
    """Forms inet_aton (so getaddrinfo) accepts: integer, hex, octal, short dotted."""
    n = int(address)
    a, b, c, d = address.packed

    def num(value: int) -> str:
        return draw(st.sampled_from([str(value), hex(value), f"0{value:o}"]))

    return draw(
        st.sampled_from(
            [
                num(n),
                f"{num(a)}.{num(b)}.{num(c)}.{num(d)}",
                f"{num(a)}.{num(b)}.{num(c << 8 | d)}",
                f"{num(a)}.{num(b << 16 | c << 8 | d)}",
            ]
        )
    )


@st.composite
def ipv6_wrapping(draw: st.DrawFn, address: ipaddress.IPv4Address) -> str:
    """IPv6 literals that carry the IPv4 address, in brackets as in a URL."""
    n = int(address)
    hi, lo = f"{n >> 16:x}", f"{n & 0xFFFF:x}"
    form = draw(
        st.sampled_from(
            [
                f"::ffff:{address}",  # IPv4-mapped
                f"::ffff:{hi}:{lo}",
                f"::{address}",  # IPv4-compatible
                f"::{hi}:{lo}",
                f"64:ff9b::{address}",  # NAT64
                f"64:ff9b::{hi}:{lo}",
                f"64:ff9b:1::{hi}:{lo}",  # local-use NAT64
                f"::ffff:0:{address}",  # IPv4-translated
                f"2002:{hi}:{lo}::1",  # 6to4
            ]
        )
    )
    return f"[{draw(st.sampled_from([form, form.upper()]))}]"


LOOPBACK_V6 = st.sampled_from(
    ["[::1]", "[0:0:0:0:0:0:0:1]", "[::0001]", "[::1%25lo]", "[::]", "[fe80::1%25lo]", "[fd00::1]"]
)

INTERNAL_HOSTS = st.one_of(
    INTERNAL_V4.flatmap(unicode_ipv4),
    INTERNAL_V4.flatmap(legacy_ipv4),
    INTERNAL_V4.flatmap(ipv6_wrapping),
    LOOPBACK_V6,
)
# The spellings that land on this machine's 127.0.0.1 or ::1, where the listener is.
LOCAL_HOSTS = st.one_of(
    st.just(ipaddress.IPv4Address("127.0.0.1")).flatmap(unicode_ipv4),
    st.just(ipaddress.IPv4Address("127.0.0.1")).flatmap(legacy_ipv4),
    st.sampled_from(["[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::1]", "[0:0::1]"]),
)


class Listener:
    """A TCP port on 127.0.0.1 (and ::1 where there is IPv6) that never answers and
    counts the connections made to it. The kernel completes a handshake before the
    client's ``connect`` returns, so pending connections are counted too."""

    def __init__(self) -> None:
        self.sockets = [socket.create_server(("127.0.0.1", 0))]
        self.port = self.sockets[0].getsockname()[1]
        with contextlib.suppress(OSError):  # no IPv6 here: 127.0.0.1 only
            self.sockets.append(socket.create_server(("::1", self.port), family=socket.AF_INET6))
        self.connections = 0

    def count(self) -> int:
        for sock in self.sockets:
            while select.select([sock], [], [], 0)[0]:
                conn, _ = sock.accept()
                conn.close()
                self.connections += 1
        return self.connections

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


def fetch_outcome(url: str) -> str:
    """What UrlFetcher (no allowed hosts, the system resolver) makes of ``url``."""

    async def run() -> str:
        fetcher = UrlFetcher.create(max_bytes=1_000_000, timeout=0.5, max_redirects=1)
        try:
            await fetcher.fetch(url)
        except PermanentError as exc:
            return exc.reason
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            await fetcher.close()
        return "fetched"

    return asyncio.run(run())


def connector_outcome(url: str) -> str:
    """What the connector alone makes of ``url``: no UrlFetcher checks, and a resolver
    that checks nothing, so only the socket-address check stands in the way."""

    async def run() -> str:
        connector = GuardedConnector(GuardedResolver(), resolver=aiohttp.ThreadedResolver())
        async with aiohttp.ClientSession(connector=connector) as session:
            try:
                async with session.get(URL(url), timeout=aiohttp.ClientTimeout(total=0.5)):
                    return "connected"
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, BlockedAddressError):
                    return "blocked-address"
                return f"ClientConnectorError: {exc.os_error!r}"
            except aiohttp.InvalidURL:
                return "bad-url"  # aiohttp refuses non-canonical numeric IPv4 itself
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"

    return asyncio.run(run())


PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(host=st.one_of(INTERNAL_HOSTS, LOCAL_HOSTS), scheme=st.sampled_from(["http", "https"]))
def test_every_spelling_of_an_internal_address_is_refused_before_a_byte_is_sent(
    listener: Listener, host: str, scheme: str
) -> None:
    before = listener.count()
    outcome = fetch_outcome(f"{scheme}://{host}:{listener.port}/secret.jpg")
    assert outcome == "blocked-address", outcome
    assert listener.count() == before, "a connection reached the internal listener"


@PROPERTY
@given(host=st.one_of(INTERNAL_HOSTS, LOCAL_HOSTS))
def test_the_socket_address_check_alone_refuses_every_spelling(
    listener: Listener, host: str
) -> None:
    before = listener.count()
    outcome = connector_outcome(f"http://{host}:{listener.port}/secret.jpg")
    assert outcome in ("blocked-address", "bad-url"), outcome
    assert listener.count() == before, "a connection reached the internal listener"


@settings(max_examples=300)
@given(address=INTERNAL_V4, data=st.data())
def test_the_early_check_reads_a_spelled_host_as_the_address_yarl_connects_to(
    address: ipaddress.IPv4Address, data: st.DataObject
) -> None:
    host = data.draw(unicode_ipv4(address))
    raw_host = URL(f"http://{host}/").raw_host
    assert raw_host is not None
    assert literal_address(raw_host) == str(address)
    assert not is_public_address(str(address))


@settings(max_examples=300)
@given(address=INTERNAL_V4, data=st.data())
def test_ipv6_forms_carrying_an_internal_ipv4_are_not_public(
    address: ipaddress.IPv4Address, data: st.DataObject
) -> None:
    host = data.draw(ipv6_wrapping(address))
    assert not is_public_address(host.strip("[]"))


@pytest.mark.parametrize(
    "address", ["64:ff9b::808:808", "2002:808:808::1", "2001:4860:4860::8888", "8.8.8.8"]
)
def test_public_addresses_wrapped_in_ipv6_stay_public(address: str) -> None:
    assert is_public_address(address)


@settings(max_examples=200)
@given(address=PUBLIC_V4, data=st.data())
def test_legacy_numeric_forms_are_read_as_the_address_they_denote(
    address: ipaddress.IPv4Address, data: st.DataObject
) -> None:
    assert literal_address(data.draw(legacy_ipv4(address))) == str(address)


USERINFO_TEXT = st.text(
    st.characters(codec="ascii", categories=["L", "N"], include_characters="-._~!$&'()*+,;=%"),
    min_size=1,
    max_size=20,
)


@settings(max_examples=300)
@given(user=USERINFO_TEXT, password=USERINFO_TEXT, host=st.sampled_from(["example.com", "[::1]"]))
def test_redact_removes_credentials_and_keeps_the_rest(user: str, password: str, host: str) -> None:
    url = f"https://{user}:{password}@{host}:8443/a/b.jpg?x=1"
    shown = redact(url)
    assert shown == f"https://***@{host}:8443/a/b.jpg?x=1"
    assert f"{user}:{password}" not in shown
    assert redact(f"'{url[:60]}' is not a valid URL").count(f"{user}:{password}@") == 0


@pytest.mark.parametrize(
    "url", ["https://example.com/a@b.jpg", "http://x/?next=//y", "http://[::1]:80/", "not a url"]
)
def test_redact_leaves_urls_without_credentials_unchanged(url: str) -> None:
    assert redact(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://user:pass@example.com/x.jpg",
        "http://user:pass@１２７．０．０．１/x.jpg",
        "http://user:p@ss@127.0.0.1/x.jpg",
        "http://user@example.com/x.jpg",
    ],
)
def test_urls_with_credentials_are_refused_and_the_message_does_not_show_them(url: str) -> None:
    async def run() -> PermanentError:
        fetcher = UrlFetcher.create(max_bytes=1000, timeout=1)
        try:
            with pytest.raises(PermanentError) as info:
                await fetcher.fetch(url)
            return info.value
        finally:
            await fetcher.close()

    error = asyncio.run(run())
    assert error.reason == "bad-url"
    assert "pass" not in str(error)
    assert "user" not in str(error)
