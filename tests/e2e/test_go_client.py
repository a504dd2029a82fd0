"""clients/go: stubs generated from proto/ with buf (clients/go/buf.gen.yaml), the example built
with Debian's Go packages, run against a real `tinyserve serve` and checked against the Python
client. Skipped, saying what is missing, where Go or its protobuf plugins are not installed
(.ci/run installs them: golang-go, protoc-gen-go, protoc-gen-go-grpc, golang-google-grpc-dev,
golang-google-genproto-dev)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from realservers import free_port, serve_command
from tinyserve_client import Client

ROOT = Path(__file__).resolve().parents[2]
MODULE = "tinyserve.dev/clients/go"  # clients/go/go.mod, and go_package in the proto
GOPATH_DEBIAN = "/usr/share/gocode"  # where Debian's golang-*-dev packages put their source
TOOLS = ("go", "protoc-gen-go", "protoc-gen-go-grpc", "buf")


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """The example binary, built in a private GOPATH (module mode needs a Go proxy)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not Path(GOPATH_DEBIAN, "src", "google.golang.org", "grpc").is_dir():
        missing.append("golang-google-grpc-dev")
    if not Path(GOPATH_DEBIAN, "src", "google.golang.org", "genproto", "googleapis", "rpc", "errdetails").is_dir():
        missing.append("golang-google-genproto-dev")
    if missing:
        pytest.skip(f"Go example not built: missing {', '.join(missing)}")
    tmp = tmp_path_factory.mktemp("go")
    src = tmp / "src" / MODULE
    shutil.copytree(ROOT / "clients" / "go", src, ignore=shutil.ignore_patterns("gen"))
    subprocess.run(
        ["buf", "generate", "--template", "clients/go/buf.gen.yaml", "-o", str(tmp / "out")],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    shutil.copytree(tmp / "out" / "clients" / "go" / "gen", src / "gen")
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{tmp}:{GOPATH_DEBIAN}",
        "GOCACHE": str(tmp / "cache"),
        "GOFLAGS": "",
    }
    binary = tmp / "tinyserve-example"
    r = subprocess.run(
        ["go", "build", "-o", str(binary), "./cmd/tinyserve-example"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    return binary


@pytest.fixture(scope="module")
def server(default_model_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve-go") / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            serve_command(port, "--model", str(default_model_path)),
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
        )
    address = f"127.0.0.1:{port}"
    try:
        with Client(address, timeout=120, retries=200, backoff_s=0.2, max_backoff_s=0.5) as c:
            c.list_models()  # retried on UNAVAILABLE until the server listens
        yield address
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.fixture(scope="module")
def tenant_server(default_model_path, tmp_path_factory):
    """A server with a tenants file: key-go may send one generation request per minute and at
    most 4 output tokens."""
    from tinyserve.tenancy import hash_key

    d = tmp_path_factory.mktemp("serve-go-tenants")
    (d / "tenants.toml").write_text(
        f'[tenants.gopher]\napi_keys_sha256 = ["{hash_key("key-go")}"]\n'
        "requests_per_minute = 1\nmax_output_tokens = 4\n"
    )
    port = free_port()
    with open(d / "stderr.log", "w") as err:
        proc = subprocess.Popen(
            serve_command(port, "--model", str(default_model_path), "--tenants", str(d / "tenants.toml")),
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
        )
    address = f"127.0.0.1:{port}"
    try:
        with Client(address, api_key="key-go", timeout=120, retries=200, backoff_s=0.2, max_backoff_s=0.5) as c:
            c.list_models()
        yield address
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.mark.slow
def test_go_example_sends_the_key_and_decodes_quota_details(example, tenant_server):
    r = run(example, "-addr", tenant_server)  # no key: refused
    assert r.returncode == 1 and "error: Unauthenticated" in r.stderr
    r = run(example, "-addr", tenant_server, "-api-key", "key-go", "-max-tokens", "5")
    assert r.returncode == 1
    assert "error: ResourceExhausted" in r.stderr
    assert "  QuotaFailure: tenant:gopher: max_tokens 5 is over the tenant's limit of 4" in r.stderr
    assert (
        "  ErrorInfo: MAX_OUTPUT_TOKENS (tinyserve.dev) limit=max_output_tokens limit_value=4 tenant=gopher"
    ) in r.stderr
    assert "RetryInfo" not in r.stderr  # waiting cannot help
    r = run(example, "-addr", tenant_server, "-api-key", "key-go", "-max-tokens", "4")
    assert r.returncode == 1  # Generate passes, Chat is the 2nd
    assert "finish: FINISH_REASON_LENGTH, generated_tokens: 4," in r.stdout
    assert "  ErrorInfo: REQUESTS_PER_MINUTE (tinyserve.dev) limit=requests_per_minute" in r.stderr
    (retry,) = [line for line in r.stderr.splitlines() if line.startswith("  RetryInfo: retry in ")]
    assert retry.endswith("s")  # a Go duration, about a minute


@pytest.mark.slow
def test_go_example_decodes_bad_request(example, server):
    r = run(example, "-addr", server, "-max-tokens", "0")
    assert r.returncode == 1
    assert "  BadRequest: stopping.max_tokens: " in r.stderr


def run(example: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(example), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_go_example_matches_the_python_client(example, server):
    r = run(example, "-addr", server, "-prompt", "The capital of France is", "-max-tokens", "12")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    with Client(server, timeout=120) as c:
        default = c.list_models().default_model
        greedy = c.generate("The capital of France is", max_tokens=12, temperature=0)
        ids = c.tokenize("Hello world")
    assert lines[0] == f"default model: {default} (1 served)"
    assert lines[1].startswith("request ") and lines[1].endswith(f" {greedy.prompt_tokens} prompt tokens")
    # the streamed text sits between the start line and the end line; greedy: the same text
    text = r.stdout.split("prompt tokens\n", 1)[1].rsplit("\nfinish: ", 1)[0]
    assert text == greedy.text
    assert f"finish: FINISH_REASON_LENGTH, generated_tokens: {greedy.generated_tokens}," in r.stdout
    assert any(line.startswith("chat: ") for line in lines)
    assert lines[-3] == f"tokenize: [{' '.join(map(str, ids))}]"
    assert lines[-2] == "cancel: Canceled"  # its context cancelled after two chunks
    assert lines[-1] == "deadline: DeadlineExceeded"  # 200 tokens cannot come in 20 ms


@pytest.mark.slow
def test_go_example_reports_status_and_details(example, server):
    r = run(example, "-addr", server, "-max-tokens", "0")
    assert r.returncode == 1
    assert "error: InvalidArgument" in r.stderr and "stopping.max_tokens" in r.stderr
