"""`tinyserve serve` flags -> ServerConfig, defaults, model specs, TLS and mTLS."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_fakes import FakeEngine

from tinyserve.api.server import model_specs
from tinyserve.cli import add_serve_arguments, config_from_args
from tinyserve.config import ServerConfig
from tinyserve.engine.params import EngineConfig
from tinyserve.memory import default_kv_budget_mb
from tinyserve_client import Client


def parse(argv):
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return config_from_args(p.parse_args(argv))


def test_no_arguments_is_the_default_config():
    cfg = parse([])
    assert cfg == ServerConfig()
    assert (cfg.host, cfg.port, cfg.models, cfg.tenants_file) == ("127.0.0.1", 50051, [], None)


def test_flags_reach_the_config():
    cfg = parse(
        [
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--model",
            "a=/m/a.gguf",
            "--model",
            "/m/b.gguf",
            "--metrics-port",
            "9100",
            "--drain-seconds",
            "3",
            "--max-num-seqs",
            "8",
            "--max-message-bytes",
            "2048",
            "--log-format",
            "json",
            "--tenants",
            "t.toml",
            "--scheduling",
            "fifo",
        ]
    )
    assert cfg.port == 0 and cfg.metrics_port == 9100 and cfg.drain_seconds == 3
    assert cfg.max_num_seqs == 8 and cfg.max_receive_message_bytes == 2048 and cfg.log_format == "json"
    assert cfg.tenants_file == "t.toml" and cfg.scheduling == "fifo"
    assert model_specs(cfg) == [("a", "/m/a.gguf"), (None, "/m/b.gguf")]


def test_engine_config_takes_the_servers_engine_settings():
    """ServerConfig.engine_config(): every model's EngineConfig, from the fields the two name."""
    cfg = parse(
        [
            "--max-num-seqs",
            "3",
            "--max-num-batched-tokens",
            "33",
            "--max-waiting",
            "7",
            "--kv-budget-mb",
            "5",
            "--kv-dtype",
            "f32",
            "--max-model-len",
            "99",
            "--scheduling",
            "fifo",
            "--turn-steps",
            "4",
        ]
    )
    weight = {"a": 2.0}.get
    e = cfg.engine_config(tenant_weight=weight)
    assert (
        e.max_num_seqs,
        e.max_num_batched_tokens,
        e.max_waiting,
        e.kv_budget_bytes,
        e.kv_dtype,
        e.max_model_len,
        e.scheduling,
        e.turn_steps,
        e.block_size,
    ) == (3, 33, 7, 5 << 20, "f32", 99, "fifo", 4, 16)
    assert e.tenant_weight is weight and e.tenant_kv_share is None
    # the server's defaults are the engine's, but for the KV budget: sized from the machine
    assert ServerConfig().engine_config() == dataclasses.replace(
        EngineConfig(), kv_budget_bytes=default_kv_budget_mb() << 20
    )


def test_the_server_module_parses_no_flags():
    """`tinyserve serve`'s flags live in cli.py: the server module does not load argparse."""
    code = "import sys, tinyserve.api.server; print('argparse' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_models_dir(tmp_path):
    for n in ("b.gguf", "a.gguf", "notes.txt"):
        (tmp_path / n).write_bytes(b"")
    cfg = ServerConfig(models_dir=str(tmp_path))
    assert model_specs(cfg) == [(None, str(tmp_path / "a.gguf")), (None, str(tmp_path / "b.gguf"))]
    with pytest.raises(FileNotFoundError):
        model_specs(ServerConfig(models_dir=str(tmp_path / "missing")))


@pytest.mark.parametrize(
    "bad",
    [
        dict(port=70000),
        dict(tls_cert="c.pem"),
        dict(tls_client_ca="ca.pem"),
        dict(max_waiting=0),
        dict(drain_seconds=-1),
        dict(log_format="xml"),
        dict(scheduling="lottery"),
    ],
)
def test_bad_configs_are_refused(bad):
    with pytest.raises(ValueError):
        ServerConfig(**bad).validate()


def test_duplicate_model_names_are_refused(serve):
    with pytest.raises(ValueError, match="two models"):
        serve([FakeEngine(), FakeEngine()])


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            f"{name}.pem",
            cwd=d,
        )
    return d


def test_tls(serve, pki):
    srv = serve(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"))
    with Client(f"localhost:{srv.port}", timeout=10, tls=True, root_certificates=str(pki / "ca.pem")) as c:
        assert c.generate("tls", max_tokens=3).text == "tls"
    with Client(f"localhost:{srv.port}", timeout=5, retries=0) as c:  # plaintext to a TLS port
        with pytest.raises(grpc.RpcError):
            c.generate("x", max_tokens=1)


def test_mtls_requires_a_client_certificate(serve, pki):
    srv = serve(tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"), tls_client_ca=str(pki / "ca.pem"))
    with Client(
        f"localhost:{srv.port}",
        timeout=10,
        root_certificates=str(pki / "ca.pem"),
        private_key=str(pki / "client.key"),
        certificate_chain=str(pki / "client.pem"),
    ) as c:
        assert c.generate("mtls", max_tokens=4).text == "mtls"
    with Client(f"localhost:{srv.port}", timeout=5, retries=0, root_certificates=str(pki / "ca.pem")) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate("x", max_tokens=1)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.slow
def test_engines_follow_the_tenants_weights_and_kv_shares(default_model_path, tmp_path):
    from tinyserve.api.server import load_engines
    from tinyserve.tenancy import TenantRegistry

    path = tmp_path / "tenants.toml"
    path.write_text("[tenants.acme]\nweight = 2.0\nkv_share = 0.5\n")
    registry = TenantRegistry.from_file(path)
    try:
        (eng,) = load_engines(
            ServerConfig(models=[str(default_model_path)], scheduling="fifo", kv_budget_mb=8), registry
        )
        cfg = eng.config
        assert cfg.scheduling == "fifo"
        assert (cfg.tenant_weight("acme"), cfg.tenant_kv_share("acme")) == (2.0, 0.5)
        path.write_text("[tenants.acme]\nweight = 3.0\n")
        assert registry.reload()
        assert (cfg.tenant_weight("acme"), cfg.tenant_kv_share("acme")) == (3.0, 1.0)
    finally:
        registry.close()
