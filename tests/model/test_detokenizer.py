"""IncrementalDetokenizer: pieces streamed token by token join to exactly decode(all ids), and no
piece ever carries half a character, on byte-fallback SentencePiece tokens and on the real model's
byte-level tokens (emoji and CJK whose UTF-8 bytes are spread over several tokens)."""

from __future__ import annotations

import random

import pytest
from tiny_tokenizer_gguf import BOS, BYTE0, CORPUS, cached_tokenizer, write_spm_tokenizer_gguf

from tinyserve.models.tokenizer import IncrementalDetokenizer, Tokenizer


def stream(tok, ids, skip_special=False, step=1, **kw) -> list[str]:
    d = IncrementalDetokenizer(tok, skip_special, **kw)
    out = [d.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    out.append(d.flush())
    return out


def assert_whole_characters(chunks: list[str]) -> None:
    for c in chunks:
        c.encode("utf-8")  # raises on a lone surrogate
        assert not any(0xD800 <= ord(ch) <= 0xDFFF for ch in c)


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_gguf(write_spm_tokenizer_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf"))


def byte_ids(data: bytes) -> list[int]:
    return [BYTE0 + b for b in data]


def test_split_character_is_held_until_complete(spm):
    d = IncrementalDetokenizer(spm)
    e_acute = byte_ids("é".encode())
    assert d.add(e_acute[:1]) == ""
    assert d.add(e_acute[1:]) == "é"
    emoji = byte_ids("😀".encode())  # four bytes, four tokens
    assert [d.add([i]) for i in emoji] == ["", "", "", "😀"]
    assert d.flush() == ""


def test_flush_turns_an_incomplete_character_into_replacement(spm):
    d = IncrementalDetokenizer(spm)
    assert d.add(byte_ids(b"a\xe4\xbd")) == "a"
    assert d.flush() == "\ufffd"
    assert spm.decode(byte_ids(b"a\xe4\xbd")) == "a\ufffd"
    # the detokenizer carries on after a flush
    assert d.add(byte_ids("你".encode())) == "你"


def test_random_byte_streams_match_decode(spm):
    """Random bytes (valid UTF-8 mixed with invalid and truncated sequences), cut into random
    chunks: the streamed pieces must always join to decode() of the whole."""
    rng = random.Random(7)
    samples = ["a", "é", "你", "😀", "👨\u200d👩\u200d👧", "\U0010ffff"]
    for _ in range(300):
        data = bytearray()
        for _ in range(rng.randint(0, 12)):
            r = rng.random()
            if r < 0.6:
                data += rng.choice(samples).encode()
            elif r < 0.8:
                data += rng.choice(samples).encode()[: rng.randint(1, 3)]  # truncated character
            else:
                data.append(rng.randrange(256))  # anything, including stray continuation bytes
        ids = byte_ids(bytes(data))
        chunks = stream(spm, ids, step=rng.randint(1, 4))
        assert "".join(chunks) == spm.decode(ids) == bytes(data).decode("utf-8", "replace")
        assert_whole_characters(chunks)


def test_spm_leading_space_rule_matches_decode(spm):
    ids = spm.encode("the hello and world")  # <s> ▁the ▁hello ▁and ▁w or ld
    for skip in (False, True):
        assert "".join(stream(spm, ids, skip)) == spm.decode(ids, skip)
    assert "".join(stream(spm, ids, True)) == "the hello and world"
    # after an added token, the text starts afresh (decode drops the ▁ encode put there)
    ids = spm.encode("hello<|im_end|>the")
    assert "".join(stream(spm, ids)) == spm.decode(ids) == "<s>hello<|im_end|>the"


def test_prefix_ids_keep_the_space_of_a_continuation(spm):
    ids = spm.encode("the hello")
    assert ids[0] == BOS
    # streamed on its own, "▁hello" is the start of a text and loses its ▁ ...
    assert "".join(stream(spm, ids[2:])) == "hello"
    # ... but as the continuation of the prompt "<s> ▁the" it keeps it
    d = IncrementalDetokenizer(spm, prefix_ids=ids[:2])
    assert d.add(ids[2:]) + d.flush() == " hello"


def test_prefix_ending_inside_a_character(spm):
    data = "a你".encode()
    d = IncrementalDetokenizer(spm, prefix_ids=byte_ids(data[:2]))
    assert d.add(byte_ids(data[2:])) == "你"


def whole_prefix(tok, prefix, skip_special) -> IncrementalDetokenizer:
    """The reference: a detokenizer that has been fed every prefix token (output dropped)."""
    d = IncrementalDetokenizer(tok, skip_special)
    d.add(prefix)
    return d


def test_prefix_tail_streams_like_the_whole_prefix(spm):
    """Only the prefix's last tokens are read: random prefixes (byte tokens that cut characters,
    special and user-defined tokens, spaced pieces) followed by random continuations stream the
    same pieces as a detokenizer fed the whole prefix, with and without skip_special."""
    rng = random.Random(11)
    words = spm.encode("the hello and world")[1:]
    added = sorted(spm._boundary_ids)
    utf8 = [BYTE0 + b for b in "é你😀".encode()]
    for _ in range(2000):
        ids = []
        for _ in range(rng.randint(1, 14)):
            r = rng.random()
            ids.append(
                rng.choice(words)
                if r < 0.35
                else rng.choice(added)
                if r < 0.55
                else rng.choice(utf8)
                if r < 0.85
                else BYTE0 + rng.randrange(256)
            )
        cut = rng.randint(1, len(ids))
        prefix, rest = ids[:cut], ids[cut:]
        skip = rng.random() < 0.5
        fast = IncrementalDetokenizer(spm, skip, prefix_ids=prefix)
        ref = whole_prefix(spm, prefix, skip)
        step = rng.randint(1, 3)
        for i in range(0, len(rest), step):
            assert fast.add(rest[i : i + step]) == ref.add(rest[i : i + step]), (prefix, rest)
        assert fast.flush() == ref.flush(), (prefix, rest)


def test_prefix_reads_a_few_tokens_of_a_long_prompt(spm):
    """A 100k-token prompt: the detokenizer joins the bytes of a handful of its tokens."""
    seen = []

    class Spy:
        def _join_bytes(self, ids, skip, at_start):
            seen.append(len(ids))
            return spm._join_bytes(ids, skip, at_start)

    prompt = spm.encode("the hello and world " * 25_000)
    assert len(prompt) > 100_000
    d = IncrementalDetokenizer(Spy(), True, prefix_ids=prompt)  # type: ignore[arg-type]
    assert sum(seen) < 20
    assert d.add(spm.encode(" world")[1:]) == whole_prefix(spm, prompt, True).add(spm.encode(" world")[1:])


def test_skip_special(spm):
    ids = spm.encode("hi<|im_start|>hello<|im_end|>")
    assert "".join(stream(spm, ids, skip_special=True)) == spm.decode(ids, skip_special=True)
    assert "<|im" not in spm.decode(ids, skip_special=True)


# ---------------------------------------------------------------------------------------------
# the real default model


@pytest.fixture(scope="module")
def real(default_model_path) -> Tokenizer:
    return cached_tokenizer(default_model_path)[1]


@pytest.mark.slow
@pytest.mark.parametrize("text", CORPUS)
def test_real_model_token_by_token_equals_decode(real, text):
    ids = real.encode(text)
    for skip in (False, True):
        chunks = stream(real, ids, skip)
        assert "".join(chunks) == real.decode(ids, skip)
        assert_whole_characters(chunks)
        if "\ufffd" not in text:
            assert not any("\ufffd" in c for c in chunks)


@pytest.mark.slow
def test_real_model_multibyte_characters_span_tokens(real):
    """The emoji/CJK cases really do put one character's bytes into several tokens; those tokens
    yield nothing until the character is complete."""
    text = "👨‍👩‍👧‍👦 日本語 🧑🏿‍💻"
    ids = real.encode(text)
    partial = [i for i in ids if not _is_utf8(real.token_bytes(i))]
    assert partial, "expected tokens holding part of a character"
    d = IncrementalDetokenizer(real)
    chunks = [d.add([i]) for i in ids]
    assert "" in chunks
    assert "".join(chunks) + d.flush() == text
    assert_whole_characters(chunks)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
