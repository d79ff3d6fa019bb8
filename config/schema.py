"""The typed, immutable configuration bgproxy runs on.

Defaults are the documented ones (SPEC "Config (YAML)"). Invariants live in
``__post_init__`` so a config built in code (tests, ``bgproxy demo``) obeys the
same rules as one loaded from YAML:

* section classes report every broken invariant at once, as a ConfigError whose
  entries are relative to the section ("interval: must be greater than 0"); the
  loader prefixes the section's dotted path;
* value classes (HostPort, TargetConfig, in values.py) are a single string in YAML,
  so they raise a plain ValueError and the loader's path already names them.

The ``tls`` section's classes live with its certificate checks in tls.py, the
observability sections in observability.py.

Types are the loader's job: ``__post_init__`` assumes the annotated types.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ConfigError as ConfigError  # re-exported: its home before errors.py
from .errors import Problems
from .observability import AccessLogConfig, RequestIdConfig, TracingConfig
from .tls import TlsConfig
from .values import HostPort, TargetConfig, is_ip, valid_host

COLORS = ("blue", "green")
STATE_BACKENDS = ("memory", "redis")
REDIS_SCHEMES = ("redis", "rediss", "unix")

_WILDCARD_HOSTS = ("0.0.0.0", "::")


@dataclass(frozen=True, slots=True)
class UpstreamTlsConfig:
    """How a pool's https:// targets are verified (SPEC "TLS at the edge")."""

    verify: bool = True
    ca_file: str | None = None  # PEM CA bundle trusted instead of the system's; the loader
    # checks it is readable, since a path alone is not an invariant
    server_name: str | None = None  # SNI and the name verified; default: the target's host

    def __post_init__(self) -> None:
        p = Problems()
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
        p = Problems()
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
        p = Problems()
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
        p = Problems()
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
        p = Problems()
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
        p = Problems()
        for key in ("connect", "request_header", "upstream_response", "idle", "upstream_keepalive"):
            p.positive(key, getattr(self, key))
        p.raise_if_any()


@dataclass(frozen=True, slots=True)
class DrainConfig:
    timeout: float = 30.0

    def __post_init__(self) -> None:
        p = Problems()
        p.positive("timeout", self.timeout)
        p.raise_if_any()


@dataclass(frozen=True, slots=True)
class WebSocketConfig:
    reconnect_window: tuple[float, float] = (1.0, 30.0)
    # Placeholders are substituted literally (the JSON braces rule out str.format).
    reconnect_message: str = '{"type":"reconnect","color":"{color}","reason":"{reason}"}'
    close_grace: float = 5.0

    def __post_init__(self) -> None:
        p = Problems()
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
        p = Problems()
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
        p = Problems()
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
        p = Problems()
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
        p = Problems()
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
        p = Problems()
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
        p = Problems()
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
        p = Problems()
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
        p = Problems()
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
        p = Problems()
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
            if "*" not in host and "." in host and not is_ip(host.strip("[]"))
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
