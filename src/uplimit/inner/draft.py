"""The weak model as the strong model's speculative drafter.

Each strong sequence has a weak twin in the drafter's own session. Before a round the twin is
brought to the strong sequence's tokens (cut back to their common prefix, then fed the rest),
then it proposes up to `tokens` drafts (none after an end token), each chosen by a caller-given
`guess` (the scheduler passes the strong sampler with the position's noise: the decoder's own
guess), feeding each draft back one token per call.

Everything here goes through `Session.step` (prompt in one call, then one token per call), so a
draft is a deterministic function of the sequence, whatever else shares the weak session: the
strong side's output, which depends on the drafts through how its evaluation is cut into calls,
stays re-runnable (docs/serving.md, "Speculative decoding").

The same twin serves compression-aware decoding (`tie_nats`, `tilt`): `follow` gives the weak
logits after a sequence's tokens, evaluated as the decoder evaluates them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

from uplimit.models.base import LanguageModel, Logits, SeqId

__all__ = ["DraftRequest", "Drafter", "common_prefix"]


@dataclass(frozen=True)
class DraftRequest:
    history: Sequence[int]  # every generated token so far (the prompt is known from `start`)
    count: int  # drafts wanted (0: just keep up)
    guess: Callable[[Logits, int], int]  # (weak logits, draft index) -> the draft token


class Drafter:
    def __init__(self, weak: LanguageModel, max_sequences: int, max_context: int, tokens: int):
        self.tokens = tokens  # drafts per round, at most
        self.eos = weak.info.eos_ids  # nothing follows an end token: drafts stop there
        self.session = weak.session(max_sequences, max_context + tokens)
        self._seq: dict[Hashable, SeqId] = {}
        self._prompt: dict[Hashable, int] = {}  # prompt length
        self._fed: dict[Hashable, list[int]] = {}  # tokens after the prompt, as evaluated
        self._first: dict[Hashable, Logits] = {}  # the logits after the prompt alone

    def start(self, key: Hashable, prompt: Sequence[int]) -> None:
        self._seq[key], self._first[key] = self.session.prefill(prompt)
        self._prompt[key], self._fed[key] = len(prompt), []

    def drop(self, key: Hashable) -> None:
        self.session.drop(self._seq.pop(key))
        del self._prompt[key], self._fed[key], self._first[key]

    def follow(self, histories: Mapping[Hashable, Sequence[int]]) -> dict[Hashable, Logits]:
        """Each sequence's weak logits after its prompt and `history`: the twin is brought to
        it first (also what compression-aware decoding reads, `coding.sampling.guided_sample`)."""
        todo: dict[Hashable, list[int]] = {}
        logits: dict[Hashable, Logits] = {}
        for key, history in histories.items():
            if not history:
                logits[key] = self._first[key]
                continue
            fed = self._fed[key]
            # Keep the common prefix, and re-feed at least the last token: its logits are needed.
            keep = min(common_prefix(fed, history), len(history) - 1)
            if keep < len(fed):
                self.session.truncate(self._seq[key], self._prompt[key] + keep)
                del fed[keep:]
            todo[key] = list(history[keep:])
        while todo:  # catch up, one token per sequence per call
            logits |= self._feed({key: rest.pop(0) for key, rest in todo.items()})
            todo = {key: rest for key, rest in todo.items() if rest}
        return logits

    def propose(self, wants: Mapping[Hashable, DraftRequest]) -> dict[Hashable, list[int]]:
        """Drafts for each sequence: the tokens the weak model guesses come next."""
        logits = self.follow({key: want.history for key, want in wants.items()})
        drafts: dict[Hashable, list[int]] = {key: [] for key in wants}
        drafting = [key for key, want in wants.items() if want.count > 0]
        while drafting:
            for key in drafting:
                drafts[key].append(wants[key].guess(logits[key], len(drafts[key])))
            drafting = [
                key
                for key in drafting
                if len(drafts[key]) < wants[key].count and drafts[key][-1] not in self.eos
            ]
            if drafting:
                logits = self._feed({key: drafts[key][-1] for key in drafting})
        return drafts

    def _feed(self, tokens: Mapping[Hashable, int]) -> dict[Hashable, Logits]:
        out = self.session.step({self._seq[key]: t for key, t in tokens.items()})
        for key, t in tokens.items():
            self._fed[key].append(t)
        return {key: out[self._seq[key]] for key in tokens}

    def close(self) -> None:
        self.session.close()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
