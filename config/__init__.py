"""bgproxy configuration: YAML schema, loading and validation (the bottom layer).

Imports nothing else of bgproxy. ``load_config``/``parse_config`` raise one
ConfigError listing every problem as "dotted.key.path: message".
"""

from .load import (
    load_config,
    parse_config,
    parse_duration,
    parse_host_port,
    parse_network,
    parse_size,
    parse_target,
)
from .schema import (
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
    UpstreamsConfig,
    WarmupConfig,
    WebSocketConfig,
)

__all__ = [
    "AdminConfig",
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
