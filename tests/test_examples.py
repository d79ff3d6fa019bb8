"""The shipped examples work: every config passes ``bgproxy check``, and the Kubernetes
manifest and the Dockerfile agree on ports, probes and the config path."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from config import load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "config" / "examples"
CONFIG_PATH = "/etc/bgproxy/bgproxy.yaml"  # the path the Dockerfile documents


def bgproxy_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "admin.cli", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def k8s_documents() -> list[dict[str, Any]]:
    text = (EXAMPLES / "kubernetes.yaml").read_text(encoding="utf-8")
    return [d for d in yaml.safe_load_all(text) if d]


def k8s(kind: str, name: str) -> dict[str, Any]:
    for doc in k8s_documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name} in kubernetes.yaml")


def test_examples_are_what_the_docs_say() -> None:
    names = sorted(p.name for p in EXAMPLES.iterdir())
    assert names == [
        "bgproxy.yaml",
        "fleet-redis.yaml",
        "kubernetes.yaml",
        "rollout.yaml",
        "services.yaml",
        "tls.yaml",
    ]


@pytest.mark.parametrize(
    "name", ["bgproxy.yaml", "fleet-redis.yaml", "rollout.yaml", "services.yaml"]
)
def test_config_example_passes_bgproxy_check(name: str) -> None:
    got = bgproxy_check(EXAMPLES / name)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip().endswith(": ok")


def test_tls_example_passes_bgproxy_check_with_its_certificates_in_place(
    tmp_path: Path,
) -> None:
    """tls.yaml names files under /etc/bgproxy/tls: made here by a test CA, under tmp_path."""
    from tlskit import TestCA

    ca = TestCA(tmp_path)
    text = (EXAMPLES / "tls.yaml").read_text(encoding="utf-8")
    for name in ("shop.example.com", "*.example.com"):
        ca.issue(name)
    path = tmp_path / "tls.yaml"
    path.write_text(text.replace("/etc/bgproxy/tls/", f"{tmp_path}/"), encoding="utf-8")
    got = bgproxy_check(path)
    assert got.returncode == 0, got.stderr
    config = load_config(path)
    assert str(config.tls.listen) == "0.0.0.0:443" and config.tls.redirect_http


def test_kubernetes_configmap_passes_bgproxy_check(tmp_path: Path) -> None:
    embedded = k8s("ConfigMap", "bgproxy-config")["data"]["bgproxy.yaml"]
    path = tmp_path / "bgproxy.yaml"
    path.write_text(embedded, encoding="utf-8")
    got = bgproxy_check(path)
    assert got.returncode == 0, got.stderr


def test_rollout_example_overrides_per_service() -> None:
    shop, api = load_config(EXAMPLES / "rollout.yaml").services
    assert shop.rollout.steps == (5, 20, 50, 100) and shop.rollout.auto_promote
    assert [h.name for h in shop.hooks] == ["ci", "chat"]
    assert api.rollout.step_interval == 300 and not api.rollout.auto_promote
    assert api.hooks == ()


def test_fleet_example_shares_state_in_redis_behind_a_token() -> None:
    config = load_config(EXAMPLES / "fleet-redis.yaml")
    assert config.state.backend == "redis"
    assert config.admin.listen.host == "0.0.0.0"
    assert config.admin.token_env == "BGPROXY_ADMIN_TOKEN"


def test_kubernetes_deployment_probes_ports_and_config_mount(tmp_path: Path) -> None:
    embedded = k8s("ConfigMap", "bgproxy-config")["data"]["bgproxy.yaml"]
    (tmp_path / "c.yaml").write_text(embedded, encoding="utf-8")
    config = load_config(tmp_path / "c.yaml")
    assert config.state.backend == "redis"  # more than one replica needs one state

    deploy = k8s("Deployment", "bgproxy")
    assert deploy["spec"]["replicas"] >= 2
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.listen.port, "admin": config.admin.listen.port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["args"] == ["serve", "-c", CONFIG_PATH]
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == str(Path(CONFIG_PATH).parent)
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == "bgproxy-config"
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env[config.admin.token_env or ""]["valueFrom"]
    # The pod outlives the drain: SIGTERM, drain, exit, before the kubelet's SIGKILL.
    assert pod["terminationGracePeriodSeconds"] > config.drain.timeout

    service = k8s("Service", "bgproxy")
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    redis_host = config.state.redis_url.split("://", 1)[1].split(":", 1)[0]
    k8s("Service", redis_host)


def test_dockerfile_runs_non_root_with_healthcheck_and_the_documented_paths() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    final = text.split("\nFROM ")[-1]  # the runtime stage
    assert final.startswith("python:") and "-slim" in final.splitlines()[0]
    user = re.search(r"^USER (\S+)", final, re.M)
    assert user is not None and user[1].split(":")[0] not in ("root", "0")
    assert re.search(r"^EXPOSE 8080 9901$", final, re.M)
    healthcheck = re.search(r"^HEALTHCHECK .*(?:\n .*)*", final, re.M)
    assert healthcheck is not None and "BGPROXY_HEALTHCHECK_URL" in healthcheck[0]
    assert "BGPROXY_HEALTHCHECK_URL=http://127.0.0.1:9901/healthz" in final
    assert f'CMD ["serve", "-c", "{CONFIG_PATH}"]' in final
    assert f"COPY config/examples/bgproxy.yaml {CONFIG_PATH}" in final
