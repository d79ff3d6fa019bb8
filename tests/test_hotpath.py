"""The compiled hot path and its pure-Python fallback: which one runs, and that an edited
checkout never runs stale compiled code. The rest of the suite exercises whichever build
is installed; CI runs it once compiled and once with ``BGPROXY_PURE_PYTHON=1``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxy import _hotpath
from tests.conftest import Proxy

PROXY_DIR = Path(_hotpath.__file__).parent
COMPILED = all(_hotpath._compiled_file(m) is not None for m in _hotpath.MODULES)
PROBE = (
    "from proxy import _hotpath; import proxy.listener, proxy.exchange, proxy.upstream;"
    "print(_hotpath.KIND); print(proxy.listener.__file__); print(proxy.upstream.__file__);"
    "print(_hotpath.describe())"
)


def probe(path: Path | None = None, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if k != "BGPROXY_PURE_PYTHON"}
    environ.update(env)
    if path is not None:
        environ["PYTHONPATH"] = str(path)
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        env=environ,
        cwd=path or PROXY_DIR.parent,
        timeout=30,
        check=True,
    )
    return out.stdout.splitlines()


def test_pure_python_on_request() -> None:
    kind, listener, upstream, why = probe(BGPROXY_PURE_PYTHON="1")
    assert kind == "python"
    assert listener.endswith("listener.py") and upstream.endswith("upstream.py")
    assert "BGPROXY_PURE_PYTHON" in why


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """A copy of the installed proxy package, compiled modules included."""
    shutil.copytree(PROXY_DIR, tmp_path / "proxy", ignore=shutil.ignore_patterns("*.c"))
    for pkg in ("config", "admin"):
        (tmp_path / pkg).symlink_to(PROXY_DIR.parent / pkg)
    return tmp_path


@pytest.mark.skipif(not COMPILED, reason="this install has no compiled hot path")
def test_compiled_build_is_used(package_copy: Path) -> None:
    kind, listener, upstream, _ = probe(package_copy)
    assert kind == "compiled"
    assert listener.endswith(".so") and upstream.endswith(".so")
    assert listener.startswith(str(package_copy))


@pytest.mark.skipif(not COMPILED, reason="this install has no compiled hot path")
def test_edited_source_runs_instead_of_stale_compiled_code(package_copy: Path) -> None:
    source = package_copy / "proxy" / "upstream.py"
    source.write_text(source.read_text() + "\nEDITED = True\n")
    kind, listener, upstream, why = probe(package_copy)
    # All or nothing: the compiled modules share C types.
    assert kind == "python"
    assert listener.endswith("listener.py") and upstream.endswith("upstream.py")
    assert "changed since they were compiled" in why


@pytest.mark.skipif(not COMPILED, reason="this install has no compiled hot path")
def test_a_missing_compiled_module_falls_back_whole(package_copy: Path) -> None:
    for built in (package_copy / "proxy").glob("exchange.*.so"):
        built.unlink()
    kind, listener, _, why = probe(package_copy)
    assert kind == "python" and listener.endswith("listener.py")
    assert "proxy/exchange is not compiled" in why


async def test_status_reports_the_hot_path(proxy: Proxy) -> None:
    status, body = await proxy.admin("GET", "/status")
    assert status == 200
    assert body["hot_path"] == _hotpath.KIND
    if os.environ.get("BGPROXY_PURE_PYTHON"):
        assert body["hot_path"] == "python"


def test_uvloop_transport_map_keeps_nothing_and_serving_still_works() -> None:
    """server._untrack_transports: connections are served and closed as before, and uvloop's
    per-transport map (pure overhead for the proxy) holds none of them."""
    import asyncio
    import gc
    import weakref

    import uvloop

    from proxy.server import _untrack_transports

    async def main() -> tuple[bytes, int]:
        loop = asyncio.get_running_loop()
        _untrack_transports(loop)

        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.readline())
            await w.drain()
            w.close()

        srv = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        maps = [o for o in gc.get_referents(loop) if isinstance(o, weakref.WeakValueDictionary)]
        replies = b""
        tracked = 0
        for i in range(5):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"%d\n" % i)
            replies += await r.read()
            tracked += sum(len(m) for m in maps)  # both ends of this connection are alive
            w.close()
        srv.close()
        return replies, tracked

    replies, tracked = uvloop.run(main())
    assert replies == b"0\n1\n2\n3\n4\n"
    assert tracked == 0
    # Any other loop is left alone.
    plain = asyncio.SelectorEventLoop()
    try:
        _untrack_transports(plain)
    finally:
        plain.close()


def test_latency_buckets_match_bisect() -> None:
    """ColorTraffic.record's own bucket search (C in the compiled build) is bisect_left."""
    from bisect import bisect_left

    from proxy.stats import LATENCY_BUCKETS, ColorTraffic

    values = [0.0, 1e-9, 200.0, 1e12]
    for b in LATENCY_BUCKETS:
        values += [b, b * (1 - 1e-12), b * (1 + 1e-12)]
    for v in values:
        t = ColorTraffic()
        t.record(200, v)
        assert t.counts.index(1) == bisect_left(LATENCY_BUCKETS, v), v


def test_head_end_is_bytes_find() -> None:
    """http1.head_end (a C loop in the compiled build) finds what bytes.find finds."""
    import random

    from proxy.http1 import head_end

    rng = random.Random(8)
    cases = [b"", b"\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody", b"\n\r\n\r\n"]
    for _ in range(50_000):
        cases.append(bytes(rng.choice(b"\r\n\r\nab") for _ in range(rng.randint(0, 16))))
    for data in cases:
        assert head_end(data) == data.find(b"\r\n\r\n"), data
