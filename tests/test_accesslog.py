"""The access log through the real proxy: the lines an operator reads for requests,
WebSocket sessions, the proxy's own refusals and the control plane's events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import Proxy, StartProxy, Upstream, config_dict


def lines(proxy: Proxy, path: Path) -> list[dict[str, Any]]:
    """What the log file holds once the pending lines are written (the proxy writes in
    batches a few milliseconds apart: flushing now makes the test deterministic)."""
    observer = proxy.run.observer
    assert observer is not None and observer.access is not None
    observer.access.flush()
    return [json.loads(line) for line in path.read_bytes().splitlines()]


async def logged_proxy(
    start_proxy: StartProxy, upstreams: dict[str, Upstream], path: Path, **access: Any
) -> Proxy:
    cfg = config_dict(
        [upstreams["blue"].url], [upstreams["green"].url],
        access_log={"destination": str(path), **access},
    )  # fmt: skip
    return await start_proxy(cfg)


async def test_switch_weights_rollback_and_drain_are_json_log_lines(
    start_proxy: StartProxy, upstreams: dict[str, Upstream], tmp_path: Path
) -> None:
    path = tmp_path / "access.log"
    proxy = await logged_proxy(start_proxy, upstreams, path)
    assert (await proxy.admin("POST", "/switch", {"color": "green", "reason": "v2"}))[0] == 200
    assert (await proxy.admin("POST", "/weights", {"blue": 10, "green": 90}))[0] == 200
    assert (await proxy.admin("POST", "/rollback", {"reason": "bad"}))[0] == 200
    events = [line for line in lines(proxy, path) if line.get("event")]
    changes = [e for e in events if e["action"] != "drain_done"]
    assert [(e["action"], e["from"], e["to"], e["generation"]) for e in changes] == [
        ("switch", "blue", "green", 2),
        ("weights", "green", "blue=10,green=90", 3),
        ("rollback", "blue=10,green=90", "green", 4),
    ]
    _, api = await proxy.admin("GET", "/events")
    # The same fields as /events (newest first there), plus the service and the time.
    for line, listed in zip(changes, reversed(api["events"]), strict=True):
        assert {k: line[k] for k in listed} == listed
        assert line["service"] == "default" and line["time"].endswith("Z")
    drained = [e for e in events if e["action"] == "drain_done"]
    assert drained and drained[0]["color"] == "blue" and drained[0]["forced"] == 0
