"""The language-model interface that the codec and the services use.

The codec only works if the encoder (inner side) and the decoder (outer side) compute
bit-identical next-token logits from the weak model. Measured on llama.cpp (FACTS.md):
evaluating several tokens of one sequence in one call ("teacher forcing") gives different
logits from evaluating them one at a time. So the codec extends a sequence after its prompt
in exactly one way: `Session.step`, one token per sequence per call. `Session.extend` (several
tokens per sequence in one call) exists for the strong model's speculative decoding, where the
logits only need to be a deterministic function of the tokens and of how they were cut into calls.
Batching *across* sequences is allowed; each backend documents why its batches are
invariant (and tests in tests/*/test_determinism.py check it).

    with model.session(max_sequences=8, max_context=2048) as session:
        seq, logits = session.prefill(prompt_ids)     # prompt in one call
        logits = session.step({seq: token})[seq]      # then one token per call
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import numpy as np
import numpy.typing as npt

from uplimit.models.chat import ChatTemplate, Message

Logits = npt.NDArray[np.float32]  # [n_vocab], one sequence's next-token logits
SeqId = int


@dataclass(frozen=True)
class ModelInfo:
    """What identifies a loaded model; part of the codec fingerprint."""

    name: str
    backend: str
    path: str
    n_vocab: int
    eos_ids: frozenset[int]
    # sha256 of the model file(s) where known, else "" (a directory we did not hash).
    file_sha256: str
    # Backend build identity: logits differ between llama.cpp builds (FACTS.md).
    build: str


class LanguageModel(abc.ABC):
    """A causal language model with its tokenizer."""

    info: ModelInfo
    chat_template: ChatTemplate

    @abc.abstractmethod
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text`; `special=True` parses control tokens such as <|im_end|>."""

    @abc.abstractmethod
    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (a token may hold part of a UTF-8 character)."""

    @abc.abstractmethod
    def session(self, max_sequences: int, max_context: int) -> Session:
        """A batch of KV-cached sequences; close it (or use `with`) to free its memory."""

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    def chat_tokens(self, messages: Sequence[Message]) -> list[int]:
        """Prompt ids for a chat, ending where the assistant's answer begins."""
        return self.tokenize(self.chat_template.render(messages), special=True)

    def vocab_digest(self) -> str:
        """sha256 over every token's bytes, in id order: equal digests mean a shared tokenizer."""
        import hashlib

        h = hashlib.sha256(self.info.n_vocab.to_bytes(4, "little"))
        for token in range(self.info.n_vocab):
            piece = self.token_bytes(token)
            h.update(len(piece).to_bytes(2, "little"))
            h.update(piece)
        return h.hexdigest()

    def close(self) -> None:  # noqa: B027 - optional hook for backends holding native memory
        """Free native resources; the model is unusable afterwards."""


class Session(abc.ABC):
    """Sequences that share one evaluation context.

    Contract (the determinism discipline):
    - `prefill` evaluates a whole prompt in one call, alone.
    - `step` feeds exactly one token to each named sequence, all in one batched call.
    - The logits returned for a sequence depend only on that sequence's tokens, never on
      which other sequences exist or share the call. Backends guarantee this (see their
      docstrings); tests check it.
    """

    @abc.abstractmethod
    def prefill(self, prompt: Sequence[int]) -> tuple[SeqId, Logits]:
        """Start a sequence with `prompt` (non-empty); return its id and next-token logits."""

    @abc.abstractmethod
    def step(self, tokens: Mapping[SeqId, int]) -> dict[SeqId, Logits]:
        """Append one token to each sequence; return each one's next-token logits."""

    def extend(self, chunks: Mapping[SeqId, Sequence[int]]) -> dict[SeqId, list[Logits]]:
        """Append several tokens to each sequence; return the logits after each of them.

        For speculative decoding (checking a draft in one call). A backend may evaluate a
        sequence's tokens together (teacher forcing), so the logits may differ from feeding them
        by `step`; they must still depend only on the sequence's tokens and on how they were cut
        into calls, never on other sequences. This default feeds them by `step`, one at a time.
        """
        out: dict[SeqId, list[Logits]] = {seq: [] for seq in chunks}
        for i in range(max(map(len, chunks.values()), default=0)):
            fed = {seq: chunk[i] for seq, chunk in chunks.items() if i < len(chunk)}
            for seq, logits in self.step(fed).items():
                out[seq].append(logits)
        return out

    @abc.abstractmethod
    def truncate(self, seq: SeqId, length: int) -> None:
        """Forget all but the first `length` tokens of `seq` (length >= 1).

        The caller must then `step` the token at position `length` to get fresh logits.
        """

    @abc.abstractmethod
    def drop(self, seq: SeqId) -> None:
        """End a sequence and free its slot."""

    @abc.abstractmethod
    def length(self, seq: SeqId) -> int:
        """Number of tokens evaluated for `seq`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Free the context."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
