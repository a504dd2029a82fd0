"""Hatchling build hook: generate tinyserve_client/v1/*_pb2*.py from the .proto files.

The .proto files are found in the sdist (proto/, copied there when the sdist is built) or, when
building from a checkout, in the repository's proto/ two levels up. Nothing generated is committed.
Editable installs get none: in a checkout the package generates them on first import.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _protogen(root: Path):
    """src/tinyserve_client/_protogen.py, loaded on its own (the package needs the stubs)."""
    path = root / "src" / "tinyserve_client" / "_protogen.py"
    spec = importlib.util.spec_from_file_location("_tinyserve_client_protogen", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ProtoStubsHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        root = Path(self.root)
        gen = _protogen(root)
        candidates = [root / "proto", root.parent.parent / "proto"]
        proto_root = next((c for c in candidates if (c / gen.PROTO_DIR).is_dir()), None)
        if proto_root is None:
            raise gen.ProtoGenerationError(f"no proto/tinyserve/v1 in {' or '.join(str(c) for c in candidates)}")
        self._tmp = Path(tempfile.mkdtemp(prefix="tinyserve-client-stubs-"))
        for f in gen.generate(proto_root, self._tmp):
            build_data["force_include"][str(f)] = str(gen.OUT_DIR / f.name)

    def finalize(self, version: str, build_data: dict, artifact_path: str) -> None:
        tmp = getattr(self, "_tmp", None)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
