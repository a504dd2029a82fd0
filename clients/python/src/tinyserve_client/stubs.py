"""The generated protobuf and gRPC modules of tinyserve.v1: `pb2`, `pb2_grpc`, `SERVICE_NAME`.

Installed (a wheel of clients/python): they were generated when the wheel was built and live in
tinyserve_client/v1/. Source checkout (clients/python/src on sys.path, or an editable install): the
first import generates them from the checkout's proto/ into build/proto-py/<hash>/ (or, if that is
not writable, $TINYSERVE_CACHE or ~/.cache/tinyserve/proto-py) and puts that folder on this
package's path; this needs grpcio-tools, or an installed wheel of this package built from the same
.proto files (its stubs are copied then).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import tinyserve_client
from tinyserve_client import _protogen

_PACKAGE = Path(__file__).resolve().parent


def source_proto_root() -> Path | None:
    """proto/ of the source checkout this package lives in (clients/python/src/...), if any."""
    root = _PACKAGE.parents[3] / "proto"
    return root if (root / _protogen.PROTO_DIR).is_dir() else None


def _cache_roots(repo: Path) -> list[Path]:
    base = os.environ.get("TINYSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "tinyserve"
    )
    return [repo / "build" / "proto-py", Path(base) / "proto-py"]


def _installed_stubs() -> list[Path]:
    """v1 folders of installed copies of this package on sys.path (not this checkout's)."""
    found = []
    for entry in sys.path:
        v1 = Path(entry or ".") / "tinyserve_client" / "v1"
        try:
            if (v1 / "__init__.py").is_file() and v1.resolve().parent != _PACKAGE:
                found.append(v1)
        except OSError:
            continue
    return found


def _find() -> str:
    """Where tinyserve_client.v1 comes from: "installed" or "checkout"."""
    if (_PACKAGE / "v1" / "__init__.py").exists():
        return "installed"
    proto_root = source_proto_root()
    if proto_root is None:
        raise _protogen.ProtoGenerationError(
            f"tinyserve_client has no generated stubs in {_PACKAGE / 'v1'} and is not in a source "
            "checkout with proto/: reinstall it (pip install ./clients/python)"
        )
    out = _protogen.generate_cached(proto_root, _cache_roots(proto_root.parent), _installed_stubs())
    pkg_dir = str(out / "tinyserve_client")
    if pkg_dir not in tinyserve_client.__path__:
        tinyserve_client.__path__.insert(0, pkg_dir)
    return "checkout"


ORIGIN = _find()

from tinyserve_client.v1 import tinyserve_pb2 as pb2  # noqa: E402 - found by _find() above
from tinyserve_client.v1 import tinyserve_pb2_grpc as pb2_grpc  # noqa: E402

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["TinyServeService"].full_name  # tinyserve.v1.TinyServeService

__all__ = ["ORIGIN", "SERVICE_NAME", "pb2", "pb2_grpc"]
