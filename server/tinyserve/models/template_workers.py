"""Chat templates render in worker processes, so that a runaway can never hold the server's GIL.

The bounded sandbox (template_sandbox.py) stops what it can see; this is the backstop for what it
cannot (one C-level operation that runs long or allocates a lot). A WorkerPool keeps up to `size`
worker processes (`python -c ...template_workers._worker_main()`), each rendering one template at
a time, and:

- sends each render as one length-prefixed JSON frame (the worker is untrusted: no pickle either
  way) and waits for the reply with the calling thread blocked in poll(), GIL released;
- kills a worker (SIGKILL) that has not answered by the render's hard deadline
  (TemplateLimits.time_s, or the request's deadline if sooner, plus HARD_GRACE_S: the worker's
  own clock normally ends it cleanly first), and starts a replacement in the background;
- caps each worker's address space (RLIMIT_AS = TemplateLimits.memory_mb), file size (0) and
  CPU time (set before each render, so a worker whose server died mid-render still ends);
- restarts a worker after it ran out of memory or broke a limit (its heap may be bloated).

Workers compile each template once (cached by source, tokens and limits); a replacement recompiles
on first use. Workers exit when their stdin closes (the server exited) and are killed at exit.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from typing import Any

from tinyserve.models.template_sandbox import (
    ChatTemplateError,
    TemplateDeadlineExceeded,
    TemplateFault,
    TemplateLimitExceeded,
    TemplateLimits,
    TemplateRefused,
    TemplateUnavailable,
)

log = logging.getLogger("tinyserve.templates")

HARD_GRACE_S = 0.5  # past the soft time limit, before the worker is killed
START_TIMEOUT_S = 30.0  # a worker must say "ready" within this (imports Jinja)
MAX_FRAME_BYTES = 64 << 20  # largest reply accepted (the output limit, JSON-escaped, fits)
MAX_WAIT_S = 30.0  # for a free worker, when the render has no deadline of its own
_HEADER = struct.Struct(">I")


class WorkerPool:
    """Up to `size` template worker processes, started on demand (or by prestart())."""

    def __init__(self, size: int = 2, memory_mb: int | None = None):
        if size < 1:
            raise ValueError(f"template worker pool size must be >= 1, got {size}")
        self.size = size
        self.memory_mb = memory_mb or TemplateLimits().memory_mb
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._live: set[_Worker] = set()  # idle and busy
        self._count = 0  # workers alive or starting
        self._closed = False
        self.num_killed = 0  # workers killed for overrunning (for tests and metrics)
        self.num_started = 0

    # ---- public ----
    def render(self, request: dict, time_s: float, deadline: float | None = None) -> str:
        """Render `request` (template, messages, add_generation_prompt, extra) in a worker: the
        text, or the ChatTemplateError the render raised. It may run for time_s once a worker has
        it, or until `deadline` (time.monotonic(), the request's) if sooner; a worker that has not
        answered HARD_GRACE_S after that is killed."""
        try:
            body = json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
        except (TypeError, ValueError) as e:
            raise TemplateRefused(f"the messages and extra variables must be JSON values: {e}") from None
        worker = self._acquire(deadline)
        healthy = False
        try:
            now = time.monotonic()
            is_request = deadline is not None and deadline - now < time_s
            if deadline is not None and is_request:
                time_s = deadline - now
                if time_s <= 0:
                    healthy = True
                    raise TemplateDeadlineExceeded("the request's deadline passed before its chat template rendered")
            head = json.dumps({"time_s": time_s, "deadline_is_request": is_request})[:-1].encode() + b","
            try:
                reply = worker.call(head + body[1:], now + time_s + HARD_GRACE_S)
            except _Overrun:
                self.num_killed += 1
                if is_request:
                    raise TemplateDeadlineExceeded(
                        "the request's deadline passed while its chat template rendered"
                    ) from None
                raise TemplateLimitExceeded(
                    "time_s", f"chat template ran for more than {time_s:g} s (time_s); its worker was killed"
                ) from None
            healthy = reply.get("recycle") is not True
            return _result(reply)
        finally:
            self._release(worker, healthy)

    def prestart(self, n: int = 1) -> None:
        """Start up to n workers now, in the background (the first render then does not wait)."""
        for _ in range(n):
            with self._cond:
                if self._closed or self._count >= self.size or len(self._idle) >= n:
                    return
                self._count += 1
            threading.Thread(target=self._start_into_idle, name="template-worker-start", daemon=True).start()

    def pids(self) -> list[int]:
        """The process ids of the workers alive now (idle or rendering)."""
        with self._cond:
            return [w.pid for w in self._live]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._live.difference_update(idle)
            self._cond.notify_all()
        for w in idle:
            w.stop()

    # ---- internals ----
    def _acquire(self, deadline: float | None) -> _Worker:
        wait_until = deadline if deadline is not None else time.monotonic() + MAX_WAIT_S
        with self._cond:
            while True:
                if self._closed:
                    raise TemplateUnavailable("the template worker pool is closed")
                if self._idle:
                    return self._idle.pop()
                if self._count < self.size:
                    self._count += 1
                    break
                left = wait_until - time.monotonic()
                if left <= 0:
                    if deadline is not None:
                        raise TemplateDeadlineExceeded(
                            "the request's deadline passed while it waited for a chat template worker"
                        )
                    raise TemplateUnavailable(f"all {self.size} chat template workers stayed busy for {MAX_WAIT_S:g} s")
                self._cond.wait(left)
        try:
            return self._start()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def _start(self) -> _Worker:
        w = _Worker(self.memory_mb)
        with self._cond:
            self.num_started += 1
            self._live.add(w)
        return w

    def _start_into_idle(self) -> None:
        try:
            w = self._start()
        except ChatTemplateError as e:
            log.warning("cannot start a chat template worker: %s", e)
            with self._cond:
                self._count -= 1
                self._cond.notify()
            return
        self._release(w, True)

    def _release(self, worker: _Worker, healthy: bool) -> None:
        with self._cond:
            if healthy and worker.alive and not self._closed:
                self._idle.append(worker)
                self._cond.notify()
                return
            self._count -= 1
            self._live.discard(worker)
            self._cond.notify()
            replace = not self._closed
        worker.stop()
        if replace:
            self.prestart(1)  # keep one warm for the next render


class _Overrun(Exception):
    """The worker was killed: it did not answer by its hard deadline."""


def _result(reply: dict) -> str:
    if "text" in reply:
        return reply["text"]
    kind, message = reply.get("error"), str(reply.get("message", ""))
    if kind == "refused":
        raise TemplateRefused(message)
    if kind == "limit":
        raise TemplateLimitExceeded(str(reply.get("limit")), message)
    if kind == "deadline":
        raise TemplateDeadlineExceeded(message)
    raise TemplateFault(message or "chat template worker failed")


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, memory_mb: int):
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        code = (
            f"import sys; sys.path.insert(0, {root!r}); "
            f"from tinyserve.models.template_workers import _worker_main; _worker_main({int(memory_mb)})"
        )
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True
            )
        except OSError as e:
            raise TemplateUnavailable(f"cannot start a chat template worker: {e}") from None
        self.pid = self.proc.pid
        self.alive = True
        try:
            ready = self._read(time.monotonic() + START_TIMEOUT_S)
        except _Overrun:
            self.stop()
            raise TemplateUnavailable("a chat template worker did not start in time") from None
        except TemplateFault as e:
            self.stop()
            raise TemplateUnavailable(f"a chat template worker failed to start: {e}") from None
        if ready.get("ready") is not True:
            self.stop()
            raise TemplateUnavailable("a chat template worker failed to start")

    def call(self, data: bytes, hard_deadline: float) -> dict:
        """Send one request frame (JSON bytes); the reply, or _Overrun past hard_deadline."""
        try:
            stdin = self.proc.stdin
            assert stdin is not None  # started with stdin=PIPE
            stdin.write(_HEADER.pack(len(data)) + data)
            stdin.flush()
        except (BrokenPipeError, OSError):
            self.alive = False
            raise TemplateFault(f"chat template worker died ({self._exit()})") from None
        return self._read(hard_deadline)

    def _read(self, deadline: float) -> dict:
        header = self._read_exact(_HEADER.size, deadline)
        (n,) = _HEADER.unpack(header)
        if n > MAX_FRAME_BYTES:
            self.stop()
            raise TemplateFault(f"chat template worker sent a {n}-byte reply")
        try:
            reply = json.loads(self._read_exact(n, deadline).decode("utf-8", "surrogatepass"))
        except ValueError:
            self.stop()
            raise TemplateFault("chat template worker sent a malformed reply") from None
        if not isinstance(reply, dict):
            self.stop()
            raise TemplateFault("chat template worker sent a malformed reply")
        return reply

    def _read_exact(self, n: int, deadline: float) -> bytes:
        assert self.proc.stdout is not None  # started with stdout=PIPE
        fd = self.proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(max(1, int(left * 1000))):
                if time.monotonic() < deadline:
                    continue
                self.stop()
                raise _Overrun("chat template worker killed: it ran past its time limit")
            chunk = os.read(fd, min(n - len(buf), 1 << 20))
            if not chunk:
                self.alive = False
                status = self._exit()
                raise TemplateFault(f"chat template worker died ({status})")
            buf += chunk
        return bytes(buf)

    def _exit(self) -> str:
        try:
            rc = self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            self.stop()
            return "killed"
        if rc < 0:
            return f"signal {signal.Signals(-rc).name}" if -rc in signal.valid_signals() else f"signal {-rc}"
        return f"exit status {rc}"

    def stop(self) -> None:
        """Kill the process and reap it (idempotent)."""
        self.alive = False
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            log.warning("chat template worker %d did not exit after SIGKILL", self.pid)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


_default: WorkerPool | None = None
_default_lock = threading.Lock()


def default_pool() -> WorkerPool:
    """The process-wide pool (size $TINYSERVE_TEMPLATE_WORKERS, default 2), closed at exit."""
    global _default
    with _default_lock:
        if _default is None:
            try:
                size = int(os.environ.get("TINYSERVE_TEMPLATE_WORKERS", "2"))
            except ValueError:
                size = 2
            _default = WorkerPool(max(1, size))
            atexit.register(_default.close)
        return _default


# ---- the worker process ---------------------------------------------------------------------
def _worker_main(memory_mb: int) -> None:
    """Serve render requests on stdin/stdout until stdin closes."""
    import resource

    from tinyserve.models.template_sandbox import SandboxedTemplate

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    inp = os.fdopen(os.dup(0), "rb", buffering=0)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # a stray print cannot corrupt the protocol
    limit = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    cache: OrderedDict[tuple, SandboxedTemplate] = OrderedDict()

    def send(obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
        out.write(_HEADER.pack(len(data)) + data)

    def read_exact(n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            chunk = inp.read(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    send({"ready": True, "pid": os.getpid()})
    while True:
        header = read_exact(_HEADER.size)
        if header is None:
            return
        body = read_exact(_HEADER.unpack(header)[0])
        if body is None:
            return
        try:
            req = json.loads(body.decode("utf-8", "surrogatepass"))
            time_s = float(req["time_s"])
            # A backstop that needs no parent: CPU seconds used so far + this render's + 2.
            used = resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime
            soft = int(used + time_s + 2)
            resource.setrlimit(
                resource.RLIMIT_CPU,
                (soft, cpu_hard if cpu_hard != resource.RLIM_INFINITY and cpu_hard >= soft else resource.RLIM_INFINITY),
            )
            t = req["template"]
            limits = TemplateLimits(**t["limits"])
            key = (t["source"], t["bos"], t["eos"], tuple(sorted(t["limits"].items())))
            tpl = cache.get(key)
            if tpl is None:
                tpl = SandboxedTemplate(t["source"], t["bos"], t["eos"], limits)
                cache[key] = tpl
                if len(cache) > 16:
                    cache.popitem(last=False)
            else:
                cache.move_to_end(key)
            text = tpl.render(
                req["messages"],
                req["add_generation_prompt"],
                req.get("extra") or {},
                time_s=time_s,
                deadline_is_request=bool(req.get("deadline_is_request")),
            )
            reply: dict[str, Any] = {"text": text}
        except TemplateRefused as e:
            reply = {"error": "refused", "message": str(e)}
        except TemplateDeadlineExceeded as e:
            reply = {"error": "deadline", "message": str(e)}
        except TemplateLimitExceeded as e:
            reply = {"error": "limit", "limit": e.limit, "message": str(e)}
        except MemoryError:
            reply = {
                "error": "limit",
                "limit": "memory_mb",
                "recycle": True,
                "message": f"chat template ran out of memory ({memory_mb} MiB, memory_mb)",
            }
        except ChatTemplateError as e:
            reply = {"error": "fault", "message": str(e)}
        except Exception as e:  # noqa: BLE001 - a malformed request: say so, keep serving
            reply = {"error": "fault", "message": f"chat template worker: {type(e).__name__}: {e}"}
        if _rss_bytes() > limit // 2:
            reply["recycle"] = True  # a bloated heap: let a fresh worker take over
        try:
            send(reply)
        except MemoryError:
            send(
                {
                    "error": "limit",
                    "limit": "memory_mb",
                    "recycle": True,
                    "message": f"chat template ran out of memory ({memory_mb} MiB, memory_mb)",
                }
            )


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
