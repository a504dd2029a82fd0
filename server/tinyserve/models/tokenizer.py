"""The tokenizer a GGUF file describes, rebuilt from its own metadata on Hugging Face `tokenizers`.

A GGUF carries no tokenizer.json. It stores the vocabulary under llama.cpp's key names:

    tokenizer.ggml.model       "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE with scores)
    tokenizer.ggml.pre         which pre-tokenizer regexes the BPE merges were learned with (gpt2 only)
    tokenizer.ggml.tokens      the vocabulary, id order
    tokenizer.ggml.token_type  1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.merges      "left right" strings, best first (gpt2)
    tokenizer.ggml.scores      one float per token (llama); merges are derived from them
    tokenizer.ggml.{bos,eos,eot,eom,unknown}_token_id, add_bos_token, add_space_prefix

Encoding runs in `tokenizers` (Rust). Decoding is ours: every id maps to the exact bytes it stands
for (`token_bytes`), and text is those bytes joined and read as UTF-8. That one rule serves both
`decode()` and the streaming `IncrementalDetokenizer`, so the two always agree.

Control tokens (type 3) are "special": `<|im_start|>` typed in the text becomes that one token when
`parse_special=True` and is spelled out as ordinary text when False. User-defined tokens (type 4) are
always matched whole, as llama.cpp and transformers do. The metadata dict has the shape
`tinyserve._core.Model(path).metadata()` returns; `metadata_from_gguf` builds the same from a file.
"""

from __future__ import annotations

import codecs
import logging
import operator
import os
import re
import threading
from collections.abc import Mapping, Sequence

from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

log = logging.getLogger(__name__)

__all__ = [
    "IncrementalDetokenizer",
    "Tokenizer",
    "TokenizerError",
    "metadata_from_gguf",
]


class TokenizerError(ValueError):
    """The tokenizer metadata is missing, malformed or unsupported, or an input cannot be handled."""


# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
TOKEN_UNDEFINED = 0
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

SPM_SPACE = "\u2581"  # ▁, SentencePiece's visible space
# Deriving SentencePiece merges cuts every piece at every position, so its cost grows with the square
# of a piece's length. Real vocabularies need ~1e7 here (Gemma 3's 262k pieces: 31 characters at
# most); this bound (a few seconds at worst) refuses vocabularies built to stall the load.
MAX_SPM_MERGE_WORK = 200_000_000

# Control tokens that end an assistant turn in common chat formats, or end generation; generation
# stops on them (with eos/eot/eom). The same texts llama.cpp marks end-of-generation for these models.
END_OF_TURN_TEXTS = frozenset(
    {
        "<|im_end|>",  # ChatML (SmolLM, Qwen)
        "<|eot_id|>",  # Llama 3
        "<|eom_id|>",  # Llama 3.1 tool calls
        "<|end|>",  # Phi-3
        "<end_of_turn>",  # Gemma
        "<|endoftext|>",  # GPT-2 style end of document
        "<|end_of_text|>",  # Llama 3 end of document
        "<EOT>",  # CodeLlama infill
        "<|fim_pad|>",  # Qwen2.5-Coder fill-in-the-middle padding
        "<|repo_name|>",  # Qwen2.5-Coder repository-level completion: a new repository starts
        "<|file_sep|>",  # Qwen2.5-Coder repository-level completion: a new file starts
    }
)

# ---- pre-tokenizer regexes (gpt2-type vocabularies), as named by tokenizer.ggml.pre ----
# Each entry is a list of regexes applied in turn: every regex splits the pieces the previous one
# produced, its matches and the text between them both becoming pieces ("isolated").
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_RE_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_DIGIT = r"\p{N}"

# name -> (regexes, ignore_merges). ignore_merges: a piece that is itself in the vocabulary is taken
# whole before any merging (Llama 3's tokenizer.json sets it; llama.cpp does the same for llama3).
_PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {}
for _names, _spec in [
    (("gpt2", "gpt-2", "default", "mpt", "olmo", "jais", "phi-2", "roberta-bpe", "trillion"), ([_RE_GPT2], False)),
    (
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        ([_RE_DIGIT, _RE_GPT2], False),
    ),
    (
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe", "lfm2", "midm-2.0"),
        ([_RE_LLAMA3], True),
    ),
    (("chatglm-bpe",), ([_RE_LLAMA3], False)),
    (("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"), ([_RE_QWEN2], False)),
    (("gpt-4o", "llama4", "minimax-m2"), ([_RE_GPT4O], False)),
    (("tekken",), ([_RE_TEKKEN], False)),
]:
    for _name in _names:
        _PRE_TOKENIZERS[_name] = _spec


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte gets a printable character. Printable Latin-1 bytes
    stand for themselves; the others (controls, space, ...) take the code points from 256 up, in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
_SPM_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# ---------------------------------------------------------------------------------------------
# metadata access


def metadata_from_gguf(path: str | os.PathLike) -> dict:
    """All key/value metadata of a GGUF file, in the shape `_core.Model(path).metadata()` returns:
    arrays are lists, strings str, integers int, floats float, bools bool.

    Read by the C++ core's validating reader (~0.3 s for a 262k vocabulary) when the extension is
    there, else by the `gguf` package (~15 s). The file need not be a model tinyserve can run."""
    try:
        from tinyserve import _core
    except ImportError:
        return _metadata_with_gguf_py(path)
    if not os.path.isfile(path):
        raise TokenizerError(f"GGUF file not found: {path}")
    try:
        return _core.read_gguf(os.fspath(path))["metadata"]
    except (OSError, ValueError) as e:  # _core.GGUFError is a ValueError naming the file and problem
        msg = str(e).removeprefix(f"{os.fspath(path)}: ")
        raise TokenizerError(f"cannot read GGUF metadata from {path}: {msg}") from None


def _metadata_with_gguf_py(path: str | os.PathLike) -> dict:
    import gguf  # imported here: only this fallback needs it

    try:
        reader = gguf.GGUFReader(os.fspath(path), "r")
    except FileNotFoundError:
        raise TokenizerError(f"GGUF file not found: {path}") from None
    except Exception as e:  # the reader raises assorted errors on malformed files
        raise TokenizerError(f"cannot read GGUF metadata from {path}: {type(e).__name__}: {e}") from None
    meta: dict = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):  # the reader's own header pseudo-fields
            continue
        try:
            meta[name] = _field_value(field)
        except Exception as e:
            raise TokenizerError(f"{path}: cannot read metadata key {name!r}: {e}") from None
    return meta


def _field_value(field):
    import gguf

    vt = gguf.GGUFValueType
    types = field.types
    if not types:
        raise ValueError("field has no type")

    def scalar(part, t):
        if t == vt.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        v = part[0].item()
        if t == vt.BOOL:
            return bool(v)
        return v

    if types[0] == vt.ARRAY:
        if len(types) > 2:  # nested arrays: rare, none of ours; let the reader spell them out
            return field.contents()
        if len(types) == 1:
            return []
        return [scalar(field.parts[i], types[1]) for i in field.data]
    return scalar(field.parts[field.data[0]], types[0])


def _get(meta: Mapping, key: str, kind, default=None, required: bool = False):
    """meta[key] checked against `kind` (a type or tuple of types); bools are not ints here."""
    if key not in meta:
        if required:
            raise TokenizerError(f"GGUF metadata has no {key}")
        return default
    v = meta[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(v, bool) and bool not in kinds:
        raise TokenizerError(f"{key} must be {_kind_name(kinds)}, got bool")
    if not isinstance(v, kinds):
        raise TokenizerError(f"{key} must be {_kind_name(kinds)}, got {type(v).__name__}")
    return v


def _kind_name(kinds) -> str:
    return " or ".join(k.__name__ for k in kinds)


# ---------------------------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary. Immutable after construction; thread-safe."""

    def __init__(
        self,
        *,
        model: str,
        pre: str | None,
        tokens: list[str],
        token_types: list[int],
        hf: HFTokenizer,
        token_bytes: list[bytes],
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        add_eos: bool,
        add_space_prefix: bool,
        stop_ids: frozenset[int],
        special_ids: frozenset[int],
    ):
        # Use Tokenizer.from_metadata / from_gguf; this constructor only stores what they built.
        self.model = model  # "gpt2" or "llama"
        self.pre = pre  # tokenizer.ggml.pre as given (gpt2 only)
        self.vocab_size = len(tokens)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos  # prepend BOS when encode(add_bos=None)
        self.add_eos = add_eos  # informational: encode never appends EOS (prompts must not end)
        self.add_space_prefix = add_space_prefix
        self.stop_ids = stop_ids
        self.special_ids = special_ids
        self._tokens = tokens
        self._types = token_types
        self._bytes = token_bytes
        self._hf = hf  # control tokens matched in text
        self._hf_plain: HFTokenizer | None = None  # control tokens spelled out (built on first use)
        self._lock = threading.Lock()
        # SentencePiece's "add a space in front" is undone when decoding (see _join_bytes).
        self._strip_first_space = model == "llama" and add_space_prefix
        # ids after which text starts afresh: the specials and the (always matched) user-defined tokens
        self._boundary_ids = special_ids | {i for i, t in enumerate(token_types) if t == TOKEN_USER_DEFINED}

    # ---- construction ----

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        return cls.from_metadata(metadata_from_gguf(path))

    @classmethod
    def from_metadata(cls, meta: Mapping) -> Tokenizer:
        if not isinstance(meta, Mapping):
            raise TokenizerError(f"metadata must be a mapping, got {type(meta).__name__}")
        model = _get(meta, "tokenizer.ggml.model", str, required=True)
        if model not in ("gpt2", "llama"):
            raise TokenizerError(
                f"unsupported tokenizer.ggml.model {model!r} (supported: 'gpt2' byte-level BPE, "
                "'llama' SentencePiece BPE)"
            )
        tokens = _get(meta, "tokenizer.ggml.tokens", list, required=True)
        n = len(tokens)
        if n == 0:
            raise TokenizerError("tokenizer.ggml.tokens is empty")
        # _core hands over a string that is not valid UTF-8 as bytes: such a token keeps its exact
        # bytes for decoding, and a "replace"-decoded spelling (which text can hardly produce) for encoding.
        raw: dict[int, bytes] = {}
        texts = []
        for i, t in enumerate(tokens):
            if isinstance(t, (bytes, bytearray)):
                raw[i] = bytes(t)
                t = raw[i].decode("utf-8", errors="replace")
            elif not isinstance(t, str):
                raise TokenizerError(f"tokenizer.ggml.tokens[{i}] must be str, got {type(t).__name__}")
            texts.append(t)
        tokens = texts

        types = _get(meta, "tokenizer.ggml.token_type", list)
        if types is None:
            types = [TOKEN_NORMAL] * n
            if model == "llama":  # old files: recognise byte tokens by their spelling
                types = [TOKEN_BYTE if _SPM_BYTE_TOKEN.fullmatch(t) else TOKEN_NORMAL for t in tokens]
        if len(types) != n:
            raise TokenizerError(f"tokenizer.ggml.token_type has {len(types)} entries but there are {n} tokens")
        for i, t in enumerate(types):
            if isinstance(t, bool) or not isinstance(t, int):
                raise TokenizerError(f"tokenizer.ggml.token_type[{i}] must be int, got {type(t).__name__}")
        types = list(types)

        def token_id(key: str) -> int | None:
            v = _get(meta, key, int)
            if v is None:
                return None
            if not 0 <= v < n:
                raise TokenizerError(f"{key} = {v} is out of range for a vocabulary of {n} tokens")
            return v

        bos_id = token_id("tokenizer.ggml.bos_token_id")
        eos_id = token_id("tokenizer.ggml.eos_token_id")
        eot_id = token_id("tokenizer.ggml.eot_token_id")
        eom_id = token_id("tokenizer.ggml.eom_token_id")
        unk_id = token_id("tokenizer.ggml.unknown_token_id")
        add_bos = _get(meta, "tokenizer.ggml.add_bos_token", bool, default=(model == "llama"))
        add_eos = _get(meta, "tokenizer.ggml.add_eos_token", bool, default=False)
        add_space_prefix = _get(meta, "tokenizer.ggml.add_space_prefix", bool, default=True)
        if add_bos and bos_id is None:
            raise TokenizerError("tokenizer.ggml.add_bos_token is set but there is no tokenizer.ggml.bos_token_id")

        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)  # a duplicate spelling keeps its first id (the later one can't be produced)
        if len(vocab) != n:
            log.debug("vocabulary has %d duplicate token spellings", n - len(vocab))

        pre = None
        if model == "gpt2":
            pre = _get(meta, "tokenizer.ggml.pre", str, default="default")
            hf, token_bytes = _build_byte_level_bpe(meta, tokens, raw, types, vocab, pre)
        else:
            hf, token_bytes = _build_spm_bpe(meta, tokens, raw, types, vocab, unk_id, add_space_prefix)

        _add_special_tokens(hf, tokens, types, vocab)

        special = {i for i, t in enumerate(types) if t == TOKEN_CONTROL}
        special.update(i for i in (bos_id, eos_id, eot_id, eom_id) if i is not None)
        stop = {i for i in (eos_id, eot_id, eom_id) if i is not None}
        stop.update(
            i
            for i, (t, ty) in enumerate(zip(tokens, types))
            if t in END_OF_TURN_TEXTS and ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
        )
        return cls(
            model=model,
            pre=pre,
            tokens=list(tokens),
            token_types=types,
            hf=hf,
            token_bytes=token_bytes,
            bos_id=bos_id,
            eos_id=eos_id,
            add_bos=add_bos,
            add_eos=add_eos,
            add_space_prefix=add_space_prefix,
            stop_ids=frozenset(stop),
            special_ids=frozenset(special),
        )

    # ---- encoding ----

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids for `text`. add_bos None follows the metadata; a BOS is never doubled when the
        text already starts with one. parse_special=False spells control-token text out as plain text
        (for raw user input); user-defined tokens are matched either way."""
        if not isinstance(text, str):
            raise TokenizerError(f"text must be str, got {type(text).__name__}")
        hf = self._hf if parse_special else self._plain()
        try:
            ids = hf.encode(text, add_special_tokens=False).ids
        except Exception as e:  # e.g. a lone surrogate, which Rust strings cannot hold
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as ue:
                raise TokenizerError(f"text is not valid Unicode: {ue.reason} at index {ue.start}") from None
            raise TokenizerError(f"cannot tokenize text: {e}") from None
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise TokenizerError("add_bos requested but this vocabulary has no BOS token")
            if not ids or ids[0] != self.bos_id:
                ids.insert(0, self.bos_id)
        return ids

    def _plain(self) -> HFTokenizer:
        if self._hf_plain is None:
            with self._lock:
                if self._hf_plain is None:
                    plain = HFTokenizer.from_str(self._hf.to_str())
                    plain.encode_special_tokens = True
                    self._hf_plain = plain
        return self._hf_plain

    # ---- decoding ----

    def _check_id(self, i) -> int:
        if type(i) is not int:  # numpy integers are fine, bools and floats are not
            if isinstance(i, bool):
                raise TokenizerError("token id must be int, got bool")
            try:
                i = operator.index(i)
            except TypeError:
                raise TokenizerError(f"token id must be int, got {type(i).__name__}") from None
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {i} out of range [0, {self.vocab_size})")
        return i

    def _join_bytes(self, ids: Sequence[int], skip_special: bool, at_start: bool) -> tuple[bytes, bool]:
        """The bytes `ids` stand for, continuing a text that is at a boundary iff `at_start`.
        Returns (bytes, at a boundary afterwards).

        SentencePiece vocabularies with add_space_prefix: encoding put a ▁ in front of the text and
        after every added (control / user-defined) token, so decoding takes one leading space off
        the first normal token at the start and after each of those tokens."""
        parts = []
        for i in ids:
            i = self._check_id(i)
            if i in self._boundary_ids:
                at_start = True
                if not (skip_special and i in self.special_ids):
                    parts.append(self._bytes[i])
                continue
            b = self._bytes[i]
            if (
                at_start
                and self._strip_first_space
                and b[:1] == b" "
                and self._types[i] in (TOKEN_NORMAL, TOKEN_UNDEFINED)
            ):
                b = b[1:]
            at_start = False
            parts.append(b)
        return b"".join(parts), at_start

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text for `ids`: their bytes joined, read as UTF-8 (invalid bytes become U+FFFD)."""
        data, _ = self._join_bytes(ids, skip_special, True)
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes token `id` stands for (no leading-space rule applied)."""
        return self._bytes[self._check_id(id)]

    def token_text(self, id: int) -> str:
        """The token's spelling in the vocabulary (byte-level or ▁ form, as stored)."""
        return self._tokens[self._check_id(id)]

    def token_to_id(self, text: str) -> int | None:
        """The id whose vocabulary spelling is exactly `text`, or None."""
        return self._hf.token_to_id(text)

    def is_special(self, id: int) -> bool:
        return id in self.special_ids

    def __repr__(self) -> str:
        return (
            f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, add_bos={self.add_bos})"
        )


def _build_byte_level_bpe(meta, tokens, raw, types, vocab, pre) -> tuple[HFTokenizer, list[bytes]]:
    """gpt2-type: byte-level BPE with the file's merges and the regexes `pre` names."""
    raw_merges = _get(meta, "tokenizer.ggml.merges", list, required=True)
    merges = []
    for k, m in enumerate(raw_merges):
        if not isinstance(m, str):
            raise TokenizerError(f"tokenizer.ggml.merges[{k}] must be str, got {type(m).__name__}")
        parts = m.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerError(f"tokenizer.ggml.merges[{k}] = {m!r} is not two tokens separated by one space")
        for p in (parts[0], parts[1], parts[0] + parts[1]):
            if p not in vocab:
                raise TokenizerError(f"tokenizer.ggml.merges[{k}] = {m!r}: {p!r} is not in the vocabulary")
        merges.append((parts[0], parts[1]))

    spec = _PRE_TOKENIZERS.get(pre)
    if spec is None:
        log.warning(
            "unknown tokenizer.ggml.pre %r; splitting text with the GPT-2 regex instead "
            "(tokenization may differ slightly from the model's own)",
            pre,
        )
        spec = _PRE_TOKENIZERS["gpt2"]
    regexes, ignore_merges = spec

    # Bytes without a symbol are dropped when encoding (as transformers does; llama.cpp aborts).
    # Real vocabularies often lack a few rare control characters; 0xC0, 0xC1, 0xF5.. never occur in UTF-8.
    missing = [b for b, c in _BYTE_TO_CHAR.items() if c not in vocab and not (b in (0xC0, 0xC1) or b >= 0xF5)]
    if missing:
        log.info(
            "byte-level vocabulary has no symbol for %d byte(s) (%s); text containing them loses them",
            len(missing),
            ", ".join(f"0x{b:02x}" for b in missing),
        )
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
    except Exception as e:
        raise TokenizerError(f"cannot build the BPE model from tokenizer.ggml.tokens/merges: {e}") from None
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )

    token_bytes = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED) or i in raw:
            token_bytes.append(raw.get(i) or t.encode("utf-8"))  # plain text, not in the byte alphabet
            continue
        try:
            token_bytes.append(bytes(_CHAR_TO_BYTE[c] for c in t))
        except KeyError:  # not byte-level spelled: take it as the text it is
            token_bytes.append(t.encode("utf-8"))
    return hf, token_bytes


def _build_spm_bpe(meta, tokens, raw, types, vocab, unk_id, add_space_prefix) -> tuple[HFTokenizer, list[bytes]]:
    """llama-type: SentencePiece BPE. SentencePiece merges, at every step, the adjacent pair whose
    concatenation is the best-scoring vocabulary piece; a BPE whose merge list is ordered by the
    score of the merged piece does the same. Characters missing from the vocabulary fall back to
    <0xXX> byte tokens; spaces are ▁ and (add_space_prefix) one is put in front of the text."""
    scores = _get(meta, "tokenizer.ggml.scores", list, required=True)
    if len(scores) != len(tokens):
        raise TokenizerError(f"tokenizer.ggml.scores has {len(scores)} entries but there are {len(tokens)} tokens")
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise TokenizerError(f"tokenizer.ggml.scores[{i}] must be a number, got {type(s).__name__}")

    candidates = []  # (-score, id of merged piece, id left, id right, left, right)
    work = 0  # characters copied by the slicing below: sum of len(piece)^2
    for tid, piece in enumerate(tokens):
        if types[tid] not in (TOKEN_NORMAL, TOKEN_UNDEFINED) or len(piece) < 2 or vocab[piece] != tid:
            continue
        work += len(piece) * len(piece)
        if work > MAX_SPM_MERGE_WORK:  # a hostile vocabulary (one 160k-character piece took 27 s)
            raise TokenizerError(
                f"tokenizer.ggml.tokens: the pieces are too long to derive SentencePiece merges from "
                f"(sum of squared piece lengths over {MAX_SPM_MERGE_WORK}; token {tid} has "
                f"{len(piece)} characters)"
            )
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            li, ri = vocab.get(left), vocab.get(right)
            if li is not None and ri is not None:
                candidates.append((-float(scores[tid]), tid, li, ri, left, right))
    candidates.sort(key=lambda c: c[:4])
    merges = [(c[4], c[5]) for c in candidates]

    unk_token = tokens[unk_id] if unk_id is not None else None
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True)
    except Exception as e:
        raise TokenizerError(f"cannot build the BPE model from tokenizer.ggml.tokens/scores: {e}") from None
    hf = HFTokenizer(bpe)
    # Spaces become ▁; with add_space_prefix a ▁ goes in front of every stretch of text between
    # added tokens (llama.cpp and SentencePiece do this even when the text starts with a space, which
    # `Metaspace` would not). No pre-tokenizer: SentencePiece merges across the whole text.
    steps = [normalizers.Prepend(SPM_SPACE)] if add_space_prefix else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPM_SPACE)])

    token_bytes = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        m = _SPM_BYTE_TOKEN.fullmatch(t) if ty == TOKEN_BYTE else None
        b = raw.get(i) or t.encode("utf-8")
        if m:
            token_bytes.append(bytes([int(m.group(1), 16)]))
        elif ty in (TOKEN_CONTROL, TOKEN_UNKNOWN):
            token_bytes.append(b)
        else:
            token_bytes.append(b.replace(SPM_SPACE.encode("utf-8"), b" "))
    return hf, token_bytes


def _add_special_tokens(hf: HFTokenizer, tokens, types, vocab) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens: both are
    then matched whole in text before any splitting."""
    control = [
        AddedToken(t, special=True, normalized=False)
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty == TOKEN_CONTROL and t and vocab[t] == i
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for i, (t, ty) in enumerate(zip(tokens, types))
        if ty == TOKEN_USER_DEFINED and t and vocab[t] == i
    ]
    if control:
        hf.add_special_tokens(control)
    if user:
        hf.add_tokens(user)
    for tok in control + user:
        got = hf.token_to_id(tok.content)
        if got != vocab[tok.content]:
            raise TokenizerError(f"special token {tok.content!r} maps to id {got}, expected {vocab[tok.content]}")


class IncrementalDetokenizer:
    """Streams text as token ids arrive. The pieces add() returns, followed by flush(), join to
    exactly `tok.decode(all ids, skip_special)`; bytes of a UTF-8 character split across tokens
    are held back until the character is complete, so no piece ends in half a character.

    prefix_ids (optional): tokens already in the sequence before the ones to stream (e.g. the
    prompt). They emit nothing, but they mean the streamed text is not at the start of the sequence,
    so SentencePiece's leading-space rule leaves it alone ("The capital is" + " Paris").

    Only the prefix's last few tokens are read (constant time, whatever the prompt's length): what
    streaming after the prefix depends on is whether its last token is a boundary (an added token)
    and the UTF-8 bytes of an unfinished character at its end (at most 3). UTF-8 resynchronizes at
    every lead byte, so the prefix's last PREFIX_TAIL_BYTES bytes leave the decoder holding exactly
    what the whole prefix would. The earlier ids are not checked."""

    PREFIX_TAIL_BYTES = 4  # > the 3 bytes of the longest unfinished character

    def __init__(self, tok: Tokenizer, skip_special: bool = False, *, prefix_ids: Sequence[int] = ()):
        self._tok = tok
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True
        if len(prefix_ids):
            self._at_start, tail = self._tail(prefix_ids)
            self.add(tail)  # output dropped; a character left incomplete there is finished later

    def _tail(self, ids: Sequence[int]) -> tuple[bool, Sequence[int]]:
        """(at a boundary before it, the shortest tail of `ids` whose tokens stand for at least
        PREFIX_TAIL_BYTES bytes, or all of `ids`). The boundary state before token j is set by
        token j - 1 alone (_join_bytes)."""
        join, skip = self._tok._join_bytes, self._skip_special
        j, got, before = len(ids), 0, True
        while j > 0 and got < self.PREFIX_TAIL_BYTES:
            j -= 1
            before = j == 0 or join(ids[j - 1 : j], skip, False)[1]
            got += len(join(ids[j : j + 1], skip, before)[0])
        return before, ids[j:]

    def add(self, ids: Sequence[int]) -> str:
        """New text for these tokens (maybe "" while a character is incomplete)."""
        data, self._at_start = self._tok._join_bytes(ids, self._skip_special, self._at_start)
        return self._utf8.decode(data)

    def flush(self) -> str:
        """Whatever is held (an incomplete character becomes U+FFFD)."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out
