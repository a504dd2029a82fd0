"""Server configuration: one dataclass, filled from `tinyserve serve` flags (api/server.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from tinyserve.engine.params import KV_DTYPES, default_kv_dtype


@dataclass
class ServerConfig:
    # -- listening ---------------------------------------------------------------------------
    host: str = "127.0.0.1"                 # bind address ("0.0.0.0" / "[::]" for all interfaces)
    port: int = 50051                       # 0 = any free port (tests)
    # -- models ------------------------------------------------------------------------------
    models: list[str] = field(default_factory=list)  # "PATH" or "NAME=PATH"; first is the default
    models_dir: str | None = None           # also serve every *.gguf in it (sorted by name)
    # -- engine (per model) ------------------------------------------------------------------
    max_num_seqs: int = 64                  # running sequences per model
    max_num_batched_tokens: int = 512       # tokens per engine step (decode + prefill chunks)
    max_waiting: int = 256                  # wait queue bound; full -> RESOURCE_EXHAUSTED
    kv_budget_mb: int = 256                 # KV cache arena per model
    kv_dtype: str = field(default_factory=default_kv_dtype)  # KV cache element type (KV_DTYPES)
    block_size: int = 16                    # KV positions per block
    max_model_len: int | None = None        # None = the model's context length
    chat_template_fallback: str | None = None  # "chatml": serve a model whose chat template fails
                                            # validation with ChatML (WARNING); None: refuse it
    threads: int = 0                        # C++ compute threads (0 = all cores)
    scheduling: str = "fair"                # "fair" (weighted fair share between tenants) | "fifo"
    turn_steps: int = 128                   # a request waiting for its first token may preempt one
                                            # admitted this many steps ago (0 = never; README)
    # -- backpressure (per stream) -----------------------------------------------------------
    max_unread_tokens: int = 256            # generated tokens the client has not read: the stream
                                            # is paused at this many (0 = never)
    stall_timeout_s: float = 30.0           # paused and nothing read this long: cancelled with
                                            # RESOURCE_EXHAUSTED (0 = never)
    # -- request limits ----------------------------------------------------------------------
    default_max_tokens: int = 256           # when a request leaves max_tokens unset
    max_stop_strings: int = 16
    max_stop_bytes: int = 256               # per stop string, UTF-8 bytes
    max_receive_message_bytes: int = 1 << 20  # larger requests are refused (RESOURCE_EXHAUSTED)
    max_send_message_bytes: int = 4 << 20
    # -- connections -------------------------------------------------------------------------
    keepalive_time_s: float = 60.0          # server pings idle connections this often
    keepalive_timeout_s: float = 20.0       # and drops them if the ping is not answered
    min_client_ping_interval_s: float = 10.0  # clients pinging faster get GOAWAY
    max_connection_age_s: float | None = None  # recycle connections (helps L4 load balancers)
    tls_cert: str | None = None             # PEM server certificate chain (enables TLS)
    tls_key: str | None = None              # PEM private key
    tls_client_ca: str | None = None        # PEM CA bundle: require client certificates (mTLS)
    # -- lifecycle / ops ---------------------------------------------------------------------
    drain_seconds: float = 30.0             # SIGTERM: in-flight streams get this long to finish
    metrics_port: int | None = None         # Prometheus endpoint; None = off
    metrics_host: str | None = None         # default: same as host
    tenants_file: str | None = None         # TOML tenants file (docs/tenancy.md); None = one open
                                            # development tenant ("dev"), keys not checked
    log_format: str = "text"                # "text" or "json" (request lines are JSON either way)
    log_level: str = "INFO"

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert/--tls-key")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "kv_budget_mb",
                     "block_size", "default_max_tokens", "max_stop_strings", "max_stop_bytes",
                     "max_receive_message_bytes", "max_send_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("turn_steps", "max_unread_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.stall_timeout_s >= 0:
            raise ValueError(f"stall_timeout_s must be >= 0, got {self.stall_timeout_s}")
        if self.drain_seconds < 0:
            raise ValueError("drain_seconds must be >= 0")
        if self.scheduling not in ("fair", "fifo"):
            raise ValueError(f"scheduling must be 'fair' or 'fifo', got {self.scheduling!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        if self.chat_template_fallback not in (None, "chatml"):
            raise ValueError(f"chat_template_fallback must be 'chatml' or unset, got {self.chat_template_fallback!r}")
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be 'text' or 'json', got {self.log_format!r}")
