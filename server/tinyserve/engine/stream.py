"""Token ids -> text deltas, with exact stop-string cutting.

Text is held back only while its tail could still be the start of a stop string; a stop string is
found even when it spans several tokens, and the text is cut right before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def find_stop(text: str, stop: list[str]) -> int:
    """Index of the earliest stop-string occurrence in `text`, or -1."""
    best = -1
    for s in stop:
        i = text.find(s)
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def holdback(text: str, stop: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    """push(token_ids) -> (text to emit now, stopped?); finish() -> the rest of the text."""

    def __init__(
        self,
        tokenizer: Any,
        stop: list[str] | None = None,
        skip_special: bool = True,
        *,
        prefix_ids: Sequence[int] = (),
        detokenizer: Any = None,
    ) -> None:
        """prefix_ids: tokens before the streamed ones (the prompt), for the tokenizer's
        start-of-text rules. detokenizer: any object with add(ids) -> str and flush() -> str
        (default: tinyserve.models.tokenizer.IncrementalDetokenizer over `tokenizer`)."""
        if detokenizer is None:
            from tinyserve.models.tokenizer import IncrementalDetokenizer

            detokenizer = IncrementalDetokenizer(tokenizer, skip_special=skip_special, prefix_ids=prefix_ids)
        self._detok = detokenizer
        self.stop = [s for s in (stop or []) if s]
        self._pending = ""  # decoded text not emitted yet (could start a stop string)
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that ended the text
        self.text = ""  # everything emitted so far

    def push(self, token_ids: list[int]) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        return self._feed(self._detok.add(list(token_ids)), final=False)

    def finish(self) -> str:
        """Flush the detokenizer and anything held back (no stop string can complete any more)."""
        if self.stopped:
            return ""
        return self._feed(self._detok.flush(), final=True)[0]

    def _feed(self, new: str, final: bool) -> tuple[str, bool]:
        buf = self._pending + new
        i = find_stop(buf, self.stop)
        if i != -1:
            self.stop_string = next(s for s in self.stop if buf.startswith(s, i))
            out, self._pending, self.stopped = buf[:i], "", True
        else:
            keep = 0 if final else holdback(buf, self.stop)
            out, self._pending = buf[: len(buf) - keep], buf[len(buf) - keep :]
        self.text += out
        return out, self.stopped
