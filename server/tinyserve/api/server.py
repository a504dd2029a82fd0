"""The grpc.aio server: tinyserve.v1.TinyServeService + grpc.health.v1 + reflection, drain on SIGTERM.

    server, port = create_server(config)           # or create_server(config, engines=[...]) in tests
    await server.start()
    ...
    await server.drain(config.drain_seconds)       # health NOT_SERVING; after the drain notice new
                                                   # streams UNAVAILABLE; in-flight streams finish
                                                   # (or get UNAVAILABLE)
    server.registry.reload()                       # what SIGHUP does: re-read the tenants file

`tinyserve serve` (cli.py) parses its flags into a ServerConfig and calls run(config).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from tinyserve.api.async_engine import AsyncEngine
from tinyserve.api.errors import REASON_DRAINING, Unavailable
from tinyserve.api.interceptors import AuthInterceptor
from tinyserve.api.protos import SERVICE_NAME, pb2
from tinyserve.api.servicer import ServedModel, ServingState, TinyServeServicer
from tinyserve.api.wire import reject_malformed, tolerant_deserializer
from tinyserve.config import ServerConfig
from tinyserve.engine.engine import LLMEngine
from tinyserve.memory import MemorySplit, memory_split
from tinyserve.metrics import Metrics
from tinyserve.tenancy import DEV_TENANT, TenantConfigError, TenantRegistry

log = logging.getLogger("tinyserve.server")

# A grpc.health.v1 service name that stays SERVING until the process stops, drains included: what
# a liveness probe checks (deploy/kubernetes.yaml). "" and tinyserve.v1.TinyServeService turn
# NOT_SERVING when a drain starts: what readiness probes and balancers check.
LIVENESS_SERVICE = "liveness"


class TinyServeServer:
    """A grpc.aio server with its engines, health, metrics endpoint and drain logic."""

    def __init__(
        self,
        grpc_server: grpc.aio.Server,
        port: int,
        servicer: TinyServeServicer,
        config: ServerConfig,
        metrics: Metrics,
        registry: TenantRegistry,
    ):
        self.grpc_server = grpc_server
        self.port = port
        self.servicer = servicer
        self.config = config
        self.metrics = metrics
        self.health = health_aio.HealthServicer()
        self.metrics_port: int | None = None
        self.registry = registry
        self._metrics_http: Any = None  # prometheus_client's WSGI server, once started
        self._stopped = False

    @property
    def models(self) -> list[ServedModel]:
        return list(self.servicer.models.values())

    @property
    def state(self) -> ServingState:
        return self.servicer.state

    async def start(self) -> None:
        for m in self.models:
            m.engine.start()
        await self.grpc_server.start()
        for service in ("", SERVICE_NAME, LIVENESS_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_port is not None:
            from prometheus_client import start_http_server

            host = self.config.metrics_host or self.config.host
            self._metrics_http, _ = start_http_server(
                self.config.metrics_port, addr=host.strip("[]"), registry=self.metrics.registry
            )
            self.metrics_port = self._metrics_http.server_port

    async def drain(
        self, grace_s: float | None = None, force: asyncio.Event | None = None, notice_s: float | None = None
    ) -> bool:
        """Lame duck, then stop: health NOT_SERVING at once (balancers and readiness probes take
        the replica out) while new streams are still served for notice_s seconds; then new
        streams get UNAVAILABLE (retry elsewhere) and in-flight ones may finish for up to
        grace_s; then stop. `force` set: skip what is left of both. The liveness service stays
        SERVING throughout.

        Returns True if every stream finished in time (the rest end with UNAVAILABLE).
        """
        grace_s = self.config.drain_seconds if grace_s is None else grace_s
        notice_s = self.config.drain_notice_s if notice_s is None else notice_s
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        forced = asyncio.ensure_future(force.wait()) if force is not None else None
        if notice_s > 0:
            log.info("drain notice: health NOT_SERVING, still accepting new streams for %.1fs", notice_s)
            if forced is None:
                await asyncio.sleep(notice_s)
            else:
                await asyncio.wait([forced], timeout=notice_s)
        self.state.draining = True
        log.info("draining: %d stream(s) in flight, up to %.1fs", self.state.inflight, grace_s)
        idle = asyncio.ensure_future(self.state.wait_idle(grace_s))
        await asyncio.wait([idle] + ([forced] if forced else []), return_when=asyncio.FIRST_COMPLETED)
        for w in (idle, forced):
            if w is not None:
                w.cancel()
        clean = self.state.inflight == 0
        if not clean:
            log.warning("drain: %d stream(s) still running; ending them with UNAVAILABLE", self.state.inflight)
            for m in self.models:
                m.engine.fail_all(
                    Unavailable("the server shut down before the request finished", reason=REASON_DRAINING)
                )
            await self.state.wait_idle(5.0)
        await self.health.enter_graceful_shutdown()  # liveness too: the process is going
        await self.stop(grace=1.0)
        return clean

    async def stop(self, grace: float | None = None) -> None:
        if self._stopped:
            return
        self._stopped = True
        await self.grpc_server.stop(grace)
        for m in self.models:
            await asyncio.get_running_loop().run_in_executor(None, m.engine.stop)
        self.registry.close(wait=False)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self.grpc_server.wait_for_termination(timeout)


# ---- building the server -------------------------------------------------------------------
def load_registry(config: ServerConfig, metrics: Metrics) -> TenantRegistry:
    """The tenants of config.tenants_file (raises TenantConfigError naming the line and field),
    or the open development tenant; usage counters mirrored into `metrics`; quotas and usage in
    config.quota_store (Redis shared by the replicas) or in this process."""
    from tinyserve.tenancy.store import open_store

    kwargs = dict(
        usage_observer=metrics.observe_usage,
        store=open_store(config.quota_store),
        store_policy=config.quota_store_policy,
        lease_seconds=config.quota_lease_seconds,
        on_store_error=metrics.count_quota_store_error,
    )
    if config.tenants_file is None:
        return TenantRegistry.open_dev(**kwargs)
    return TenantRegistry.from_file(config.tenants_file, **kwargs)


def create_server(
    config: ServerConfig | None = None,
    engines: list[LLMEngine] | None = None,
    metrics: Metrics | None = None,
    registry: TenantRegistry | None = None,
) -> tuple[TinyServeServer, int]:
    """Build (not start) the server; bind config.host:config.port (0 = a free port).

    `engines` are LLMEngines (tests pass fakes with the same public API); None loads config's
    models.
    `registry` (with `metrics`) comes from load_registry; None loads config's tenants.
    Must be called with an asyncio event loop running.
    """
    config = config or ServerConfig()
    config.validate()
    if registry is not None and metrics is None:
        raise ValueError("pass the Metrics the registry's usage observer feeds")
    metrics = metrics or Metrics()
    registry = registry or load_registry(config, metrics)
    if engines is None:
        engines = load_engines(config, registry)
    models: list[ServedModel] = []
    for eng in engines:
        name = eng.model.name
        if any(m.name == name for m in models):
            raise ValueError(f"two models are named {name!r}; name them with --model NAME=PATH")
        metrics.set_cache_config(name, eng.config.block_size, eng.stats().kv_blocks_total)
        model_metrics = metrics.for_model(name, eng.config.kv_dtype)
        model_metrics.observe_kv_cache(eng.stats())  # the cache's size before the first step
        bridge = AsyncEngine(
            eng, name, model_metrics, max_unread_tokens=config.max_unread_tokens, stall_timeout_s=config.stall_timeout_s
        )
        models.append(ServedModel(name, eng.model, bridge))
    metrics.watch_memory(lambda: engines_memory(engines))
    servicer = TinyServeServicer(models, config, metrics, ServingState(), registry)

    server = grpc.aio.server(
        interceptors=[AuthInterceptor(registry.authenticate, (SERVICE_NAME,), on_refused=metrics.count_refused)],
        options=_channel_options(config),
    )
    server.add_generic_rpc_handlers((_service_handler(servicer),))
    app = TinyServeServer(server, 0, servicer, config, metrics, registry)
    health_pb2_grpc.add_HealthServicer_to_server(app.health, server)
    reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME), server)

    address = f"{config.host}:{config.port}"
    if config.tls_cert:
        port = server.add_secure_port(address, _tls_credentials(config))
    else:
        port = server.add_insecure_port(address)
    if not port:
        raise OSError(f"cannot listen on {address}")
    app.port = port
    return app, port


def _channel_options(c: ServerConfig) -> list[tuple[str, int]]:
    opts = [
        ("grpc.max_receive_message_length", c.max_receive_message_bytes),
        ("grpc.max_send_message_length", c.max_send_message_bytes),
        ("grpc.keepalive_time_ms", int(c.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(c.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(c.min_client_ping_interval_s * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.so_reuseport", 0),  # a second server on the same port fails instead of sharing it
    ]
    if c.max_connection_age_s:  # an aged connection's streams get as long as a drain gives them
        grace_s = c.drain_notice_s + c.drain_seconds
        opts += [
            ("grpc.max_connection_age_ms", int(c.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(grace_s * 1000)),
        ]
    return opts


def _tls_credentials(c: ServerConfig) -> grpc.ServerCredentials:
    if not (c.tls_key and c.tls_cert):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    key, cert = Path(c.tls_key).read_bytes(), Path(c.tls_cert).read_bytes()
    ca = Path(c.tls_client_ca).read_bytes() if c.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _service_handler(servicer: TinyServeServicer) -> grpc.GenericRpcHandler:
    """Method handlers for every RPC in the proto, with the tolerant (UTF-8 aware) deserializer."""
    service = pb2.DESCRIPTOR.services_by_name["TinyServeService"]
    handlers = {}
    for method in service.methods:
        req_cls = getattr(pb2, method.input_type.name)
        resp_cls = getattr(pb2, method.output_type.name)
        behavior = reject_malformed(getattr(servicer, method.name), method.server_streaming)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            behavior,
            request_deserializer=tolerant_deserializer(req_cls),
            response_serializer=resp_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


# ---- models --------------------------------------------------------------------------------
def model_specs(config: ServerConfig) -> list[tuple[str | None, str]]:
    """(name or None, path) for every model to serve; the default model when none is given."""
    from tinyserve.models.catalog import resolve_model  # PATH or a catalog NAME (pulled on first use)

    specs: list[tuple[str | None, str]] = []
    for spec in config.models:
        name, sep, path = spec.partition("=")
        if sep and name and "/" not in name and path:
            specs.append((name, str(resolve_model(path)[1])))
        else:
            served, found = resolve_model(spec)
            specs.append((served, str(found)))
    if config.models_dir:
        d = Path(config.models_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"--models-dir {d} is not a directory")
        files = sorted(d.glob("*.gguf"))
        if not files:
            raise FileNotFoundError(f"--models-dir {d} holds no .gguf files")
        specs += [(None, str(p)) for p in files]
    if not specs:
        from tinyserve.models.default import default_model_path

        specs.append((None, str(default_model_path())))
    return specs


def load_engines(config: ServerConfig, registry: TenantRegistry | None = None) -> list[LLMEngine]:
    """Load every model of the config and put an LLMEngine on each. The engines read tenants'
    fair-share weights and KV shares from `registry` (live: reloads apply at the next step)."""
    from tinyserve import _core

    # Size the compute pool up front (0 = all cores). Also sidesteps a hang seen when the pool was
    # first created lazily inside the first forward (reported to the core's owner).
    from tinyserve.cpus import default_threads
    from tinyserve.models.loader import load_model

    _core.set_num_threads(config.threads or default_threads())  # 0: the cgroup's CPU limit
    engines = []
    for name, path in model_specs(config):
        t0 = time.monotonic()
        model = load_model(path, name=name, chat_template_fallback=config.chat_template_fallback, device=config.device)
        engines.append(
            LLMEngine(
                model,
                config.engine_config(registry.weight if registry else None, registry.kv_share if registry else None),
            )
        )
        log.info(
            "loaded model %s from %s in %.1fs (chat template: %s)",
            model.name,
            path,
            time.monotonic() - t0,
            model.chat_template_origin,
        )
    return engines


def engines_memory(engines: list[LLMEngine]) -> MemorySplit:
    """This process's RSS split over the engines' model files, repacked weights and KV arenas."""
    paths, repacked, kv = [], 0, 0
    for eng in engines:
        model = eng.model
        if getattr(model, "path", None):
            paths.append(str(model.path))
        repacked += int(getattr(model, "config", {}).get("repacked_bytes", 0) or 0)
        arena = getattr(eng, "kv", None)
        if arena is not None:
            kv += int(arena.total_bytes)
    return memory_split(paths, repacked, kv)


# ---- running -------------------------------------------------------------------------------
class JsonFormatter(logging.Formatter):
    """One JSON object per line; request lines merge their fields in at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name}
        fields = getattr(record, "json_fields", None)
        if fields is not None:
            out.update(fields)
        else:
            out["msg"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


def setup_logging(config: ServerConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain; SIGHUP reloads the tenants file. Returns the exit code."""
    from tinyserve.device import check_device

    check_device(config.device)  # DeviceUnavailable: before any file is read or port opened
    metrics = Metrics()
    try:
        registry = load_registry(config, metrics)  # before the models: a bad file fails fast
    except TenantConfigError as e:
        log.error("cannot serve: bad tenants file: %s", e)
        return 1
    if config.tenants_file is None:
        log.warning(
            "no tenants file given: serving one open development tenant %r; API keys are not checked", DEV_TENANT
        )
    else:
        log.info("tenants from %s: %s", config.tenants_file, ", ".join(registry.config.names))
    loop = asyncio.get_running_loop()
    try:
        engines = await loop.run_in_executor(None, load_engines, config, registry)
        server, port = create_server(config, engines, metrics, registry)
    except BaseException:
        registry.close(wait=False)
        raise
    await server.start()
    log.info("memory: %s (KV budget %d MiB per model)", engines_memory(engines).describe(), config.kv_budget_mb)
    log.info(
        "tinyserve listening on %s:%d (models: %s)%s",
        config.host,
        port,
        ", ".join(m.name for m in server.models),
        f"; metrics on :{server.metrics_port}/metrics" if server.metrics_port else "",
    )
    stop, force = asyncio.Event(), asyncio.Event()

    def on_signal():
        if stop.is_set():
            force.set()  # a second signal skips the rest of the grace period
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    # SIGHUP: re-read the tenants file off the loop (streams keep flowing); a bad file is logged
    # (file, line, field) and the current tenants stay. Without a file it only logs that.
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.run_in_executor(None, registry.reload))
    await stop.wait()
    clean = await server.drain(config.drain_seconds, force)
    log.info("stopped (%s)", "drained" if clean else "grace period over")
    return 0


def run(config: ServerConfig) -> int:
    """Set up logging and serve until a signal: the exit code (0 after a drain, 1 if the server
    cannot start). `config` is validated (ServerConfig.validate)."""
    setup_logging(config)
    try:
        return asyncio.run(serve(config))
    except (OSError, ValueError, RuntimeError) as e:
        log.error("cannot serve: %s", e)
        return 1
