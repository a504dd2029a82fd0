"""Python stubs from proto/tinyserve/v1/*.proto with grpcio-tools (never written by hand).

Used in two places, so it imports nothing of this package:
- the wheel build (clients/python/hatch_build.py): the stubs go into the wheel as
  tinyserve_client/v1/*_pb2*.py;
- a source checkout (tinyserve_client/stubs.py): the first import generates them into a cache
  folder keyed by a hash of the .proto files.

protoc names the modules after the proto path (`tinyserve.v1.tinyserve_pb2`); they are moved under
`tinyserve_client.v1` and their imports of each other are rewritten to match. The descriptors keep
the proto's own file name (tinyserve/v1/tinyserve.proto), so server reflection names it as written.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

PROTO_DIR = Path("tinyserve") / "v1"  # under the proto root: package tinyserve.v1
OUT_DIR = Path("tinyserve_client") / "v1"  # under the output root: tinyserve_client.v1
_IMPORT = re.compile(r"^(from|import) tinyserve\.v1\b", re.MULTILINE)


class ProtoGenerationError(RuntimeError):
    """grpcio-tools is missing or protoc rejected the .proto files."""


class GrpcToolsMissing(ProtoGenerationError):
    """grpcio-tools is not installed (protoc was never run)."""


_DIGEST_LINE = re.compile(r'^PROTOS_DIGEST = "([0-9a-f]+)"$', re.MULTILINE)


def stubs_digest(v1_dir: Path) -> str | None:
    """The protos_digest that generated the stubs in v1_dir (from its __init__.py), if it says."""
    try:
        m = _DIGEST_LINE.search((Path(v1_dir) / "__init__.py").read_text(encoding="utf-8"))
    except OSError:
        return None
    return m.group(1) if m else None


def proto_files(proto_root: Path) -> list[Path]:
    protos = sorted((proto_root / PROTO_DIR).glob("*.proto"))
    if not protos:
        raise ProtoGenerationError(f"no .proto files in {proto_root / PROTO_DIR}")
    return protos


def protos_digest(proto_root: Path) -> str:
    """A short hash of the .proto files' names and contents."""
    h = hashlib.sha256()
    for p in proto_files(proto_root):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def generate(proto_root: Path, out_root: Path) -> list[Path]:
    """Run protoc on proto_root/tinyserve/v1/*.proto; write out_root/tinyserve_client/v1/.

    Writes *_pb2.py, *_pb2.pyi, *_pb2_grpc.py and an __init__.py; returns their paths.
    """
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as e:
        raise GrpcToolsMissing("generating the gRPC stubs needs grpcio-tools (pip install grpcio-tools)") from e
    proto_root = Path(proto_root).resolve()
    protos = proto_files(proto_root)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
        ]
        args += [str(p) for p in protos]  # absolute: protoc names them relative to -I
        rc = protoc.main(args)
        if rc != 0:
            raise ProtoGenerationError(f"protoc failed (exit {rc}) on {[p.name for p in protos]}")
        target = Path(out_root) / OUT_DIR
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted((Path(tmp) / PROTO_DIR).iterdir()):
            text = _IMPORT.sub(r"\1 tinyserve_client.v1", f.read_text(encoding="utf-8"))
            (target / f.name).write_text(text, encoding="utf-8")
    (target / "__init__.py").write_text(
        '"""Generated from proto/tinyserve/v1 by grpcio-tools. Do not edit."""\n\n'
        f'PROTOS_DIGEST = "{protos_digest(proto_root)}"\n',
        encoding="utf-8",
    )
    return sorted(target.iterdir())


def _generate_or_copy(proto_root: Path, out_root: Path, digest: str, prebuilt: list[Path]) -> None:
    """generate(); without grpcio-tools, copy the first of prebuilt (v1 folders of installed
    wheels) that was generated from the same .proto files."""
    try:
        generate(proto_root, out_root)
    except GrpcToolsMissing as e:
        same = next((p for p in prebuilt if stubs_digest(p) == digest), None)
        if same is None:
            raise GrpcToolsMissing(
                f"{e}; no installed tinyserve_client was generated from these .proto files (digest {digest})"
            ) from e
        shutil.copytree(same, Path(out_root) / OUT_DIR)


def generate_cached(proto_root: Path, cache_roots: list[Path], prebuilt: list[Path] | None = None) -> Path:
    """The output root holding tinyserve_client/v1 for the current .proto files.

    Tries each cache root in turn (the first writable one wins); the folder is named by the
    protos' hash, so an edited .proto is picked up on the next import, never a stale copy, and it
    appears atomically (os.replace), so concurrent first imports are safe. Without grpcio-tools,
    the stubs of an installed wheel built from the same .proto files (prebuilt: candidate v1
    folders, checked by their PROTOS_DIGEST) are copied instead.
    """
    digest = protos_digest(proto_root)
    errors = []
    for root in cache_roots:
        target = root / digest
        if (target / OUT_DIR / "__init__.py").exists():
            return target
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=root))
            try:
                _generate_or_copy(proto_root, tmp / "out", digest, prebuilt or [])
                try:
                    os.replace(tmp / "out", target)
                except OSError:
                    if not (target / OUT_DIR / "__init__.py").exists():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return target
        except OSError as e:
            errors.append(f"{root}: {e}")
    raise ProtoGenerationError("cannot write generated stubs: " + "; ".join(errors))
