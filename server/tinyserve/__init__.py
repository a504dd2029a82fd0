"""tinyserve: multi-tenant gRPC serving of small GGUF LLMs on CPUs."""

import os
import sys
from pathlib import Path
from pkgutil import extend_path

# The C++ core has its own compute pool; numpy's BLAS threads would only compete with it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Developer builds (tools/dev_build.sh) put _core in a separate folder on PYTHONPATH.
__path__ = extend_path(__path__, __name__)

# A source checkout (PYTHONPATH=server) uses the client package beside it, clients/python, for the
# gRPC stubs and clients, ahead of any installed copy. An installed tinyserve has no such folder.
_CLIENT_SRC = Path(__file__).resolve().parents[2] / "clients" / "python" / "src"
if (_CLIENT_SRC / "tinyserve_client").is_dir() and str(_CLIENT_SRC) not in sys.path:
    sys.path.insert(0, str(_CLIENT_SRC))

__version__ = "0.1.0"
