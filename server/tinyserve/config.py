"""Server configuration: one dataclass, every setting named once.

A field that `tinyserve serve` sets carries its flag (`_flag`: name, help, --help section,
argparse keywords); cli.py builds the flags from the fields. The engine settings have the
engine's names and defaults (EngineConfig), except the KV budget, which the server sizes from the
machine's memory (tinyserve.memory): `engine_config()` passes the fields the two share to every
model's engine.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tinyserve.device import DEVICES, resolve_device
from tinyserve.engine.params import KV_DTYPES, EngineConfig, default_kv_dtype
from tinyserve.memory import default_kv_budget_mb

_ENGINE = EngineConfig()  # the engine's defaults are the server's


@dataclass(frozen=True)
class Flag:
    """How `tinyserve serve` sets a ServerConfig field (cli.py turns it into argparse)."""

    name: str  # e.g. "--max-num-seqs"
    help: str | None = None  # argparse help; "%(default)s" shows the default
    group: str | None = None  # --help section; None: the top level
    argparse: dict[str, Any] = dataclasses.field(default_factory=dict)  # type, choices, action...


def _flag(
    default: Any, name: str, help: str | None = None, group: str | None = None, env: str | None = None, **argparse: Any
) -> Any:
    """A dataclass field with default `default` (a function: called for each instance, e.g. to
    read the environment), set by flag `name` (and, when given, by the environment variable
    `env`, which the flag overrides)."""
    meta = {"flag": Flag(name, help, group, argparse)}
    if env is not None:
        return dataclasses.field(default_factory=lambda: os.environ.get(env) or default, metadata=meta)
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=meta)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_E, _B, _R, _O = "engine", "backpressure (per stream)", "requests", "operations"
_M = "many replicas"


@dataclass
class ServerConfig:
    # -- listening, models, tenants ----------------------------------------------------------
    host: str = _flag("127.0.0.1", "--host", "bind address (default %(default)s)")
    port: int = _flag(50051, "--port", "port (default %(default)s; 0 = any)", type=int)
    models: list[str] = _flag(  # "PATH", "NAME=PATH" or a catalog name; the first is the default
        [],
        "--model",
        "GGUF model to serve: a file or a catalog name (`tinyserve models list`; "
        "pulled on first use); repeatable; the first is the default model; default: the "
        "built-in SmolLM2-135M-Instruct",
        action="append",
        metavar="[NAME=]PATH|MODEL",
    )
    models_dir: str | None = _flag(  # also serve every *.gguf in it (sorted by name)
        None, "--models-dir", "also serve every *.gguf file in this directory"
    )
    tenants_file: str | None = _flag(  # None = one open development tenant ("dev"), no keys
        None,
        "--tenants",
        "tenants file (TOML; see docs/tenancy.md): API keys, weights, quotas. "
        "SIGHUP reloads it. Default: one open development tenant, no keys checked",
        metavar="FILE",
    )
    # -- engine (per model; names and defaults are EngineConfig's) ------------------------------
    max_num_seqs: int = _flag(_ENGINE.max_num_seqs, "--max-num-seqs", "running sequences per model", _E, type=int)
    max_num_batched_tokens: int = _flag(
        _ENGINE.max_num_batched_tokens,
        "--max-num-batched-tokens",
        "token budget of one engine step while one tenant has the model to itself (default %(default)s)",
        _E,
        type=int,
    )
    contended_step_tokens: int = _flag(
        _ENGINE.contended_step_tokens,
        "--contended-step-tokens",
        "token budget of one engine step while another tenant was "
        "busy in the last few hundred steps, and all of them still "
        "are (default %(default)s)",
        _E,
        type=int,
    )
    idle_step_tokens: int = _flag(
        _ENGINE.idle_step_tokens,
        "--idle-step-tokens",
        "token budget of one engine step while a tenant that was "
        "busy in the last few hundred steps has no work: short steps, "
        "so its next request waits little (default %(default)s)",
        _E,
        type=int,
    )
    max_waiting: int = _flag(
        _ENGINE.max_waiting, "--max-waiting", "wait queue bound (full -> RESOURCE_EXHAUSTED)", _E, type=int
    )
    kv_budget_mb: int = _flag(
        default_kv_budget_mb(),
        "--kv-budget-mb",  # (not the engine's 256)
        "KV cache per model, MiB (default %(default)s: 1/16 of this machine's memory, 256 to 2048)",
        _E,
        type=int,
    )
    kv_dtype: str = _flag(
        default_kv_dtype,
        "--kv-dtype",  # $TINYSERVE_KV_DTYPE, else the engine's
        "KV cache element type: q8_0 (int8 with a scale per 32, about half the "
        "bytes of f16) or f16 (default %(default)s; $TINYSERVE_KV_DTYPE sets it)",
        _E,
        choices=KV_DTYPES,
    )
    block_size: int = _ENGINE.block_size  # KV positions per block (no flag)
    max_model_len: int | None = _flag(
        None, "--max-model-len", "cap on prompt + output tokens", _E, type=int
    )  # None = the model's context length
    chat_template_fallback: str | None = _flag(
        None,
        "--chat-template-fallback",
        "serve a model whose chat template fails validation "
        "at load with ChatML (logged as a WARNING) instead of refusing to start",
        _E,
        choices=("chatml",),
    )
    threads: int = _flag(
        0,
        "--threads",
        "compute threads (0 = the CPUs this process may use: its affinity, capped by a cgroup CPU limit)",
        _E,
        type=int,
    )
    device: str | None = _flag(
        None,
        "--device",
        "where the forward runs: cpu, or cuda (a build with "
        "TINYSERVE_CUDA and an NVIDIA GPU); default $TINYSERVE_DEVICE, else cpu",
        _E,
        choices=DEVICES,
    )
    scheduling: str = _flag(
        _ENGINE.scheduling,
        "--scheduling",
        "who runs first when tenants compete: weighted fair share (default) or arrival order",
        _E,
        choices=("fair", "fifo"),
    )
    turn_steps: int = _flag(
        _ENGINE.turn_steps,
        "--turn-steps",
        "a request waiting for its first token may preempt a sequence "
        "admitted at least this many engine steps ago (default "
        "%(default)s; 0 = never)",
        _E,
        type=int,
    )
    # -- backpressure (per stream) -----------------------------------------------------------
    max_unread_tokens: int = _flag(
        256,
        "--max-unread-tokens",
        "pause a stream once this many generated tokens wait for its "
        "client to read them (default %(default)s; 0 = never)",
        _B,
        type=int,
    )
    stall_timeout_s: float = _flag(
        30.0,
        "--stall-timeout-seconds",
        "cancel a paused stream whose client reads nothing for this "
        "long (RESOURCE_EXHAUSTED; default %(default)g; 0 = never)",
        _B,
        type=float,
    )
    # -- requests ----------------------------------------------------------------------------
    default_max_tokens: int = _flag(
        256, "--default-max-tokens", "max_tokens of a request that leaves it unset", _R, type=int
    )
    max_receive_message_bytes: int = _flag(
        1 << 20,
        "--max-message-bytes",  # larger: refused
        "largest request accepted",
        _R,
        type=int,
    )
    max_send_message_bytes: int = 4 << 20
    # -- operations --------------------------------------------------------------------------
    drain_seconds: float = _flag(
        30.0,
        "--drain-seconds",
        "on SIGTERM, how long in-flight streams may run on (after the drain notice)",
        _O,
        type=float,
    )
    drain_notice_s: float = _flag(
        0.0,
        "--drain-notice-seconds",
        "on SIGTERM, health turns NOT_SERVING at once but new streams "
        "are still accepted for this long, so balancers and readiness "
        "probes take the replica out first (default %(default)g)",
        _O,
        type=float,
    )
    metrics_port: int | None = _flag(None, "--metrics-port", "serve Prometheus metrics here", _O, type=int)
    metrics_host: str | None = None  # default: same as host
    keepalive_time_s: float = _flag(
        60.0,
        "--keepalive-seconds",  # ping idle connections
        None,
        _O,
        type=float,
    )
    keepalive_timeout_s: float = 20.0  # and drop them if the ping is not answered
    min_client_ping_interval_s: float = 10.0  # clients pinging faster get GOAWAY
    max_connection_age_s: float | None = _flag(  # recycle connections (helps L4 load balancers)
        None, "--max-connection-age-seconds", None, _O, type=float
    )
    tls_cert: str | None = _flag(None, "--tls-cert", "PEM certificate chain (enables TLS)", _O)
    tls_key: str | None = _flag(None, "--tls-key", "PEM private key", _O)
    tls_client_ca: str | None = _flag(
        None, "--tls-client-ca", "PEM CA bundle; clients must present a certificate (mTLS)", _O
    )
    log_format: str = _flag(
        "text",
        "--log-format",
        None,
        _O,  # request lines are JSON either way
        choices=("text", "json"),
    )
    log_level: str = _flag("INFO", "--log-level", None, _O)
    # -- many replicas -----------------------------------------------------------------------
    quota_store: str | None = _flag(  # None: in this process (one box)
        None,
        "--quota-store",
        "share tenant quotas and usage with every replica using the same "
        "Redis: redis://HOST:PORT/DB (default: $TINYSERVE_QUOTA_STORE, else in this process)",
        _M,
        env="TINYSERVE_QUOTA_STORE",
        metavar="URL",
    )
    quota_store_policy: str = _flag(
        "open",
        "--quota-store-policy",
        "when the quota store cannot be reached: admit without "
        "limits (open, logged and counted) or refuse with "
        "UNAVAILABLE (closed)",
        _M,
        choices=("open", "closed"),
    )
    quota_lease_seconds: float = _flag(
        10.0,
        "--quota-lease-seconds",
        "a stream's concurrency slot in the quota store lapses "
        "this long after its replica stops renewing it (a "
        "replica that died)",
        _M,
        type=float,
    )

    def engine_config(
        self, tenant_weight: Callable[[str], float] | None = None, tenant_kv_share: Callable[[str], float] | None = None
    ) -> EngineConfig:
        """Every model's EngineConfig: the fields both configs name, the KV budget in bytes, and
        the tenants' fair-share weights and KV shares (callables, so reloads apply)."""
        shared = {f.name for f in dataclasses.fields(EngineConfig)} & {f.name for f in dataclasses.fields(self)}
        return EngineConfig(
            **{name: getattr(self, name) for name in sorted(shared)},
            kv_budget_bytes=self.kv_budget_mb << 20,
            tenant_weight=tenant_weight,
            tenant_kv_share=tenant_kv_share,
        )

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting (the engine's are EngineConfig.validate's)."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert/--tls-key")
        for name in ("kv_budget_mb", "default_max_tokens", "max_receive_message_bytes", "max_send_message_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_unread_tokens < 0:
            raise ValueError(f"max_unread_tokens must be >= 0, got {self.max_unread_tokens}")
        if not self.stall_timeout_s >= 0:
            raise ValueError(f"stall_timeout_s must be >= 0, got {self.stall_timeout_s}")
        if self.drain_seconds < 0:
            raise ValueError("drain_seconds must be >= 0")
        if not self.drain_notice_s >= 0:
            raise ValueError(f"drain_notice_s must be >= 0, got {self.drain_notice_s}")
        if self.quota_store_policy not in ("open", "closed"):
            raise ValueError(f"quota_store_policy must be 'open' or 'closed', got {self.quota_store_policy!r}")
        if not self.quota_lease_seconds > 0:
            raise ValueError(f"quota_lease_seconds must be > 0, got {self.quota_lease_seconds}")
        if self.quota_store and not self.quota_store.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"--quota-store {self.quota_store!r}: give redis://HOST:PORT/DB (or rediss://, unix://)")
        if self.chat_template_fallback not in (None, "chatml"):
            raise ValueError(f"chat_template_fallback must be 'chatml' or unset, got {self.chat_template_fallback!r}")
        resolve_device(self.device)
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be 'text' or 'json', got {self.log_format!r}")
        self.engine_config().validate()


def serve_flags() -> list[tuple[str, Flag]]:
    """(field name, its flag) of every ServerConfig field `tinyserve serve` sets, in field order."""
    return [(f.name, f.metadata["flag"]) for f in dataclasses.fields(ServerConfig) if "flag" in f.metadata]
