"""tinyserve: multi-tenant gRPC serving of small GGUF LLMs on CPUs."""
from pkgutil import extend_path

# Developer builds (tools/dev_build.sh) put _core in a separate folder on PYTHONPATH.
__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
