"""What the admin API acts on: a ``ServiceControl`` per service and the ``ControlPlane``
that holds them.

A ``ServiceControl`` holds one service's data-plane state, its store, gates, rollback
watch and rollout driver, and its one write path, ``apply``: a compare-and-set of the
state a pure transition from ``proxy.state`` built, which the admin API's endpoints, the
rollback controller and the rollout driver all go through. The HTTP side is
``admin/api.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from admin.fleet import Fleet, Identity, default_fleet
from admin.view import ProxyView
from config.tls import CertProblem, inspect_pair
from proxy import _hotpath
from proxy.service import Service
from proxy.state import (
    Color,
    Event,
    GenerationMismatch,
    RoutingState,
    StateStore,
    StoreUnavailable,
    describe,
    rfc3339,
)

if TYPE_CHECKING:
    from admin.gates import Gates
    from admin.hooks import Hooks
    from proxy.observability import Observer

log = logging.getLogger("bgproxy.admin")


class ApiError(Exception):
    """What an admin endpoint answers instead of a result: an HTTP status, a stable
    ``code`` and a human ``detail`` (``admin.api`` turns it into the JSON error)."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


class Watch(Protocol):
    """The rollback watch as the API and metrics read it (``admin.rollback``'s controller,
    which itself acts through ``ServiceControl.apply``: this keeps the two modules from
    importing each other)."""

    auto_rollbacks: int

    def status(self) -> dict[str, Any]: ...


class Driver(Protocol):
    """The rollout driver as the API and metrics read it (``admin.rollout``)."""

    auto_aborts: int

    def status(self) -> dict[str, Any]: ...


class ServiceControl:
    """What the admin API acts on for one service: its data-plane state, its store, its
    gates and rollback watch."""

    def __init__(self, service: Service, identity: Identity) -> None:
        self.service = service
        self.name = service.name
        self.store: StateStore = service.store
        # Set by the runner once started; None (tests, early start) means "not running".
        self.gates: Gates | None = None
        self.rollback: Watch | None = None
        self.rollout: Driver | None = None
        self.hooks: Hooks | None = None
        self.switches: Counter[str] = Counter()  # accepted changes by trigger, for metrics
        self.identity = identity
        # Who else serves this state (Redis fleet, workers); replaced by a supervisor.
        self.fleet: Fleet = default_fleet(self.store, lambda: [self.instance()])
        self.propagation_timeout = 3.0  # how long a write waits for every instance to apply it

    async def check_gates(
        self, colors: Iterable[Color], action: str = "switch", reason: str | None = None
    ) -> None:
        """Run the pre-switch gates, then the ``pre_switch`` hooks, for each color about to
        get traffic; GateFailed if not."""
        for color in colors:
            if self.gates is not None:
                await self.gates.check(color)
            if self.hooks is not None:
                await self.hooks.check(color.value, action, reason)

    def rollout_status(self) -> dict[str, Any]:
        if self.rollout is not None:
            return self.rollout.status()
        return {"state": "idle", "color": None, "steps": [], "step": None, "weight": None,
                "started_at": None, "next_at": None, "last": None}  # fmt: skip

    def rollback_status(self) -> dict[str, Any]:
        if self.rollback is not None:
            return self.rollback.status()
        return {"state": "idle", "color": None, "until": None, "last": None}

    def summary(self) -> dict[str, Any]:
        """This service's entry in ``GET /services``."""
        state = self.store.snapshot()
        service = self.service
        return {
            "name": self.name,
            "hosts": list(service.config.hosts),
            "paths": list(service.config.paths),
            "active": state.active.value,
            "weights": state.weights.as_dict(),
            "generation": state.generation,
            "healthy": {c.value: p.healthy for c, p in service.pools.items()},
            "traffic": service.traffic.status(service.loop.time()),
            "drain": service.drain.drain.to_dict(),
            "rollback": self.rollback_status(),
            "rollout": self.rollout_status(),
        }

    def status(self) -> dict[str, Any]:
        state = self.store.snapshot()
        service = self.service
        return {
            "service": self.name,
            "active": state.active.value,
            "weights": state.weights.as_dict(),
            "generation": state.generation,
            "previous": state.previous.value if state.previous else None,
            "changed_at": rfc3339(state.changed_at),
            "colors": service.colors_status(),
            "drain": service.drain.drain.to_dict(),
            "rollback": self.rollback_status(),
            "rollout": self.rollout_status(),
            "traffic": service.traffic.status(service.loop.time()),
            "instances": self.fleet.instances(),
            "store": self.fleet.store_status(),
            "hot_path": _hotpath.KIND,
        }

    async def settled_status(self, new: RoutingState | None) -> dict[str, Any]:
        """The status after a write, once every live instance has applied it or the bounded
        wait ran out (``lagging`` names those that had not)."""
        lagging: list[str] = []
        if new is not None:
            lagging = await self.fleet.wait_applied(new.generation, self.propagation_timeout)
        return {**self.status(), "lagging": lagging}

    def instance(self) -> dict[str, Any]:
        service = self.service
        return {
            **self.identity.record(),
            "generation": self.store.snapshot().generation,
            "in_flight": {c.value: n for c, n in service.in_flight.items()},
            "websockets": {c.value: n for c, n in service.websockets.items()},
            "last_seen": rfc3339(time.time()),
        }

    async def apply(
        self,
        build: Callable[[RoutingState], RoutingState | None],
        action: str,
        reason: str | None,
        actor: str,
        trigger: str = "manual",
        expected_generation: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> RoutingState | None:
        """Build the next state from the current one and compare-and-set it.

        Returns None for a no-op. Raises ``StateError`` subclasses on refusal.
        """
        if not self.store.available:
            raise StoreUnavailable(self.fleet.unavailable_detail())
        current = self.store.snapshot()
        if expected_generation is not None and expected_generation != current.generation:
            raise GenerationMismatch(
                f"state is at generation {current.generation}, not {expected_generation}"
            )
        new = build(current)
        if new is None:
            return None
        new = dataclasses.replace(new, reason=reason or action)
        details = {"service": self.name, **(details or {})}
        if current.rollout is not None and current.rollout.running and new.rollout is not None:
            if new.rollout.state == "cancelled":  # an operator's change took the wheel
                details["rollout_cancelled"] = True
                details["rollout"] = "cancelled"
        event = Event(
            at=new.changed_at,
            generation=new.generation,
            action=action,
            from_=describe(current),
            to=describe(new),
            trigger=trigger,
            reason=reason,
            actor=actor,
            details=details,
        )
        applied = await self.store.compare_and_set(current.generation, new, event)
        self.switches[trigger] += 1
        if details.get("rollout_cancelled"):
            log.info("%s: %s cancelled the rollout", self.name, action)
        if self.hooks is not None:
            self.hooks.notify(event)  # queued: delivery never holds up the change
        return applied


class ControlPlane:
    """What the admin API acts on: every service's control, the token and readiness;
    ``view`` is the process they run in (the server, or a supervisor's runtime)."""

    def __init__(self, view: ProxyView, token: str | None) -> None:
        self.view = view
        self.token = token
        self.ready = False
        self.acme: Any = None  # proxy.acme.AcmeManager while tls.acme runs here
        self.identity = Identity.for_process()
        # The access log and tracing (set by the runner); lines dropped by the workers'
        # logs, summed from their reports (--workers).
        self.observer: Observer | None = None
        self.workers_log_dropped = 0
        self.services: dict[str, ServiceControl] = {}
        # With --workers, the supervisor's sum of its workers' TLS handshakes.
        self.tls_handshakes: dict[str, int] | None = None
        self.sync_services()

    def sync_services(self) -> list[ServiceControl]:
        """Follow the data plane's services (start, reload): a kept service keeps its
        control; returns the controls that are new (the runner starts their watch)."""
        added = []
        current: dict[str, ServiceControl] = {}
        for name, service in self.view.services.items():
            control = self.services.get(name)
            if control is None or control.service is not service:
                control = ServiceControl(service, self.identity)
                added.append(control)
            current[name] = control
        self.services = current
        return added

    def resolve(self, name: str | None) -> ServiceControl:
        """The service an endpoint acts on: the named one, else the only one, else
        ``default_service``; ApiError otherwise."""
        if name is not None:
            control = self.services.get(name)
            if control is None:
                raise ApiError(404, "unknown_service", f"no service named {name!r}")
            return control
        if len(self.services) == 1:
            return next(iter(self.services.values()))
        default = self.view.config.default_service
        if default is not None and default in self.services:
            return self.services[default]
        raise ApiError(
            400,
            "service_required",
            "several services and no default_service: name one with /services/{name}/... "
            f"(services: {', '.join(self.services)})",
        )

    def tls_status(self) -> dict[str, Any] | None:
        """``/status`` ``tls``: the certificates served, and this process's handshakes.
        A supervisor (``--workers``) serves none itself: it reads the files."""
        edge = self.view.edge
        if edge is not None:
            status: dict[str, Any] = edge.status()
            return status
        tls = self.view.config.tls
        if tls.listen is None:
            return None
        certificates = []
        for cfg in tls.certificates:
            try:
                info = inspect_pair(cfg)
            except CertProblem:
                continue
            certificates.append(
                {"names": list(info.names), "not_after": info.not_after.isoformat(),
                 "source": "file", "file": cfg.cert}
            )  # fmt: skip
        handshakes = None
        if self.tls_handshakes is not None:
            handshakes = {r: self.tls_handshakes.get(r, 0) for r in ("ok", "failed", "timeout")}
        return {"listen": str(tls.listen), "certificates": certificates, "handshakes": handshakes}

    @property
    def only(self) -> ServiceControl:
        """The single-service form's one service (tests, workers)."""
        return next(iter(self.services.values()))


# -- middlewares --------------------------------------------------------------------------
