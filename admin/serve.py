"""``bgproxy serve``: one process, or a supervisor and its workers (``--workers N``).

Kept apart from ``admin.runner`` (which wires one process) because the supervisor and
the workers build on the runner: the runner importing them back would be a cycle.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from admin.runner import (
    StartupError,
    graceful_stop,
    reload_config,
    run_loop,
    running,
    settle_heap,
)
from config import Config, ConfigError, load_config
from proxy import _hotpath

log = logging.getLogger("bgproxy")


async def serve(config: Config, path: str | None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    async with running(config) as run:
        host, port = run.proxy_address
        ahost, aport = run.admin_address
        log.info("bgproxy listening on http://%s:%d (admin http://%s:%d)", host, port, ahost, aport)
        if run.server.edge is not None and run.server.edge.tls_listener is not None:
            log.info("bgproxy listening on https://%s:%d", *run.tls_address)
        log.info("hot path: %s", _hotpath.describe())
        settle_heap()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        if path is not None:
            loop.add_signal_handler(signal.SIGHUP, reload_config, run, path)
        if run.observer is not None:  # logrotate's postrotate, as for nginx
            loop.add_signal_handler(signal.SIGUSR1, run.observer.reopen)
        await stop.wait()
        log.info("shutting down")
        await graceful_stop(run, run.server.config.drain.timeout)
    return 0


def main_serve(path: str, workers: int = 1) -> int:
    logging.basicConfig(
        level=os.environ.get("BGPROXY_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if workers < 1:
        print("bgproxy: --workers must be at least 1", file=sys.stderr)
        return 2
    if workers > 1 and config.tls.acme.enabled:
        # Each worker would answer HTTP-01 and hold certificates of its own: not yet.
        print("bgproxy: tls.acme: not supported with --workers yet (run one process)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        if workers > 1:
            from admin.supervisor import supervise  # one process (the default) never loads it

            return run_loop(supervise(config, path, workers))
        return run_loop(serve(config, path))
    except StartupError as exc:
        print(f"bgproxy: {exc}", file=sys.stderr)
        return exc.code
