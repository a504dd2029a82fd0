"""Tokenizer rebuilt from GGUF metadata: tiny hand-made vocabularies (exact expectations and an
independent SentencePiece reference written here), the real default model against transformers'
own GGUF tokenizer conversion, and every way bad metadata must be refused."""

from __future__ import annotations

import logging
import random

import pytest
from tiny_tokenizer_gguf import (
    BOS,
    BYTE0,
    CORPUS,
    EOS,
    bpe_vocab,
    cached_tokenizer,
    spm_vocab,
    write_bpe_tokenizer_gguf,
    write_spm_tokenizer_gguf,
)

from tinyserve.models.tokenizer import Tokenizer, TokenizerError, metadata_from_gguf

SP = "\u2581"


# ---------------------------------------------------------------------------------------------
# tiny SentencePiece-style vocabulary


@pytest.fixture(scope="module")
def spm(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_gguf(write_spm_tokenizer_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf"))


def pieces(tok: Tokenizer, ids) -> list[str]:
    return [tok.token_text(i) for i in ids]


def test_spm_defaults_follow_the_model_type(spm):
    # the file leaves add_bos_token and add_space_prefix out: llama-type defaults are True
    assert spm.model == "llama"
    assert spm.add_bos is True and spm.add_space_prefix is True
    assert spm.bos_id == BOS and spm.eos_id == EOS
    assert spm.vocab_size == len(spm_vocab()[0])


@pytest.mark.parametrize(
    "text, expected",
    [
        # greedy by score: "he"(-1) first, then "ll"(-2), "llo"(-7), "hello"(-8), "▁hello"(-9)
        ("hello", [f"{SP}hello"]),
        # "or"(-10) before "ld"(-11) before "▁w"(-12); "▁wor" is no piece
        ("hello world", [f"{SP}hello", f"{SP}w", "or", "ld"]),
        ("the hello and", [f"{SP}the", f"{SP}hello", f"{SP}and"]),
        # the prefix space is added even before a leading space: "▁▁hello" -> ▁ + ▁hello ("▁hello"(-9) beats "▁▁"(-13))
        (" hello", [SP, f"{SP}hello"]),
        # characters outside the vocabulary fall back to their UTF-8 bytes
        ("héllo", [f"{SP}h", "<0xC3>", "<0xA9>", "llo"]),
        ("\nhello", [SP, "<0x0A>", "hello"]),
        ("", []),
    ],
)
def test_spm_exact_pieces(spm, text, expected):
    ids = spm.encode(text, add_bos=False)
    assert pieces(spm, ids) == expected
    assert spm.decode(ids) == text


def spm_reference(text: str, add_prefix: bool = True) -> list[int]:
    """SentencePiece BPE written plainly: from single characters, merge the adjacent pair whose
    concatenation is the best-scoring normal piece (leftmost on ties) until none is left; symbols
    outside the vocabulary become <0xXX> byte tokens."""
    tokens, scores, types = spm_vocab()
    ids = {t: i for i, t in enumerate(tokens)}
    score = {t: s for t, s, ty in zip(tokens, scores, types) if ty == 1}
    if not text:
        return []
    syms = list((SP if add_prefix else "") + text.replace(" ", SP))
    while True:
        best = None
        for i in range(len(syms) - 1):
            cand = syms[i] + syms[i + 1]
            if cand in score and (best is None or score[cand] > best[0]):
                best = (score[cand], i)
        if best is None:
            break
        i = best[1]
        syms[i : i + 2] = [syms[i] + syms[i + 1]]
    out = []
    for s in syms:
        if s in ids and ids[s] >= BYTE0 + 256:
            out.append(ids[s])
        else:
            out.extend(BYTE0 + b for b in s.encode("utf-8"))
    return out


def test_spm_matches_plain_reference_on_random_text(spm):
    rng = random.Random(1234)
    alphabet = "helowrdant! \u00e9\u4f60\n"
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        ids = spm.encode(text, add_bos=False)
        assert ids == spm_reference(text), repr(text)
        assert spm.decode(ids) == text, repr(text)


def test_spm_without_space_prefix(tmp_path):
    tok = Tokenizer.from_gguf(write_spm_tokenizer_gguf(tmp_path / "t.gguf", add_space_prefix=False, add_bos=False))
    assert tok.add_bos is False
    ids = tok.encode("hello world")
    assert ids == spm_reference("hello world", add_prefix=False)
    assert pieces(tok, ids) == ["hello", f"{SP}w", "or", "ld"]
    assert tok.decode(tok.encode(" hello")) == " hello"


def test_spm_bos_and_special_tokens(spm):
    ids = spm.encode("hello")
    assert ids[0] == BOS and pieces(spm, ids[1:]) == [f"{SP}hello"]
    assert spm.encode("<s>hello", add_bos=True).count(BOS) == 1  # never doubled
    assert spm.decode(ids) == "<s>hello"
    assert spm.decode(ids, skip_special=True) == "hello"

    ids = spm.encode("hi<|im_end|>the", add_bos=False)
    end = spm.token_to_id("<|im_end|>")
    assert end in ids
    # after an added token a fresh ▁ is prefixed (as llama.cpp does), and decoding removes it again
    assert pieces(spm, ids[ids.index(end) + 1 :]) == [f"{SP}the"]
    assert spm.decode(ids) == "hi<|im_end|>the"

    plain = spm.encode("hi<|im_end|>the", add_bos=False, parse_special=False)
    assert end not in plain
    assert spm.decode(plain) == "hi<|im_end|>the"
    # user-defined tokens are matched whole either way and are not "special"
    sep = spm.token_to_id("<sep>")
    assert sep in spm.encode("a<sep>b", parse_special=False)
    assert sep not in spm.special_ids
    assert spm.decode(spm.encode("a<sep>b"), skip_special=True) == "a<sep>b"
    assert end in spm.special_ids


def test_stop_ids_include_end_of_turn_control_tokens(spm):
    # <|im_end|> in this vocabulary is control-typed, so it ends a turn like EOS does
    assert spm.token_to_id("<|im_end|>") in spm.stop_ids
    assert spm.token_to_id("<|im_start|>") not in spm.stop_ids
    assert EOS in spm.stop_ids and BOS not in spm.stop_ids


def test_spm_transformers_agrees_where_conventions_match(spm, tmp_path):
    """transformers' GGUF conversion (Metaspace, prepend 'first') differs from llama.cpp only on text
    that starts with a space or follows an added token; elsewhere it must agree with us."""
    backend = reference_backend(metadata_from_gguf(write_spm_tokenizer_gguf(tmp_path / "r.gguf")))
    rng = random.Random(99)
    alphabet = "helowrdant!\u00e9\u4f60\n "
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))).lstrip(" ")
        assert spm.encode(text, add_bos=False) == backend.encode(text, add_special_tokens=False).ids, repr(text)


# ---------------------------------------------------------------------------------------------
# tiny byte-level BPE vocabulary


def bpe(tmp_path, pre):
    return Tokenizer.from_gguf(write_bpe_tokenizer_gguf(tmp_path / f"bpe-{pre}.gguf", pre=pre))


def test_bpe_merges_apply_in_rank_order(tmp_path):
    tok = bpe(tmp_path, "gpt2")
    assert tok.model == "gpt2" and tok.add_bos is False
    assert pieces(tok, tok.encode("hello")) == ["he", "llo"]
    assert pieces(tok, tok.encode(" the world")) == ["\u0120the", "\u0120wor", "l", "d"]
    assert tok.decode(tok.encode(" the world")) == " the world"
    # bytes outside ASCII map through the byte alphabet and back
    assert tok.decode(tok.encode("é€😀")) == "é€😀"
    assert [tok.token_bytes(i) for i in tok.encode("é")] == [b"\xc3", b"\xa9"]


@pytest.mark.parametrize(
    "pre, expected",
    [
        ("gpt2", ["12", "12", "1"]),  # \p{N}+ keeps "12121" together; merges make 12|12|1
        ("smollm", ["1", "2", "1", "2", "1"]),  # every digit is its own piece
        ("llama-bpe", ["12", "1", "2", "1"]),  # \p{N}{1,3}: "121" | "21"
        ("qwen2", ["1", "2", "1", "2", "1"]),
    ],
)
def test_bpe_pre_tokenizer_follows_tokenizer_ggml_pre(tmp_path, pre, expected):
    tok = bpe(tmp_path, pre)
    assert pieces(tok, tok.encode("12121")) == expected


def test_bpe_unknown_pre_falls_back_to_gpt2_with_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tinyserve.models.tokenizer"):
        tok = bpe(tmp_path, "some-new-model")
    assert any("some-new-model" in r.getMessage() for r in caplog.records)
    assert pieces(tok, tok.encode("12121")) == ["12", "12", "1"]


def test_bpe_special_tokens_parse_or_not(tmp_path):
    tok = bpe(tmp_path, "gpt2")
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    ids = tok.encode("<|im_start|>hello<|im_end|>")
    assert ids == [start] + tok.encode("hello") + [end]
    plain = tok.encode("<|im_start|>hello<|im_end|>", parse_special=False)
    assert start not in plain and end not in plain
    assert tok.decode(plain) == "<|im_start|>hello<|im_end|>"
    assert tok.decode(ids, skip_special=True) == "hello"
    assert {start, end, tok.token_to_id("<|endoftext|>")} <= tok.special_ids
    assert end in tok.stop_ids and tok.token_to_id("<|endoftext|>") in tok.stop_ids
    assert start not in tok.stop_ids


def test_metadata_from_gguf_types(tmp_path):
    meta = metadata_from_gguf(write_spm_tokenizer_gguf(tmp_path / "m.gguf", add_bos=False))
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert type(meta["tokenizer.ggml.bos_token_id"]) is int
    assert isinstance(meta["tokenizer.ggml.tokens"], list) and meta["tokenizer.ggml.tokens"][1] == "<s>"
    assert all(type(s) is float for s in meta["tokenizer.ggml.scores"])
    assert all(type(t) is int for t in meta["tokenizer.ggml.token_type"])


# ---------------------------------------------------------------------------------------------
# bad metadata and bad input


def spm_meta() -> dict:
    tokens, scores, types = spm_vocab()
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": BOS,
        "tokenizer.ggml.eos_token_id": EOS,
    }


def bpe_meta() -> dict:
    tokens, types, merges = bpe_vocab()
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }


def test_dict_metadata_builds_the_same_tokenizer(spm):
    assert Tokenizer.from_metadata(spm_meta()).encode("hello world") == spm.encode("hello world")


@pytest.mark.parametrize(
    "base, change, message",
    [
        (spm_meta, {"tokenizer.ggml.model": None}, "no tokenizer.ggml.model"),
        (spm_meta, {"tokenizer.ggml.model": "rwkv"}, "unsupported tokenizer.ggml.model 'rwkv'"),
        (spm_meta, {"tokenizer.ggml.model": 3}, "tokenizer.ggml.model must be str"),
        (spm_meta, {"tokenizer.ggml.tokens": None}, "no tokenizer.ggml.tokens"),
        (spm_meta, {"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens is empty"),
        (spm_meta, {"tokenizer.ggml.tokens": ["a", 2]}, r"tokenizer.ggml.tokens\[1\] must be str"),
        (spm_meta, {"tokenizer.ggml.token_type": [1, 1]}, "token_type has 2 entries"),
        (spm_meta, {"tokenizer.ggml.scores": [0.0]}, "scores has 1 entries"),
        (spm_meta, {"tokenizer.ggml.scores": None}, "no tokenizer.ggml.scores"),
        (spm_meta, {"tokenizer.ggml.bos_token_id": 10**6}, "bos_token_id = 1000000 is out of range"),
        (spm_meta, {"tokenizer.ggml.eos_token_id": -1}, "eos_token_id = -1 is out of range"),
        (spm_meta, {"tokenizer.ggml.eot_token_id": True}, "eot_token_id must be int, got bool"),
        (spm_meta, {"tokenizer.ggml.bos_token_id": None}, "add_bos_token is set but there is no"),
        (spm_meta, {"tokenizer.ggml.add_bos_token": "yes"}, "add_bos_token must be bool"),
        (bpe_meta, {"tokenizer.ggml.merges": None}, "no tokenizer.ggml.merges"),
        (bpe_meta, {"tokenizer.ggml.merges": ["h e x"]}, "not two tokens separated by one space"),
        (bpe_meta, {"tokenizer.ggml.merges": ["he"]}, "not two tokens separated by one space"),
        (bpe_meta, {"tokenizer.ggml.merges": ["h zz"]}, "'zz' is not in the vocabulary"),
        (bpe_meta, {"tokenizer.ggml.merges": [7]}, r"merges\[0\] must be str"),
        (bpe_meta, {"tokenizer.ggml.pre": 5}, "tokenizer.ggml.pre must be str"),
    ],
)
def test_bad_metadata_is_refused_by_name(base, change, message):
    meta = base()
    for k, v in change.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_metadata(meta)


def test_tokens_that_are_not_utf8_arrive_as_bytes():
    """_core hands over non-UTF-8 strings as bytes; such tokens decode to their exact bytes."""
    meta = spm_meta()
    tokens = list(meta["tokenizer.ggml.tokens"])
    odd = tokens.index("lo")
    tokens[odd] = b"\xe2\x96\x81\xff"  # "▁" then a byte that is never UTF-8
    meta["tokenizer.ggml.tokens"] = tokens
    tok = Tokenizer.from_metadata(meta)
    assert tok.token_bytes(odd) == b" \xff"
    assert tok.decode([tok.token_to_id("a"), odd]) == "a \ufffd"
    assert tok.decode(tok.encode("hello world", add_bos=False)) == "hello world"


def test_ids_may_be_numpy_integers(spm):
    np = pytest.importorskip("numpy")
    ids = spm.encode("hello world")
    assert spm.decode(np.array(ids, dtype=np.int32)) == spm.decode(ids)
    assert spm.token_bytes(np.int64(ids[1])) == spm.token_bytes(ids[1])
    with pytest.raises(TokenizerError, match="must be int, got bool"):
        spm.decode([True])
    with pytest.raises(TokenizerError, match="must be int, got float"):
        spm.decode([1.0])


def test_metadata_must_be_a_mapping():
    with pytest.raises(TokenizerError, match="mapping"):
        Tokenizer.from_metadata([("tokenizer.ggml.model", "gpt2")])


def test_unreadable_files(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(TokenizerError, match="cannot read GGUF metadata"):
        Tokenizer.from_gguf(junk)
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(TokenizerError):
        Tokenizer.from_gguf(not_gguf)


def test_bad_input(spm):
    with pytest.raises(TokenizerError, match="text must be str"):
        spm.encode(b"bytes")
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        spm.encode("lone \ud800 surrogate")
    with pytest.raises(TokenizerError, match="out of range"):
        spm.decode([spm.vocab_size])
    with pytest.raises(TokenizerError, match="out of range"):
        spm.decode([-1])
    with pytest.raises(TokenizerError, match="must be int"):
        spm.decode(["3"])
    with pytest.raises(TokenizerError, match="out of range"):
        spm.token_bytes(10**9)
    with pytest.raises(TokenizerError, match="no BOS"):
        Tokenizer.from_metadata({**bpe_meta()}).encode("x", add_bos=True)


# ---------------------------------------------------------------------------------------------
# the real default model (SmolLM2: byte-level BPE, pre "smollm")


def reference_backend(meta: dict):
    """transformers' own GGUF tokenizer conversion (its `tokenizers` backend), fed the metadata
    read by the `gguf` package. AutoTokenizer(gguf_file=...) would do the same but needs torch."""
    pytest.importorskip("transformers")
    try:  # transformers 5
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError:  # transformers 4
        from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    d = {
        name: meta[f"tokenizer.{key}"]
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in meta
    }
    backend, _ = convert_gguf_tokenizer(meta.get("general.architecture", "llama"), d)
    return backend


@pytest.fixture(scope="module")
def real(default_model_path):
    return cached_tokenizer(default_model_path)


@pytest.fixture(scope="module")
def real_reference(real):
    from tokenizers import pre_tokenizers

    meta, _ = real
    backend = reference_backend(meta)
    # transformers does not know the "smollm" pre-tokenizer name; SmolLM2's published tokenizer.json
    # splits digits individually before GPT-2's byte-level regex, so give the reference exactly that.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return backend


@pytest.mark.slow
def test_real_model_metadata(real):
    _, tok = real
    assert (tok.model, tok.pre, tok.vocab_size) == ("gpt2", "smollm", 49152)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert tok.token_text(1) == "<|im_start|>" and tok.token_text(2) == "<|im_end|>"
    assert tok.stop_ids == {0, 2}  # <|endoftext|>, <|im_end|> (eos)
    assert tok.special_ids == set(range(17))


@pytest.mark.slow
@pytest.mark.parametrize("text", CORPUS)
def test_real_model_matches_transformers(real, real_reference, text):
    _, tok = real
    assert tok.encode(text) == real_reference.encode(text, add_special_tokens=False).ids


@pytest.mark.slow
@pytest.mark.parametrize("text", CORPUS)
def test_real_model_round_trip(real, text):
    _, tok = real
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, parse_special=False)) == text


@pytest.mark.slow
def test_real_model_digits_are_single_tokens(real):
    _, tok = real
    ids = tok.encode("In 2024, 1234567890 people")
    digit_pieces = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert "".join(digit_pieces) == "20241234567890"
    assert all(len(p) == 1 for p in digit_pieces)


@pytest.mark.slow
def test_real_model_special_tokens(real):
    _, tok = real
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    plain = tok.encode("<|im_start|>user\nHi<|im_end|>", parse_special=False)
    assert 1 not in plain and 2 not in plain and len(plain) > len(ids)
    assert tok.decode(ids, skip_special=True) == "user\nHi"
    assert tok.encode("Hi", add_bos=True) == [1] + tok.encode("Hi")
    assert tok.encode("<|im_start|>Hi", add_bos=True).count(1) == 1


def test_spm_vocabulary_built_to_stall_the_load_is_refused_quickly():
    """Deriving SentencePiece merges costs the square of a piece's length: one 160k-character piece
    took 27 s before the bound. Now it is a TokenizerError naming the token, at once; a long but
    sane piece still builds."""
    import time

    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a", "a" * 160_000],
        "tokenizer.ggml.scores": [0.0] * 5,
        "tokenizer.ggml.token_type": [2, 3, 3, 1, 1],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_space_prefix": False,
    }
    t0 = time.monotonic()
    with pytest.raises(TokenizerError, match="too long.*token 4 has 160000 characters"):
        Tokenizer.from_metadata(meta)
    assert time.monotonic() - t0 < 5.0  # a generous bound: the refusal comes before any slicing
    meta["tokenizer.ggml.tokens"][-1] = "a" * 10_000
    tok = Tokenizer.from_metadata(meta)
    assert tok.decode(tok.encode("aaa", add_bos=False)) == "aaa"
