"""Header work done once per message with bytes operations.

Names are compared lowercased; everything stays ``bytes`` from the parser to the wire.
"""

from __future__ import annotations

# RFC 9110 §7.6.1 plus the legacy ones every proxy drops.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

# Headers the proxy owns: a client's ``Connection:`` cannot make us drop these.
PROTECTED = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"cookie",
    }
)


# What a client's Connection field may not make us drop from a request: the fields we
# own, and the options that name no field.
KEEP_ON_REQUEST = PROTECTED | {b"close", b"keep-alive", b"upgrade"}


def connection_tokens(value: bytes) -> set[bytes]:
    """The lowercased option names listed in a ``Connection`` header value."""
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def drop_fields(
    value: bytes, into: set[bytes] | None, keep: frozenset[bytes] = KEEP_ON_REQUEST
) -> set[bytes]:
    """The fields a ``Connection`` value names as hop-by-hop (RFC 9110 §7.6.1), less
    ``keep``, added to ``into`` (from earlier Connection lines of the same head)."""
    names = connection_tokens(value) - keep
    return names if into is None else into | names


def get_cookie(header: bytes, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in a ``Cookie`` header value, or None."""
    for part in header.split(b";"):
        k, sep, v = part.strip().partition(b"=")
        if sep and k == name:
            return v.strip().strip(b'"')
    return None


def drop_cookie(header: bytes, name: bytes) -> bytes:
    """``header`` without cookie ``name``; empty bytes when nothing is left."""
    kept = [p.strip() for p in header.split(b";") if p.strip().partition(b"=")[0] != name]
    return b"; ".join(p for p in kept if p)


def is_token(value: str) -> bool:
    """RFC 9110 token characters only (header and cookie names)."""
    allowed = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    return bool(value) and all(ch in allowed for ch in value)
