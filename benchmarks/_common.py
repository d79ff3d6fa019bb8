"""Shared pieces of the benchmark commands in this directory.

Every ``bench_*.py`` imports this module (``python benchmarks/bench_X.py`` puts this
directory first on ``sys.path``). It holds:

* process management: :class:`Server` (own process group, killed with its children),
  CPU time and RSS of a process tree from ``/proc``;
* the servers the benchmarks start: the upstream nginx, nginx / HAProxy as reverse
  proxies (peers), bgproxy from a generated YAML config, a WebSocket echo upstream;
* the wrk runner and parser;
* asyncio helpers: an uvloop event loop, a tiny keep-alive HTTP/1.1 client protocol
  and a raw WebSocket client (pre-masked frames), both cheap enough per request that
  the client is not the first thing to saturate;
* table printing, percentiles, signal handling and the ``main`` wrapper.

Python stdlib plus aiohttp (only for the echo upstream and admin calls) and uvloop
(optional, used when installed).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, cast

REPO_ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

CLIENT_CPU = 0  # load generator + upstream
PROXY_CPU = 1  # the proxy under test

SMALL_BODY = b"Hello, world!"  # 13 bytes
BIG_BODY_SIZE = 65536
TIMES = "\N{MULTIPLICATION SIGN}"

BODIES: dict[str, tuple[str, int]] = {
    # name -> (path, expected body length)
    "small": ("/small", len(SMALL_BODY)),
    "64k": ("/64k", BIG_BODY_SIZE),
}

# executable -> Debian package(s) to try, in order
TOOL_PACKAGES: dict[str, tuple[str, ...]] = {
    "nginx": ("nginx-light", "nginx"),
    "haproxy": ("haproxy",),
    "wrk": ("wrk",),
    "taskset": ("util-linux",),
}
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A fatal, clearly explained setup failure."""


class TargetFailed(RuntimeError):
    """A target could not be started or does not serve correctly."""


# --------------------------------------------------------------------------- helpers


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=SBIN_PATH)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    out = "\n".join(text.rstrip().splitlines()[-lines:])
    return out or "(empty)"


def ensure_tools(tools: Sequence[str] | None = None) -> None:
    """Install nginx / haproxy / wrk / taskset with apt-get if any is missing."""
    wanted = list(TOOL_PACKAGES) if tools is None else list(tools)
    missing = [tool for tool in wanted if which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0 or which("apt-get") is None:
        raise BenchError(f"missing tools {missing} and cannot apt-get install them (need root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log(f"installing missing tools: {', '.join(missing)} (apt-get update once, then install)")
    subprocess.run(["apt-get", "update"], check=True, env=env)
    for tool in missing:
        for pkg in TOOL_PACKAGES[tool]:
            rc = subprocess.run(["apt-get", "install", "-y", pkg], env=env).returncode
            if rc == 0 and which(tool):
                break
        else:
            raise BenchError(f"could not install {tool} (tried {TOOL_PACKAGES[tool]})")


def tool_version(cmd: list[str]) -> str:
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (cp.stdout + cp.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def need_cpus(*cpus: int) -> None:
    have = os.sched_getaffinity(0)
    if not set(cpus) <= have:
        raise BenchError(f"need CPUs {sorted(set(cpus))}; have {sorted(have)}")


def taskset(cpu: int | None) -> list[str]:
    """Command prefix pinning to ``cpu``; nothing for None (unpinned)."""
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


def pin_self(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def raise_nofile(want: int) -> int:
    """Raise RLIMIT_NOFILE (soft, and hard when root) to ``want``; children inherit it.

    Returns the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    if hard < want and os.geteuid() == 0:
        try:
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            nr_open = want
        hard = max(hard, min(want, nr_open))
    new_soft = min(want, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def env_info(**extra: Any) -> dict[str, Any]:
    """Machine description for ``--json``."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "bgproxy_commit": git_describe(),
        "host": platform.node(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg": load,
        **extra,
    }


def git_describe() -> str:
    """The repository's commit, with ``+dirty`` when the tree has changes (or "unknown")."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=REPO_ROOT, timeout=10,
        )  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "proxy", "admin",
             "config"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    log(f"wrote {path}")


# ------------------------------------------------------------------ /proc accounting


def _read_stat(pid: int) -> tuple[int, int] | None:
    """Return (ppid, utime+stime+cutime+cstime in ticks) or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces / parentheses: split after the last ')'
    fields = raw[raw.rfind(")") + 2 :].split()
    # fields[0] is state (field 3); utime is field 14 -> index 11
    ppid = int(fields[1])
    ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return ppid, ticks


def process_tree(root: int) -> list[int]:
    """root and all of its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _read_stat(int(entry))
        if st is not None:
            children.setdefault(st[0], []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def pid_cpu_seconds(pid: int) -> float:
    st = _read_stat(pid)
    return 0.0 if st is None else st[1] / CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    total = 0
    for pid in process_tree(root):
        st = _read_stat(pid)
        if st is not None:
            total += st[1]
    return total / CLK_TCK


def pid_rss_bytes(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else 0


def tree_rss_bytes(root: int) -> int:
    return sum(pid_rss_bytes(pid) for pid in process_tree(root))


def tree_fds(root: int) -> int:
    total = 0
    for pid in process_tree(root):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def _socket_inodes(root: int) -> set[str]:
    inodes: set[str] = set()
    for pid in process_tree(root):
        fd_dir = f"/proc/{pid}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"{fd_dir}/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    return inodes


def tree_tcp_peers(root: int, listen_port: int) -> tuple[list[int], int]:
    """TCP connections held by a process tree: (the peer ports of those accepted on
    ``listen_port``, the number of other connections, e.g. to upstreams).

    From ``/proc/net/tcp{,6}`` matched to the tree's socket inodes; listening sockets
    are not counted. A CLOSE-WAIT socket (the peer left, the process has not closed
    it) still counts: that is what a leak looks like."""
    inodes = _socket_inodes(root)
    peers: list[int] = []
    other = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[9] not in inodes or f[3] == "0A":  # 0A: LISTEN
                continue
            if int(f[1].rsplit(":", 1)[1], 16) == listen_port:
                peers.append(int(f[2].rsplit(":", 1)[1], 16))
            else:
                other += 1
    return peers, other


# ------------------------------------------------------------------------ TLS

# bgproxy's TLS 1.2 suites (proxy/certs.py, Mozilla "intermediate"), given to every TLS
# peer so that all of them offer the same; TLS 1.3 suites are OpenSSL's defaults for all.
TLS_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)


@dataclass(frozen=True)
class TlsFiles:
    """One certificate for every TLS target: PEM files, and both in one (HAProxy)."""

    cert: Path
    key: Path
    combined: Path


def self_signed(base: Path, name: str = "bench") -> TlsFiles:
    """An ECDSA P-256 certificate for ``name`` (what a TLS edge would serve today)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=90))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    files = TlsFiles(base / f"{name}.crt", base / f"{name}.key", base / f"{name}.pem")
    files.cert.write_bytes(cert_pem)
    files.key.write_bytes(key_pem)
    files.combined.write_bytes(cert_pem + key_pem)
    return files


def unverified_tls() -> ssl.SSLContext:
    """A client context that does not verify: the benchmarks measure proxies, not PKI."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def server_tls(files: TlsFiles) -> ssl.SSLContext:
    """A Python server context built as bgproxy builds its own (proxy/certs.py)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS_CIPHERS)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


def tls_session(port: int) -> str:
    """What a handshake with ``port`` negotiates and whether the server resumes its
    session, e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384, resumes"."""
    ctx = unverified_tls()
    request = b"GET /small HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    session = None
    desc = "?"
    for attempt in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="bench", session=session) as tls:
                tls.sendall(request)
                with contextlib.suppress(ssl.SSLEOFError):  # closed without close_notify
                    while tls.recv(65536):  # TLS 1.3 tickets arrive after the handshake
                        pass
                if attempt == 0:
                    cipher = tls.cipher()
                    desc = f"{tls.version()} {cipher[0] if cipher else '?'}"
                    session = tls.session
                else:
                    return desc + (", resumes" if tls.session_reused else ", no resumption")
    return desc


# --------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    log_path: Path
    cwd: Path | None = None
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    admin_port: int | None = None  # bgproxy only
    extra_ports: dict[str, int] = field(default_factory=dict)
    scheme: str = "http"  # "https": ``port`` is a TLS listener (bench_tls.py)

    def start(self) -> None:
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,  # own process group: clean kill, no stray SIGINT
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # == pid because of start_new_session
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # group members may outlive the leader by a moment (e.g. nginx workers)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.05)
        self.proc = None

    def fail(self, why: str) -> TargetFailed:
        return TargetFailed(
            f"{self.name}: {why}\n--- {self.name} output ---\n{tail(self.log_path)}"
        )


class Servers:
    """Every server a benchmark started; ``stop_all`` in a ``finally``."""

    def __init__(self) -> None:
        self.items: list[Server] = []

    def add(self, srv: Server) -> Server:
        self.items.append(srv)
        return srv

    def stop_all(self) -> None:
        for srv in reversed(self.items):
            with contextlib.suppress(Exception):
                srv.stop()


def http_get(
    port: int,
    path: str,
    timeout: float = 2.0,
    headers: dict[str, str] | None = None,
    scheme: str = "http",
) -> tuple[int, bytes]:
    conn: http.client.HTTPConnection
    if scheme == "https":
        conn = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=timeout, context=unverified_tls()
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_json(
    port: int, method: str, path: str, body: Any = None, timeout: float = 10.0
) -> tuple[int, Any]:
    """A JSON request to an admin API (no token: benchmarks drop BGPROXY_ADMIN_TOKEN)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            return resp.status, raw.decode(errors="replace")
    finally:
        conn.close()


def wait_http(
    server: Server,
    timeout: float,
    path: str = "/small",
    ok: Callable[[int, bytes], bool] | None = None,
    port: int | None = None,
) -> None:
    """Poll ``GET path`` until ``ok(status, body)`` (default: 200), with a deadline.

    Raises TargetFailed (with the server's output) when it exits or never answers."""
    check = ok or (lambda status, _body: status == 200)
    deadline = time.monotonic() + timeout
    last_err = "no attempt"
    while True:
        if not server.alive():
            rc = server.proc.returncode if server.proc else None
            raise server.fail(f"exited during startup (exit code {rc})")
        try:
            status, body = http_get(port or server.port, path, timeout=1.0, scheme=server.scheme)
            if check(status, body):
                return
            last_err = f"GET {path} -> {status} {body[:80]!r}"
        except (OSError, http.client.HTTPException) as exc:
            last_err = f"GET {path} -> {type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise server.fail(f"not ready after {timeout:.0f}s (last: {last_err})")
        time.sleep(0.1)


def wait_ready(server: Server, timeout: float) -> None:
    """Poll until the server answers GET /small with 200 + the right body, then
    check /64k once.  Raises TargetFailed (with the server's output) otherwise."""
    wait_http(server, timeout, "/small", lambda st, body: st == 200 and body == SMALL_BODY)
    try:
        status, body = http_get(server.port, "/64k", timeout=5.0, scheme=server.scheme)
    except (OSError, http.client.HTTPException) as exc:
        raise server.fail(f"GET /64k failed: {exc}") from exc
    if status != 200 or len(body) != BIG_BODY_SIZE:
        raise server.fail(f"GET /64k -> {status}, {len(body)} bytes (want 200, {BIG_BODY_SIZE})")


def start_or_skip(
    srv: Server, ready: Callable[[Server], None], skipped: dict[str, str], cpu: str = ""
) -> bool:
    """Start ``srv`` and wait for it; on failure record why in ``skipped`` and stop it."""
    try:
        srv.start()
        ready(srv)
    except (TargetFailed, OSError) as exc:
        skipped[srv.name] = str(exc)
        log(f"SKIPPING {srv.name}: {exc}")
        srv.stop()
        return False
    build = ""
    if srv.admin_port is not None:
        # An edited checkout runs the pure-Python build until reinstalled: say which ran.
        with contextlib.suppress(OSError, http.client.HTTPException):
            status, body = http_json(srv.admin_port, "GET", "/status", timeout=5.0)
            if status == 200 and isinstance(body, dict):
                build = f", hot path {body.get('hot_path')}"
    log(f"{srv.name} ready on :{srv.port} (pid {srv.pid}{', CPU ' + cpu if cpu else ''}{build})")
    return True


def nginx_temp_paths(nginx: str, tmp: Path) -> str:
    """temp-path directives pointing into tmp, only for modules compiled in."""
    info = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
    lines = [f"client_body_temp_path {tmp}/client_body;"]
    for mod in ("proxy", "fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{mod}_module" not in info:
            lines.append(f"{mod}_temp_path {tmp}/{mod};")
    return "\n    ".join(lines)


def nginx_conf(
    tmp: Path,
    temp_paths: str,
    server_block: str,
    extra_http: str = "",
    workers: int = 1,
    worker_connections: int = 16384,
) -> str:
    user = "user root;" if os.geteuid() == 0 else ""  # workers must read files in tmp
    return f"""{user}
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile {max(65536, 4 * worker_connections)};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{
    worker_connections {worker_connections};
    multi_accept on;
}}
http {{
    access_log off;
    server_tokens off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    {temp_paths}
    {extra_http}
    {server_block}
}}
"""


def make_upstream(
    base: Path,
    nginx: str,
    cpu: int | None = CLIENT_CPU,
    workers: int = 1,
    name: str = "upstream",
) -> Server:
    """nginx serving /small (13 B), /64k (65,536 B) and /health."""
    tmp = base / name
    (tmp / "www").mkdir(parents=True)
    (tmp / "www" / "64k").write_bytes(bytes(range(256)) * (BIG_BODY_SIZE // 256))
    port = free_port()
    server = f"""server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        root {tmp}/www;
        location = /small {{
            default_type text/plain;
            return 200 "{SMALL_BODY.decode()}";
        }}
        location = /64k {{
            default_type application/octet-stream;
        }}
        location = /health {{
            # bgproxy's active health checks (health_check.path): 404 would take it out
            return 200 "ok";
        }}
    }}"""
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_conf(tmp, nginx_temp_paths(nginx, tmp), server, workers=workers))
    cmd = [*taskset(cpu), nginx, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")]
    return Server(name, cmd, port, tmp / "stdout.log")


def make_color_upstreams(base: Path, nginx: str, cpu: int | None = CLIENT_CPU) -> Server:
    """One nginx with two ports: ``port`` answers ``blue``, ``extra_ports['green']`` ``green``.

    Both answer every path with 200 and the color as the body (also in ``X-Upstream``)."""
    tmp = base / "colors"
    tmp.mkdir(parents=True)
    ports = {"blue": free_port(), "green": free_port()}
    blocks = "\n".join(
        f"""server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            default_type text/plain;
            add_header X-Upstream {color} always;
            return 200 "{color}";
        }}
    }}"""
        for color, port in ports.items()
    )
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_conf(tmp, nginx_temp_paths(nginx, tmp), blocks))
    cmd = [*taskset(cpu), nginx, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")]
    return Server("colors", cmd, ports["blue"], tmp / "stdout.log", extra_ports=ports)


def make_nginx_proxy(
    base: Path,
    nginx: str,
    up_port: int,
    cpu: int | None = PROXY_CPU,
    workers: int = 1,
    websocket: bool = False,
    worker_connections: int = 16384,
    access_log: bool = False,
    name: str = "nginx",
    tls: TlsFiles | None = None,
) -> Server:
    """nginx as a reverse proxy with pooled upstream keep-alive (and WebSocket relaying);
    with ``access_log``, writing a JSON access log to a file as production edges do;
    with ``tls``, listening for HTTPS only (TLS 1.2+, ``TLS_CIPHERS``, session cache and
    tickets on, as a production edge has them)."""
    tmp = base / f"{name}-proxy"
    tmp.mkdir(parents=True)
    port = free_port()
    upstream = f"""upstream backend {{
        server 127.0.0.1:{up_port};
        keepalive 64;
        keepalive_requests 1000000000;
        keepalive_timeout 300s;
    }}"""
    if websocket:
        upstream += """
    map $http_upgrade $connection_upgrade {
        default upgrade;
        '' '';
    }"""
        conn_headers = """proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;"""
    else:
        conn_headers = 'proxy_set_header Connection "";'
    logging = ""
    if access_log:
        # The fields bgproxy's json line has, escaped as JSON, buffered as nginx users do.
        upstream += """
    log_format bench_json escape=json '{"time":"$time_iso8601","client":"$remote_addr",'
        '"method":"$request_method","target":"$request_uri","version":"$server_protocol",'
        '"status":$status,"bytes_in":$request_length,"bytes_out":$bytes_sent,'
        '"duration":$request_time,"upstream_time":"$upstream_header_time",'
        '"upstream":"$upstream_addr","request_id":"$request_id",'
        '"user_agent":"$http_user_agent","referer":"$http_referer"}';"""
        logging = f"access_log {tmp}/access.log bench_json buffer=64k;"
    ssl_conf = ""
    if tls is not None:
        ssl_conf = f"""ssl_certificate {tls.cert};
        ssl_certificate_key {tls.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {TLS_CIPHERS};
        ssl_prefer_server_ciphers off;
        ssl_session_cache shared:SSL:10m;
        ssl_session_timeout 1d;
        ssl_session_tickets on;"""
    server = f"""server {{
        listen 127.0.0.1:{port} reuseport backlog=4096{" ssl" if tls else ""};
        {ssl_conf}
        {logging}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            {conn_headers}
            proxy_buffer_size 8k;
            proxy_buffers 16 8k;
            proxy_max_temp_file_size 0;
        }}
    }}"""
    conf = tmp / "nginx.conf"
    conf.write_text(
        nginx_conf(
            tmp,
            nginx_temp_paths(nginx, tmp),
            server,
            upstream,
            workers=workers,
            worker_connections=worker_connections,
        )
    )
    cmd = [*taskset(cpu), nginx, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")]
    return Server(name, cmd, port, tmp / "stdout.log", scheme="https" if tls else "http")


def make_haproxy(
    base: Path,
    haproxy: str,
    up_port: int,
    cpu: int | None = PROXY_CPU,
    threads: int = 1,
    maxconn: int = 8000,
    tls: TlsFiles | None = None,
) -> Server:
    """HAProxy as a reverse proxy; with ``tls``, listening for HTTPS only (TLS 1.2+,
    ``TLS_CIPHERS``, its session cache and tickets on by default)."""
    tmp = base / "haproxy"
    tmp.mkdir(parents=True)
    port = free_port()
    ssl_global = ssl_bind = ""
    if tls is not None:
        ssl_global = f"""    ssl-default-bind-ciphers {TLS_CIPHERS}
    ssl-default-bind-options ssl-min-ver TLSv1.2
"""
        ssl_bind = f" ssl crt {tls.combined} alpn http/1.1"
    cfg = f"""global
    nbthread {threads}
    maxconn {maxconn}
{ssl_global}
defaults
    mode http
    option http-keep-alive
    http-reuse always
    maxconn {maxconn}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout tunnel 3600s
    timeout http-request 10s
    timeout http-keep-alive 60s

frontend fe
    bind 127.0.0.1:{port}{ssl_bind}
    default_backend be

backend be
    server up1 127.0.0.1:{up_port}
"""
    conf = tmp / "haproxy.cfg"
    conf.write_text(cfg)
    cmd = [*taskset(cpu), haproxy, "-db", "-f", str(conf)]
    return Server("haproxy", cmd, port, tmp / "stdout.log", scheme="https" if tls else "http")


def bgproxy_command(
    conf: Path, cpu: int | None, workers: int = 1
) -> tuple[list[str], dict[str, str]]:
    """The command line (and environment) that serves ``conf``."""
    env = {k: v for k, v in os.environ.items() if k != "BGPROXY_ADMIN_TOKEN"}
    exe = shutil.which("bgproxy")
    extra = [] if workers == 1 else ["--workers", str(workers)]
    cmd = [*taskset(cpu), exe, "serve"] if exe else [*taskset(cpu), sys.executable, "-m", "proxy"]
    cmd += ["-c", str(conf), *extra]
    # The checkout this benchmark runs from, not whichever one `pip install -e` points at
    # (the console script would import that one: a worktree would measure main's code).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return cmd, env


def make_bgproxy(
    base: Path,
    up_port: int,
    cpu: int | None = PROXY_CPU,
    workers: int = 1,
    green_port: int | None = None,
    extra_yaml: str = "",
    name: str = "bgproxy",
    tls: TlsFiles | None = None,
) -> Server:
    """bgproxy with blue -> ``up_port`` and green -> ``green_port`` (default: the same);
    with ``tls``, the Server's ``port`` is its HTTPS listener (``tls.listen``)."""
    tmp = base / name
    tmp.mkdir(parents=True)
    port, admin_port = free_port(), free_port()
    if tls is not None:
        tls_port = free_port()
        extra_yaml += (
            f'tls: {{ listen: "127.0.0.1:{tls_port}", '
            f'certificates: [{{ cert: "{tls.cert}", key: "{tls.key}" }}] }}\n'
        )
    blue = f"http://127.0.0.1:{up_port}"
    green = f"http://127.0.0.1:{green_port or up_port}"
    cfg = (
        f'listen: "127.0.0.1:{port}"\n'
        f'admin: {{ listen: "127.0.0.1:{admin_port}" }}\n'
        "upstreams:\n"
        f'  blue: {{ targets: ["{blue}"] }}\n'
        f'  green: {{ targets: ["{green}"] }}\n'
        f"{extra_yaml}"
    )
    conf = tmp / "bgproxy.yaml"
    conf.write_text(cfg)
    cmd, env = bgproxy_command(conf, cpu, workers)
    if tls is not None:
        return Server(
            name, cmd, tls_port, tmp / "stdout.log", cwd=REPO_ROOT, env=env,
            admin_port=admin_port, scheme="https", extra_ports={"http": port},
        )  # fmt: skip
    return Server(
        name, cmd, port, tmp / "stdout.log", cwd=REPO_ROOT, env=env, admin_port=admin_port
    )


def make_uvloop_floor(
    base: Path,
    up_port: int,
    cpu: int | None = PROXY_CPU,
    tls: TlsFiles | None = None,
    kind: str = "uvloop-floor",
    name: str = "uvloop",
) -> Server:
    """``serve_uvloop_floor`` relaying to ``up_port``: the uvloop peer of the benchmarks;
    with ``tls``, over uvloop's TLS (``server_tls``: the context bgproxy would build)."""
    args = [str(up_port)] + ([str(tls.cert), str(tls.key)] if tls else [])
    srv = helper_server(base, name, kind, cpu, args)
    if tls is not None:
        srv.scheme = "https"
    return srv


def helper_server(
    base: Path, name: str, kind: str, cpu: int | None = CLIENT_CPU, args: Sequence[str] = ()
) -> Server:
    """A Python helper server from this module (``python _common.py KIND PORT ...``)."""
    tmp = base / name
    tmp.mkdir(parents=True)
    port = free_port()
    cmd = [*taskset(cpu), sys.executable, str(Path(__file__)), kind, str(port), *args]
    return Server(name, cmd, port, tmp / "stdout.log", cwd=REPO_ROOT)


def bgproxy_workers_flag() -> bool:
    """Whether ``bgproxy serve --help`` lists ``--workers``."""
    cmd, _ = bgproxy_command(Path("x.yaml"), None)
    cmd = [c for c in cmd if c not in ("-c", "x.yaml")]
    cmd.append("--help")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO_ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--workers" in out.stdout + out.stderr


# ------------------------------------------------------------------------ wrk

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    non_2xx_3xx: int = 0
    sock_connect: int = 0
    sock_read: int = 0
    sock_write: int = 0
    sock_timeout: int = 0
    percentiles_ms: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return (
            self.non_2xx_3xx
            + self.sock_connect
            + self.sock_read
            + self.sock_write
            + self.sock_timeout
        )


def parse_wrk(out: str) -> WrkResult:
    pct = {
        m.group(1): _ms(m.group(2), m.group(3))
        for m in re.finditer(r"^\s*(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.MULTILINE)
    }
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    reqs = re.search(r"^\s*(\d+) requests in", out, re.MULTILINE)
    if rps is None or reqs is None or "50" not in pct or "99" not in pct:
        raise ValueError(f"cannot parse wrk output:\n{out}")
    res = WrkResult(
        rps=float(rps.group(1)),
        requests=int(reqs.group(1)),
        p50_ms=pct["50"],
        p99_ms=pct["99"],
        percentiles_ms=pct,
    )
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        res.sock_connect, res.sock_read, res.sock_write, res.sock_timeout = map(int, sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        res.non_2xx_3xx = int(non2xx.group(1))
    return res


def run_wrk(
    port: int,
    path: str,
    mode: str,
    duration: int,
    connections: int,
    threads: int = 1,
    cpu: int | None = CLIENT_CPU,
    scheme: str = "http",
) -> WrkResult:
    cmd = [*taskset(cpu), "wrk", f"-t{threads}", f"-c{connections}"]
    cmd += [f"-d{duration}s", "--latency"]
    if mode == "close":
        cmd += ["-H", "Connection: close"]
    cmd.append(f"{scheme}://127.0.0.1:{port}{path}")
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"wrk did not finish within {duration + 60}s") from exc
    if cp.returncode != 0:
        raise RuntimeError(f"wrk failed ({cp.returncode}): {cp.stderr or cp.stdout}")
    return parse_wrk(cp.stdout)


# ---------------------------------------------------------------- statistics


def median_or_none(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def paired_ratio(runs: Sequence[Any], peer_runs: Sequence[Any], attr: str) -> float | None:
    """Median over runs of ``attr`` divided by the peer's ``attr`` in the same run (both
    sides have ``.run``): noise that hits one run hits both sides of its ratio."""
    base = {p.run: getattr(p, attr) for p in peer_runs}
    return median_or_none([getattr(r, attr) / base[r.run] for r in runs if base.get(r.run)])


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(q / 100.0 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


def print_rows(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> None:
    """A plain-text table; the first ``left`` columns are left-aligned."""
    table = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    for i, row in enumerate(table):
        cells = [
            c.ljust(w) if j < left else c.rjust(w)
            for j, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def parse_list(value: str, allowed: Sequence[str], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what}: {bad or value!r} not in {list(allowed)}")
    return [a for a in allowed if a in items]  # canonical order


# ------------------------------------------------------------------ main wrapper


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """Ctrl-C and SIGTERM both unwind through ``finally`` blocks (clean-up)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited as ignored
    signal.signal(signal.SIGTERM, _on_sigterm)
    os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + SBIN_PATH


def run_main(main: Callable[[], int]) -> None:
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; cleaned up")
        sys.exit(130)
    except BenchError as exc:
        log(f"error: {exc}")
        sys.exit(2)


# ------------------------------------------------------------------ asyncio side


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (as bgproxy uses), else the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_async(coro: Any) -> Any:
    """Run ``coro`` on a fresh loop; Ctrl-C / SIGTERM cancel it and raise KeyboardInterrupt.

    (A KeyboardInterrupt raised inside a protocol callback would be swallowed by the
    loop as a transport error, so the signals are handled by the loop itself.)"""
    loop = new_event_loop()
    task = loop.create_task(coro)
    interrupted: list[int] = []

    def on_signal(signum: int) -> None:
        interrupted.append(signum)
        task.cancel()

    sigs = (signal.SIGINT, signal.SIGTERM)
    for sig in sigs:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        for sig in sigs:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _on_sigterm)
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class HttpClientProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, one request at a time, minimal parsing.

    ``send(request_bytes, on_done)`` writes a pre-built request; when the whole response
    (Content-Length framing) is in, ``on_done(status, head, body)`` is called. A lost
    connection calls ``on_done(0, b"", b"")`` for the request in flight and ``on_lost``.
    """

    def __init__(self, on_lost: Callable[[HttpClientProtocol], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.on_done: Callable[[int, bytes, bytes], None] | None = None
        self.on_lost = on_lost
        self.connected: asyncio.Future[None] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, request: bytes, on_done: Callable[[int, bytes, bytes], None]) -> None:
        assert self.transport is not None
        self.on_done = on_done
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[: end + 4])
            lower = head.lower()
            i = lower.find(b"\r\ncontent-length:")
            if i < 0:
                self._fail()
                return
            j = lower.find(b"\r\n", i + 2)
            length = int(head[i + 17 : j])
            total = end + 4 + length
            if len(buf) < total:
                return
            body = bytes(buf[end + 4 : total])
            del buf[:total]
            cb, self.on_done = self.on_done, None
            try:
                status = int(head[9:12])
            except ValueError:
                status = 0
            if cb is not None:
                cb(status, head, body)
            if not buf:
                return

    def _fail(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        cb, self.on_done = self.on_done, None
        if cb is not None:
            cb(0, b"", b"")
        if self.on_lost is not None:
            self.on_lost(self)


async def open_http(
    port: int, on_lost: Callable[[HttpClientProtocol], None] | None = None
) -> HttpClientProtocol:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: HttpClientProtocol(on_lost), "127.0.0.1", port)
    return proto


def get_request(path: str, port: int, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()


# ---------------------------------------------------------------- WebSocket side

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_handshake_request(path: str, port: int) -> tuple[bytes, bytes]:
    """(request bytes, expected Sec-WebSocket-Accept)."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    req = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    return req, accept


def ws_masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A final client frame with a fixed mask (built once, sent many times)."""
    n = len(payload)
    if n >= 126:
        raise ValueError("benchmark frames are small")
    key = os.urandom(4)
    masked = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | n]) + key + masked


def ws_server_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    n = len(payload)
    if n >= 126:
        raise ValueError("benchmark frames are small")
    return bytes([0x80 | opcode, n]) + payload


class WsClientProtocol(asyncio.Protocol):
    """A raw WebSocket client: handshake, then ping-pong of one small text message.

    After the 101, every ``send_message()`` writes the pre-built masked frame; when the
    echo (``expect`` bytes) has fully arrived, ``on_echo(self)`` is called."""

    def __init__(self, handshake: bytes, accept: bytes, frame: bytes, expect: bytes) -> None:
        self.handshake = handshake
        self.accept = accept
        self.frame = frame
        self.expect = expect
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_echo: Callable[[WsClientProtocol], None] | None = None
        self.on_lost: Callable[[WsClientProtocol], None] | None = None
        self.sent_at = 0.0
        self.bad = 0  # echoes that did not match
        self.extra: list[bytes] = []  # frames the proxy injected (e.g. reconnect messages)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.write(self.handshake)

    def send_message(self) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(self.frame)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[: end + 4])
            del buf[: end + 4]
            if not head.startswith(b"HTTP/1.1 101") or self.accept not in head:
                self.upgraded.set_exception(ConnectionError(f"handshake refused: {head[:200]!r}"))
                return
            self.upgraded.set_result(None)
        want = len(self.expect)
        while len(buf) >= 2:
            n = buf[1] & 0x7F
            if n >= 126:  # not one of ours: skip it properly
                hl = 4 if n == 126 else 10
                if len(buf) < hl:
                    return
                n = int.from_bytes(buf[2:hl], "big")
                size = hl + n
            else:
                size = 2 + n
            if len(buf) < size:
                return
            if size == want and buf[:want] == self.expect:
                del buf[:size]
                if self.on_echo is not None:
                    self.on_echo(self)
            else:
                self.extra.append(bytes(buf[:size]))
                del buf[:size]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError(f"closed during handshake: {exc}"))
        if self.on_lost is not None:
            self.on_lost(self)


async def open_ws(
    port: int, path: str = "/ws", payload: bytes = b"ping", timeout: float = 30.0
) -> WsClientProtocol:
    loop = asyncio.get_running_loop()
    handshake, accept = ws_handshake_request(path, port)
    _, proto = await loop.create_connection(
        lambda: WsClientProtocol(
            handshake, accept, ws_masked_frame(payload), ws_server_frame(payload)
        ),
        "127.0.0.1",
        port,
    )
    await asyncio.wait_for(proto.upgraded, timeout)
    return proto


# --------------------------------------------------------- helper servers (children)


def serve_ws_echo(port: int) -> None:
    """aiohttp: WebSocket echo on any path with Upgrade, 200 "ok" otherwise (/health)."""
    from aiohttp import WSMsgType, web

    async def handle(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(text="ok")
        ws = web.WebSocketResponse(autoping=True, heartbeat=None, max_msg_size=1 << 20)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(
        app, host="127.0.0.1", port=port, print=None, access_log=None, backlog=4096, loop=loop
    )


def serve_uvloop_floor(
    port: int, upstream_port: int, cert: str = "", key: str = "", fd_tls: bool = False
) -> None:
    """The floor for any proxy built on uvloop: a relay to 127.0.0.1:``upstream_port``
    with pooled keep-alive upstream connections and nothing else. It frames GET requests
    by their head and responses by Content-Length, tunnels an Upgrade, and drops
    ``Connection: close`` upstream (answering it downstream). No routing, no header
    rewriting beyond that, no timeouts, no limits, no metrics: not a proxy anyone
    should run, only what the event loop and one Python callback per read cost.
    bgproxy against it shows how much of a gap to nginx is bgproxy's own work. With
    ``cert`` and ``key`` it listens over uvloop's TLS (a memory-BIO SSL protocol), or with
    ``fd_tls`` over OpenSSL on the socket itself (``_fdtls.py``, a prototype).
    """
    import uvloop

    tls = server_tls(TlsFiles(Path(cert), Path(key), Path())) if cert else None

    idle: list[FloorUp] = []

    class FloorUp(asyncio.Protocol):
        def __init__(self, client: FloorClient, request: bytes) -> None:
            self.client: FloorClient | None = client
            self.request = request
            self.transport: asyncio.Transport | None = None
            self.head = b""
            self.left = -1  # body bytes still due; -1 while the head is incomplete

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)
            self.transport.write(self.request)
            self.request = b""

        def data_received(self, data: bytes) -> None:
            client = self.client
            if client is None or client.transport is None:
                return
            if client.tunnel:
                client.transport.write(data)
                return
            if self.left < 0:
                head = self.head + data
                end = head.find(b"\r\n\r\n")
                if end < 0:
                    self.head = head
                    return
                self.head = b""
                if head.startswith(b"HTTP/1.1 101"):
                    client.tunnel = True
                    client.transport.write(head)
                    return
                low = head[: end + 2].lower()  # every field line ends in CRLF
                at = low.find(b"\r\ncontent-length:")
                length = int(low[at + 17 : low.find(b"\r\n", at + 2)]) if at >= 0 else 0
                self.left = length - (len(head) - end - 4)
                if client.close:
                    head = head.replace(b"Connection: keep-alive", b"Connection: close", 1)
                data = head
            else:
                self.left -= len(data)
            client.transport.write(data)
            if self.left <= 0:
                self.left = -1
                self.client = None
                client.up = None
                idle.append(self)
                if client.close:
                    client.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self in idle:
                idle.remove(self)
            if self.client is not None and self.client.transport is not None:
                self.client.transport.close()

    class FloorClient(asyncio.Protocol):
        def __init__(self) -> None:
            self.transport: asyncio.Transport | None = None
            self.up: FloorUp | None = None
            self.buf = b""
            self.close = False
            self.tunnel = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)

        def data_received(self, data: bytes) -> None:
            if self.tunnel:
                if self.up is not None and self.up.transport is not None:
                    self.up.transport.write(data)
                return
            buf = self.buf + data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            request, self.buf = buf[: end + 4], buf[end + 4 :]
            if b"\r\nConnection: close\r\n" in request:
                self.close = True
                request = request.replace(b"Connection: close\r\n", b"", 1)
            if idle and b"\r\nUpgrade:" not in request:
                up = self.up = idle.pop()
                up.client = self
                assert up.transport is not None
                up.transport.write(request)
                return
            up = self.up = FloorUp(self, request)
            connect = loop.create_connection(lambda: up, "127.0.0.1", upstream_port)
            loop.create_task(connect).add_done_callback(self._connected)

        def _connected(self, task: asyncio.Task[Any]) -> None:
            if task.exception() is not None and self.transport is not None:
                self.transport.abort()  # upstream refused: the client sees a reset

        def connection_lost(self, exc: Exception | None) -> None:
            up = self.up
            if up is not None and up.transport is not None:
                up.client = None
                up.transport.close()  # mid-exchange or a tunnel: its stream state is unknown

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)

    async def main() -> None:
        if fd_tls and tls is not None:
            from _fdtls import serve_fd_tls

            serve_fd_tls(loop, FloorClient, port, tls)
        else:
            await loop.create_server(FloorClient, "127.0.0.1", port, backlog=4096, ssl=tls)
        await asyncio.Event().wait()

    loop.run_until_complete(main())


def _helper_main(argv: list[str]) -> int:
    kinds: dict[str, Callable[..., None]] = {
        "ws-echo": serve_ws_echo,
        "uvloop-floor": serve_uvloop_floor,
        "fdtls-floor": functools.partial(serve_uvloop_floor, fd_tls=True),
    }
    if len(argv) < 2 or argv[0] not in kinds:
        print(f"usage: {Path(__file__).name} {{{','.join(kinds)}}} PORT [ARG]", file=sys.stderr)
        return 2
    raise_nofile(1 << 16)
    port, *rest = argv[1:]
    kinds[argv[0]](int(port), *(int(a) if a.isdigit() else a for a in rest))
    return 0


if __name__ == "__main__":
    sys.exit(_helper_main(sys.argv[1:]))


def add_target_args(
    p: argparse.ArgumentParser,
    targets: Sequence[str],
    start_timeout: float = 20,
    default: Sequence[str] | None = None,
) -> None:
    """The options every benchmark shares: which targets, how long to wait, where to write."""
    chosen = list(targets if default is None else default)
    p.add_argument(
        "--targets", type=lambda v: parse_list(v, targets, "--targets"), default=chosen,
        help=f"targets: {','.join(targets)} (default {','.join(chosen)})",
    )  # fmt: skip
    p.add_argument(
        "--start-timeout", type=float, default=start_timeout,
        help=f"seconds to wait for each server (default {start_timeout:g})",
    )  # fmt: skip
    p.add_argument("--json", type=Path, help="write all raw numbers to this file")
