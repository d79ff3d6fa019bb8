"""YAML -> Config: explicit per-section constructors that collect every error.

Each section converts the keys that are present (types, durations, sizes,
addresses) with the converter named for that key, then hands the values to the section's dataclass,
whose ``__post_init__`` checks the invariants. A key that fails to convert is
left out, so its default stands in and the rest of the section is still
checked; the section itself is then reported as failed. Nothing is raised until
the whole document has been walked: one ConfigError lists every problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import ssl
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from .observability import AccessLogConfig, RequestIdConfig, TracingConfig
from .schema import (
    SERVICE_NAME,
    SERVICE_SECTIONS,
    TARGET_SCHEMES,
    AcmeConfig,
    AdminConfig,
    Config,
    ConfigError,
    DrainConfig,
    GatesConfig,
    HealthCheckConfig,
    HookConfig,
    HostPort,
    LimitsConfig,
    PoolConfig,
    RollbackConfig,
    RolloutConfig,
    RoutingConfig,
    ServiceConfig,
    SmokeProbe,
    StateConfig,
    TargetConfig,
    TimeoutsConfig,
    TlsConfig,
    UpstreamsConfig,
    UpstreamTlsConfig,
    WarmupConfig,
    WebSocketConfig,
    host_pattern_problem,
    normalize_path,
)
from .tls import check_certificates, parse_certificates, parse_min_version

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


def _show(value: object) -> str:
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
        f"expected a duration like 5s, 250ms or a number of seconds, got {_show(value)}"
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
        f"expected a size like 64KiB, 10MiB or a number of bytes, got {_show(value)}{hint}"
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
        raise ValueError(f"{_HOST_PORT_HINT}, got {_show(value)}")
    try:
        host, port = _split_host_port(value.strip(), None)
    except ValueError as exc:
        raise ValueError(f"{exc}; {_HOST_PORT_HINT}, got {_show(value)}") from None
    return HostPort(host, port)  # its own ValueError ("port out of range") is already clear


def parse_target(value: object) -> TargetConfig:
    """An upstream target "http(s)://host[:port]" (port 80 or 443 by default), normalized."""
    if not isinstance(value, str):
        raise ValueError(f"expected a URL like http://127.0.0.1:9001, got {_show(value)}")
    text = value.strip()
    if "://" not in text:
        raise ValueError(f"expected a URL like http://127.0.0.1:9001, got {_show(value)}")
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # e.g. a bad IPv6 literal
        raise ValueError(f"not a valid URL ({exc}): {_show(value)}") from None
    scheme = parts.scheme  # urlsplit lowercases it
    if scheme not in TARGET_SCHEMES:
        raise ValueError(f"expected an http:// or https:// URL, got {_show(value)}")
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


def _ca_file(value: object) -> str:
    """A PEM CA bundle that ssl can load now: a typo fails ``check``, not the first request."""
    path = _str(value)
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
        f"not an IP network: expected a CIDR like 10.0.0.0/8 or an address, got {_show(value)}"
    )


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(f"expected true or false, got {_show(value)}")


def _int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"expected a whole number, got {_show(value)}")


def _number(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ValueError(f"expected a number, got {_show(value)}")


def _str(value: object) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"expected a string, got {_show(value)}")


def _switch(value: object) -> str:
    """``on``/``off``/``auto``; YAML 1.1 reads a bare on/off as a boolean, so both work."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return _str(value)


def _optional(convert: Callable[[object], T]) -> Callable[[object], T | None]:
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
_Builder = Callable[[list[str], str, object, Any], object | None]


class _Section:
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
            self.fail(path, f"expected a mapping, got {_show(data)}")
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
            self.fail(self.key_path(key), f"expected a list, got {_show(raw)}")
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

    def nested(self, key: str, build: _Builder, base: Any = None) -> None:
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


def _flat(
    factory: Callable[..., object], converters: dict[str, Callable[[object], object]]
) -> _Builder:
    """A section of plain keys: each one converted explicitly, then the dataclass built."""

    def build(errors: list[str], path: str, data: object, base: Any = None) -> object | None:
        s = _Section(errors, path, data, tuple(converters), base)
        for key, convert in converters.items():
            s.take(key, convert)
        return s.build(factory)

    return build


_upstream_tls = _flat(
    UpstreamTlsConfig,
    {"verify": _bool, "ca_file": _optional(_ca_file), "server_name": _optional(_str)},
)


def _pool(errors: list[str], path: str, data: object, base: Any = None) -> PoolConfig | None:
    s = _Section(errors, path, data, ("targets", "tls"))
    if not isinstance(data, dict):
        return None  # null was reported by the caller as "required", anything else by _Section
    if s.values.get("targets") is None:
        s.fail(s.key_path("targets"), "required: a list of http:// URLs")
        return None
    targets = s.take_list("targets", parse_target)
    if targets is None:
        # Some targets failed: checking the rest for duplicates would misnumber them.
        return None
    s.kwargs["targets"] = tuple(targets)
    if "tls" in s.values:
        s.nested("tls", _upstream_tls)
    return s.build(PoolConfig)


def _upstreams(
    errors: list[str], path: str, data: object, base: Any = None
) -> UpstreamsConfig | None:
    s = _Section(errors, path, data, ("blue", "green"))
    if not isinstance(data, dict):
        return None
    for color in ("blue", "green"):
        if s.values.get(color) is None:
            s.fail(s.key_path(color), "required: {targets: [http://host:port, ...]}")
        else:
            s.nested(color, _pool)
    return s.build(UpstreamsConfig) if s.ok else None


def _websocket(
    errors: list[str], path: str, data: object, base: Any = None
) -> WebSocketConfig | None:
    keys = ("reconnect_window", "reconnect_message", "close_grace")
    s = _Section(errors, path, data, keys, base)
    if "reconnect_window" in s.values:
        raw = s.values["reconnect_window"]
        if isinstance(raw, list) and len(raw) == 2:
            window = s.take_list("reconnect_window", parse_duration)
            if window is not None:
                s.kwargs["reconnect_window"] = (window[0], window[1])
        else:
            s.fail(
                s.key_path("reconnect_window"),
                f"expected two durations [earliest, latest] like [1s, 30s], got {_show(raw)}",
            )
    s.take("reconnect_message", _str)
    s.take("close_grace", parse_duration)
    return s.build(WebSocketConfig)


def _smoke_probe(errors: list[str], path: str, data: object, base: Any = None) -> SmokeProbe | None:
    if data is None:  # unlike a section, a probe has a required key
        errors.append(f"{path}: expected a mapping like {{path: /health}}, got null")
        return None
    s = _Section(errors, path, data, ("path", "expect_status", "expect_body"))
    if not isinstance(data, dict):
        return None
    if "path" not in s.values:
        s.fail(s.key_path("path"), "required")
        return None
    s.take("path", _str)
    s.take("expect_status", _int)
    s.take("expect_body", _optional(_str))
    return s.build(SmokeProbe) if "path" in s.kwargs else None


_warmup = _flat(WarmupConfig, {"requests": _int, "path": _str, "concurrency": _int})


def _gates(errors: list[str], path: str, data: object, base: Any = None) -> GatesConfig | None:
    s = _Section(errors, path, data, ("require_healthy", "smoke", "warmup"), base)
    s.take("require_healthy", _bool)
    raw_smoke = s.values.get("smoke")
    if raw_smoke is not None and not isinstance(raw_smoke, list):
        s.fail(s.key_path("smoke"), f"expected a list of probes, got {_show(raw_smoke)}")
    elif raw_smoke:
        probes = [
            _smoke_probe(errors, f"{s.key_path('smoke')}[{index}]", item)
            for index, item in enumerate(raw_smoke)
        ]
        good = [probe for probe in probes if probe is not None]
        if len(good) == len(probes):
            s.kwargs["smoke"] = tuple(good)
        else:
            s.ok = False
    s.nested("warmup", _warmup, base.warmup if base is not None else None)
    return s.build(GatesConfig)


def _weights(value: object) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of weights like [10, 25, 50, 100], got {_show(value)}")
    return tuple(_int(w) for w in value)


_rollout = _flat(
    RolloutConfig, {"steps": _weights, "step_interval": parse_duration, "auto_promote": _bool}
)
_HOOK_KEYS = ("on", "url", "timeout", "format", "name")


def _hook(errors: list[str], path: str, data: object) -> HookConfig | None:
    if isinstance(data, dict) and True in data:
        # YAML 1.1 reads a bare ``on`` as the boolean true: take it as the key it means.
        data = {("on" if k is True else k): v for k, v in data.items()}
    if not isinstance(data, dict):
        hint = "expected a mapping like {on: [switch], url: ...}"
        errors.append(f"{path}: {hint}, got {_show(data)}")
        return None
    s = _Section(errors, path, data, _HOOK_KEYS)
    for key in ("on", "url"):
        if key not in s.values:
            s.fail(s.key_path(key), "required")
    on = s.values.get("on")
    if isinstance(on, str):
        s.values["on"] = [on]
    items = s.take_list("on", _str)
    if items is not None:
        s.kwargs["on"] = tuple(items)
    s.take("url", _str)
    s.take("timeout", parse_duration)
    s.take("format", _str)
    s.take("name", _str)
    # Built even after a bad key (to report the rest), but only with both required keys.
    return s.build(HookConfig) if "on" in s.kwargs and "url" in s.kwargs else None


def _hooks(errors: list[str], path: str, data: object, base: Any = None) -> object | None:
    if data is None:
        return ()
    if not isinstance(data, list):
        errors.append(f"{path}: expected a list of hooks, got {_show(data)}")
        return None
    hooks = [_hook(errors, f"{path}[{i}]", item) for i, item in enumerate(data)]
    good = [h for h in hooks if h is not None]
    return tuple(good) if len(good) == len(hooks) else None


# In SPEC order, so errors come out in the order a reader meets the keys.
_SECTIONS: tuple[tuple[str, _Builder], ...] = (
    ("admin", _flat(AdminConfig, {"listen": parse_host_port, "token_env": _optional(_str)})),
    ("upstreams", _upstreams),
    (
        "health_check",
        _flat(
            HealthCheckConfig,
            {
                "path": _str,
                "interval": parse_duration,
                "timeout": parse_duration,
                "healthy_threshold": _int,
                "unhealthy_threshold": _int,
            },
        ),
    ),
    (
        "routing",
        _flat(
            RoutingConfig,
            {
                "active": _str,
                "override_header": _str,
                "override_cookie": _str,
                "override_token_env": _optional(_str),
                "sticky_cookie": _str,
                "response_header": _optional(_str),
            },
        ),
    ),
    (
        "timeouts",
        _flat(
            TimeoutsConfig,
            {
                "connect": parse_duration,
                "request_header": parse_duration,
                "upstream_response": parse_duration,
                "idle": parse_duration,
                "upstream_keepalive": parse_duration,
            },
        ),
    ),
    ("drain", _flat(DrainConfig, {"timeout": parse_duration})),
    ("websocket", _websocket),
    (
        "rollback",
        _flat(
            RollbackConfig,
            {
                "enabled": _bool,
                "window": parse_duration,
                "interval": parse_duration,
                "max_error_rate": _number,
                "max_p99_latency": parse_duration,
                "min_requests": _int,
                "failure_limit": _int,
            },
        ),
    ),
    ("gates", _gates),
    ("rollout", _rollout),
    ("hooks", _hooks),
    (
        "state",
        _flat(
            StateConfig,
            {
                "backend": _str,
                "redis_url": _str,
                "key_prefix": _str,
                "connect_timeout": parse_duration,
            },
        ),
    ),
    (
        "limits",
        _flat(
            LimitsConfig,
            {
                "max_header_bytes": parse_size,
                "max_headers": _int,
                "max_body_bytes": _optional(parse_size),
                "max_connections": _int,
                "admin_max_body_bytes": parse_size,
            },
        ),
    ),
)
def _acme_domain(value: object) -> str:
    return _str(value).strip().lower().rstrip(".")


def _acme(errors: list[str], path: str, data: object, base: Any = None) -> AcmeConfig | None:
    keys = tuple(f.name for f in dataclasses.fields(AcmeConfig))
    s = _Section(errors, path, data, keys)
    s.take("directory", _optional(_str))
    s.take("email", _optional(_str))
    domains = s.take_list("domains", _acme_domain)
    if domains is not None:
        s.kwargs["domains"] = tuple(dict.fromkeys(domains))
    s.take("challenge", _str)
    s.take("storage", _str)
    s.take("ca_file", _optional(_ca_file))
    s.take("renew_before", parse_duration)
    return s.build(AcmeConfig)


_TLS_KEYS = (
    "listen", "certificates", "min_version", "alpn", "redirect_http", "hsts", "handshake_timeout",
    "acme",
)  # fmt: skip


def _tls(errors: list[str], path: str, data: object, base: Any = None) -> TlsConfig | None:
    s = _Section(errors, path, data, _TLS_KEYS)
    s.take("listen", _optional(parse_host_port))
    if s.values.get("certificates") is not None:
        certs, problems = parse_certificates(s.values["certificates"], s.key_path("certificates"))
        for problem in problems:
            where, _, message = problem.partition(": ")
            s.fail(where, message)
        if certs is not None:
            s.kwargs["certificates"] = certs
    s.take("min_version", parse_min_version)
    alpn = s.take_list("alpn", _str)
    if alpn is not None:
        s.kwargs["alpn"] = tuple(alpn)
    s.take("redirect_http", _bool)
    s.take("hsts", _optional(_str))
    s.take("handshake_timeout", parse_duration)
    s.nested("acme", _acme)
    if "acme" in s.values and "acme" not in s.kwargs:
        return None  # its errors are listed; TlsConfig's checks would read it as off
    return s.build(TlsConfig)


_SECTIONS += (("tls", _tls),)
# Top-level only: one log stream and one trace export per process, whatever the service.
_SECTIONS += (
    (
        "access_log",
        _flat(
            AccessLogConfig,
            {
                "destination": _optional(_str),
                "format": _str,
                "sample": _number,
                "rejections_per_second": _int,
            },
        ),
    ),
    ("request_id", _flat(RequestIdConfig, {"header": _optional(_str), "mode": _switch})),
    (
        "tracing",
        _flat(
            TracingConfig,
            {"otlp_endpoint": _optional(_str), "sample_ratio": _number, "service_name": _str},
        ),
    ),
)
_TOP_KEYS = (
    "listen", *(key for key, _ in _SECTIONS), "trusted_proxies", "proxy_protocol", "services",
    "default_service",
)  # fmt: skip
_BUILDERS = dict(_SECTIONS)
_SECTION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}
# The head arrives before the service is known: only these timeouts are per service.
_SERVICE_TIMEOUTS = ("connect", "upstream_response")
_TIMEOUT_KEYS = frozenset(f.name for f in dataclasses.fields(TimeoutsConfig))
_SERVICE_KEYS = ("hosts", "paths", "upstreams", *SERVICE_SECTIONS)


def _host_pattern(value: object) -> str:
    text = _str(value).strip().lower()
    problem = host_pattern_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


def _path_prefix(value: object) -> str:
    text = _str(value)
    if not text.startswith("/") or any(c in text for c in " ?#") or not text.isprintable():
        raise ValueError(f"expected a path prefix like /v1, got {text!r}")
    return normalize_path(text)


def _service(
    errors: list[str], path: str, name: str, data: object, top: dict[str, Any]
) -> ServiceConfig | None:
    """One entry of ``services``: its claims, its pools, and its overrides of the
    top-level sections (``top``: those sections, already built)."""
    s = _Section(errors, path, data, _SERVICE_KEYS)
    if not isinstance(data, dict):
        if data is None:
            s.fail(path, "expected a mapping with hosts and upstreams, got null")
        return None
    for key in ("hosts", "paths"):
        items = s.take_list(key, _host_pattern if key == "hosts" else _path_prefix)
        if items is not None:
            s.kwargs[key] = tuple(dict.fromkeys(items))
    if s.values.get("upstreams") is None:
        s.fail(s.key_path("upstreams"), "required: both blue and green, each {targets: [...]}")
    else:
        s.nested("upstreams", _upstreams)
    timeouts = s.values.get("timeouts")
    if isinstance(timeouts, dict):
        for key in timeouts:
            if key not in _SERVICE_TIMEOUTS and key in _TIMEOUT_KEYS:
                s.fail(
                    f"{s.key_path('timeouts')}.{key}",
                    "a connection-level timeout: set it at the top level (a service may set "
                    f"{' and '.join(_SERVICE_TIMEOUTS)})",
                )
    for key in SERVICE_SECTIONS:
        s.kwargs[key] = top[key]
        s.nested(key, _BUILDERS[key], top[key])
    if not s.ok:
        return None
    s.kwargs["name"] = name
    return s.build(ServiceConfig)


def _services(errors: list[str], data: object, top: dict[str, Any]) -> list[ServiceConfig]:
    if not isinstance(data, dict) or not data:
        errors.append(f"services: expected a mapping of service names, got {_show(data)}")
        return []
    out = []
    for name, value in data.items():
        path = f"services.{name}"
        if not isinstance(name, str) or SERVICE_NAME.fullmatch(name) is None:
            errors.append(f"{path}: a service name must match [a-z0-9][a-z0-9_-]{{0,62}}")
            continue
        svc = _service(errors, path, name, value, top)
        if svc is not None:
            out.append(svc)
    return out


def parse_config(data: object) -> Config:
    """Build a Config from already-loaded YAML data; raise one ConfigError listing every error."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"(top level): expected a mapping of config keys, got {_show(data)}")
    errors: list[str] = []
    s = _Section(errors, "", data, _TOP_KEYS)  # an empty file is None: only upstreams is missing
    s.take("listen", parse_host_port)
    has_services = s.values.get("services") is not None
    for key, build in _SECTIONS:
        if key == "upstreams" and s.values.get(key) is None:
            if not has_services:
                s.fail(key, "required: both blue and green, each {targets: [http://host:port]}")
        elif key == "upstreams" and has_services:
            s.fail("services", "give either top-level upstreams or services, not both")
        else:
            s.nested(key, build)
    networks = s.take_list("trusted_proxies", parse_network)
    if networks is not None:
        s.kwargs["trusted_proxies"] = tuple(networks)
    s.take("default_service", _optional(_str))
    s.take("proxy_protocol", _bool)
    if has_services:
        # Services override the top-level sections key by key: build those first.
        top = {key: s.kwargs.get(key, _SECTION_DEFAULTS[key]) for key in SERVICE_SECTIONS}
        s.kwargs["services"] = tuple(_services(errors, s.values["services"], top))
    # Cross-section checks (Config.__post_init__) only look at sections that are valid.
    config = None if errors else s.build(Config)
    if config is None:
        raise ConfigError(errors)
    # The files last: a config that is wrong in itself is reported without touching them.
    cert_errors, _ = check_certificates(config.tls)
    if cert_errors:
        raise ConfigError(cert_errors)
    return config


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *base" keys may be overridden on purpose
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: SafeLoader reports it itself
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file; every failure is a ConfigError."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise ConfigError(f"{name}: file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: invalid YAML: {exc}") from None
    return parse_config(data)
