"""A real ACME server for the tests: Debian's ``pebble`` (RFC 8555 test server).

Pebble validates HTTP-01 and TLS-ALPN-01 for real: it resolves the domain through
``pebble-challtestsrv`` (a DNS server answering 127.0.0.1 for every name) and GETs
``http://<domain>:<http_port>/.well-known/acme-challenge/<token>``, or shakes hands
with ``<domain>:<tls_port>`` offering ALPN ``acme-tls/1``, where the proxy under test
listens. Its own HTTPS is served with a certificate from a ``TestCA``, which
the proxy's ``tls.acme.ca_file`` trusts.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from tlskit import TestCA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{what} did not start: {log.read_text()[-2000:]}")


class Pebble:
    """``pebble`` and its DNS server on free loopback ports; ``http_port`` is where it
    validates HTTP-01 (the proxy's plain listener goes there), ``tls_port`` where it
    validates TLS-ALPN-01 (the proxy's TLS listener)."""

    def __init__(
        self, directory: Path, http_port: int | None = None, tls_port: int | None = None
    ) -> None:
        if shutil.which("pebble") is None or shutil.which("pebble-challtestsrv") is None:
            pytest.skip("pebble is not installed (apt-get install pebble)")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = TestCA(directory / "ca", "pebble HTTPS test CA")
        leaf = self.ca.issue("127.0.0.1", "localhost", file="pebble")
        self.port = free_port()
        self.mgmt_port = free_port()
        self.dns_port = free_port()
        self.http_port = http_port or free_port()
        self.tls_port = tls_port or free_port()
        self.config = directory / "pebble.json"
        self.config.write_text(
            json.dumps(
                {
                    "pebble": {
                        "listenAddress": f"127.0.0.1:{self.port}",
                        "managementListenAddress": f"127.0.0.1:{self.mgmt_port}",
                        "certificate": str(leaf.cert),
                        "privateKey": str(leaf.key),
                        "httpPort": self.http_port,
                        "tlsPort": self.tls_port,
                        "ocspResponderURL": "",
                        "externalAccountBindingRequired": False,
                    }
                }
            )
        )
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> None:
        dns_log = self.dir / "dns.log"
        with dns_log.open("wb") as out:
            dns = subprocess.Popen(
                [
                    "pebble-challtestsrv", "-dns01", f"127.0.0.1:{self.dns_port}",
                    "-http01", "", "-https01", "", "-tlsalpn01", "",
                    "-management", f"127.0.0.1:{free_port()}", "-defaultIPv6", "",
                ],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.procs.append(dns)
        # No sleeping between validation attempts; no random nonce rejections (the
        # default 5% would make a test's outcome a matter of chance).
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
        env.pop("PEBBLE_VA_ALWAYS_VALID", None)  # the challenge answer is what we test
        self.log = self.dir / "pebble.log"
        with self.log.open("wb") as out:
            pebble = subprocess.Popen(
                ["pebble", "-config", str(self.config), "-dnsserver", f"127.0.0.1:{self.dns_port}"],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        self.procs.append(pebble)
        _wait_port(self.port, pebble, "pebble", self.log)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.procs.clear()

    def root_pem(self) -> bytes:
        """The root that signs what this pebble issues (its management interface)."""
        ctx = ssl.create_default_context(cafile=str(self.ca.path))
        url = f"https://127.0.0.1:{self.mgmt_port}/roots/0"
        with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
            data: bytes = resp.read()
        return data

    def validations(self) -> list[str]:
        """The HTTP-01 URLs pebble fetched, from its log."""
        return [
            line.rsplit(" ", 1)[-1]
            for line in self.log.read_text().splitlines()
            if "Attempting to validate w/ HTTP" in line
        ]
