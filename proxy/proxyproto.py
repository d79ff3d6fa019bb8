"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 1 and 2).

A load balancer in front sends it first on each connection, before any TLS or HTTP
byte, to say who the client is. ``parse`` reads it from the bytes seen so far and says
how many of them belong to the header, so the caller consumes exactly those and not a
byte of what follows (the TLS ClientHello or the HTTP request). Pure functions, no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # "PROXY TCP6 <39> <39> <5> <5>\r\n", the longest v1 line
V2_MAX_PAYLOAD = 4096  # addresses plus TLVs; real balancers send well under this
_V1_PREFIX = b"PROXY "


class ProxyHeaderError(ValueError):
    """Not a PROXY header, or a malformed one: the connection is closed unanswered."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    length: int  # bytes of the header, to consume
    client: str | None  # the client's address; None: use the connection's (LOCAL, UNKNOWN)
    client_port: int | None = None


def needed(data: bytes) -> int:
    """How many bytes to look at next: the header's full length once known, else the
    most it could still need. Never more than the header itself."""
    if data.startswith(V2_SIGNATURE[: len(data)]) and len(data) < 16:
        return 16
    if data.startswith(V2_SIGNATURE) and len(data) >= 16:
        return 16 + int.from_bytes(data[14:16], "big")
    return V1_MAX


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of ``data``, or None while it is incomplete.
    Raises ProxyHeaderError as soon as ``data`` cannot begin a valid header."""
    if not data:
        return None
    if data[:1] == b"\r":
        return _parse_v2(data)
    if not _V1_PREFIX.startswith(data[:6]):
        raise ProxyHeaderError("not a PROXY protocol header")
    return _parse_v1(data)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data:
            raise ProxyHeaderError("PROXY v1 line too long or not ended by CRLF")
        return None
    parts = data[:end].split(b" ")
    if len(parts) < 2 or parts[0] != b"PROXY":
        raise ProxyHeaderError("malformed PROXY v1 line")
    if parts[1] == b"UNKNOWN":
        return ProxyHeader(end + 2, None)
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 line")
    family = 4 if parts[1] == b"TCP4" else 6
    try:
        src = ipaddress.ip_address(parts[2].decode("ascii"))
        dst = ipaddress.ip_address(parts[3].decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise ProxyHeaderError("bad address in PROXY v1 line") from None
    if src.version != family or dst.version != family:
        raise ProxyHeaderError("address family does not match in PROXY v1 line")
    ports = [_port(p) for p in parts[4:6]]
    return ProxyHeader(end + 2, str(src), ports[0])


def _port(text: bytes) -> int:
    # 1-5 digits, no sign, no leading zero (the spec forbids them).
    if not (text.isdigit() and len(text) <= 5 and (text == b"0" or not text.startswith(b"0"))):
        raise ProxyHeaderError("bad port in PROXY v1 line")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError("bad port in PROXY v1 line")
    return port


def _parse_v2(data: bytes) -> ProxyHeader | None:
    head = data[:12]
    if head != V2_SIGNATURE[: len(head)]:
        raise ProxyHeaderError("not a PROXY protocol header")
    if len(data) < 16:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2 or command > 1:
        raise ProxyHeaderError("unsupported PROXY v2 version or command")
    length = int.from_bytes(data[14:16], "big")
    if length > V2_MAX_PAYLOAD:
        raise ProxyHeaderError("PROXY v2 header too long")
    if len(data) < 16 + length:
        return None
    total = 16 + length
    if command == 0:  # LOCAL: the balancer's own connection (a health check)
        return ProxyHeader(total, None)
    family, transport = data[13] >> 4, data[13] & 0x0F
    body = data[16:total]
    if family == 0 or family == 3:  # UNSPEC or UNIX: nothing usable as a client address
        return ProxyHeader(total, None)
    if transport != 1:
        raise ProxyHeaderError("PROXY v2 header for a transport other than TCP")
    if family == 1:
        if length < 12:
            raise ProxyHeaderError("PROXY v2 IPv4 addresses truncated")
        return ProxyHeader(
            total, str(ipaddress.IPv4Address(body[0:4])), int.from_bytes(body[8:10], "big")
        )
    if family == 2:
        if length < 36:
            raise ProxyHeaderError("PROXY v2 IPv6 addresses truncated")
        addr = ipaddress.IPv6Address(body[0:16])
        client = str(addr.ipv4_mapped) if addr.ipv4_mapped else str(addr)
        return ProxyHeader(total, client, int.from_bytes(body[32:34], "big"))
    raise ProxyHeaderError("unknown PROXY v2 address family")


def v1(client: str, client_port: int, server: str, server_port: int) -> bytes:
    """A v1 header (for tests and tools)."""
    family = "TCP6" if ":" in client else "TCP4"
    return f"PROXY {family} {client} {server} {client_port} {server_port}\r\n".encode()


def v2(client: str, client_port: int, server: str, server_port: int, local: bool = False) -> bytes:
    """A v2 header (for tests and tools)."""
    if local:
        return V2_SIGNATURE + b"\x20\x00\x00\x00"
    a, b = ipaddress.ip_address(client), ipaddress.ip_address(server)
    family = 0x11 if a.version == 4 else 0x21
    body = a.packed + b.packed + client_port.to_bytes(2, "big") + server_port.to_bytes(2, "big")
    return V2_SIGNATURE + bytes((0x21, family)) + len(body).to_bytes(2, "big") + body
