"""Structured output: the shape a request's output must have (a JSON Schema, any JSON object, a
regex, a Lark grammar or a choice of strings), enforced token by token with llguidance.

    fmt = ResponseFormat("json_schema", schema_text)       # fmt.validate(): sizes, ParamError
    compiler = GrammarCompiler.for_tokenizer(tokenizer)    # one per vocabulary, built on first use
    grammar = compiler.compile(fmt)                        # any thread (a tenant's pool); cached
    engine.add_request(..., grammar=grammar.matcher())     # one matcher per request

llguidance (Rust, on PyPI) does the work: `LLMatcher` is an Earley parser over the grammar with a
lexer built lazily against the vocabulary's token bytes. Constructing one is the "compile"; the
compiled matcher is cached per (vocabulary, format) and every request gets a `deep_copy` of it
(microseconds). Each engine step, `fill_masks` computes the allowed-token bitmask of every
constrained row at once (LLExecutor: parallel, without the GIL) and `apply_mask` sets the logits
of forbidden tokens to -inf, so greedy, temperature, top-k/p and min-p all choose among allowed
tokens only; the chosen token is then fed back (`GrammarMatcher.consume`). The model's stop
tokens are the grammar's end-of-sequence: allowed only where the structure is complete. Special
(control) tokens are never allowed inside the structure. Unconstrained rows are not touched.

Limits (documented in README, "Structured output"): a JSON Schema, regex or Lark grammar is at
most MAX_GRAMMAR_BYTES, a choice at most MAX_CHOICES options of MAX_CHOICE_BYTES; the parser's
work is bounded by LIMITS (fuel for the lexer at compile time and per step, Earley items per
step, lexer states, grammar symbols), so neither a compile nor a step can run away; the server
waits at most COMPILE_TIMEOUT_S for a compile. A grammar that breaks a limit or does not compile
raises ParamError on the request field used (INVALID_ARGUMENT with a BadRequest naming it).
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .params import ParamError

if TYPE_CHECKING:
    from tinyserve.models.tokenizer import Tokenizer

__all__ = [
    "COMPILE_TIMEOUT_S",
    "FORMATS",
    "Grammar",
    "GrammarCompiler",
    "GrammarMatcher",
    "MAX_CHOICES",
    "MAX_CHOICE_BYTES",
    "MAX_GRAMMAR_BYTES",
    "ResponseFormat",
    "apply_mask",
    "fill_masks",
]

FORMATS = ("json_schema", "json_object", "regex", "lark_grammar", "choice")
MAX_GRAMMAR_BYTES = 64 << 10  # a JSON Schema, regex or Lark grammar, UTF-8
MAX_CHOICES = 256  # options of a choice ...
MAX_CHOICE_BYTES = 1024  # ... each 1 to this many bytes
COMPILE_TIMEOUT_S = 5.0  # the server's wait for one compile (the fuel below bounds it anyway)
CACHE_SIZE = 256  # compiled grammars kept per vocabulary (least recently used dropped)

# JSON is written with one space after ':' and ',' and no other whitespace: a small model given
# free whitespace can emit newlines until max_tokens. A schema's own "x-guidance" options override.
JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _limits() -> Any:
    import llguidance

    # llguidance's defaults, tightened where a step runs on the engine thread:
    return llguidance.LLParserLimits(
        initial_lexer_fuel=1_000_000,  # lexer construction at compile (~20 ms of work)
        step_lexer_fuel=100_000,  # lexer work per token mask (~7 ms), on the engine thread
        step_max_items=20_000,  # Earley items per token mask (~1 ms)
        max_lexer_states=50_000,  # lexer DFA states (~1-2 kB each): <= ~100 MB per grammar
        max_grammar_size=200_000,  # grammar symbols
        verbose_errors=False,
    )  # errors name the problem, not the parser's state


@dataclass(frozen=True)
class ResponseFormat:
    """What a request's output must be. `kind` is one of FORMATS; `value` the schema, regex or
    grammar text, the options of a choice (a tuple), or None for json_object."""

    kind: str
    value: str | tuple[str, ...] | None = None

    @property
    def field(self) -> str:
        """The request field this format came from (where errors point)."""
        return "response_format.choice.options" if self.kind == "choice" else f"response_format.{self.kind}"

    def validate(self) -> None:
        """Raise ParamError (on self.field) for a format too large or malformed to compile."""
        if self.kind not in FORMATS:
            raise ParamError("response_format", f"unknown format {self.kind!r} (one of {', '.join(FORMATS)})")
        if self.kind == "json_object":
            return
        if self.kind == "choice":
            opts = self.value
            if not isinstance(opts, tuple) or not opts:
                raise ParamError(self.field, "a choice needs at least one option")
            if len(opts) > MAX_CHOICES:
                raise ParamError(self.field, f"at most {MAX_CHOICES} options, got {len(opts)}")
            for i, o in enumerate(opts):
                n = len(o.encode("utf-8", "surrogatepass")) if isinstance(o, str) else -1
                if not 1 <= n <= MAX_CHOICE_BYTES:
                    raise ParamError(
                        f"{self.field}[{i}]",
                        f"an option is 1 to {MAX_CHOICE_BYTES} bytes" + (f", got {n}" if n >= 0 else ", and a string"),
                    )
            return
        if not isinstance(self.value, str) or not self.value:
            raise ParamError(self.field, "must not be empty")
        n = len(self.value.encode("utf-8", "surrogatepass"))
        if n > MAX_GRAMMAR_BYTES:
            raise ParamError(self.field, f"at most {MAX_GRAMMAR_BYTES} bytes, got {n}")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.value)
            except ValueError as e:
                raise ParamError(self.field, f"not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise ParamError(self.field, f"a JSON Schema is an object (or a boolean), got {type(schema).__name__}")

    def grammar_text(self) -> str:
        """The llguidance grammar for this format (call validate() first)."""
        from llguidance import LLMatcher

        text = self.value if isinstance(self.value, str) else ""
        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(text)
        if self.kind == "lark_grammar":
            return LLMatcher.grammar_from_lark(text)
        # choice: one Lark rule of string literals (JSON string syntax is Lark's)
        return LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in self.value or ())
        )


class GrammarMatcher:
    """One request's position in its grammar. Engine thread only (after matcher() made it)."""

    __slots__ = ("_m", "end_token")

    def __init__(self, m: Any, end_token: int) -> None:
        self._m = m
        self.end_token = end_token  # the stop token appended when the structure is complete

    def consume(self, token: int) -> bool:
        """Feed the sampled token; False if the grammar refused it (then it is in error)."""
        return bool(self._m.consume_token(int(token)))

    @property
    def is_complete(self) -> bool:
        """The structure is finished: nothing but end-of-sequence may follow."""
        return self._m.is_stopped() and not self._m.is_error()

    @property
    def error(self) -> str | None:
        return self._m.get_error() or None if self._m.is_error() else None


class Grammar:
    """A compiled grammar for one vocabulary: immutable, shared by the requests that use it."""

    def __init__(self, fmt: ResponseFormat, template: Any, end_token: int) -> None:
        self.format = fmt
        self._template = template  # an LLMatcher that never consumes a token
        self._end_token = end_token

    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the start of the grammar (any thread)."""
        return GrammarMatcher(self._template.deep_copy(), self._end_token)


class GrammarCompiler:
    """Compiles response formats against one vocabulary and caches the results (thread-safe)."""

    _by_tokenizer: weakref.WeakKeyDictionary[Tokenizer, GrammarCompiler] = weakref.WeakKeyDictionary()
    _class_lock = threading.Lock()

    def __init__(self, tokenizer: Tokenizer, cache_size: int = CACHE_SIZE):
        import llguidance

        self.vocab_size = tokenizer.vocab_size
        stops = sorted(tokenizer.stop_ids)
        if not stops:
            raise ValueError("structured output needs a vocabulary with an end-of-sequence token")
        eos = tokenizer.eos_id if tokenizer.eos_id in tokenizer.stop_ids else stops[0]
        self.end_token = eos
        self._llt = llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_Vocabulary(tokenizer, eos)), n_vocab=self.vocab_size, eos_token=stops
        )
        self._limits = _limits()
        self._cache: OrderedDict[ResponseFormat, Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.num_compiled = 0  # compiles done (cache misses that compiled)

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> GrammarCompiler:
        """The compiler of this vocabulary, built on first use (~0.5 s for 49k tokens)."""
        with cls._class_lock:
            c = cls._by_tokenizer.get(tokenizer)
            if c is None:
                c = cls._by_tokenizer[tokenizer] = cls(tokenizer)
            return c

    def compile(self, fmt: ResponseFormat) -> Grammar:
        """The compiled grammar for `fmt` (cached). Raises ParamError on fmt.field."""
        with self._lock:
            g = self._cache.get(fmt)
            if g is not None:
                self._cache.move_to_end(fmt)
                return g
        fmt.validate()
        import llguidance

        try:
            text = fmt.grammar_text()
        except ValueError as e:  # not a JSON object (validate() checked, but be sure)
            raise ParamError(fmt.field, str(e)) from None
        m = llguidance.LLMatcher(self._llt, text, log_level=0, limits=self._limits)
        if m.is_error():
            raise ParamError(fmt.field, _clean(m.get_error()))
        # The first mask, computed once here: a grammar that allows no token at all is refused
        # now, and the work of its first step is not done on the engine thread.
        first = np.zeros((1, _words(self.vocab_size)), np.int32)
        m.unsafe_compute_mask_ptr(first.ctypes.data, first.nbytes)
        if m.is_error():
            raise ParamError(fmt.field, _clean(m.get_error()))
        if not first.any():
            raise ParamError(fmt.field, "no token of this model's vocabulary can start the output")
        g = Grammar(fmt, m, self.end_token)
        with self._lock:
            self.num_compiled += 1
            self._cache[fmt] = g
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return g

    @property
    def num_cached(self) -> int:
        with self._lock:
            return len(self._cache)


class _Vocabulary:
    """What llguidance.TokenizerWrapper reads: each token's exact bytes, the special ids (never
    allowed inside a structure), and an encoder for the text it forces."""

    def __init__(self, tok: Tokenizer, eos: int):
        self.eos_token_id = eos
        self.bos_token_id = tok.bos_id
        self.tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
        self.special_token_ids = sorted(tok.special_ids)
        self._tok = tok

    def __call__(self, text: bytes) -> list[int]:
        return self._tok.encode(text.decode("utf-8", "replace"), add_bos=False, parse_special=False)


def _clean(message: str) -> str:
    """llguidance's error message on one line, without its source excerpt's caret lines."""
    lines = [ln.strip() for ln in message.splitlines()]
    lines = [ln for ln in lines if ln and set(ln) - set("^| 0123456789")]
    return "; ".join(lines) or "the grammar does not compile"


def _words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


_executor: Any = None  # llguidance.LLExecutor, made on first use
_executor_lock = threading.Lock()


def _get_executor() -> Any:
    global _executor
    with _executor_lock:
        if _executor is None:
            import llguidance

            _executor = llguidance.LLExecutor(num_threads=max(1, min(8, os.cpu_count() or 1)))
        return _executor


def fill_masks(matchers: Iterable[GrammarMatcher], vocab_size: int) -> np.ndarray:
    """The allowed-token bitmasks [n, ceil(V/32)] int32 of `matchers` (bit t of row i: token t
    is allowed for matcher i), computed in parallel without the GIL."""
    ms = list(matchers)
    masks = np.zeros((len(ms), _words(vocab_size)), np.int32)
    if len(ms) == 1:
        ms[0]._m.unsafe_compute_mask_ptr(masks.ctypes.data, masks.nbytes)
    elif ms:
        _get_executor().unsafe_compute_mask_ptr(
            [(m._m, i) for i, m in enumerate(ms)], masks.ctypes.data, masks.shape[1] * 4, len(ms)
        )
    return masks


def apply_mask(row: np.ndarray, mask: np.ndarray) -> bool:
    """Set row[t] = -inf for every token the bitmask `mask` forbids (in place; row is float32 of
    the logits width). False if the mask allows nothing (the caller ends the request)."""
    allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")
    n = row.shape[0]
    if allowed.shape[0] < n:  # logits wider than the vocabulary: the extra ids are never allowed
        allowed = np.concatenate([allowed, np.zeros(n - allowed.shape[0], np.uint8)])
    allowed = allowed[:n].view(bool)
    if not allowed.any():
        return False
    np.copyto(row, np.float32(-np.inf), where=~allowed)
    return True
