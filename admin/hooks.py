"""HTTP hooks: the team's own systems told of (and asked about) changes.

Two kinds, by the ``on`` list of each ``hooks`` entry:

* ``pre_switch`` hooks are gates. Before a switch, a weights change that gives a color
  traffic, or the start of a rollout, each is POSTed ``{"service", "color", "action",
  "reason"}``; a non-2xx answer, a timeout or a connection error refuses the change with
  ``GateFailed`` (gate ``hook:<name>``), as a failing health gate does. They run once per
  change, never at each rollout step.
* Every other name (``switch``, ``weights``, ``rollback``, ``rollout_step``, ``promote``,
  ``abort``) is a notification, POSTed the event's JSON after the change was committed.
  ``notify`` only queues: one task per service delivers in order, each call bounded by
  the hook's timeout, so a hook that hangs or is down delays later notifications by at
  most that, and never a change. Only the instance that committed a change notifies, so
  a fleet sends each event once.

Every call is counted by hook name and result (``bgproxy_hook_calls_total``); failures
are logged. ``format: slack`` sends ``{"text": ...}``, which Slack, Mattermost and
Rocket.Chat incoming webhooks take.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from types import TracebackType
from typing import Any

import aiohttp

from admin.gates import GateFailed
from config import HookConfig
from proxy.state import Event
from proxy.tasks import cancel_and_wait

log = logging.getLogger("bgproxy.hooks")

MAX_QUEUED = 1000  # notifications waiting for delivery; beyond it they are dropped, counted


def slack_text(event: dict[str, Any]) -> str:
    """One chat line for an event."""
    service = event.get("service") or "default"
    text = f"bgproxy {service}: {event.get('action')} {event.get('from')} → {event.get('to')}"
    text += f" ({event.get('trigger')}, by {event.get('actor')})"
    if event.get("reason"):
        text += f": {event['reason']}"
    return text


class Hooks:
    """One service's hooks; an async context manager owning the HTTP session and the
    delivery task. ``configured`` is read at each call, so a reload applies at once."""

    def __init__(self, name: str, configured: Callable[[], tuple[HookConfig, ...]]) -> None:
        self.service = name
        self.configured = configured
        self.calls: Counter[tuple[str, str]] = Counter()  # (hook name, result)
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_QUEUED)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Hooks:
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": "bgproxy-hook"},
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
        )
        self._task = asyncio.get_running_loop().create_task(
            self._deliver(), name=f"{self.service}:hooks"
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await cancel_and_wait(self._task)
        if self._session is not None:
            await self._session.close()

    # -- gates --------------------------------------------------------------------------------

    async def check(self, color: str, action: str, reason: str | None) -> list[str]:
        """Every ``pre_switch`` hook, in order; GateFailed at the first refusal."""
        ran = []
        body = {"service": self.service, "color": color, "action": action, "reason": reason}
        for hook in self.configured():
            if "pre_switch" not in hook.on:
                continue
            result, status = await self._post(hook, body)
            if result != "ok":
                seen = f"answered {status}" if status is not None else _SAID[result]
                raise GateFailed(
                    f"hook:{hook.name}",
                    f"pre_switch hook {hook.name} {seen}",
                    color=color,
                    hook=hook.name,
                    result=result,
                    status=status,
                )
            ran.append(f"hook:{hook.name}")
        return ran

    # -- notifications ------------------------------------------------------------------------

    def notify(self, event: Event) -> None:
        """Queue ``event`` for the hooks that want its action (never blocks)."""
        wanted = [h for h in self.configured() if event.action in h.on]
        if not wanted:
            return
        body = event.to_dict()
        try:
            self._queue.put_nowait(body)
        except asyncio.QueueFull:
            for hook in wanted:
                self.calls[hook.name, "dropped"] += 1
            log.warning("hook queue full: %s event of %s not delivered", event.action, self.service)

    async def _deliver(self) -> None:
        while True:
            body = await self._queue.get()
            for hook in self.configured():
                if body.get("action") not in hook.on:
                    continue
                payload = {"text": slack_text(body)} if hook.format == "slack" else body
                try:
                    await self._post(hook, payload)
                except Exception:  # never let one odd failure stop later notifications
                    self.calls[hook.name, "error"] += 1
                    log.exception("hook %s for %s failed", hook.name, self.service)

    async def _post(self, hook: HookConfig, body: dict[str, Any]) -> tuple[str, int | None]:
        """POST ``body``; the result (ok, error, timeout, unreachable) and the status."""
        assert self._session is not None, "Hooks used outside its async with"
        status = None
        try:
            async with asyncio.timeout(hook.timeout):
                async with self._session.post(hook.url, json=body, allow_redirects=False) as resp:
                    status = resp.status
                    await resp.read()
            result = "ok" if 200 <= status < 300 else "error"
        except TimeoutError:
            result = "timeout"
        except aiohttp.ClientError:
            result = "unreachable"
        self.calls[hook.name, result] += 1
        if result != "ok":
            what = f"status {status}" if status is not None else _SAID[result]
            action = body.get("action")
            log.warning("hook %s (%s) for %s: %s", hook.name, action, self.service, what)
        return result, status


_SAID = {"timeout": "did not answer in time", "unreachable": "could not be reached"}
