"""The two real K-quant models' tokenizers, stop tokens and chat templates, each checked against
implementations someone else wrote:

- transformers' tokenizer loaded from the same GGUF: `AutoTokenizer.from_pretrained(dir,
  gguf_file=...)` (its GGUF loader needs torch; without torch, the same GGUF conversion is called
  directly) for encoding, decoding and Qwen's chat template (`apply_chat_template`, tools included);
- llama.cpp's `llama-tokenize` (bench/build_llamacpp.sh builds it; $LLAMA_CPP_BIN points at another
  build) for encoding, when it is built.

Gemma 3 270M: 262144-token SentencePiece vocabulary with byte fallback, add_bos_token, whitespace-run
and HTML user-defined tokens, no chat template in the file (the built-in Gemma turns apply).
Qwen2.5-Coder 0.5B: 151936-token byte-level BPE (qwen2 pre-tokenizer), ChatML with tools.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tiny_tokenizer_gguf import CORPUS, cached_tokenizer

from tinyserve.engine import EngineConfig, FinishReason, LLMEngine, SamplingParams, StoppingParams
from tinyserve.engine.stream import TextStream
from tinyserve.models.builtin_templates import GEMMA_TURNS
from tinyserve.models.loader import select_chat_template
from tinyserve.models.tokenizer import IncrementalDetokenizer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

EXTRA = [
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    '<|im_start|>system\nYou are<|im_end|>\n<tool_call>\n{"name": "f"}\n</tool_call>',
    "  two  spaces\n\n  ",
    " leading",
    "trailing ",
    "\t\t\ttabs\t",
    "a  b   c    d" + " " * 40 + "e",
    "\n" * 36 + "x",  # longer than Gemma's longest newline-run token
    "import numpy as np\n\nclass A:\n    def __init__(self):\n        self.x = {'a': 1}  # comment\n",
    "function f(a, b) {\n  return a === b ? `${a}` : null;\n}\n",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name;",
    "<table><tr><td>1</td></tr></table> <b>bold</b> <i>x</i>",
    "rare: 𠀀𓀀ꙮ\U0010fffd\U0001fae8 \ue000",  # byte fallback in Gemma
    "ǅ ﬁ ｆｕｌｌ－ｗｉｄｔｈ Å Å e\u0301",  # no normalisation in either tokenizer
    "🤖" * 5,
    "x" * 1000,
]
TEXTS = CORPUS + EXTRA


class Reference:
    """transformers' tokenizer for a GGUF file."""

    def __init__(self, path: Path):
        pytest.importorskip("transformers")
        try:
            import torch  # noqa: F401  (transformers' GGUF loader requires it)
        except ImportError:
            self.auto = None
            from test_tokenizer import reference_backend

            from tinyserve.models.tokenizer import metadata_from_gguf

            self.backend = reference_backend(metadata_from_gguf(path))
        else:
            from transformers import AutoTokenizer

            self.auto = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    def encode(self, text: str) -> list[int]:
        """Without the BOS (the two implementations' BOS rules are tested separately)."""
        if self.auto is not None:
            return self.auto.encode(text, add_special_tokens=False)
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        if self.auto is not None:
            return self.auto.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=False)


@pytest.fixture(scope="module")
def gemma(gemma3_path):
    return cached_tokenizer(gemma3_path)


@pytest.fixture(scope="module")
def qwen(qwen25_coder_path):
    return cached_tokenizer(qwen25_coder_path)


@pytest.fixture(scope="module", params=["gemma", "qwen"])
def model(request, gemma3_path, qwen25_coder_path):
    path = gemma3_path if request.param == "gemma" else qwen25_coder_path
    meta, tok = cached_tokenizer(path)
    return SimpleNamespace(name=request.param, path=path, meta=meta, tok=tok)


_refs: dict = {}


@pytest.fixture
def ref(model) -> Reference:
    if model.name not in _refs:
        _refs[model.name] = Reference(model.path)
    return _refs[model.name]


def test_metadata(gemma, qwen):
    _, g = gemma
    assert (g.model, g.vocab_size, g.bos_id, g.eos_id, g.add_bos, g.add_space_prefix) == (
        "llama",
        262144,
        2,
        1,
        True,
        False,
    )
    assert (g.token_text(105), g.token_text(106)) == ("<start_of_turn>", "<end_of_turn>")
    _, q = qwen
    assert (q.model, q.pre, q.vocab_size, q.eos_id, q.add_bos) == ("gpt2", "qwen2", 151936, 151645, False)


def test_stop_tokens_end_the_turn(gemma, qwen):
    """eos plus the end-of-turn / end-of-generation tokens llama.cpp stops on for these vocabularies."""
    _, g = gemma
    assert g.stop_ids == {1, 106}  # <eos>, <end_of_turn>
    _, q = qwen
    assert {q.token_text(i) for i in q.stop_ids} == {
        "<|endoftext|>",
        "<|im_end|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    }
    assert q.token_to_id("<|im_start|>") not in q.stop_ids and g.token_to_id("<start_of_turn>") not in g.stop_ids


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(model, ref, text):
    if model.name == "gemma" and " " * 32 in text:
        return  # transformers splits these differently: see test_gemma_space_runs_take_the_longest_token
    assert model.tok.encode(text, add_bos=False) == ref.encode(text)


def test_gemma_space_runs_take_the_longest_token(gemma):
    """Gemma's runs of 2..31 spaces are user-defined tokens, which SentencePiece (and llama.cpp)
    match whole, longest first. transformers' GGUF conversion keeps them as ordinary pieces, so it
    agrees up to 31 spaces and then splits a longer run into 16-space pieces (40 -> 16+16+8). We
    follow SentencePiece; test_encode_matches_llama_cpp checks the same texts against llama.cpp."""
    _, tok = gemma
    run = [tok.token_to_id(" " * n) for n in (31, 9)]
    assert tok.encode("a" + " " * 40 + "b", add_bos=False) == [tok.token_to_id("a"), *run, tok.token_to_id("b")]
    assert tok.encode(" " * 70, add_bos=False) == [tok.token_to_id(" " * 31)] * 2 + [tok.token_to_id(" " * 8)]


def test_bos_follows_add_bos_token(model):
    tok = model.tok
    ids = tok.encode("Hello")
    if model.name == "gemma":
        assert ids[0] == 2 and ids[1:] == tok.encode("Hello", add_bos=False)
        assert tok.encode("<bos>Hello").count(2) == 1  # never doubled
    else:
        assert ids == tok.encode("Hello", add_bos=False) and tok.bos_id not in ids


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip_and_streaming(model, ref, text):
    tok = model.tok
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text == ref.decode(ids)
    assert tok.decode(tok.encode(text, add_bos=False, parse_special=False)) == text
    d = IncrementalDetokenizer(tok)
    pieces = [d.add([i]) for i in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert "\ufffd" in text or not any("\ufffd" in p for p in pieces)  # no half characters on the way


def test_gemma_byte_fallback_and_user_defined_tokens(gemma):
    _, tok = gemma
    ids = tok.encode("𠀀", add_bos=False)
    assert [tok.token_text(i) for i in ids] == ["<0xF0>", "<0xA0>", "<0x80>", "<0x80>"]
    d = IncrementalDetokenizer(tok)
    assert [d.add([i]) for i in ids] == ["", "", "", "𠀀"]  # held until the character is whole
    assert tok.encode("a  b", add_bos=False)[1] == tok.token_to_id("  ")  # whitespace runs are tokens
    assert tok.token_to_id("<b>") in tok.encode("x <b>y</b>", add_bos=False, parse_special=False)


def test_special_tokens_are_parsed_only_when_asked(gemma, qwen):
    _, g = gemma
    text = "<start_of_turn>user\nHi<end_of_turn>"
    ids = g.encode(text)
    assert ids[:2] == [2, 105] and ids[-1] == 106
    plain = g.encode(text, parse_special=False)
    assert 105 not in plain and 106 not in plain and g.decode(plain[1:]) == text
    assert g.decode(ids, skip_special=True) == "user\nHi"
    _, q = qwen
    ids = q.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == 151644 and ids[-1] == 151645
    assert 151644 not in q.encode("<|im_start|>", parse_special=False)


def _llama_tokenize() -> Path | None:
    d = Path(os.environ.get("LLAMA_CPP_BIN", ROOT / "build" / "llamacpp" / "bin"))
    exe = d / "llama-tokenize"
    return exe if exe.exists() else None


def test_encode_matches_llama_cpp(model, tmp_path):
    exe = _llama_tokenize()
    if exe is None:
        pytest.skip("llama-tokenize is not built (bench/build_llamacpp.sh, or set $LLAMA_CPP_BIN)")
    wrong = []
    for k, text in enumerate(t for t in TEXTS if t):  # llama-tokenize refuses an empty prompt
        f = tmp_path / f"prompt{k}.txt"
        f.write_bytes(text.encode("utf-8"))
        r = subprocess.run(
            [str(exe), "-m", str(model.path), "-f", str(f), "--ids", "--log-disable", "--no-bos"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("[")][-1]
        want = [int(t) for t in line.strip("[]").split(",") if t.strip()]
        if model.tok.encode(text, add_bos=False) != want:
            wrong.append(text)
    assert wrong == []


# ---- chat templates ------------------------------------------------------------------------------


def test_gemma_gets_the_built_in_turns_and_they_tokenize_as_turn_tokens(gemma):
    meta, tok = gemma
    assert "tokenizer.chat_template" not in meta
    tpl = select_chat_template(meta, tok, "test-model")[0]
    assert tpl.source == GEMMA_TURNS
    text = tpl.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    ids = tok.encode(text)
    nl = tok.token_to_id("\n")
    assert ids[:2] == [2, 105] and ids.count(2) == 1
    assert ids[-3:] == [105, tok.token_to_id("model"), nl]
    assert ids.count(106) == 1 and ids[ids.index(106) + 1] == nl


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

CONVERSATIONS = [
    [{"role": "user", "content": "Write a Python hello world."}],
    [
        {"role": "system", "content": "You write Rust."},
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "fn main() {}"},
        {"role": "user", "content": "More."},
    ],
    [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": '{"temp_c": 21}'},
        {"role": "tool", "content": '{"sky": "clear"}'},
    ],
]


@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_qwen_template_with_tools_renders_as_transformers_does(qwen, qwen25_coder_path, conv, tools):
    meta, tok = qwen
    ref = _refs.get("qwen") or _refs.setdefault("qwen", Reference(qwen25_coder_path))
    if ref.auto is None:
        pytest.skip("transformers' apply_chat_template on a GGUF file needs torch")
    msgs = CONVERSATIONS[conv]
    tpl = select_chat_template(meta, tok, "test-model")[0]
    assert tpl.source == meta["tokenizer.chat_template"]
    kw = {"tools": tools} if tools else {}
    got = tpl.render(msgs, add_generation_prompt=True, **kw)
    want = ref.auto.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
    assert got == want
    if tools:
        assert "<tools>" in got and "get_weather" in got


# ---- generation in chat stops at the end of the turn ---------------------------------------------


class ScriptedForward:
    """A stand-in for the model: every logits row it returns puts the next token of `script` on top."""

    def __init__(self, vocab: int, script: list[int]):
        self.vocab, self.script, self.n = vocab, script, 0

    def __call__(self, kv, tokens, seq_lens, start_pos, block_tables, logit_rows):
        rows = np.zeros((len(logit_rows), self.vocab), np.float32)
        for r in range(len(logit_rows)):
            rows[r, self.script[min(self.n, len(self.script) - 1)]] = 10.0
            self.n += 1
        return rows


@pytest.mark.parametrize("name", ["gemma", "qwen"])
def test_chat_generation_stops_at_the_end_of_turn_token(name, gemma, qwen):
    meta, tok = gemma if name == "gemma" else qwen
    end = tok.token_to_id("<end_of_turn>" if name == "gemma" else "<|im_end|>")
    answer = tok.encode("Paris.", add_bos=False)
    script = answer + [end] + tok.encode(" and then more", add_bos=False)
    model = SimpleNamespace(
        name=name,
        tokenizer=tok,
        config={"n_vocab": tok.vocab_size, "context_length": 4096, "n_layers": 1, "n_kv_heads": 1, "head_dim": 8},
    )
    engine = LLMEngine(model, EngineConfig(num_kv_blocks=64), forward=ScriptedForward(tok.vocab_size, script))
    prompt = tok.encode(
        select_chat_template(meta, tok, "test-model")[0].render([{"role": "user", "content": "Capital of France?"}])
    )
    engine.add_request("r", prompt, SamplingParams(temperature=0.0), StoppingParams(max_tokens=32))
    stream = TextStream(tok, prefix_ids=prompt)
    out, finish = [], None
    for _ in range(64):
        for o in engine.step():
            out += o.new_token_ids
            finish = o.finish_reason if o.finished else finish
        if finish is not None:
            break
    assert finish is FinishReason.STOP and out == answer + [end]
    text = stream.push(out)[0] + stream.finish()
    assert text == "Paris."
