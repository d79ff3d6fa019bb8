"""The typed, immutable configuration bgproxy runs on.

Defaults are the documented ones (SPEC "Config (YAML)"). Invariants live in
``__post_init__`` so a config built in code (tests, ``bgproxy demo``) obeys the
same rules as one loaded from YAML:

* section classes report every broken invariant at once, as a ConfigError whose
  entries are relative to the section ("interval: must be greater than 0"); the
  loader prefixes the section's dotted path;
* value classes (HostPort, TargetConfig) are a single string in YAML, so they
  raise a plain ValueError and the loader's path already names them.

Types are the loader's job: ``__post_init__`` assumes the annotated types.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ConfigError as ConfigError  # re-exported: its home before errors.py
from .observability import AccessLogConfig, RequestIdConfig, TracingConfig

COLORS = ("blue", "green")
STATE_BACKENDS = ("memory", "redis")
REDIS_SCHEMES = ("redis", "rediss", "unix")

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2 tchar
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Permissive on purpose: docker-compose service names carry underscores.
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?(?:\.[A-Za-z0-9_-]+)*\.?")
# A path goes verbatim into a request line: visible ASCII only, no spaces.
_REQUEST_PATH = re.compile(r"/[!-~]*")
_WILDCARD_HOSTS = ("0.0.0.0", "::")


class _Problems:
    """Collects a section's broken invariants so they are reported together."""

    __slots__ = ("errors",)

    def __init__(self) -> None:
        self.errors: list[str] = []

    def check(self, ok: bool, key: str, message: str) -> None:
        if not ok:
            self.errors.append(f"{key}: {message}")

    def positive(self, key: str, value: float) -> None:
        self.check(value > 0, key, "must be greater than 0")

    def at_least(self, key: str, value: int, low: int) -> None:
        self.check(value >= low, key, f"must be at least {low}")

    def token(self, key: str, value: str | None, what: str) -> None:
        if value is not None:
            self.check(_TOKEN.fullmatch(value) is not None, key, f"not a valid {what}: {value!r}")

    def env_name(self, key: str, value: str | None) -> None:
        if value is not None:
            ok = _ENV_NAME.fullmatch(value) is not None
            self.check(ok, key, f"not a valid environment variable name: {value!r}")

    def request_path(self, key: str, value: str) -> None:
        ok = _REQUEST_PATH.fullmatch(value) is not None
        self.check(
            ok, key, f"must start with '/' and hold no spaces or control characters: {value!r}"
        )

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigError(self.errors)


def valid_host(host: str) -> bool:
    """An IP address or a plausible DNS name (resolution happens at connect time)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return len(host) <= 253 and _HOSTNAME.fullmatch(host) is not None
    return True


def _join_host_port(host: str, port: int) -> str:
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
        return _join_host_port(self.host, self.port)


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
        expected = f"{self.scheme}://{_join_host_port(self.host, self.port)}"
        if self.url != expected:
            raise ValueError(f"url must be the normalized form {expected!r}, got {self.url!r}")


@dataclass(frozen=True, slots=True)
class UpstreamTlsConfig:
    """How a pool's https:// targets are verified (SPEC "TLS at the edge")."""

    verify: bool = True
    ca_file: str | None = None  # PEM CA bundle trusted instead of the system's; the loader
    # checks it is readable, since a path alone is not an invariant
    server_name: str | None = None  # SNI and the name verified; default: the target's host

    def __post_init__(self) -> None:
        p = _Problems()
        p.check(
            self.verify or self.ca_file is None,
            "ca_file",
            "has no effect with verify: false (remove one of them)",
        )
        if self.server_name is not None:
            ok = valid_host(self.server_name) and not self.server_name.endswith(".")
            p.check(ok, "server_name", f"not a valid host name: {self.server_name!r}")
        p.raise_if_any()


@dataclass(frozen=True, slots=True)
class PoolConfig:
    targets: tuple[TargetConfig, ...]
    tls: UpstreamTlsConfig = UpstreamTlsConfig()  # for its https:// targets

    def __post_init__(self) -> None:
        p = _Problems()
        p.check(len(self.targets) > 0, "targets", "must list at least one http:// target")
        first_seen: dict[tuple[str, int], int] = {}
        for index, target in enumerate(self.targets):
            earlier = first_seen.setdefault((target.host, target.port), index)
            p.check(earlier == index, f"targets[{index}]", f"duplicate of targets[{earlier}]")
        if self.tls != UpstreamTlsConfig() and self.targets:
            # Most likely a target written http:// by mistake: say so rather than ignore it.
            p.check(
                any(t.scheme == "https" for t in self.targets),
                "tls",
                "applies to https:// targets, and this pool has none",
            )
        p.raise_if_any()


@dataclass(frozen=True, slots=True)
class UpstreamsConfig:
    blue: PoolConfig
    green: PoolConfig

    def pool(self, color: str) -> PoolConfig:
        """The pool of ``color`` ("blue" or "green"), for code keyed by color name."""
        if color == "blue":
            return self.blue
        if color == "green":
            return self.green
        raise KeyError(color)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: HostPort = HostPort("127.0.0.1", 9901)
    # The non-loopback-without-token refusal needs the environment: checked at serve time.
    token_env: str | None = "BGPROXY_ADMIN_TOKEN"

    def __post_init__(self) -> None:
        p = _Problems()
        p.env_name("token_env", self.token_env)
        p.raise_if_any()


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    path: str = "/health"
    interval: float = 2.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3

    def __post_init__(self) -> None:
        p = _Problems()
        p.request_path("path", self.path)
        p.positive("interval", self.interval)
        p.positive("timeout", self.timeout)
        p.at_least("healthy_threshold", self.healthy_threshold, 1)
        p.at_least("unhealthy_threshold", self.unhealthy_threshold, 1)
        p.raise_if_any()


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    active: str = "blue"
    override_header: str = "X-Bg-Color"
    override_cookie: str = "bg_color"
    override_token_env: str | None = None
    sticky_cookie: str = "bg_sticky"
    response_header: str | None = "X-Bg-Color"

    def __post_init__(self) -> None:
        p = _Problems()
        p.check(self.active in COLORS, "active", f"must be 'blue' or 'green', got {self.active!r}")
        p.token("override_header", self.override_header, "HTTP header name")
        p.token("override_cookie", self.override_cookie, "cookie name")
        p.env_name("override_token_env", self.override_token_env)
        p.token("sticky_cookie", self.sticky_cookie, "cookie name")
        p.token("response_header", self.response_header, "HTTP header name")
        p.raise_if_any()


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    connect: float = 5.0
    request_header: float = 10.0
    upstream_response: float = 60.0
    idle: float = 75.0
    upstream_keepalive: float = 15.0  # idle pooled upstream connections are closed after this

    def __post_init__(self) -> None:
        p = _Problems()
        for key in ("connect", "request_header", "upstream_response", "idle", "upstream_keepalive"):
            p.positive(key, getattr(self, key))
        p.raise_if_any()


@dataclass(frozen=True, slots=True)
class DrainConfig:
    timeout: float = 30.0

    def __post_init__(self) -> None:
        p = _Problems()
        p.positive("timeout", self.timeout)
        p.raise_if_any()


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    reconnect_window: tuple[float, float] = (1.0, 30.0)
    # Placeholders are substituted literally (the JSON braces rule out str.format).
    reconnect_message: str = '{"type":"reconnect","color":"{color}","reason":"{reason}"}'
    close_grace: float = 5.0

    def __post_init__(self) -> None:
        p = _Problems()
        window = self.reconnect_window
        if len(window) != 2:
            p.check(False, "reconnect_window", "must be two durations [earliest, latest]")
        else:
            # 0 is fine here: "tell everyone at once" is a valid choice.
            p.check(window[0] >= 0, "reconnect_window[0]", "must not be negative")
            p.check(window[1] >= 0, "reconnect_window[1]", "must not be negative")
            p.check(window[0] <= window[1], "reconnect_window", "earliest must not exceed latest")
        p.positive("close_grace", self.close_grace)
        p.raise_if_any()


@dataclass(frozen=True, slots=True)
class RollbackConfig:
    enabled: bool = True
    window: float = 300.0
    interval: float = 15.0
    max_error_rate: float = 0.05
    max_p99_latency: float = 2.0
    min_requests: int = 20
    failure_limit: int = 1

    def __post_init__(self) -> None:
        p = _Problems()
        p.positive("window", self.window)
        p.positive("interval", self.interval)
        rate_ok = 0 <= self.max_error_rate <= 1
        p.check(rate_ok, "max_error_rate", "must be between 0 and 1 (a share, 0.05 = 5%)")
        p.positive("max_p99_latency", self.max_p99_latency)
        p.at_least("min_requests", self.min_requests, 0)
        p.at_least("failure_limit", self.failure_limit, 1)
        p.raise_if_any()


@dataclass(frozen=True, slots=True)
class SmokeProbe:
    path: str
    expect_status: int = 200
    expect_body: str | None = None  # substring the body must contain; None skips the check

    def __post_init__(self) -> None:
        p = _Problems()
        p.request_path("path", self.path)
        ok = 100 <= self.expect_status <= 599
        p.check(ok, "expect_status", f"must be an HTTP status 100-599, got {self.expect_status}")
        p.raise_if_any()


@dataclass(frozen=True, slots=True)
class WarmupConfig:
    requests: int = 0
    path: str = "/"
    concurrency: int = 4

    def __post_init__(self) -> None:
        p = _Problems()
        p.at_least("requests", self.requests, 0)
        p.request_path("path", self.path)
        p.at_least("concurrency", self.concurrency, 1)
        p.raise_if_any()


@dataclass(frozen=True, slots=True)
class GatesConfig:
    require_healthy: bool = True
    smoke: tuple[SmokeProbe, ...] = ()
    warmup: WarmupConfig = WarmupConfig()


@dataclass(frozen=True, slots=True)
class RolloutConfig:
    steps: tuple[int, ...] = (10, 25, 50, 100)  # the new color's weight at each step
    step_interval: float = 60.0
    auto_promote: bool = True

    def __post_init__(self) -> None:
        p = _Problems()
        steps = self.steps
        p.check(len(steps) > 0, "steps", "must list at least one weight")
        for i, w in enumerate(steps):
            p.check(1 <= w <= 100, f"steps[{i}]", f"must be a weight from 1 to 100, got {w}")
        for i in range(1, len(steps)):
            p.check(steps[i] > steps[i - 1], f"steps[{i}]", "must be greater than the step before")
        p.check(not steps or steps[-1] == 100, "steps", "the last step must be 100")
        p.positive("step_interval", self.step_interval)
        p.raise_if_any()


# When a hook is called: ``pre_switch`` is a gate, the others are notifications.
HOOK_EVENTS = ("pre_switch", "switch", "weights", "rollout_step", "promote", "abort", "rollback")
HOOK_FORMATS = ("json", "slack")


@dataclass(frozen=True, slots=True)
class HookConfig:
    on: tuple[str, ...]
    url: str
    timeout: float = 5.0
    format: str = "json"  # json: the event itself; slack: {"text": ...} for chat webhooks
    name: str = ""  # the metric label; default: the URL's host (never its path: tokens)

    def __post_init__(self) -> None:
        p = _Problems()
        p.check(len(self.on) > 0, "on", f"must name at least one of {', '.join(HOOK_EVENTS)}")
        for i, what in enumerate(self.on):
            p.check(what in HOOK_EVENTS, f"on[{i}]", f"expected one of {', '.join(HOOK_EVENTS)}")
        scheme, sep, rest = self.url.partition("://")
        ok = bool(sep) and scheme in ("http", "https") and bool(rest.split("/")[0])
        p.check(ok, "url", f"expected an http:// or https:// URL, got {self.url!r}")
        p.positive("timeout", self.timeout)
        ok = self.format in HOOK_FORMATS
        p.check(ok, "format", f"must be 'json' or 'slack', got {self.format!r}")
        p.raise_if_any()
        if not self.name:
            host = rest.split("/")[0].rpartition("@")[2]
            object.__setattr__(self, "name", host)


@dataclass(frozen=True, slots=True)
class StateConfig:
    backend: str = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "bgproxy"
    connect_timeout: float = 30.0

    def __post_init__(self) -> None:
        p = _Problems()
        p.check(
            self.backend in STATE_BACKENDS,
            "backend",
            f"must be 'memory' or 'redis', got {self.backend!r}",
        )
        # Checked even with the memory backend: a later switch to redis should not surprise.
        scheme, sep, _ = self.redis_url.partition("://")
        p.check(
            bool(sep) and scheme.lower() in REDIS_SCHEMES,
            "redis_url",
            f"expected a redis://, rediss:// or unix:// URL, got {self.redis_url!r}",
        )
        ok = bool(self.key_prefix) and self.key_prefix.isprintable() and " " not in self.key_prefix
        p.check(ok, "key_prefix", "must be a non-empty string without spaces")
        p.positive("connect_timeout", self.connect_timeout)
        p.raise_if_any()


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_header_bytes: int = 32768  # whole request head; beyond it: 431
    max_headers: int = 100  # header fields in one request head; beyond it: 431
    max_body_bytes: int | None = None  # request body; None = unlimited (bodies stream)
    max_connections: int = 10000  # concurrent client connections per process
    admin_max_body_bytes: int = 65536  # admin API request bodies; beyond it: 413

    def __post_init__(self) -> None:
        p = _Problems()
        p.at_least("max_header_bytes", self.max_header_bytes, 1)
        p.at_least("max_headers", self.max_headers, 1)
        if self.max_body_bytes is not None:
            p.at_least("max_body_bytes", self.max_body_bytes, 1)
        p.at_least("max_connections", self.max_connections, 1)
        p.at_least("admin_max_body_bytes", self.admin_max_body_bytes, 1)
        p.raise_if_any()


def _may_collide(a: HostPort, b: HostPort) -> bool:
    """Whether two listeners would fight over one socket (port 0 never does)."""
    if a.port == 0 or a.port != b.port:
        return False
    if a.host == b.host or "::" in (a.host, b.host):
        return True
    # 0.0.0.0 takes the port on every IPv4 address, not on IPv6 ones.
    other = b.host if a.host == "0.0.0.0" else a.host if b.host == "0.0.0.0" else None
    return other is not None and ":" not in other


ACME_CHALLENGES = ("http-01", "tls-alpn-01")


@dataclass(frozen=True, slots=True)
class AcmeConfig:
    """Automatic certificates (RFC 8555); off while ``directory`` is None."""

    directory: str | None = None  # the ACME server's directory URL
    email: str | None = None
    domains: tuple[str, ...] = ()  # empty: every exact host of every service
    challenge: str = "http-01"
    storage: str = "acme/"  # account key, keys and certificates, kept across restarts
    ca_file: str | None = None  # extra CA trusted for the ACME server itself
    renew_before: float = 30 * 86400.0

    def __post_init__(self) -> None:
        p = _Problems()
        if self.directory is not None:
            p.check(
                self.directory.startswith("https://") and len(self.directory) > 8,
                "directory",
                f"expected an https:// URL, got {self.directory!r}",
            )
        if self.email is not None:
            local, at, domain = self.email.partition("@")
            ok = bool(local and at and "." in domain) and " " not in self.email
            p.check(ok, "email", f"not an email address: {self.email!r}")
        # Neither challenge can validate a wildcard (RFC 8555 §8.3, RFC 8737 §3): DNS-01 only.
        method = "TLS-ALPN-01" if self.challenge == "tls-alpn-01" else "HTTP-01"
        for i, name in enumerate(self.domains):
            if name.startswith("*"):
                p.check(False, f"domains[{i}]", f"{method} cannot validate a wildcard: {name!r}")
            else:
                ok = valid_host(name) and "." in name.strip(".") and not _is_ip(name)
                p.check(ok, f"domains[{i}]", f"not a DNS name: {name!r}")
        p.check(
            self.challenge in ACME_CHALLENGES,
            "challenge",
            f"must be 'http-01' or 'tls-alpn-01', got {self.challenge!r}",
        )
        p.check(bool(self.storage), "storage", "must name a directory")
        p.positive("renew_before", self.renew_before)
        p.raise_if_any()

    @property
    def enabled(self) -> bool:
        return self.directory is not None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


MIN_TLS_VERSIONS = ("1.2", "1.3")
# An ALPN protocol id is 1-255 bytes; the ones worth naming are printable.
_ALPN = re.compile(r"[!-~]{1,255}")
# One header value (RFC 6797 directives): printable, no control characters.
_HSTS = re.compile(r"[ -~]+")


@dataclass(frozen=True, slots=True)
class CertificateConfig:
    cert: str  # PEM: the certificate, optionally followed by its chain
    key: str  # PEM: its private key, unencrypted


@dataclass(frozen=True, slots=True)
class TlsConfig:
    acme: AcmeConfig = AcmeConfig()
    listen: HostPort | None = None  # None: no HTTPS listener
    certificates: tuple[CertificateConfig, ...] = ()
    min_version: str = "1.2"
    alpn: tuple[str, ...] = ("http/1.1",)
    redirect_http: bool = False
    hsts: str | None = None  # the Strict-Transport-Security value, e.g. "max-age=31536000"
    handshake_timeout: float = 10.0

    def __post_init__(self) -> None:
        p = _Problems()
        p.check(
            self.min_version in MIN_TLS_VERSIONS,
            "min_version",
            f'must be "1.2" or "1.3", got {self.min_version!r}',
        )
        p.check(len(self.alpn) > 0, "alpn", "must list at least one protocol, e.g. http/1.1")
        for i, proto in enumerate(self.alpn):
            p.check(
                _ALPN.fullmatch(proto) is not None, f"alpn[{i}]", f"not a protocol id: {proto!r}"
            )
        if self.hsts is not None:
            ok = _HSTS.fullmatch(self.hsts) is not None and "max-age" in self.hsts.lower()
            p.check(
                ok, "hsts", f'expected a header value like "max-age=31536000", got {self.hsts!r}'
            )
        p.positive("handshake_timeout", self.handshake_timeout)
        if self.listen is not None:
            p.check(
                len(self.certificates) > 0 or self.acme.enabled,
                "certificates",
                "required with tls.listen (unless tls.acme obtains them):"
                " a list of {cert: FILE, key: FILE}",
            )
        p.check(
            not self.acme.enabled or self.listen is not None,
            "acme",
            "needs tls.listen (the HTTPS listener that serves what it obtains)",
        )
        p.check(
            not self.redirect_http or self.listen is not None,
            "redirect_http",
            "needs tls.listen (the HTTPS listener to redirect to)",
        )
        p.raise_if_any()


# A service name goes into URLs, metric labels and Redis keys: keep it plain.
SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
DEFAULT_SERVICE = "default"  # the name of the one service of the top-level upstreams form
# Sections a service may override key by key (SPEC "Services").
# ``hooks`` is a list: a service's replaces the top-level one whole.
SERVICE_SECTIONS = (
    "health_check", "routing", "timeouts", "drain", "websocket", "rollback", "gates",
    "rollout", "hooks",
)  # fmt: skip


def host_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a valid ``hosts`` entry: exact name, ``*.suffix`` or ``*``."""
    if pattern == "*":
        return None
    name = pattern[2:] if pattern.startswith("*.") else pattern
    if "*" in name or (":" in name and not name.startswith("[")):
        return f"expected a host name, '*.suffix' or '*' (no port), got {pattern!r}"
    if not valid_host(name.strip("[]")):
        return f"not a valid host name: {pattern!r}"
    return None


def normalize_path(prefix: str) -> str:
    """``/v1/`` claims what ``/v1`` claims: prefixes match on ``/`` boundaries."""
    return prefix.rstrip("/") or "/"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceConfig:
    """One app behind the edge: what it claims (hosts, paths), its two pools and the
    sections it runs under (the top-level ones, overridden key by key per service)."""

    name: str
    hosts: tuple[str, ...] = ("*",)  # lowercased
    paths: tuple[str, ...] = ("/",)  # normalized prefixes
    upstreams: UpstreamsConfig
    health_check: HealthCheckConfig = HealthCheckConfig()
    routing: RoutingConfig = RoutingConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    drain: DrainConfig = DrainConfig()
    websocket: WebSocketConfig = WebSocketConfig()
    rollback: RollbackConfig = RollbackConfig()
    gates: GatesConfig = GatesConfig()
    rollout: RolloutConfig = RolloutConfig()
    hooks: tuple[HookConfig, ...] = ()

    def __post_init__(self) -> None:
        p = _Problems()
        p.check(
            SERVICE_NAME.fullmatch(self.name) is not None,
            "name",
            f"must match [a-z0-9][a-z0-9_-]{{0,62}}, got {self.name!r}",
        )
        p.check(len(self.hosts) > 0, "hosts", "must list at least one host pattern")
        for i, host in enumerate(self.hosts):
            problem = host_pattern_problem(host)
            p.check(problem is None, f"hosts[{i}]", problem or "")
        p.check(len(self.paths) > 0, "paths", "must list at least one path prefix")
        for i, path in enumerate(self.paths):
            p.request_path(f"paths[{i}]", path)
            p.check("?" not in path and "#" not in path, f"paths[{i}]", "a prefix has no query")
        p.raise_if_any()


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    listen: HostPort = HostPort("0.0.0.0", 8080)
    admin: AdminConfig = AdminConfig()
    # The single-service form; with ``services`` it is None. Either way ``services`` holds
    # every service after construction (this form is one service named "default").
    upstreams: UpstreamsConfig | None = None
    health_check: HealthCheckConfig = HealthCheckConfig()
    routing: RoutingConfig = RoutingConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    drain: DrainConfig = DrainConfig()
    websocket: WebSocketConfig = WebSocketConfig()
    rollback: RollbackConfig = RollbackConfig()
    gates: GatesConfig = GatesConfig()
    rollout: RolloutConfig = RolloutConfig()
    hooks: tuple[HookConfig, ...] = ()
    state: StateConfig = StateConfig()
    limits: LimitsConfig = LimitsConfig()
    # Peers (e.g. a load balancer in front) whose incoming X-Forwarded-For is trusted.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    services: tuple[ServiceConfig, ...] = ()
    default_service: str | None = None
    tls: TlsConfig = TlsConfig()
    # The plain and TLS listeners expect a PROXY protocol header, from trusted_proxies only.
    proxy_protocol: bool = False
    access_log: AccessLogConfig = AccessLogConfig()
    request_id: RequestIdConfig = RequestIdConfig()
    tracing: TracingConfig = TracingConfig()

    def __post_init__(self) -> None:
        p = _Problems()
        if self.tls.listen is not None:
            p.check(
                not _may_collide(self.tls.listen, self.listen),
                "tls.listen",
                f"{self.tls.listen} collides with listen ({self.listen})",
            )
            p.check(
                not _may_collide(self.tls.listen, self.admin.listen),
                "tls.listen",
                f"{self.tls.listen} collides with admin.listen ({self.admin.listen})",
            )
        p.check(
            not self.proxy_protocol or bool(self.trusted_proxies),
            "proxy_protocol",
            "needs trusted_proxies: a PROXY header is accepted only from them",
        )
        p.check(
            not _may_collide(self.listen, self.admin.listen),
            "admin.listen",
            f"{self.admin.listen} collides with listen ({self.listen})",
        )
        if self.upstreams is not None and self.services:
            p.check(False, "services", "give either top-level upstreams or services, not both")
        elif self.upstreams is None and not self.services:
            p.check(False, "upstreams", "required: both blue and green (or services)")
        elif self.upstreams is not None:
            object.__setattr__(self, "services", (self._only_service(self.upstreams),))
        names = [s.name for s in self.services]
        for i, name in enumerate(names):
            p.check(name not in names[:i], f"services.{name}", "defined twice")
        if self.default_service is not None:
            p.check(
                self.default_service in names,
                "default_service",
                f"names no configured service: {self.default_service!r} "
                f"(services: {', '.join(names)})",
            )
        for problem in claim_conflicts(self.services):
            p.check(False, "services", problem)
        if self.tls.acme.enabled:
            p.check(
                bool(self.acme_domains()),
                "tls.acme.domains",
                "nothing to order: list domains, or give services exact host names",
            )
        p.raise_if_any()

    def acme_domains(self) -> tuple[str, ...]:
        """The names ACME keeps certificates for: ``tls.acme.domains``, or by default every
        exact, non-wildcard host name of every service (an IP address cannot be one)."""
        if self.tls.acme.domains:
            return self.tls.acme.domains
        names = (
            host for svc in self.services for host in svc.hosts
            if "*" not in host and "." in host and not _is_ip(host.strip("[]"))
        )  # fmt: skip
        return tuple(dict.fromkeys(names))

    def _only_service(self, upstreams: UpstreamsConfig) -> ServiceConfig:
        return ServiceConfig(
            name=DEFAULT_SERVICE,
            upstreams=upstreams,
            **{key: getattr(self, key) for key in SERVICE_SECTIONS},
        )

    def service(self, name: str) -> ServiceConfig | None:
        for svc in self.services:
            if svc.name == name:
                return svc
        return None


def claim_conflicts(services: Iterable[ServiceConfig]) -> list[str]:
    """Two services claiming the same host pattern and path prefix, each named once."""
    owner: dict[tuple[str, str], str] = {}
    problems = []
    for svc in services:
        for host in svc.hosts:
            for path in svc.paths:
                key = (host, normalize_path(path))
                first = owner.setdefault(key, svc.name)
                if first != svc.name:
                    problems.append(
                        f"{first} and {svc.name} both claim host {host!r} path {key[1]!r}"
                    )
    return problems
