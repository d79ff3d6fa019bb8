"""Pre-switch gates: is the color about to get traffic ready for it?

Run before a manual switch and before a weights change that gives a color traffic it did
not have, in this order, stopping at the first failure:

* ``require_healthy`` - at least one target of the color passes its health checks;
* ``smoke`` - each probe (path, expected status, expected body substring) against every
  target of the color, sent directly to the target, not through the router;
* ``warmup`` - ``requests`` GETs of ``path`` to every target, ``concurrency`` at a time,
  so caches and JITs are warm before real traffic; any 5xx or failed request fails it.

Probes bypass the data plane, so they never show in the traffic metrics or the rollback
statistics. A failure raises ``GateFailed``, which the admin API answers with 409.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

from config import SmokeProbe
from proxy.pools import Upstream
from proxy.service import Service
from proxy.state import Color
from proxy.upstream_tls import aiohttp_tls_failure, request_options

MAX_PROBE_BODY = 1024 * 1024  # expect_body is a substring check: never read more than this


class GateFailed(Exception):
    """A gate refused the change; ``facts`` are what it saw, for the 409 body."""

    def __init__(self, gate: str, detail: str, **facts: Any) -> None:
        super().__init__(detail)
        self.gate = gate
        self.detail = detail
        self.facts = facts

    def to_dict(self) -> dict[str, Any]:
        return {"error": "gate_failed", "detail": self.detail, "gate": self.gate, **self.facts}


@dataclass(frozen=True, slots=True)
class Probe:
    """What one direct request to a target got: a status and body, or a failure."""

    status: int | None
    body: str = ""
    failure: str | None = None  # short, fixed text: never exception text

    def describe(self) -> str:
        return self.failure if self.failure is not None else f"status {self.status}"


class Gates:
    """Runs the configured gates; an async context manager owning the probe session."""

    def __init__(self, server: Service) -> None:
        self.server = server
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Gates:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            headers={"User-Agent": "bgproxy-gate"},
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check(self, color: Color) -> list[str]:
        """Every gate for ``color``; the names of the gates that ran. Raises GateFailed."""
        cfg = self.server.config.gates
        pool = self.server.pools[color]
        ran: list[str] = []
        if cfg.require_healthy:
            if not pool.healthy:
                seen = ", ".join(
                    f"{u.url} ({u.stats.last_error or 'failing checks'})" for u in pool.upstreams
                )
                raise GateFailed(
                    "require_healthy",
                    f"require_healthy: no healthy target in {color.value}: {seen}",
                    color=color.value,
                    targets=[{"url": u.url, "healthy": u.stats.healthy} for u in pool.upstreams],
                )
            ran.append("require_healthy")
        if cfg.smoke:
            for probe in cfg.smoke:
                results = await asyncio.gather(*(self._probe(u, probe) for u in pool.upstreams))
                for up, got in zip(pool.upstreams, results, strict=True):
                    _check_smoke(color, up, probe, got)
            ran.append("smoke")
        if cfg.warmup.requests > 0:
            await asyncio.gather(*(self._warm(color, u) for u in pool.upstreams))
            ran.append("warmup")
        return ran

    # -- requests -------------------------------------------------------------------------

    async def _get(self, up: Upstream, path: str, want_body: bool) -> Probe:
        assert self._session is not None, "Gates used outside its async with"
        t = self.server.config.timeouts
        # The budget a real request to this target gets: connect, then the response head.
        timeout = aiohttp.ClientTimeout(sock_connect=t.connect, sock_read=t.upstream_response)
        try:
            async with self._session.get(
                up.url + path, allow_redirects=False, timeout=timeout, **request_options(up.tls)
            ) as resp:
                body = b""
                if want_body:
                    while len(body) < MAX_PROBE_BODY:
                        chunk = await resp.content.read(MAX_PROBE_BODY - len(body))
                        if not chunk:
                            break
                        body += chunk
                else:
                    await resp.read()
                return Probe(resp.status, body.decode("utf-8", "replace"))
        except TimeoutError:
            return Probe(None, failure="timed out")
        except aiohttp.ClientSSLError as exc:
            return Probe(None, failure=aiohttp_tls_failure(exc) or "TLS handshake failed")
        except aiohttp.ClientConnectionError:
            return Probe(None, failure="connection failed")
        except aiohttp.ClientError:
            return Probe(None, failure="bad response")

    async def _probe(self, up: Upstream, probe: SmokeProbe) -> Probe:
        return await self._get(up, probe.path, want_body=probe.expect_body is not None)

    async def _warm(self, color: Color, up: Upstream) -> None:
        warm = self.server.config.gates.warmup
        failed: list[Probe] = []
        todo = iter(range(warm.requests))

        async def worker() -> None:
            for _ in todo:  # one shared iterator: exactly ``requests`` in total
                got = await self._get(up, warm.path, want_body=False)
                if got.status is None or got.status >= 500:
                    failed.append(got)

        await asyncio.gather(*(worker() for _ in range(min(warm.concurrency, warm.requests))))
        if failed:
            raise GateFailed(
                "warmup",
                f"warmup: {len(failed)} of {warm.requests} requests to {up.url}{warm.path} "
                f"failed (first: {failed[0].describe()})",
                color=color.value,
                target=up.url,
                path=warm.path,
                requests=warm.requests,
                failed=len(failed),
            )


def _check_smoke(color: Color, up: Upstream, probe: SmokeProbe, got: Probe) -> None:
    problem = None
    if got.status != probe.expect_status:
        problem = f"expected status {probe.expect_status}, got {got.describe()}"
    elif probe.expect_body is not None and probe.expect_body not in got.body:
        problem = f"expected the body to contain {probe.expect_body!r}"
    if problem is not None:
        raise GateFailed(
            "smoke",
            f"smoke: GET {probe.path} on {up.url} ({color.value}): {problem}",
            color=color.value,
            target=up.url,
            path=probe.path,
            expect_status=probe.expect_status,
            expect_body=probe.expect_body,
            status=got.status,
        )
