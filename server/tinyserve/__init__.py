"""tinyserve: multi-tenant gRPC serving of small GGUF LLMs on CPUs."""
import os
from pkgutil import extend_path

# The C++ core has its own compute pool; numpy's BLAS threads would only compete with it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Developer builds (tools/dev_build.sh) put _core in a separate folder on PYTHONPATH.
__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
