"""A model that emits a fixed script of tokens first (stop sequences, reasoning markers)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from uplimit.models.base import LanguageModel, Logits, SeqId, Session

__all__ = ["ScriptedModel"]


class ScriptedModel(LanguageModel):
    """A model that emits a fixed script of tokens first, then whatever `base` says."""

    def __init__(self, base: LanguageModel, script: Sequence[int]) -> None:
        self.base, self.script = base, list(script)
        self.info, self.chat_template = base.info, base.chat_template

    def tokenize(self, text, *, special=False):
        return self.base.tokenize(text, special=special)

    def token_bytes(self, token):
        return self.base.token_bytes(token)

    def session(self, max_sequences, max_context):
        return _ScriptedSession(self.base.session(max_sequences, max_context), self.script)


class _ScriptedSession(Session):
    def __init__(self, inner: Session, script: list[int]) -> None:
        self.inner, self.script, self.start = inner, script, {}

    def _force(self, seq: SeqId, logits: Logits) -> Logits:
        i = self.inner.length(seq) - self.start[seq]
        if i < len(self.script):
            logits = np.full_like(logits, -1e4)
            logits[self.script[i]] = 0.0
        return logits

    def prefill(self, prompt):
        seq, logits = self.inner.prefill(prompt)
        self.start[seq] = len(prompt)
        return seq, self._force(seq, logits)

    def step(self, tokens: Mapping[SeqId, int]):
        return {s: self._force(s, lg) for s, lg in self.inner.step(tokens).items()}

    def truncate(self, seq, length):
        self.inner.truncate(seq, length)

    def drop(self, seq):
        self.inner.drop(seq)

    def length(self, seq):
        return self.inner.length(seq)

    def close(self):
        self.inner.close()
