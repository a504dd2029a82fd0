"""The CLI as a user runs it: subprocesses of `python -m tinyserve.cli`."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

TEXT = """The river town woke slowly on market days. Before the sun had cleared the hills, farmers were
already unloading crates of apples, cabbages and late summer plums onto long wooden tables near the
bridge. The baker on the corner opened his shutters at six, and the smell of fresh bread drifted down
the street toward the water. Children ran between the stalls, and their parents argued cheerfully
with the sellers about the price of honey.

By mid-morning the square was full. An old man played the accordion beside the fountain, and a few
coins collected in the hat at his feet. The mayor, who liked to be seen on such days, walked from one
end of the market to the other, shaking hands and asking about the harvest. Most people told him that
the season had been good, although the spring rains had come late and the wheat was thinner than usual.

In the afternoon, clouds gathered over the western hills. The sellers looked up at the sky and began
to pack their goods a little earlier than they had planned. When the first drops fell, the square
emptied quickly, and only the pigeons remained to search for crumbs between the stones. The
accordion player folded his instrument into its case, counted his coins, and went into the café to
wait for the rain to stop.

That evening the town was quiet again. Lamps were lit in the windows along the river, and the sound
of dinner plates and low conversation came through the open doors. Tomorrow would be an ordinary
working day, but for a few more hours people talked about the market, the weather, and the news from
the neighbouring villages. Somewhere a dog barked, and then the only sound was the steady rush of the
river under the old stone bridge.
"""


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tinyserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def test_generate_streams_text_and_prints_stats(default_model_path):
    r = cli(
        "generate",
        "The capital of France is",
        "--model",
        str(default_model_path),
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    m = re.fullmatch(r"\[(\d+) tokens, ([\d.]+|nan) tokens/s \(prefill (\d+) tokens in (\d+) ms\)\]", last)
    assert m, last
    assert 1 <= int(m.group(1)) <= 8 and int(m.group(3)) == 5


def test_generate_stop_string(default_model_path):
    base = cli("generate", "The capital of France is", "--model", str(default_model_path), "-n", "8", "--temp", "0")
    out = cli(
        "generate",
        "The capital of France is",
        "--model",
        str(default_model_path),
        "-n",
        "8",
        "--temp",
        "0",
        "--stop",
        "aris",
    )
    assert base.returncode == out.returncode == 0
    assert "Paris" in base.stdout
    assert out.stdout == base.stdout[: base.stdout.index("aris")] + "\n"


def test_tokenize_prints_ids_and_pieces(default_model_path):
    from tinyserve.models.tokenizer import Tokenizer

    r = cli("tokenize", "Hello world, café!", "--model", str(default_model_path))
    assert r.returncode == 0, r.stderr
    rows = [re.fullmatch(r"\s*(\d+) -> '(.*)'", line) for line in r.stdout.splitlines()]
    assert rows and all(rows)
    ids = [int(m.group(1)) for m in rows]
    tok = Tokenizer.from_gguf(default_model_path)
    assert ids == tok.encode("Hello world, café!")
    assert "".join(m.group(2) for m in rows) == "Hello world, café!"
    r = cli("tokenize", "Hello world", "--ids", "--model", str(default_model_path))
    assert r.stdout.strip() == str(tok.encode("Hello world"))


def test_info_shows_model_and_kernels(default_model_path):
    from tinyserve import _core

    r = cli("info", "--model", str(default_model_path))
    assert r.returncode == 0, r.stderr
    info = dict(line.split(":", 1) for line in r.stdout.splitlines())
    info = {k.strip(): v.strip() for k, v in info.items()}
    assert info["arch"] == "llama" and info["layers"] == "30" and info["vocab"] == "49152"
    assert "Q4_1" in info["tensor types"] and "Q8_0" in info["tensor types"]
    assert info["ISA"] in _core.available_isas()
    assert info["KV bytes per token"].split()[0] == str(2 * 30 * 3 * 64 * 2)
    assert int(info["threads"]) >= 1
    # the matrices are repacked where the ISA has x16 kernels (Q4_1 blocks and the Q8_0 head)
    repacked = float(info["weight memory"].split("+")[1].split()[0])
    packs = _core.kernels.has_packed("Q4_1", info["ISA"]) and os.environ.get("TINYSERVE_PACK") != "0"
    assert (repacked > 90) == packs, info["weight memory"]


def test_perplexity_last_line(default_model_path, tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(TEXT, encoding="utf-8")
    r = cli("perplexity", str(f), "--ctx", "128", "--model", str(default_model_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    m = re.fullmatch(r"PPL = ([\d.]+)", lines[-1])
    assert m, lines[-1]
    ppl = float(m.group(1))
    assert math.isfinite(ppl) and 1.0 < ppl < 100.0
    running = [float(re.fullmatch(r"\[\d+\]([\d.]+)", x).group(1)) for x in lines if x.startswith("[")]
    assert len(running) >= 2 and running[-1] == pytest.approx(ppl, abs=1e-3)


def test_user_errors_are_one_line_without_traceback(default_model_path, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 60)
    for args in (
        ["info", "--model", str(bad)],
        ["generate", "hi", "--model", str(tmp_path / "missing.gguf")],
        ["generate", "hi", "--model", str(default_model_path), "--top-p", "2"],
        ["perplexity", str(tmp_path / "nope.txt"), "--model", str(default_model_path)],
    ):
        r = cli(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("tinyserve: error:"), r.stderr


def chat(model, max_tokens: int, stdin: str) -> subprocess.CompletedProcess:
    """`tinyserve chat` (greedy) with `stdin` typed in."""
    argv = [sys.executable, "-m", "tinyserve.cli", "chat", "--model", str(model), "--temperature", "0"]
    return subprocess.run(argv + ["-n", str(max_tokens)], input=stdin, capture_output=True, text=True, timeout=600)


def test_chat_repl_answers_and_quits(default_model_path):
    r = chat(default_model_path, 40, "What is the capital of Germany?\n/exit\nnever read\n")
    assert r.returncode == 0, r.stderr
    assert "Berlin" in r.stdout and "never read" not in r.stdout
    # EOF also ends the session; an empty line is skipped
    r = chat(default_model_path, 5, "\nHi\n")
    assert r.returncode == 0 and r.stdout.strip()
