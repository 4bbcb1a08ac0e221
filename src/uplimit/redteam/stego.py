"""Attacks 2 and 3: secret bits hidden in token choices.

The dishonest scheduler ignores the outer's seed at chosen positions and picks one of the two
tokens the *weak* model finds most likely: the first for a 0 bit, the second for a 1. Using
the weak model (not the strong one) for the choice is what makes the bits readable outside:
an accomplice who sees the decoded tokens and holds the weak model (which may be stolen)
computes the same two candidates and reads the bit back. A position carries a bit when the
weak model's second choice has probability at least `min_p` (so the token stays plausible),
and only every `stride`-th such position (attack 3, "occasional" deviations at T = 0).

Each stream carries its own slice of the secret (bits from `stream_id * max_tokens` on), so
attacker and accomplice agree on which bit a position carries whatever order the streams
are generated and framed in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from uplimit.inner.runs import CandidateRun
from uplimit.inner.scheduler import Scheduler, SchedulerConfig
from uplimit.models.base import LanguageModel, Logits, SeqId
from uplimit.wire.streams import StreamSpec

__all__ = ["StegoAccomplice", "StegoScheduler", "TokenStego"]


def secret_bit(secret: bytes, index: int) -> int | None:
    if index >= 8 * len(secret):
        return None
    return secret[index // 8] >> (7 - index % 8) & 1


@dataclass
class TokenStego:
    """The shared scheme: which positions carry a bit, and which token means what."""

    secret: bytes
    min_p: float = 0.1
    stride: int = 1
    # stream -> eligible positions seen; each party keeps its own (`dataclasses.replace`)
    _eligible: dict[int, int] = field(default_factory=dict, init=False, repr=False)

    def candidates(self, weak_logits: Logits) -> tuple[int, int] | None:
        """The weak model's top two tokens, if the second is plausible enough to carry a bit."""
        x = weak_logits.astype(np.float64)
        a, b = (int(i) for i in np.argsort(x)[-1:-3:-1])
        p = np.exp(x - x.max())
        p /= p.sum()
        return (a, b) if p[b] >= self.min_p else None

    def carrier(
        self, spec: StreamSpec, position: int, weak_logits: Logits
    ) -> tuple[int, int, int] | None:
        """(bit index, token for 0, token for 1) if this position carries a bit."""
        pair = self.candidates(weak_logits)
        if pair is None:
            return None
        k = self._eligible.get(spec.stream_id, 0)
        self._eligible[spec.stream_id] = k + 1
        if k % self.stride or k // self.stride >= spec.max_tokens:
            return None
        return spec.stream_id * spec.max_tokens + k // self.stride, *pair


class StegoScheduler(Scheduler):
    """A dishonest scheduler (red team only): samples honestly except where a bit goes."""

    def __init__(
        self,
        strong: LanguageModel,
        config: SchedulerConfig,
        *,
        weak: LanguageModel,
        stego: TokenStego,
        **kwargs: object,
    ) -> None:
        super().__init__(strong, config, **kwargs)  # type: ignore[arg-type]
        self.stego = stego
        self._weak = weak.session(config.max_batch, config.max_context + 1)
        # candidate -> (weak sequence, tokens fed, latest weak logits)
        self._weak_seq: dict[CandidateRun, tuple[SeqId, int, Logits]] = {}
        self.bits_hidden = 0

    def _weak_logits(self, c: CandidateRun) -> Logits:
        for done in [d for d in self._weak_seq if d.done]:
            self._weak.drop(self._weak_seq.pop(done)[0])
        if c not in self._weak_seq:
            seq, logits = self._weak.prefill(c.stream.request.spec.prompt)
            self._weak_seq[c] = (seq, 0, logits)
        seq, fed, logits = self._weak_seq[c]
        while fed < len(c.tokens):  # one token per call, like both sides of the codec
            logits = self._weak.step({seq: c.tokens[fed]})[seq]
            fed += 1
        self._weak_seq[c] = (seq, fed, logits)
        return logits

    def choose(self, c: CandidateRun, logits: Logits) -> tuple[int, float]:
        token, logprob = super().choose(c, logits)  # logprob only matters to best-of scoring
        spec = c.stream.request.spec
        carrier = self.stego.carrier(spec, len(c.tokens), self._weak_logits(c))
        if carrier is None:
            return token, logprob
        index, zero, one = carrier
        bit = secret_bit(self.stego.secret, index)
        if bit is None:
            return token, logprob
        self.bits_hidden += 1
        return (one if bit else zero), logprob

    def close(self) -> None:
        super().close()
        self._weak.close()


class StegoAccomplice:
    """Outside, with the weak model: reads the bits back from the decoded tokens.

    Fed by the outer decoder's observer (weak logits and the decoded token, per stream), as a
    party that sees the served text and runs the weak model would compute them.
    """

    def __init__(self, scheme: TokenStego) -> None:
        self.scheme = replace(scheme)  # its own position counters
        self.read: dict[int, int] = {}  # bit index -> bit
        self.times: list[tuple[float, int]] = []  # (when, bits read so far)

    def observe(self, spec: StreamSpec, position: int, weak_logits: Logits, token: int) -> None:
        carrier = self.scheme.carrier(spec, position, weak_logits)
        if carrier is None:
            return
        index, zero, one = carrier
        if token in (zero, one) and secret_bit(self.scheme.secret, index) is not None:
            self.read[index] = int(token == one)
            self.times.append((time.time(), len(self.read)))

    def correct_bits(self, until: float | None = None) -> int:
        """Bits read that equal the secret's (read before `until`, if given)."""
        indices = self.read if until is None else self._read_before(until)
        return sum(self.read[i] == secret_bit(self.scheme.secret, i) for i in indices)

    def _read_before(self, until: float) -> list[int]:
        n = sum(1 for t, _ in self.times if t <= until)
        return list(self.read)[:n]
