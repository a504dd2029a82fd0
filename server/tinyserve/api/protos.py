"""The Python modules generated from proto/tinyserve/v1/*.proto (never written by hand).

Where they come from:
- installed package (wheel / `pip install .`): CMakeLists.txt runs grpcio-tools at build time and
  installs them as tinyserve/v1/*_pb2.py;
- source checkout (PYTHONPATH=server, tools/dev_build.sh, editable install): the first import
  generates them from the .proto files into build/proto-py/<hash of the protos>/ (or the user cache
  if build/ is not writable) and puts that folder first on tinyserve's package path. The hash means
  an edited .proto is picked up on the next start, never a stale copy.

Also runnable as a script (used by CMake):  python protos.py PROTO_ROOT OUT_DIR
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

PROTO_PACKAGE_DIR = Path("tinyserve") / "v1"


class ProtoGenerationError(RuntimeError):
    """grpcio-tools is missing or protoc rejected the .proto files."""


def generate(proto_root: Path, out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on proto_root/tinyserve/v1/*.proto into out_dir.

    Writes *_pb2.py, *_pb2.pyi and *_pb2_grpc.py under out_dir/tinyserve/v1/ plus an __init__.py.
    """
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as e:
        raise ProtoGenerationError(
            "generating the gRPC stubs needs grpcio-tools (pip install grpcio-tools)") from e
    protos = sorted((proto_root / PROTO_PACKAGE_DIR).glob("*.proto"))
    if not protos:
        raise ProtoGenerationError(f"no .proto files in {proto_root / PROTO_PACKAGE_DIR}")
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    args += [str(p.relative_to(proto_root)) for p in protos]
    cwd = os.getcwd()
    try:
        os.chdir(proto_root)  # protoc names files relative to -I; keep paths short and stable
        rc = protoc.main(args)
    finally:
        os.chdir(cwd)
    if rc != 0:
        raise ProtoGenerationError(f"protoc failed (exit {rc}) on {[p.name for p in protos]}")
    init = out_dir / PROTO_PACKAGE_DIR / "__init__.py"
    init.write_text('"""Generated from proto/tinyserve/v1 by grpcio-tools. Do not edit."""\n')
    return sorted((out_dir / PROTO_PACKAGE_DIR).iterdir())


def _source_proto_root() -> Path | None:
    """proto/ of the source checkout this module lives in, if any."""
    root = Path(__file__).resolve().parents[3] / "proto"
    return root if (root / PROTO_PACKAGE_DIR).is_dir() else None


def _cache_roots(repo: Path) -> list[Path]:
    roots = [repo / "build" / "proto-py"]
    base = os.environ.get("TINYSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "tinyserve")
    roots.append(Path(base) / "proto-py")
    return roots


def _generate_for_checkout(proto_root: Path) -> Path:
    """Generated package dir (…/tinyserve) for the checkout's current .proto files."""
    h = hashlib.sha256()
    for p in sorted((proto_root / PROTO_PACKAGE_DIR).glob("*.proto")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    digest = h.hexdigest()[:16]
    errors = []
    for root in _cache_roots(proto_root.parent):
        target = root / digest
        if (target / PROTO_PACKAGE_DIR / "__init__.py").exists():
            return target / "tinyserve"
        try:
            root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                generate(proto_root, Path(tmp) / "out")
                try:
                    os.replace(Path(tmp) / "out", target)  # atomic: concurrent starts are safe
                except OSError:
                    if not (target / PROTO_PACKAGE_DIR / "__init__.py").exists():
                        raise
            return target / "tinyserve"
        except OSError as e:
            errors.append(f"{root}: {e}")
    raise ProtoGenerationError("cannot write generated stubs: " + "; ".join(errors))


def _load():
    import tinyserve

    proto_root = _source_proto_root()
    if proto_root is not None:
        pkg_dir = str(_generate_for_checkout(proto_root))
        if pkg_dir not in tinyserve.__path__:
            tinyserve.__path__.insert(0, pkg_dir)
    from tinyserve.v1 import tinyserve_pb2 as pb2
    from tinyserve.v1 import tinyserve_pb2_grpc as pb2_grpc

    return pb2, pb2_grpc


if __name__ == "__main__":  # CMake: python protos.py PROTO_ROOT OUT_DIR
    # Run as a script, this folder is sys.path[0]; its modules (server.py, errors.py) must not
    # shadow anything grpcio-tools imports.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    if len(sys.argv) != 3:
        sys.exit("usage: protos.py PROTO_ROOT OUT_DIR")
    for f in generate(Path(sys.argv[1]), Path(sys.argv[2])):
        print(f)
else:
    pb2, pb2_grpc = _load()
    SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["TinyServe"].full_name  # tinyserve.v1.TinyServe
