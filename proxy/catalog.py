"""The services a config names, built and rebuilt without a data plane.

``build_services`` is what a start and a reload do to the services: a kept service is
reconfigured in place (its routing state, counters, drain and connections stay), a new
one is built on its store, a removed one is dropped (its requests in flight finish on
the objects they hold). The serving process (``ProxyServer``) and a ``--workers``
supervisor, which serves nothing, both build their services here, each on its own
``Runtime`` (proxy/interfaces.py); ``service_table`` is the host/path table only the
serving process routes with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from config import Config
from proxy.hosts import ServiceTable
from proxy.service import Service
from proxy.settings import build_settings
from proxy.state import StateStore

if TYPE_CHECKING:
    from proxy.interfaces import Runtime


def build_services(
    runtime: Runtime,
    current: dict[str, Service],
    config: Config,
    stores: dict[str, StateStore] | None = None,
) -> tuple[dict[str, Service], set[str]]:
    """The services of ``config``, in its order, and the target URLs that the services
    no longer have (removed services' and dropped targets'; a URL another service still
    has is among them: the caller knows which it still uses). A service not in
    ``current`` needs its store in ``stores``."""
    stores = stores or {}
    gone: set[str] = set()
    services: dict[str, Service] = {}
    for svc_config in config.services:
        settings = build_settings(config, svc_config)
        svc = current.get(svc_config.name)
        if svc is None:
            svc = Service(runtime, svc_config, settings, stores[svc_config.name])
        else:
            gone |= svc.apply_config(svc_config, settings)
        services[svc.name] = svc
    for name, svc in current.items():
        if name not in services:
            gone |= svc.urls()
    return services, gone


def service_table(config: Config, services: dict[str, Service]) -> ServiceTable:
    """What the request path matches a request's host and path against."""
    default = services[config.default_service] if config.default_service else None
    return ServiceTable(
        ((svc, svc.config.hosts, svc.config.paths) for svc in services.values()), default
    )
