"""The PROXY protocol parser, as a table: what it takes, what it refuses, and how many
bytes it says are header (never one of what follows)."""

from __future__ import annotations

import pytest

from proxy.proxyproto import V2_SIGNATURE, ProxyHeader, ProxyHeaderError, needed, parse, v1, v2

AFTER = b"\x16\x03\x01 the ClientHello or request that follows"

GOOD = [
    (b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\n", "192.0.2.1"),
    (b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n", "2001:db8::1"),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),
    (v1("203.0.113.9", 0, "10.0.0.1", 80), "203.0.113.9"),
    (v2("203.0.113.9", 1, "10.0.0.1", 80), "203.0.113.9"),
    (v2("2001:db8::9", 1, "2001:db8::1", 80), "2001:db8::9"),
    (v2("::ffff:192.0.2.5", 1, "::1", 80), "192.0.2.5"),
    (v2("", 0, "", 0, local=True), None),
    # v2 with a TLV after the addresses: part of the header, skipped.
    (
        V2_SIGNATURE
        + b"\x21\x11\x00\x10"
        + bytes([192, 0, 2, 1, 10, 0, 0, 1, 0, 1, 0, 80])
        + b"\x04\x00\x01\x00",
        "192.0.2.1",
    ),
    (V2_SIGNATURE + b"\x21\x00\x00\x00", None),  # UNSPEC
]

BAD = [
    b"GET / HTTP/1.1\r\n",
    b"\x16\x03\x01\x02\x00",  # a ClientHello with no header
    b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.1 56324\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443 9\r\n",
    b"PROXY TCP5 192.0.2.1 198.51.100.1 1 2\r\n",
    b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.1 65536 2\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.1 -1 2\r\n",
    b"PROXY TCP4 192.0.2.01x 198.51.100.1 1 2\r\n",
    b"PROXY  TCP4 192.0.2.1 198.51.100.1 1 2\r\n",
    b"proxy TCP4 192.0.2.1 198.51.100.1 1 2\r\n",
    b"PROXY " + b"1" * 110,
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in a v2 signature
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
    V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),  # IPv4 addresses truncated
    V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),  # IPv6 addresses truncated
    V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12),  # UDP
    V2_SIGNATURE + b"\x21\x11\xff\xff",  # longer than we accept
    b"\r\n\r\n\x00\r\nQUIx" + bytes(8),
]


@pytest.mark.parametrize(("header", "client"), GOOD)
def test_a_valid_header_is_read_to_its_last_byte_only(header: bytes, client: str | None) -> None:
    result = parse(header + AFTER)
    assert result == ProxyHeader(len(header), client, result.client_port if result else None)
    # Every prefix is "not yet", never an error and never a guess.
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, cut
        assert needed(header[:cut]) <= max(len(header), 107)
    assert needed(header) >= len(header) or header.startswith(b"PROXY")


@pytest.mark.parametrize("data", BAD)
def test_a_malformed_header_is_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data + b"\r\n" + AFTER)


def test_ports_are_read() -> None:
    header = parse(v2("192.0.2.1", 40123, "10.0.0.1", 443))
    assert header is not None and header.client_port == 40123
    header = parse(v1("192.0.2.1", 40123, "10.0.0.1", 443))
    assert header is not None and header.client_port == 40123
