"""Value converters and the section walker the config loaders share.

A converter turns one YAML value into its typed form or raises ConfigError with a
message that shows the value as the user wrote it; ``Section`` walks one mapping,
converting the keys present and collecting every error under its key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import re
import ssl
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from .errors import ConfigError
from .values import TARGET_SCHEMES, HostPort, TargetConfig

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h|d)")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PLAIN_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_SIZE = re.compile(r"([0-9]+)\s*([A-Za-z]*)")
# Binary multiples only (nginx's k/m/g mean the same); KB/MB/GB are refused as ambiguous.
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
}
_HOST_PORT_HINT = 'expected "host:port" like 0.0.0.0:8080 (IPv6 as "[::1]:8080")'


def show(value: object) -> str:
    """A value as the user wrote it in YAML, short enough for one error line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"  # e.g. a date: YAML reads 2024-01-01 as one


# --- scalar parsers (public ones are used by the CLI/demo too) -------------------------------


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like "250ms", "30s", "5m", "1h", "30d", "1m30s"."""
    error = ValueError(
        f"expected a duration like 5s, 250ms or a number of seconds, got {show(value)}"
    )
    if isinstance(value, bool):  # YAML `yes` is a bool, and bool is an int subclass
        raise error
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise error
        return float(value)
    if not isinstance(value, str):
        raise error
    text = value.strip()
    if _PLAIN_NUMBER.fullmatch(text):  # a quoted "5" is still seconds
        return float(text)
    if not _DURATION.fullmatch(text):
        raise error
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))


def parse_size(value: object) -> int:
    """Bytes from an integer or a string like "512B", "64KiB", "10MiB", "1GiB"."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    hint = ""
    if isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        unit = match[2].lower()
        if unit in _SIZE_UNITS:
            return int(match[1]) * _SIZE_UNITS[unit]
        if unit in ("kb", "mb", "gb"):
            hint = " (KB/MB/GB are ambiguous: write KiB/MiB/GiB)"
    raise ValueError(
        f"expected a size like 64KiB, 10MiB or a number of bytes, got {show(value)}{hint}"
    )


def _split_host_port(text: str, default_port: int | None) -> tuple[str, int]:
    """Split "host:port" / "[v6]:port"; the port may be absent only with a default."""
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unclosed '[' in an IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address in brackets: {host!r}") from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']'")
        port_text = rest[1:] if rest else None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, None
        if ":" in host:
            raise ValueError("an IPv6 address needs brackets")
    if not host:
        raise ValueError("missing host")
    if not port_text:  # RFC 3986: an empty port means the scheme's default
        if default_port is None:
            raise ValueError("missing port")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"port is not a number: {port_text!r}")
    return host, int(port_text)


def parse_host_port(value: object) -> HostPort:
    """A listen address "host:port" ("[::1]:8080" for IPv6); port 0 = any free port."""
    if not isinstance(value, str):
        raise ValueError(f"{_HOST_PORT_HINT}, got {show(value)}")
    try:
        host, port = _split_host_port(value.strip(), None)
    except ValueError as exc:
        raise ValueError(f"{exc}; {_HOST_PORT_HINT}, got {show(value)}") from None
    return HostPort(host, port)  # its own ValueError ("port out of range") is already clear


def parse_target(value: object) -> TargetConfig:
    """An upstream target "http(s)://host[:port]" (port 80 or 443 by default), normalized."""
    if not isinstance(value, str):
        raise ValueError(f"expected a URL like http://127.0.0.1:9001, got {show(value)}")
    text = value.strip()
    if "://" not in text:
        raise ValueError(f"expected a URL like http://127.0.0.1:9001, got {show(value)}")
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # e.g. a bad IPv6 literal
        raise ValueError(f"not a valid URL ({exc}): {show(value)}") from None
    scheme = parts.scheme  # urlsplit lowercases it
    if scheme not in TARGET_SCHEMES:
        raise ValueError(f"expected an http:// or https:// URL, got {show(value)}")
    if "@" in parts.netloc:
        raise ValueError("credentials in a target URL are not supported")
    if parts.path not in ("", "/"):
        raise ValueError(f"a target is a host and port only, without a path: got {parts.path!r}")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise ValueError("a target URL takes no query or fragment")
    host, port = _split_host_port(parts.netloc, 443 if scheme == "https" else 80)
    host = host.lower()  # DNS names are case-insensitive; keeps duplicate checks honest
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return TargetConfig(url=f"{scheme}://{hostport}", host=host, port=port, scheme=scheme)


def ca_file_path(value: object) -> str:
    """A PEM CA bundle that ssl can load now: a typo fails ``check``, not the first request."""
    path = as_str(value)
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise ValueError(f"file not found: {path!r}") from None
    except PermissionError:
        raise ValueError(f"cannot read (permission denied): {path!r}") from None
    except IsADirectoryError:
        raise ValueError(f"is a directory, expected a PEM file: {path!r}") from None
    except (ssl.SSLError, OSError, ValueError):
        raise ValueError(f"no PEM CA certificate in {path!r}") from None
    return path


def parse_network(value: object) -> IPNetwork:
    """A CIDR ("10.0.0.0/8") or a bare address (a /32 or /128); host bits are masked."""
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            pass
    raise ValueError(
        f"not an IP network: expected a CIDR like 10.0.0.0/8 or an address, got {show(value)}"
    )


def as_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {show(value)}")


def as_int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"expected a whole number, got {show(value)}")


def as_number(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ValueError(f"expected a number, got {show(value)}")


def as_str(value: object) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {show(value)}")


def as_switch(value: object) -> str:
    """``on``/``off``/``auto``; YAML 1.1 reads a bare on/off as a boolean, so both work."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return as_str(value)


def optional(convert: Callable[[object], T]) -> Callable[[object], T | None]:
    """For keys where null is meaningful (hide a header, no token, unlimited)."""

    def convert_or_none(value: object) -> T | None:
        return None if value is None else convert(value)

    return convert_or_none


# --- walking the document ------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _unknown_key(key: object, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key (expected one of: {', '.join(known)})"


# (errors, key path, YAML data, base): ``base`` is the section a service overrides key by
# key (the top-level one), None at the top level.
Builder = Callable[[list[str], str, object, Any], object | None]


class Section:
    """One YAML mapping on its way to a dataclass: converted kwargs plus errors."""

    def __init__(
        self,
        errors: list[str],
        path: str,
        data: object,
        keys: Sequence[str],
        base: Any = None,
    ) -> None:
        self.errors = errors
        self.base = base
        self.path = path
        self.kwargs: dict[str, Any] = {}
        self.values: dict[str, object] = {}
        self.ok = True
        if data is None:  # a section whose keys are all commented out: defaults
            return
        if not isinstance(data, dict):
            self.fail(path, f"expected a mapping, got {show(data)}")
            return
        for key, value in data.items():
            if isinstance(key, str) and key in keys:
                self.values[key] = value
            else:
                self.fail(_join(path, str(key)), _unknown_key(key, keys))

    def fail(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}")
        self.ok = False

    def key_path(self, key: str) -> str:
        return _join(self.path, key)

    def take(self, key: str, convert: Callable[[object], object]) -> None:
        if key not in self.values:
            return
        try:
            self.kwargs[key] = convert(self.values[key])
        except ValueError as exc:
            self.fail(self.key_path(key), str(exc))

    def take_list(self, key: str, convert: Callable[[object], T]) -> list[T] | None:
        """Convert each item, naming a bad one by index ("trusted_proxies[2]")."""
        if key not in self.values:
            return None
        raw = self.values[key]
        if not isinstance(raw, list):
            self.fail(self.key_path(key), f"expected a list, got {show(raw)}")
            return None
        items: list[T] = []
        ok = True
        for index, item in enumerate(raw):
            try:
                items.append(convert(item))
            except ValueError as exc:
                self.fail(f"{self.key_path(key)}[{index}]", str(exc))
                ok = False
        return items if ok else None

    def nested(self, key: str, build: Builder, base: Any = None) -> None:
        if key in self.values:
            value = build(self.errors, self.key_path(key), self.values[key], base)
            if value is None:
                self.ok = False
            else:
                self.kwargs[key] = value

    def build(self, factory: Callable[..., T]) -> T | None:
        """Construct even after a failed key (defaults fill in) to report the other keys.
        Over a ``base``, the keys given replace the base's and the rest are kept."""
        try:
            if self.base is not None:
                result = dataclasses.replace(self.base, **self.kwargs)
            else:
                result = factory(**self.kwargs)
        except ConfigError as exc:
            self.errors.extend(_join(self.path, error) for error in exc.errors)
            return None
        return result if self.ok else None


def flat(
    factory: Callable[..., object], converters: dict[str, Callable[[object], object]]
) -> Builder:
    """A section of plain keys: each one converted explicitly, then the dataclass built."""

    def build(errors: list[str], path: str, data: object, base: Any = None) -> object | None:
        s = Section(errors, path, data, tuple(converters), base)
        for key, convert in converters.items():
            s.take(key, convert)
        return s.build(factory)

    return build
