"""atheris (libFuzzer for Python) harness for the tokenizer build from GGUF metadata
(server/tinyserve/models/tokenizer.py): any bytes as a GGUF file, taken the way the server loads a
model: the C++ reader (`_core.read_gguf`, fuzzed on its own by fuzz_gguf) turns them into the
metadata dict, and `Tokenizer.from_metadata` builds Hugging Face `tokenizers` objects from it.

    python tests/fuzz/fuzz_tokenizer.py [libFuzzer flags] CORPUS_DIR [SEED_DIR...]

The build either raises TokenizerError (the loader's ModelLoadError names it) or gives a
tokenizer that works: every text encodes to ids in the vocabulary or raises TokenizerError, every
id decodes, and the streaming detokenizer, fed one id at a time, joins to exactly what decode()
gives. Any other exception (a Rust panic included: pyo3's PanicException is a BaseException, which
`except Exception` in the tokenizer does not catch), a crash or a hang is a finding.

Why atheris and not hypothesis: the input here is a whole file, as for the C++ harnesses, and
what matters is reaching the tokenizer's many metadata-dependent branches (model and pre names,
token types, merges that do or do not resolve, bytes that are not UTF-8, scores, special-token
ids). atheris mutates bytes under coverage feedback from tokenizer.py (instrumented below), keeps a
corpus, and reports like libFuzzer, so CI runs it beside the others with the same flags and the
same failure rule. A hypothesis test would need its own generator of the metadata's shape, which
would only find what that generator was written to produce.
"""

from __future__ import annotations

import logging
import os
import sys

import atheris

with atheris.instrument_imports(include=["tinyserve.models.tokenizer"]):
    from tinyserve.models.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

from tinyserve import _core

TEXTS = [
    "Hello, world! It's 2024: caf\u00e9, na\u00efve, Stra\u00dfe.",
    "\u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4 \u0645\u0631\u062d\u0628\u0627 \U0001f600\U0001f44d\U0001f3fd",
    "def f(x):\n\treturn x  # \u00a0\u2009\r\n\n",
    "<|im_start|>user\nhi<|im_end|><s></s><unk><|endoftext|><sep>",
    "   leading and trailing   ",
    "",
    "\x00\x01\x7f\u2581\u0120 \u2581\u2581",
]
MAX_IDS = 600  # ids decoded one by one, per tokenizer (real vocabularies are larger than seeds)

_fd = os.memfd_create("fuzz-tokenizer.gguf", os.MFD_CLOEXEC)
_path = f"/proc/self/fd/{_fd}"


def check_stream(tok: Tokenizer, ids: list[int], skip_special: bool) -> None:
    whole = tok.decode(ids, skip_special=skip_special)
    stream = IncrementalDetokenizer(tok, skip_special=skip_special)
    pieces = [stream.add([i]) for i in ids]
    pieces.append(stream.flush())
    if "".join(pieces) != whole:
        raise AssertionError(f"streamed {''.join(pieces)!r} != decoded {whole!r} for ids {ids[:50]}")


def TestOneInput(data: bytes) -> None:
    os.ftruncate(_fd, 0)
    os.pwrite(_fd, data, 0)
    try:
        meta = _core.read_gguf(_path)["metadata"]
    except _core.GGUFError:
        return  # not a GGUF file: the C++ harness's business
    try:
        tok = Tokenizer.from_metadata(meta)
    except TokenizerError:
        return
    n = tok.vocab_size
    if n != len(meta["tokenizer.ggml.tokens"]):
        raise AssertionError(f"vocab_size {n} != {len(meta['tokenizer.ggml.tokens'])} tokens")
    # text from the input too, so the encoder sees what the tokens are made of
    texts = [*TEXTS, data[-64:].decode("utf-8", errors="replace")]
    for text in texts:
        for parse_special in (True, False):
            try:
                ids = tok.encode(text, parse_special=parse_special)
            except TokenizerError:
                continue
            bad = [i for i in ids if not 0 <= i < n]
            if bad:
                raise AssertionError(f"encode({text!r}) gave ids outside [0, {n}): {bad[:10]}")
            check_stream(tok, ids, skip_special=False)
            check_stream(tok, ids, skip_special=True)
    some = list(range(min(n, MAX_IDS)))
    for i in some:
        tok.token_bytes(i), tok.token_text(i), tok.is_special(i)
    check_stream(tok, some, skip_special=False)


def main() -> None:
    logging.disable(logging.CRITICAL)  # unknown pre-tokenizer names log a warning for every input
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
