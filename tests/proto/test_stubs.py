"""Where a source checkout's gRPC stubs come from (tinyserve_client/_protogen.py, stubs.py).

With grpcio-tools they are generated into a cache keyed by the .proto files' digest. Without it
(CI installs the client wheel, whose build had grpcio-tools, but not grpcio-tools itself, which
pins an older protobuf), the checkout copies an installed wheel's stubs, and only when that wheel
was generated from the same .proto files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tinyserve_client import _protogen, stubs

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"


def _fake_installed(tmp_path: Path, digest: str | None) -> Path:
    v1 = tmp_path / "site" / "tinyserve_client" / "v1"
    v1.mkdir(parents=True)
    head = '"""Generated."""\n'
    (v1 / "__init__.py").write_text(head + (f'\nPROTOS_DIGEST = "{digest}"\n' if digest else ""))
    (v1 / "tinyserve_pb2.py").write_text("MARK = 'installed copy'\n")
    return v1


@pytest.fixture
def no_grpc_tools(monkeypatch):
    monkeypatch.setitem(sys.modules, "grpc_tools", None)  # `import grpc_tools` raises ImportError


def test_without_grpc_tools_the_installed_stubs_of_the_same_protos_are_copied(tmp_path, no_grpc_tools):
    digest = _protogen.protos_digest(PROTO_ROOT)
    other = _fake_installed(tmp_path / "a", "0" * 16)  # another version's stubs: never taken
    same = _fake_installed(tmp_path / "b", digest)
    out = _protogen.generate_cached(PROTO_ROOT, [tmp_path / "cache"], [other, same])
    assert out == tmp_path / "cache" / digest
    copied = out / _protogen.OUT_DIR
    assert (copied / "tinyserve_pb2.py").read_text() == "MARK = 'installed copy'\n"
    assert _protogen.stubs_digest(copied) == digest
    # cached: a second call finds it without looking at any installed copy
    assert _protogen.generate_cached(PROTO_ROOT, [tmp_path / "cache"], []) == out


@pytest.mark.parametrize("digest", ["0123456789abcdef", None])
def test_without_grpc_tools_stubs_of_other_protos_are_refused(tmp_path, no_grpc_tools, digest):
    v1 = _fake_installed(tmp_path, digest)
    with pytest.raises(_protogen.GrpcToolsMissing, match="needs grpcio-tools.*no installed tinyserve_client"):
        _protogen.generate_cached(PROTO_ROOT, [tmp_path / "cache"], [v1])
    assert not list((tmp_path / "cache").glob("*/tinyserve_client"))  # nothing half-written is left


def test_an_installed_wheel_says_which_protos_made_its_stubs():
    installed = stubs._installed_stubs()
    if not installed:
        pytest.skip("no installed tinyserve_client wheel on sys.path (pip install ./clients/python)")
    digests = {_protogen.stubs_digest(v1) for v1 in installed}
    assert _protogen.protos_digest(PROTO_ROOT) in digests, (
        f"installed stubs {installed} carry digests {digests}: reinstall the client from this checkout"
    )
