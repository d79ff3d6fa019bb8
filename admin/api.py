"""The admin API: JSON over aiohttp on the admin listener.

Every write goes through the ``StateStore`` as a compare-and-set built by a pure
transition from ``proxy.state``; the same path the rollback controller uses.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from admin.dashboard import DASHBOARD_PATHS, add_dashboard
from admin.fleet import Fleet, Identity, default_fleet
from admin.gates import GateFailed
from config.tls import CertProblem, inspect_pair
from proxy import _hotpath
from proxy.server import ProxyServer
from proxy.service import Service
from proxy.state import (
    Color,
    Event,
    GenerationMismatch,
    InvalidWeights,
    RoutingState,
    StateError,
    StateStore,
    StoreUnavailable,
    describe,
    rfc3339,
    roll_back,
    set_weights,
    switch_to,
)

if TYPE_CHECKING:
    from admin.gates import Gates
    from admin.hooks import Hooks
    from proxy.observability import Observer

log = logging.getLogger("bgproxy.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# The dashboard's static files carry no state (a browser cannot send a bearer header on
# navigation); the API calls the page then makes are authenticated as usual.
NO_AUTH_PATHS = OPEN_PATHS | DASHBOARD_PATHS


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


def error_json(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


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
    """What the admin API acts on: every service's control, the token and readiness."""

    def __init__(self, server: ProxyServer, token: str | None) -> None:
        self.server = server
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
        for name, service in self.server.services.items():
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
        default = self.server.config.default_service
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
        edge = self.server.edge
        if edge is not None:
            status: dict[str, Any] = edge.status()
            return status
        tls = self.server.config.tls
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


_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _origin_middleware(cp: ControlPlane) -> Any:
    """DNS rebinding and CSRF: a loopback admin answers only loopback Host names, and a
    mutation from a browser must come from the admin's own origin."""
    loopback = _is_loopback_host(cp.server.config.admin.listen.host)

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        if loopback and request.path not in OPEN_PATHS:
            name = _host_name(host).lower()
            if name not in _LOOPBACK_NAMES and not _is_loopback_ip(name):
                return error_json(403, "forbidden_host", "Host is not this admin listener")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("Origin")
            if origin is not None and origin.partition("://")[2].rstrip("/") != host:
                return error_json(403, "forbidden_origin", "cross-origin request refused")
            if request.headers.get("Sec-Fetch-Site") == "cross-site":
                return error_json(403, "forbidden_origin", "cross-site request refused")
        return await handler(request)

    return check


def _is_loopback_ip(name: str) -> bool:
    """An IP literal in the loopback range; never a DNS name that merely starts like one."""
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_loopback_host(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _auth_middleware(cp: ControlPlane) -> Any:
    expected = cp.token.encode() if cp.token else None

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and request.path not in NO_AUTH_PATHS:
            header = request.headers.get("Authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), expected
            ):
                return error_json(401, "unauthorized", "a valid bearer token is required")
        return await handler(request)

    return auth


@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_json(exc.status, exc.code, exc.detail)
    except GateFailed as exc:
        return web.json_response(exc.to_dict(), status=409)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "error")
        detail = exc.reason
        if exc.status == 413:
            detail = "request body too large"
        resp = error_json(exc.status, code, detail)
        if exc.status == 405 and "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp


# -- handlers -----------------------------------------------------------------------------


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "bad_json", "request body is not valid JSON") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "request body must be a JSON object")
    return data


def _opt_str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 1000:
        raise ApiError(400, "bad_request", f"'{key}' must be a string (at most 1000 chars)")
    return value


def _opt_int(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, "bad_request", f"'{key}' must be an integer")
    return value


def _opt_force(data: dict[str, Any]) -> bool:
    force = data.get("force", False)
    if not isinstance(force, bool):
        raise ApiError(400, "bad_request", "'force' must be a boolean")
    return force


def _state_error(exc: StateError) -> ApiError:
    status = (
        503
        if isinstance(exc, StoreUnavailable)
        else 400
        if isinstance(exc, InvalidWeights)
        else 409
    )
    return ApiError(status, exc.code, str(exc))


class _DropBadRequestLogs(logging.Filter):
    """aiohttp logs every malformed request with a traceback that quotes the offending
    header line (tokens, cookies included): drop those; they are the client's fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


def _quiet_bad_request_logs() -> None:
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _DropBadRequestLogs) for f in logger.filters):
        logger.addFilter(_DropBadRequestLogs())


def build_admin_app(cp: ControlPlane, max_body: int = 64 * 1024) -> web.Application:
    _quiet_bad_request_logs()
    app = web.Application(
        client_max_size=max_body,
        middlewares=[_errors_middleware, _origin_middleware(cp), _auth_middleware(cp)],
    )
    actor = "admin"

    def scoped(request: web.Request) -> ServiceControl:
        return cp.resolve(request.match_info.get("name"))

    async def status(request: web.Request) -> web.Response:
        control = scoped(request)
        await control.fleet.refresh()  # other instances' records as they are now (bounded)
        body = {**control.status(), "tls": cp.tls_status()}
        if cp.acme is not None and body["tls"] is not None:
            body["tls"]["acme"] = cp.acme.status()
        return web.json_response(body)

    async def services(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "services": [c.summary() for c in cp.services.values()],
                "default_service": cp.server.config.default_service,
            }
        )

    async def commit(
        control: ServiceControl,
        data: dict[str, Any],
        action: str,
        build: Callable[[RoutingState], RoutingState | None],
        force: bool = False,
    ) -> web.Response:
        """One write: compare-and-set through the service's control, answered once settled."""
        try:
            new = await control.apply(
                build,
                action,
                _opt_str(data, "reason"),
                actor,
                expected_generation=_opt_int(data, "expected_generation"),
                details={"force": True} if force else None,
            )
        except StateError as exc:
            raise _state_error(exc) from exc
        return web.json_response(await control.settled_status(new))

    async def switch(request: web.Request) -> web.Response:
        control = scoped(request)
        data = await _json_body(request)
        color = Color.parse(data.get("color"))
        if color is None:
            raise ApiError(400, "bad_color", '\'color\' must be "blue" or "green"')
        force = _opt_force(data)
        if not force and switch_to(control.store.snapshot(), color, 0.0) is not None:
            # A no-op switch runs none.
            await control.check_gates([color], "switch", _opt_str(data, "reason"))
        build = lambda s: switch_to(s, color, time.time())  # noqa: E731
        return await commit(control, data, "switch", build, force)

    async def weights(request: web.Request) -> web.Response:
        control = scoped(request)
        data = await _json_body(request)
        blue, green = data.get("blue"), data.get("green")
        for key, value in (("blue", blue), ("green", green)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ApiError(400, "bad_weights", f"'{key}' must be an integer >= 0")
        assert isinstance(blue, int) and isinstance(green, int)
        if blue == 0 and green == 0:
            raise ApiError(400, "bad_weights", "weights must not both be 0")
        force = _opt_force(data)
        if not force:
            # Gates only for a color this change gives traffic it did not have.
            had = control.store.snapshot().weights
            asked = ((Color.BLUE, blue), (Color.GREEN, green))
            gaining = [c for c, w in asked if w and not had.of(c)]
            await control.check_gates(gaining, "weights", _opt_str(data, "reason"))
        build = lambda s: set_weights(s, blue, green, time.time())  # noqa: E731
        return await commit(control, data, "weights", build, force)

    async def rollback(request: web.Request) -> web.Response:
        control = scoped(request)
        data = await _json_body(request)
        return await commit(control, data, "rollback", lambda s: roll_back(s, time.time()))

    async def events(request: web.Request) -> web.Response:
        raw = request.query.get("limit", "50")
        try:
            limit = int(raw)
        except ValueError:
            raise ApiError(400, "bad_limit", "'limit' must be an integer") from None
        if limit < 1 or limit > 1000:
            raise ApiError(400, "bad_limit", "'limit' must be between 1 and 1000")
        name = request.match_info.get("name")
        # Unscoped: every service's events, newest first.
        controls = [cp.resolve(name)] if name is not None else list(cp.services.values())
        items: list[Event] = []
        try:
            for control in controls:
                items += await control.store.events(limit)
        except StateError as exc:
            raise _state_error(exc) from exc
        items.sort(key=lambda e: e.at, reverse=True)
        return web.json_response({"events": [e.to_dict() for e in items[:limit]]})

    async def history(request: web.Request) -> web.Response:
        control = scoped(request)
        return web.json_response(control.service.traffic.history_dict())

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        if cp.ready and not cp.server.stopping:
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "not ready"}, status=503)

    app.router.add_get("/services", services)
    for prefix in ("", "/services/{name}"):
        app.router.add_get(f"{prefix}/status", status)
        app.router.add_post(f"{prefix}/switch", switch)
        app.router.add_post(f"{prefix}/weights", weights)
        app.router.add_post(f"{prefix}/rollback", rollback)
        app.router.add_get(f"{prefix}/events", events)
        app.router.add_get(f"{prefix}/history", history)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    add_dashboard(app)
    return app
