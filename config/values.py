"""The value classes: a listen address and an upstream target, and the host-name checks.

Each is a single string in YAML, so a broken one raises a plain ValueError and the
loader's key path already names it (the section classes collect theirs in ``Problems``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# Permissive on purpose: docker-compose service names carry underscores.
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?(?:\.[A-Za-z0-9_-]+)*\.?")


def valid_host(host: str) -> bool:
    """An IP address or a plausible DNS name (resolution happens at connect time)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return len(host) <= 253 and _HOSTNAME.fullmatch(host) is not None
    return True


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class HostPort:
    """A listen address; port 0 asks the OS for a free port (tests use it)."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not valid_host(self.host):
            raise ValueError(f"not a valid host: {self.host!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError("port out of range (0-65535)")

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)


TARGET_SCHEMES = ("http", "https")


@dataclass(frozen=True, slots=True)
class TargetConfig:
    """One upstream target; ``url`` is always the normalized "http(s)://host:port"."""

    url: str
    host: str
    port: int
    scheme: str = "http"  # "https": TLS to the target, per the pool's ``tls``

    def __post_init__(self) -> None:
        if self.scheme not in TARGET_SCHEMES:
            raise ValueError(f"scheme must be http or https, got {self.scheme!r}")
        if not valid_host(self.host):
            raise ValueError(f"not a valid host: {self.host!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError("port out of range (1-65535)")
        # Metrics label targets by url, so it must be one canonical spelling.
        expected = f"{self.scheme}://{join_host_port(self.host, self.port)}"
        if self.url != expected:
            raise ValueError(f"url must be the normalized form {expected!r}, got {self.url!r}")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
