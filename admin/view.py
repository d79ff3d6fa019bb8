"""What the admin side reads of the process it runs in.

``ProxyView`` is all the control plane, the admin API, metrics, the dashboard and the
runner use of the process: its config and services (each with its store, pools,
counters and drain), whether it is stopping, its edge (TLS) and its observer.
``ProxyServer`` (proxy/server.py) implements it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from config import Config
from proxy.service import Service
from proxy.state import StateStore

if TYPE_CHECKING:
    from proxy.edge import Edge
    from proxy.observability import Observer


class ProxyView(Protocol):
    """The process as the admin side sees it."""

    @property
    def config(self) -> Config: ...

    @property
    def services(self) -> dict[str, Service]: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def edge(self) -> Edge | None:
        """The TLS / PROXY protocol listeners this process serves, if any."""

    @property
    def observer(self) -> Observer | None:
        """The data plane's access log and tracing; None while all are off."""

    def apply_config(self, config: Config, stores: dict[str, StateStore] | None = None) -> None:
        """A reload: kept services keep their state and counters; a new one needs its
        store in ``stores``."""

    async def close(self) -> None:
        """Stop everything now (the process is ending)."""
