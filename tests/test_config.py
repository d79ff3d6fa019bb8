"""config/: defaults, the example file, parsers, and error reporting with key paths."""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

import config
from config import (
    Config,
    ConfigError,
    HealthCheckConfig,
    HostPort,
    PoolConfig,
    TargetConfig,
    UpstreamsConfig,
    WebSocketConfig,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
    parse_target,
)

EXAMPLE = Path(config.__file__).parent / "examples" / "bgproxy.yaml"
MINIMAL = """
upstreams:
  blue: {targets: ["http://127.0.0.1:9001"]}
  green: {targets: ["http://127.0.0.1:9002"]}
"""


def parse_yaml(text: str) -> Config:
    return parse_config(yaml.safe_load(text))


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_yaml(text)
    return info.value.errors


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bgproxy.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults and the example ----------------------------------------------------------------


def test_defaults_match_spec() -> None:
    cfg = parse_yaml(MINIMAL)
    expected: dict[str, object] = {
        "listen": HostPort("0.0.0.0", 8080),
        "admin.listen": HostPort("127.0.0.1", 9901),
        "admin.token_env": "BGPROXY_ADMIN_TOKEN",
        "health_check.path": "/health",
        "health_check.interval": 2.0,
        "health_check.timeout": 1.0,
        "health_check.healthy_threshold": 2,
        "health_check.unhealthy_threshold": 3,
        "routing.active": "blue",
        "routing.override_header": "X-Bg-Color",
        "routing.override_cookie": "bg_color",
        "routing.override_token_env": None,
        "routing.sticky_cookie": "bg_sticky",
        "routing.response_header": "X-Bg-Color",
        "timeouts.connect": 5.0,
        "timeouts.request_header": 10.0,
        "timeouts.upstream_response": 60.0,
        "timeouts.idle": 75.0,
        "timeouts.upstream_keepalive": 15.0,
        "drain.timeout": 30.0,
        "websocket.reconnect_window": (1.0, 30.0),
        "websocket.reconnect_message": '{"type":"reconnect","color":"{color}","reason":"{reason}"}',
        "websocket.close_grace": 5.0,
        "rollback.enabled": True,
        "rollback.window": 300.0,
        "rollback.interval": 15.0,
        "rollback.max_error_rate": 0.05,
        "rollback.max_p99_latency": 2.0,
        "rollback.min_requests": 20,
        "rollback.failure_limit": 1,
        "gates.require_healthy": True,
        "gates.smoke": (),
        "gates.warmup.requests": 0,
        "gates.warmup.path": "/",
        "gates.warmup.concurrency": 4,
        "state.backend": "memory",
        "state.redis_url": "redis://127.0.0.1:6379/0",
        "state.key_prefix": "bgproxy",
        "state.connect_timeout": 30.0,
        "limits.max_header_bytes": 32 * 1024,
        "limits.max_headers": 100,
        "limits.max_body_bytes": None,
        "limits.max_connections": 10000,
        "limits.admin_max_body_bytes": 64 * 1024,
        "trusted_proxies": (),
    }
    for dotted, value in expected.items():
        actual: Any = cfg
        for part in dotted.split("."):
            actual = getattr(actual, part)
        assert actual == value, dotted
        assert type(actual) is type(value), dotted  # durations are floats, counts ints
    assert str(cfg.listen) == "0.0.0.0:8080"
    assert cfg.upstreams.blue.targets == (
        TargetConfig(url="http://127.0.0.1:9001", host="127.0.0.1", port=9001),
    )
    assert cfg.upstreams.pool("green") is cfg.upstreams.green


def test_example_file_loads() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.listen == HostPort("0.0.0.0", 8080)
    assert cfg.admin.listen == HostPort("127.0.0.1", 9901)
    assert [t.url for t in cfg.upstreams.blue.targets] == ["http://127.0.0.1:9001"]
    assert [t.url for t in cfg.upstreams.green.targets] == ["http://127.0.0.1:9002"]
    # The example promises to show defaults: apart from upstreams it must equal them.
    assert cfg == Config(upstreams=cfg.upstreams)


def _field_paths(cls: type, prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and f.name != "listen":
            paths |= _field_paths(type(default), f"{prefix}{f.name}.")
        else:
            paths.add(prefix + f.name)
    return paths


def _yaml_paths(data: dict[str, Any], prefix: str = "") -> set[str]:
    paths: set[str] = set()
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("upstreams",):
            paths |= _yaml_paths(value, f"{prefix}{key}.")
        else:
            paths.add(prefix + key)
    return paths


def test_example_shows_every_key() -> None:
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    # The single-service form: `services` and `default_service` are the other form's keys
    # (config/examples/services.yaml shows them).
    assert _yaml_paths(raw) == _field_paths(Config) - {"services", "default_service"}


# --- scalar parsers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (5, 5.0),
        (2.5, 2.5),
        (0, 0.0),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("30d", 30 * 86400.0),
        ("1.5s", 1.5),
        ("1m30s", 90.0),
        (" 2s ", 2.0),
        ("10", 10.0),
    ],
)
def test_parse_duration_accepts(value: object, seconds: float) -> None:
    result = parse_duration(value)
    assert isinstance(result, float)
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    ["soon", "", "5w", "5 s", "-1s", "s", "1.5.s", True, None, [1], math.inf, math.nan],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration like 5s, 250ms"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (1000, 1000),
        ("512B", 512),
        ("64KiB", 65536),
        ("64kib", 65536),
        ("10MiB", 10 * 1024 * 1024),
        ("1GiB", 1 << 30),
        ("8k", 8192),
        ("2048", 2048),
    ],
)
def test_parse_size_accepts(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["ten", "1.5MiB", "5XB", "", True, None, 1.5])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="expected a size like 64KiB"):
        parse_size(value)


def test_decimal_size_units_are_refused_as_ambiguous() -> None:
    with pytest.raises(ValueError, match="KB/MB/GB are ambiguous"):
        parse_size("64KB")


@pytest.mark.parametrize(
    ("url", "normalized", "host", "port"),
    [
        ("http://127.0.0.1:9001", "http://127.0.0.1:9001", "127.0.0.1", 9001),
        ("http://app", "http://app:80", "app", 80),
        ("HTTP://App.Example:8080/", "http://app.example:8080", "app.example", 8080),
        ("http://[::1]:9001", "http://[::1]:9001", "::1", 9001),
        ("http://blue_app:", "http://blue_app:80", "blue_app", 80),
    ],
)
def test_parse_target_normalizes(url: str, normalized: str, host: str, port: int) -> None:
    assert parse_target(url) == TargetConfig(url=normalized, host=host, port=port)


@pytest.mark.parametrize(
    ("url", "normalized", "port"),
    [
        ("https://app", "https://app:443", 443),
        ("HTTPS://App:8443/", "https://app:8443", 8443),
    ],
)
def test_parse_target_takes_https(url: str, normalized: str, port: int) -> None:
    assert parse_target(url) == TargetConfig(
        url=normalized, host="app", port=port, scheme="https"
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ws://app", "expected an http:// or https:// URL"),
        ("ftp://app", "expected an http:// or https:// URL"),
        ("app:9001", "expected a URL like http://127.0.0.1:9001"),
        ("http://app:99999", "port out of range"),
        ("http://app:0", "port out of range"),
        ("http://app:http", "port is not a number"),
        ("http://user:pw@app", "credentials"),
        ("http://app/api", "without a path"),
        ("http://app/?a=1", "no query or fragment"),
        ("http://app#top", "no query or fragment"),
        ("http://:80", "missing host"),
        ("http://::1:80", "IPv6 address needs brackets"),
        ("http://bad host", "not a valid host"),
    ],
)
def test_parse_target_rejects(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_target(url)


# --- documents with errors -------------------------------------------------------------------

BAD_DOCUMENT = """
listen: "0.0.0.0:70000"
admin:
  listen: "::1:9901"
upstreams:
  blue:
    targets: ["http://127.0.0.1:9001", "http://127.0.0.1:9001/"]
  green:
    targets: ["http://127.0.0.1:9002", "ftp://127.0.0.1:9443", "http://127.0.0.1:99999"]
health_check:
  intervall: 2s
  healthy_threshold: 0
  unhealthy_threshold: true
timeouts:
  connect: soon
  idle: 0
routing:
  active: purple
  override_header: "X Bg"
websocket:
  reconnect_window: [30s, 1s]
rollback:
  max_error_rate: 1.5
gates:
  smoke:
    - {path: /ready, expect_status: 700}
    - {expect_status: 200}
state:
  backend: etcd
  redis_url: http://127.0.0.1:6379
limits:
  max_header_bytes: lots
trusted_proxies: ["10.0.0.0/8", "::1", "not-a-network"]
"""


def test_bad_document_reports_every_error_with_its_path() -> None:
    errors = errors_of(BAD_DOCUMENT)
    expected = [
        ("listen", "port out of range"),
        ("admin.listen", "an IPv6 address needs brackets"),
        ("upstreams.blue.targets[1]", "duplicate of targets[0]"),
        ("upstreams.green.targets[1]", "expected an http:// or https:// URL"),
        ("upstreams.green.targets[2]", "port out of range"),
        ("health_check.intervall", "unknown key; did you mean 'interval'?"),
        ("health_check.unhealthy_threshold", "expected a whole number, got true"),
        ("health_check.healthy_threshold", "must be at least 1"),
        ("routing.active", "must be 'blue' or 'green', got 'purple'"),
        ("routing.override_header", "not a valid HTTP header name"),
        (
            "timeouts.connect",
            "expected a duration like 5s, 250ms or a number of seconds, got 'soon'",
        ),
        ("timeouts.idle", "must be greater than 0"),
        ("websocket.reconnect_window", "earliest must not exceed latest"),
        ("rollback.max_error_rate", "must be between 0 and 1"),
        ("gates.smoke[0].expect_status", "must be an HTTP status 100-599"),
        ("gates.smoke[1].path", "required"),
        ("state.backend", "must be 'memory' or 'redis'"),
        ("state.redis_url", "expected a redis://, rediss:// or unix:// URL"),
        ("limits.max_header_bytes", "expected a size like 64KiB"),
        ("trusted_proxies[2]", "not an IP network"),
    ]
    for path, fragment in expected:
        matching = [e for e in errors if e.startswith(f"{path}: ")]
        assert len(matching) == 1, (path, errors)
        assert fragment in matching[0]
    assert len(errors) == len(expected), errors  # nothing spurious either
    assert "upstreams.green.targets[1]: expected an http:// or https:// URL" in str(
        ConfigError(errors)
    )


def test_config_error_str_is_every_error_on_its_own_line() -> None:
    errors = errors_of("listen: nope\nrouting: {active: red}\n")
    assert len(errors) == 3  # listen, upstreams, routing.active
    with pytest.raises(ConfigError) as info:
        parse_yaml("listen: nope\nrouting: {active: red}\n")
    assert str(info.value).splitlines() == errors
    assert ConfigError("a: b").errors == ["a: b"]  # a lone string is one error


def test_unknown_key_suggests_the_closest_known_key() -> None:
    assert errors_of(MINIMAL + "health_check: {intervall: 2s}\n") == [
        "health_check.intervall: unknown key; did you mean 'interval'?"
    ]
    assert errors_of(MINIMAL + "timeout:\n  connect: 5s\n") == [
        "timeout: unknown key; did you mean 'timeouts'?"
    ]
    (far_off,) = errors_of(MINIMAL + "drain: {zzz: 1}\n")
    assert far_off == "drain.zzz: unknown key (expected one of: timeout)"


def test_upstreams_are_required() -> None:
    assert errors_of("") == [
        "upstreams: required: both blue and green, each {targets: [http://host:port]}"
    ]
    errors = errors_of("upstreams: {blue: {targets: []}}\n")
    assert errors == [
        "upstreams.blue.targets: must list at least one http:// target",
        "upstreams.green: required: {targets: [http://host:port, ...]}",
    ]


def test_wrong_shapes_are_named() -> None:
    assert errors_of(MINIMAL + "drain: 5\n") == ["drain: expected a mapping, got 5"]
    assert errors_of(MINIMAL + "websocket: {reconnect_window: [1s]}\n") == [
        "websocket.reconnect_window: expected two durations [earliest, latest] like [1s, 30s], "
        "got a list of 1 item"
    ]
    assert errors_of(MINIMAL + "rollback: {enabled: 'yes'}\n") == [
        "rollback.enabled: expected true or false, got 'yes'"
    ]
    with pytest.raises(ConfigError, match=r"\(top level\): expected a mapping"):
        parse_config(["listen"])


def test_null_sections_and_nullable_keys() -> None:
    cfg = parse_yaml(
        MINIMAL
        + "health_check:\nadmin: {token_env: null}\n"
        + "routing: {response_header: null, override_token_env: QA_TOKEN}\n"
    )
    assert cfg.health_check == HealthCheckConfig()
    assert cfg.admin.token_env is None
    assert cfg.routing.response_header is None
    assert cfg.routing.override_token_env == "QA_TOKEN"


def test_values_are_converted() -> None:
    cfg = parse_yaml(
        MINIMAL
        + """
listen: "[::1]:0"
admin: {listen: "localhost:19901"}
timeouts: {connect: 250ms, idle: 2}
websocket: {reconnect_window: [0, 1m]}
gates:
  smoke: [{path: /health, expect_body: OK}]
  warmup: {requests: 50}
"""
    )
    assert cfg.listen == HostPort("::1", 0)
    assert str(cfg.listen) == "[::1]:0"
    assert str(cfg.admin.listen) == "localhost:19901"
    assert cfg.timeouts.connect == 0.25
    assert cfg.timeouts.idle == 2.0
    assert cfg.websocket.reconnect_window == (0.0, 60.0)
    assert cfg.gates.smoke[0].path == "/health"
    assert cfg.gates.smoke[0].expect_status == 200
    assert cfg.gates.smoke[0].expect_body == "OK"
    assert cfg.gates.warmup.requests == 50
    assert cfg.gates.warmup.concurrency == 4


def test_sizes_in_limits() -> None:
    cfg = parse_yaml(
        MINIMAL + "limits: {max_header_bytes: 16KiB, max_body_bytes: 10MiB, "
        "admin_max_body_bytes: 512B, max_connections: 500}\n"
    )
    assert cfg.limits.max_header_bytes == 16384
    assert cfg.limits.max_body_bytes == 10 * 1024 * 1024
    assert cfg.limits.admin_max_body_bytes == 512
    assert cfg.limits.max_connections == 500
    assert errors_of(MINIMAL + "limits: {max_body_bytes: 0, max_headers: 10KiB}\n") == [
        "limits.max_headers: expected a whole number, got '10KiB'",
        "limits.max_body_bytes: must be at least 1",
    ]


def test_trusted_proxies() -> None:
    cfg = parse_yaml(MINIMAL + 'trusted_proxies: ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]\n')
    assert cfg.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert ipaddress.ip_address("10.20.30.40") in cfg.trusted_proxies[0]
    errors = errors_of(MINIMAL + 'trusted_proxies: ["10.0.0.0/8", "::1", "proxy.local", 7]\n')
    assert [e.split(": ")[0] for e in errors] == ["trusted_proxies[2]", "trusted_proxies[3]"]
    assert all("not an IP network" in e for e in errors)
    assert errors_of(MINIMAL + "trusted_proxies: 10.0.0.0/8\n") == [
        "trusted_proxies: expected a list, got '10.0.0.0/8'"
    ]


def test_admin_listener_may_not_take_the_public_port() -> None:
    assert errors_of(MINIMAL + 'listen: "0.0.0.0:9000"\nadmin: {listen: "127.0.0.1:9000"}\n') == [
        "admin.listen: 127.0.0.1:9000 collides with listen (0.0.0.0:9000)"
    ]
    # Port 0 means "any free port" for both: never a collision.
    cfg = parse_yaml(MINIMAL + 'listen: "127.0.0.1:0"\nadmin: {listen: "127.0.0.1:0"}\n')
    assert cfg.listen.port == cfg.admin.listen.port == 0


# --- building in code holds the same invariants --------------------------------------------


def test_dataclasses_enforce_invariants() -> None:
    with pytest.raises(ConfigError) as info:
        HealthCheckConfig(interval=0, healthy_threshold=0)
    assert info.value.errors == [
        "interval: must be greater than 0",
        "healthy_threshold: must be at least 1",
    ]
    with pytest.raises(ConfigError, match="earliest must not exceed latest"):
        WebSocketConfig(reconnect_window=(5.0, 1.0))
    with pytest.raises(ValueError, match="port out of range"):
        HostPort("127.0.0.1", 70000)
    with pytest.raises(ValueError, match="normalized form 'http://app:80'"):
        TargetConfig(url="http://app", host="app", port=80)
    target = parse_target("http://app:9000")
    with pytest.raises(ConfigError, match=r"targets\[1\]: duplicate of targets\[0\]"):
        PoolConfig(targets=(target, target))
    pool = PoolConfig(targets=(target,))
    assert Config(upstreams=UpstreamsConfig(blue=pool, green=pool)).listen.port == 8080


# --- files -----------------------------------------------------------------------------------


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    cfg = load_config(str(write(tmp_path, MINIMAL + "routing: {active: green}\n")))
    assert cfg.routing.active == "green"


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.errors == [f"{missing}: file not found"]
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 0.0.0.0:8080\nadmin: [oops\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (error,) = info.value.errors
    assert error.startswith(f"{path}:3:1: invalid YAML: ")


def test_duplicate_yaml_keys_are_errors(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "listen: 0.0.0.0:80\nlisten: 0.0.0.0:81\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.errors == [f"{path}:6:1: invalid YAML: found duplicate key 'listen'"]


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    text = "upstreams:\n  blue: &pool {targets: ['http://a:1']}\n  green: {<<: *pool}\n"
    cfg = load_config(write(tmp_path, text))
    assert cfg.upstreams.green == cfg.upstreams.blue


def test_empty_file_needs_upstreams(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "# nothing yet\n"))
    assert [e.split(":")[0] for e in info.value.errors] == ["upstreams"]
