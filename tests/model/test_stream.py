"""TextStream: incremental text with exact stop-string cutting."""

from __future__ import annotations

import pytest

from tinyserve.engine.stream import TextStream, holdback


class PieceDetok:
    """Token id i -> PIECES[i]; no UTF-8 subtleties (the real detokenizer has its own tests)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def add(self, ids):
        return "".join(self.pieces[i] for i in ids)

    def flush(self):
        return ""


def run(pieces: list[str], stop: list[str], groups: list[list[int]] | None = None):
    """Feed the pieces one token per push (or in `groups`); return (emitted deltas, text, stopped)."""
    ts = TextStream(None, stop, detokenizer=PieceDetok(pieces))
    deltas = []
    stopped = False
    for g in groups or [[i] for i in range(len(pieces))]:
        d, stopped = ts.push(g)
        deltas.append(d)
        if stopped:
            break
    if not stopped:
        deltas.append(ts.finish())
    assert "".join(deltas) == ts.text
    return deltas, ts.text, stopped


def test_no_stop_strings_passes_everything_through_at_once():
    deltas, text, stopped = run(["Hel", "lo", " wor", "ld"], [])
    assert deltas == ["Hel", "lo", " wor", "ld", ""] and not stopped


def test_stop_string_inside_one_token_cut_exactly():
    _, text, stopped = run(["The ", "answer.\nQ:", " more"], ["\nQ:"])
    assert text == "The answer." and stopped


def test_stop_string_spanning_tokens():
    deltas, text, stopped = run(["Hello", " wo", "rl", "d!", " after"], ["world"])
    assert text == "Hello " and stopped
    # of " wo" the space goes out at once; "wo" could start "world": held back, then dropped
    assert deltas[:2] == ["Hello", " "]


def test_held_back_text_released_when_it_stops_matching():
    deltas, text, stopped = run(["a", "b", "<", "|", "x", "y"], ["<|end|>"])
    assert not stopped and text == "ab<|xy"
    assert deltas == ["a", "b", "", "", "<|x", "y", ""]


def test_multiple_stop_strings_earliest_wins():
    _, text, stopped = run(["one two three"], ["three", "two"])
    assert text == "one " and stopped
    ts = TextStream(None, ["three", "two"], detokenizer=PieceDetok(["one two three"]))
    ts.push([0])
    assert ts.stop_string == "two"


def test_stop_string_at_the_very_start():
    deltas, text, stopped = run(["STOP", "more"], ["STOP"])
    assert text == "" and stopped and deltas == [""]
    _, text, stopped = run(["S", "TOP", "x"], ["STOP"])
    assert text == "" and stopped


def test_no_false_holdback_at_the_end():
    # the text ends with a prefix of a stop string: finish() must release it
    deltas, text, stopped = run(["Hi", " <", "|e"], ["<|end|>"])
    assert not stopped and text == "Hi <|e" and deltas == ["Hi", " ", "", "<|e"]


def test_pushes_after_stop_emit_nothing():
    ts = TextStream(None, ["x"], detokenizer=PieceDetok(["ax", "b"]))
    assert ts.push([0]) == ("a", True)
    assert ts.push([1]) == ("", True)
    assert ts.finish() == ""


def test_overlapping_stop_prefixes():
    # "aab" must be found although "aa" was held back as a possible start of "aab"
    _, text, stopped = run(["x", "a", "a", "a", "b", "c"], ["aab"])
    assert text == "xa" and stopped


@pytest.mark.parametrize(
    "text,stops,expected",
    [
        ("abc", ["cd"], 1),
        ("abc", ["bcd", "cz"], 2),
        ("abc", ["abc"], 0),
        ("", ["a"], 0),
        ("abc", ["xyz"], 0),
        ("aaa", ["aab"], 2),
    ],
)
def test_holdback(text, stops, expected):
    assert holdback(text, stops) == expected


@pytest.mark.slow
def test_real_tokenizer_stream_matches_decode(default_model_path):
    from tinyserve.models.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(default_model_path)
    text = "Paris is the capital of France. Its café culture — é, ü, 日本 — is famous.<|im_end|>"
    ids = tok.encode(text)
    ts = TextStream(tok, [], skip_special=True)
    out = "".join(ts.push([i])[0] for i in ids) + ts.finish()
    assert out == tok.decode(ids, skip_special=True)
    ts = TextStream(tok, ["capital of", "日本"], skip_special=True)
    pieces = []
    for i in ids:
        d, stopped = ts.push([i])
        pieces.append(d)
        if stopped:
            break
    assert stopped and "".join(pieces) == "Paris is the "
