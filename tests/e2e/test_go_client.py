"""clients/go: stubs generated from proto/ with buf (clients/go/buf.gen.yaml), the example built
with Debian's Go packages, run against a real `tinyserve serve` and checked against the Python
client. Skipped, saying what is missing, where Go or its protobuf plugins are not installed
(.ci/run installs them: golang-go, protoc-gen-go, protoc-gen-go-grpc, golang-google-grpc-dev)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_grpcurl import free_port

from tinyserve_client import Client

ROOT = Path(__file__).resolve().parents[2]
MODULE = "tinyserve.dev/clients/go"        # clients/go/go.mod, and go_package in the proto
GOPATH_DEBIAN = "/usr/share/gocode"        # where Debian's golang-*-dev packages put their source
TOOLS = ("go", "protoc-gen-go", "protoc-gen-go-grpc", "buf")


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    """The example binary, built in a private GOPATH (module mode needs a Go proxy)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not Path(GOPATH_DEBIAN, "src", "google.golang.org", "grpc").is_dir():
        missing.append("golang-google-grpc-dev")
    if missing:
        pytest.skip(f"Go example not built: missing {', '.join(missing)}")
    tmp = tmp_path_factory.mktemp("go")
    src = tmp / "src" / MODULE
    shutil.copytree(ROOT / "clients" / "go", src, ignore=shutil.ignore_patterns("gen"))
    subprocess.run(["buf", "generate", "--template", "clients/go/buf.gen.yaml", "-o", str(tmp / "out")],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=120)
    shutil.copytree(tmp / "out" / "clients" / "go" / "gen", src / "gen")
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{tmp}:{GOPATH_DEBIAN}",
           "GOCACHE": str(tmp / "cache"), "GOFLAGS": ""}
    binary = tmp / "tinyserve-example"
    r = subprocess.run(["go", "build", "-o", str(binary), "./cmd/tinyserve-example"], cwd=src,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return binary


@pytest.fixture(scope="module")
def server(default_model_path, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve-go") / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tinyserve.cli", "serve", "--port", str(port),
                                 "--model", str(default_model_path)],
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
    address = f"127.0.0.1:{port}"
    try:
        with Client(address, timeout=120, retries=200, backoff_s=0.2, max_backoff_s=0.5) as c:
            c.list_models()   # retried on UNAVAILABLE until the server listens
        yield address
    finally:
        proc.terminate()
        proc.wait(60)


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
    assert lines[-1] == f"tokenize: [{' '.join(map(str, ids))}]"


@pytest.mark.slow
def test_go_example_reports_status_and_details(example, server):
    r = run(example, "-addr", server, "-max-tokens", "0")
    assert r.returncode == 1
    assert "error: InvalidArgument" in r.stderr and "stopping.max_tokens" in r.stderr
