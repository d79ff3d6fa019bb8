"""The admin API: JSON over aiohttp on the admin listener.

Every write goes through the ``StateStore`` as a compare-and-set built by a pure
transition from ``proxy.state`` (``ServiceControl.apply``, admin/control.py); the same
path the rollback controller uses.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from admin.control import ApiError, ControlPlane, ServiceControl
from admin.dashboard import DASHBOARD_PATHS, add_dashboard
from admin.gates import GateFailed
from proxy.state import (
    Color,
    Event,
    InvalidWeights,
    RoutingState,
    StateError,
    StoreUnavailable,
    roll_back,
    set_weights,
    switch_to,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# The dashboard's static files carry no state (a browser cannot send a bearer header on
# navigation); the API calls the page then makes are authenticated as usual.
NO_AUTH_PATHS = OPEN_PATHS | DASHBOARD_PATHS


def error_json(status: int, code: str, detail: str) -> web.Response:
    return web.json_response({"error": code, "detail": detail}, status=status)


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


# -- middlewares --------------------------------------------------------------------------


_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _origin_middleware(cp: ControlPlane) -> Any:
    """DNS rebinding and CSRF: a loopback admin answers only loopback Host names, and a
    mutation from a browser must come from the admin's own origin."""
    loopback = _is_loopback_host(cp.view.config.admin.listen.host)

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
                "default_service": cp.view.config.default_service,
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
        if cp.ready and not cp.view.stopping:
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
