"""The rollout endpoints of the admin API, unscoped and under ``/services/{name}``.

``POST .../rollout`` starts one (gates and ``pre_switch`` hooks first, unless ``force``);
``.../rollout/pause``, ``resume``, ``promote`` and ``abort`` control the running one.
Each is one compare-and-set through ``ServiceControl.apply`` with a pure transition of
``proxy.state``, answered with the status once settled, like ``/switch``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from admin.api import (
    _json_body,
    _opt_force,
    _opt_int,
    _opt_str,
    _state_error,
)
from admin.control import ApiError, ControlPlane, ServiceControl
from config import parse_duration
from proxy.state import (
    Color,
    RoutingState,
    StateError,
    abort_rollout,
    pause_rollout,
    promote_rollout,
    resume_rollout,
    start_rollout,
    steps_problem,
)


def _steps(data: dict[str, Any], default: tuple[int, ...]) -> tuple[int, ...]:
    raw = data.get("steps")
    if raw is None:
        return default
    if not isinstance(raw, list) or any(isinstance(w, bool) or not isinstance(w, int) for w in raw):
        raise ApiError(400, "bad_rollout", "'steps' must be a list of integer weights")
    steps = tuple(raw)
    problem = steps_problem(steps)
    if problem is not None:
        raise ApiError(400, "bad_rollout", f"'steps': {problem}")
    return steps


def _interval(data: dict[str, Any], default: float) -> float:
    raw = data.get("step_interval")
    if raw is None:
        return default
    try:
        value = parse_duration(raw)
    except ValueError as exc:
        raise ApiError(400, "bad_rollout", f"'step_interval': {exc}") from None
    if value <= 0:
        raise ApiError(400, "bad_rollout", "'step_interval' must be greater than 0")
    return value


def add_rollout_routes(app: web.Application, cp: ControlPlane, actor: str = "admin") -> None:
    async def commit(
        control: ServiceControl,
        data: dict[str, Any],
        build: Callable[[RoutingState], RoutingState | None],
        action: str,
        reason: str | None,
        details: dict[str, Any] | None = None,
    ) -> web.Response:
        expected = _opt_int(data, "expected_generation")  # the dashboard guards with it
        try:
            new = await control.apply(
                build, action, reason, actor, expected_generation=expected, details=details
            )
        except StateError as exc:
            raise _state_error(exc) from exc
        return web.json_response(await control.settled_status(new))

    async def start(request: web.Request) -> web.Response:
        control = cp.resolve(request.match_info.get("name"))
        data = await _json_body(request)
        color = Color.parse(data.get("color"))
        if color is None:
            raise ApiError(400, "bad_color", '\'color\' must be "blue" or "green"')
        cfg = control.service.config.rollout
        steps = _steps(data, cfg.steps)
        interval = _interval(data, cfg.step_interval)
        reason = _opt_str(data, "reason")
        force = _opt_force(data)
        current = control.store.snapshot()
        now = time.time()
        try:  # refused before the gates run: a second rollout, the color already live
            start_rollout(current, color, steps, interval, cfg.auto_promote, now)
        except StateError as exc:
            raise _state_error(exc) from exc
        if not force:
            await control.check_gates([color], "rollout", reason)
        first = start_rollout(current, color, steps, interval, cfg.auto_promote, now)
        assert first.rollout is not None
        details: dict[str, Any] = {
            "step": first.rollout.step + 1,
            "steps": list(steps),
            "weight": first.rollout.weight,
            "rollout": "started",
            "step_interval": interval,
        }
        if force:
            details["force"] = True
        action = "promote" if first.rollout.state == "promoted" else "rollout_step"
        build = lambda s: start_rollout(  # noqa: E731
            s, color, steps, interval, cfg.auto_promote, time.time()
        )
        reason = reason or f"rollout of {color.value}"
        return await commit(control, data, build, action, reason, details)

    def control_action(
        action: str, transition: Callable[[RoutingState, float], RoutingState | None]
    ) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            control = cp.resolve(request.match_info.get("name"))
            data = await _json_body(request)
            reason = _opt_str(data, "reason")
            build = lambda s: transition(s, time.time())  # noqa: E731
            return await commit(control, data, build, action, reason)

        return handler

    controls = {
        "pause": control_action("rollout_pause", pause_rollout),
        "resume": control_action("rollout_resume", resume_rollout),
        "promote": control_action("promote", promote_rollout),
        "abort": control_action("abort", abort_rollout),
    }
    for prefix in ("", "/services/{name}"):
        app.router.add_post(f"{prefix}/rollout", start)
        for verb, handler in controls.items():
            app.router.add_post(f"{prefix}/rollout/{verb}", handler)
