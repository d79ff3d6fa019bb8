"""bgproxy configuration: YAML schema, loading and validation (the bottom layer).

Imports nothing else of bgproxy. ``load_config``/``parse_config`` raise one
ConfigError listing every problem as "dotted.key.path: message".
"""

from .fields import (
    parse_duration,
    parse_host_port,
    parse_network,
    parse_size,
    parse_target,
)
from .load import load_config, parse_config
from .schema import (
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
)
from .tls import AcmeConfig, CertificateConfig, TlsConfig
from .values import HostPort, TargetConfig

__all__ = [
    "AcmeConfig",
    "AdminConfig",
    "CertificateConfig",
    "Config",
    "ConfigError",
    "DrainConfig",
    "GatesConfig",
    "HealthCheckConfig",
    "HookConfig",
    "HostPort",
    "LimitsConfig",
    "PoolConfig",
    "RollbackConfig",
    "RolloutConfig",
    "RoutingConfig",
    "ServiceConfig",
    "SmokeProbe",
    "StateConfig",
    "TargetConfig",
    "TimeoutsConfig",
    "TlsConfig",
    "UpstreamTlsConfig",
    "UpstreamsConfig",
    "WarmupConfig",
    "WebSocketConfig",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_host_port",
    "parse_network",
    "parse_size",
    "parse_target",
]
