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
import os
from collections.abc import Hashable
from typing import Any

import yaml

from .fields import (
    Builder,
    Section,
    as_bool,
    as_int,
    as_number,
    as_str,
    as_switch,
    ca_file_path,
    flat,
    optional,
    parse_duration,
    parse_host_port,
    parse_network,
    parse_size,
    parse_target,
    show,
)
from .observability import AccessLogConfig, RequestIdConfig, TracingConfig
from .schema import (
    SERVICE_NAME,
    SERVICE_SECTIONS,
    AdminConfig,
    Config,
    ConfigError,
    DrainConfig,
    GatesConfig,
    HealthCheckConfig,
    HookConfig,
    LimitsConfig,
    PoolConfig,
    RollbackConfig,
    RolloutConfig,
    RoutingConfig,
    ServiceConfig,
    SmokeProbe,
    StateConfig,
    TimeoutsConfig,
    UpstreamsConfig,
    UpstreamTlsConfig,
    WarmupConfig,
    WebSocketConfig,
    host_pattern_problem,
    normalize_path,
)
from .tls import (
    AcmeConfig,
    TlsConfig,
    check_certificates,
    parse_certificates,
    parse_min_version,
)

_upstream_tls = flat(
    UpstreamTlsConfig,
    {"verify": as_bool, "ca_file": optional(ca_file_path), "server_name": optional(as_str)},
)


def _pool(errors: list[str], path: str, data: object, base: Any = None) -> PoolConfig | None:
    s = Section(errors, path, data, ("targets", "tls"))
    if not isinstance(data, dict):
        return None  # null was reported by the caller as "required", anything else by Section
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
    s = Section(errors, path, data, ("blue", "green"))
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
    s = Section(errors, path, data, keys, base)
    if "reconnect_window" in s.values:
        raw = s.values["reconnect_window"]
        if isinstance(raw, list) and len(raw) == 2:
            window = s.take_list("reconnect_window", parse_duration)
            if window is not None:
                s.kwargs["reconnect_window"] = (window[0], window[1])
        else:
            s.fail(
                s.key_path("reconnect_window"),
                f"expected two durations [earliest, latest] like [1s, 30s], got {show(raw)}",
            )
    s.take("reconnect_message", as_str)
    s.take("close_grace", parse_duration)
    return s.build(WebSocketConfig)


def _smoke_probe(errors: list[str], path: str, data: object, base: Any = None) -> SmokeProbe | None:
    if data is None:  # unlike a section, a probe has a required key
        errors.append(f"{path}: expected a mapping like {{path: /health}}, got null")
        return None
    s = Section(errors, path, data, ("path", "expect_status", "expect_body"))
    if not isinstance(data, dict):
        return None
    if "path" not in s.values:
        s.fail(s.key_path("path"), "required")
        return None
    s.take("path", as_str)
    s.take("expect_status", as_int)
    s.take("expect_body", optional(as_str))
    return s.build(SmokeProbe) if "path" in s.kwargs else None


_warmup = flat(WarmupConfig, {"requests": as_int, "path": as_str, "concurrency": as_int})


def _gates(errors: list[str], path: str, data: object, base: Any = None) -> GatesConfig | None:
    s = Section(errors, path, data, ("require_healthy", "smoke", "warmup"), base)
    s.take("require_healthy", as_bool)
    raw_smoke = s.values.get("smoke")
    if raw_smoke is not None and not isinstance(raw_smoke, list):
        s.fail(s.key_path("smoke"), f"expected a list of probes, got {show(raw_smoke)}")
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
        raise ValueError(f"expected a list of weights like [10, 25, 50, 100], got {show(value)}")
    return tuple(as_int(w) for w in value)


_rollout = flat(
    RolloutConfig, {"steps": _weights, "step_interval": parse_duration, "auto_promote": as_bool}
)
_HOOK_KEYS = ("on", "url", "timeout", "format", "name")


def _hook(errors: list[str], path: str, data: object) -> HookConfig | None:
    if isinstance(data, dict) and True in data:
        # YAML 1.1 reads a bare ``on`` as the boolean true: take it as the key it means.
        data = {("on" if k is True else k): v for k, v in data.items()}
    if not isinstance(data, dict):
        hint = "expected a mapping like {on: [switch], url: ...}"
        errors.append(f"{path}: {hint}, got {show(data)}")
        return None
    s = Section(errors, path, data, _HOOK_KEYS)
    for key in ("on", "url"):
        if key not in s.values:
            s.fail(s.key_path(key), "required")
    on = s.values.get("on")
    if isinstance(on, str):
        s.values["on"] = [on]
    items = s.take_list("on", as_str)
    if items is not None:
        s.kwargs["on"] = tuple(items)
    s.take("url", as_str)
    s.take("timeout", parse_duration)
    s.take("format", as_str)
    s.take("name", as_str)
    # Built even after a bad key (to report the rest), but only with both required keys.
    return s.build(HookConfig) if "on" in s.kwargs and "url" in s.kwargs else None


def _hooks(errors: list[str], path: str, data: object, base: Any = None) -> object | None:
    if data is None:
        return ()
    if not isinstance(data, list):
        errors.append(f"{path}: expected a list of hooks, got {show(data)}")
        return None
    hooks = [_hook(errors, f"{path}[{i}]", item) for i, item in enumerate(data)]
    good = [h for h in hooks if h is not None]
    return tuple(good) if len(good) == len(hooks) else None


# In SPEC order, so errors come out in the order a reader meets the keys.
_SECTIONS: tuple[tuple[str, Builder], ...] = (
    ("admin", flat(AdminConfig, {"listen": parse_host_port, "token_env": optional(as_str)})),
    ("upstreams", _upstreams),
    (
        "health_check",
        flat(
            HealthCheckConfig,
            {
                "path": as_str,
                "interval": parse_duration,
                "timeout": parse_duration,
                "healthy_threshold": as_int,
                "unhealthy_threshold": as_int,
            },
        ),
    ),
    (
        "routing",
        flat(
            RoutingConfig,
            {
                "active": as_str,
                "override_header": as_str,
                "override_cookie": as_str,
                "override_token_env": optional(as_str),
                "sticky_cookie": as_str,
                "response_header": optional(as_str),
            },
        ),
    ),
    (
        "timeouts",
        flat(
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
    ("drain", flat(DrainConfig, {"timeout": parse_duration})),
    ("websocket", _websocket),
    (
        "rollback",
        flat(
            RollbackConfig,
            {
                "enabled": as_bool,
                "window": parse_duration,
                "interval": parse_duration,
                "max_error_rate": as_number,
                "max_p99_latency": parse_duration,
                "min_requests": as_int,
                "failure_limit": as_int,
            },
        ),
    ),
    ("gates", _gates),
    ("rollout", _rollout),
    ("hooks", _hooks),
    (
        "state",
        flat(
            StateConfig,
            {
                "backend": as_str,
                "redis_url": as_str,
                "key_prefix": as_str,
                "connect_timeout": parse_duration,
            },
        ),
    ),
    (
        "limits",
        flat(
            LimitsConfig,
            {
                "max_header_bytes": parse_size,
                "max_headers": as_int,
                "max_body_bytes": optional(parse_size),
                "max_connections": as_int,
                "admin_max_body_bytes": parse_size,
            },
        ),
    ),
)


def _acme_domain(value: object) -> str:
    return as_str(value).strip().lower().rstrip(".")


def _acme(errors: list[str], path: str, data: object, base: Any = None) -> AcmeConfig | None:
    keys = tuple(f.name for f in dataclasses.fields(AcmeConfig))
    s = Section(errors, path, data, keys)
    s.take("directory", optional(as_str))
    s.take("email", optional(as_str))
    domains = s.take_list("domains", _acme_domain)
    if domains is not None:
        s.kwargs["domains"] = tuple(dict.fromkeys(domains))
    s.take("challenge", as_str)
    s.take("storage", as_str)
    s.take("ca_file", optional(ca_file_path))
    s.take("renew_before", parse_duration)
    return s.build(AcmeConfig)


_TLS_KEYS = (
    "listen", "certificates", "min_version", "alpn", "redirect_http", "hsts", "handshake_timeout",
    "acme",
)  # fmt: skip


def _tls(errors: list[str], path: str, data: object, base: Any = None) -> TlsConfig | None:
    s = Section(errors, path, data, _TLS_KEYS)
    s.take("listen", optional(parse_host_port))
    if s.values.get("certificates") is not None:
        certs, problems = parse_certificates(s.values["certificates"], s.key_path("certificates"))
        for problem in problems:
            where, _, message = problem.partition(": ")
            s.fail(where, message)
        if certs is not None:
            s.kwargs["certificates"] = certs
    s.take("min_version", parse_min_version)
    alpn = s.take_list("alpn", as_str)
    if alpn is not None:
        s.kwargs["alpn"] = tuple(alpn)
    s.take("redirect_http", as_bool)
    s.take("hsts", optional(as_str))
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
        flat(
            AccessLogConfig,
            {
                "destination": optional(as_str),
                "format": as_str,
                "sample": as_number,
                "rejections_per_second": as_int,
            },
        ),
    ),
    ("request_id", flat(RequestIdConfig, {"header": optional(as_str), "mode": as_switch})),
    (
        "tracing",
        flat(
            TracingConfig,
            {"otlp_endpoint": optional(as_str), "sample_ratio": as_number, "service_name": as_str},
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
    text = as_str(value).strip().lower()
    problem = host_pattern_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


def _path_prefix(value: object) -> str:
    text = as_str(value)
    if not text.startswith("/") or any(c in text for c in " ?#") or not text.isprintable():
        raise ValueError(f"expected a path prefix like /v1, got {text!r}")
    return normalize_path(text)


def _service(
    errors: list[str], path: str, name: str, data: object, top: dict[str, Any]
) -> ServiceConfig | None:
    """One entry of ``services``: its claims, its pools, and its overrides of the
    top-level sections (``top``: those sections, already built)."""
    s = Section(errors, path, data, _SERVICE_KEYS)
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
        errors.append(f"services: expected a mapping of service names, got {show(data)}")
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
        raise ConfigError(f"(top level): expected a mapping of config keys, got {show(data)}")
    errors: list[str] = []
    s = Section(errors, "", data, _TOP_KEYS)  # an empty file is None: only upstreams is missing
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
    s.take("default_service", optional(as_str))
    s.take("proxy_protocol", as_bool)
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
