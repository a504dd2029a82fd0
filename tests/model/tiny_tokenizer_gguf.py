"""Tiny GGUF files that carry only a tokenizer (no tensors), written with gguf.GGUFWriter.

- SentencePiece-style ("llama"): <unk>, <s>, </s>, 256 <0xXX> byte tokens, a handful of scored
  pieces, two control tokens and one user-defined token.
- Byte-level BPE ("gpt2"): the 256 byte symbols, a few merges, two control tokens.

The pieces are chosen so that merge order matters (see SPM_PIECES): greedy-by-score gives a
different answer from left-to-right merging on several words.
"""

from __future__ import annotations

from pathlib import Path

import gguf

UNK, BOS, EOS = 0, 1, 2
BYTE0 = 3  # <0x00> .. <0xFF> are ids 3 .. 258

# (piece, score): higher scores merge first
SPM_PIECES = [
    ("\u2581", -100.0),
    ("e", -101.0),
    ("h", -102.0),
    ("l", -103.0),
    ("o", -104.0),
    ("t", -105.0),
    ("w", -106.0),
    ("r", -107.0),
    ("d", -108.0),
    ("a", -109.0),
    ("n", -110.0),
    ("!", -111.0),
    ("he", -1.0),
    ("ll", -2.0),
    ("\u2581t", -3.0),
    ("\u2581the", -4.0),
    ("\u2581h", -5.0),
    ("lo", -6.0),
    ("llo", -7.0),
    ("hello", -8.0),
    ("\u2581hello", -9.0),
    ("or", -10.0),
    ("ld", -11.0),
    ("\u2581w", -12.0),
    ("\u2581\u2581", -13.0),
    ("an", -14.0),
    ("\u2581an", -15.0),
    ("\u2581and", -16.0),
]
SPM_CONTROL = ["<|im_start|>", "<|im_end|>"]
SPM_USER = ["<sep>"]


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) of the tiny SentencePiece vocabulary."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    types = [2, 3, 3] + [6] * 256
    for piece, score in SPM_PIECES:
        tokens.append(piece)
        scores.append(score)
        types.append(1)
    for t in SPM_CONTROL:
        tokens.append(t)
        scores.append(0.0)
        types.append(3)
    for t in SPM_USER:
        tokens.append(t)
        scores.append(0.0)
        types.append(4)
    return tokens, scores, types


def write_spm_tokenizer_gguf(
    path: str | Path,
    *,
    add_space_prefix: bool | None = None,
    add_bos: bool | None = None,
    chat_template: str | None = None,
) -> Path:
    """A llama-type tokenizer GGUF. Keys left None are left out (so the defaults apply)."""
    tokens, scores, types = spm_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(BOS)
    w.add_eos_token_id(EOS)
    w.add_unk_token_id(UNK)
    if add_space_prefix is not None:
        w.add_add_space_prefix(add_space_prefix)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    _finish(w)
    return Path(path)


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, written out independently of the code under test."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, n = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(0x100 + n)
            n += 1
    return [out[b] for b in range(256)]


BPE_MERGES = ["\u0120 t", "h e", "\u0120t he", "l l", "ll o", "\u0120 w", "o r", "\u0120w or", "1 2"]
BPE_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def bpe_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the tiny byte-level vocabulary: control tokens first (like
    SmolLM's), then the 256 byte symbols, then one token per merge."""
    tokens = list(BPE_CONTROL) + _byte_alphabet()
    types = [3] * len(BPE_CONTROL) + [1] * 256
    for m in BPE_MERGES:
        tokens.append(m.replace(" ", ""))
        types.append(1)
    return tokens, types, list(BPE_MERGES)


def write_bpe_tokenizer_gguf(path: str | Path, *, pre: str | None = "gpt2") -> Path:
    tokens, types, merges = bpe_vocab()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    _finish(w)
    return Path(path)


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# Text every tokenizer test runs through: scripts, emoji, code, whitespace, numbers, specials.
CORPUS = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog. It's, we'll, they're, I'd, she'S.",
    "Ünïcödé àccénts: café, naïve, résumé, Straße, Ærøskøbing",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "مرحبا بالعالم — שלום עולם",  # RTL
    "Emoji: 😀 👍🏽 🇫🇷 👨‍👩‍👧‍👦 ❤️‍🔥 🧑🏿‍💻",  # skin tones, flags, ZWJ sequences
    "def f(x):\n\tif x > 0:\n\t\treturn x * 2\n    else:\n        return None\n",
    "    leading spaces, trailing spaces    ",
    "many\n\n\nnewlines\r\nand\r\n\r\nCRLF\n",
    "tabs\t\tand\u00a0non-breaking\u2009thin spaces",
    "Numbers: 0 7 42 1234567890 3.14159 -2e10 1,000,000 ²³ ٣٤٥",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<|im_end|>",
    "   ",
    "\n",
    "",
    "a",
    "x" * 300 + " " + "ab" * 150,
    "Mixed: English, Français, Deutsch, Español, Русский, Ελληνικά, हिन्दी, ไทย",
    'JSON: {"key": [1, 2, {"nested": null}], \'single\': true}',
    "URL https://example.com/path?q=1&r=two#frag and e-mail a.b@c.de",
    "\x00\x01 control \x7f chars \x1b[31m",
]

_loaded: dict = {}


def cached_tokenizer(path):
    """Tokenizer.from_gguf(path), built once per test session (reading a real vocabulary takes seconds)."""
    from tinyserve.models.tokenizer import Tokenizer, metadata_from_gguf

    key = str(path)
    if key not in _loaded:
        meta = metadata_from_gguf(path)
        _loaded[key] = (meta, Tokenizer.from_metadata(meta))
    return _loaded[key]
