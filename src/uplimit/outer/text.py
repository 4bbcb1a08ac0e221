"""Decoded tokens -> the text a client may see so far.

Bytes go through the stop matcher first (a stop sequence is matched on bytes, as the inner
matches it, and a tail that may become one is held back), then through an incremental UTF-8
decoder (a token can end inside a character; the rest of it is held back too). End-of-sequence
tokens carry no text.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable

from uplimit.wire.stops import StopMatcher

__all__ = ["TextAssembler"]


class TextAssembler:
    def __init__(
        self, token_bytes: Callable[[int], bytes], eos_ids: Iterable[int], stop: Iterable[str]
    ) -> None:
        self._bytes = token_bytes
        self._eos = frozenset(eos_ids)
        self._stop = StopMatcher(list(stop))
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tokens = 0  # tokens fed before the stream stopped (a stop's own token included)

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    def feed(self, tokens: Iterable[int]) -> str:
        """New text from `tokens`; nothing once a stop sequence was seen."""
        out = []
        for t in tokens:
            if self.stopped:
                break
            self.tokens += 1
            if t not in self._eos:
                out.append(self._utf8.decode(self._stop.feed(self._bytes(t))))
        return "".join(out)

    def finish(self) -> str:
        """At the end of the stream: whatever was held back."""
        return self._utf8.decode(self._stop.flush(), final=True)
