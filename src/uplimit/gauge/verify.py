"""Check that two models compute the same function: logits and greedy tokens on a set of prompts.

`compare(a, b, chats)` loads `a`, lets it answer each chat greedily, keeps its logits at every
position of prompt + answer (one teacher-forced forward pass: `trace`), frees it, then loads `b`
and runs the same pass on the same token ids (`compare_to`). Only one model is in memory at a
time (a 1.5B model dequantized to fp32 is ~6 GB). To check a model transformed in memory, take
its `trace` before and `compare_to` after.

Tolerance: a gauge transform changes only the order of floating-point sums, so the logits of an
fp32 model differ by rounding noise, not by zero. Measured (docs/gauge.md): tiny model 9e-5
(its own fp32-vs-fp64 error is 6e-5), Qwen2.5-Coder-1.5B 3.3e-4, logits up to ~35 in both.
The default tolerance, 1e-2 in logit units, sits well above that noise and well below what a
changed weight does (the tiny weak model, 1.5 % weight noise, differs by 7.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from uplimit.errors import ModelPairError
from uplimit.models.chat import Message
from uplimit.models.hf import HFModel

DEFAULT_TOLERANCE = 1e-2

DEFAULT_CHATS: tuple[tuple[Message, ...], ...] = tuple(
    (Message(role="user", content=text),)
    for text in (
        "Write a Python function that reverses a linked list.",
        "What does `git rebase -i` do?",
        "Explain big-O notation in two sentences.",
        "Write a SQL query that counts orders per customer.",
        "def fibonacci(n):",
        "Translate 'good morning' into French and German.",
        "Fix this bug: `for i in range(len(xs)): xs.remove(xs[i])`",
        "List three uses of a hash map.",
    )
)


@dataclass(frozen=True)
class VerifyReport:
    """How far `b`'s logits are from `a`'s; `ok` when within `tolerance` everywhere."""

    prompts: int
    positions: int  # logit vectors compared (every position of every prompt + answer)
    max_abs_diff: float  # max |logit_a - logit_b| over positions and vocabulary
    max_abs_logit: float  # the logits' scale, for reading max_abs_diff relatively
    greedy_agreement: float  # fraction of positions where both argmaxes agree
    same_answers: int  # prompts where b would have given a's whole greedy answer
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def check(self) -> None:
        """Raise ModelPairError unless the two models agree within the tolerance."""
        if not self.ok:
            raise ModelPairError(
                f"models differ: max |logit diff| {self.max_abs_diff:.3g} > tolerance "
                f"{self.tolerance:.3g}; greedy agreement {100 * self.greedy_agreement:.1f} % "
                f"over {self.positions} positions"
            )


@dataclass(frozen=True)
class Trace:
    """One chat as the reference model saw it: prompt + greedy answer, logits at every position."""

    ids: list[int]
    prompt_len: int
    logits: torch.Tensor  # [len(ids), n_vocab] fp32


def compare(
    a: str | Path,
    b: str | Path,
    chats: Sequence[Sequence[Message]] = DEFAULT_CHATS,
    *,
    answer_tokens: int = 16,
    tolerance: float = DEFAULT_TOLERANCE,
    tokenizer_dir: str | Path | None = None,
) -> VerifyReport:
    """Compare models `a` and `b` (HF directories or GGUF files) on `chats`, one loaded at a time.

    `tokenizer_dir` is passed to `HFModel` for a GGUF (saves ~17 s per load).
    """
    model = HFModel(a, tokenizer_dir=tokenizer_dir)
    reference = trace(model, chats, answer_tokens)
    model.close()
    del model
    model = HFModel(b, tokenizer_dir=tokenizer_dir)
    report = compare_to(reference, model, tolerance)
    model.close()
    return report


def trace(model: HFModel, chats: Sequence[Sequence[Message]], answer_tokens: int) -> list[Trace]:
    """Let `model` answer each chat greedily, then record its logits over prompt + answer."""
    traces = []
    for chat in chats:
        prompt = model.chat_tokens(chat)
        ids = prompt + _greedy_answer(model, prompt, answer_tokens)
        traces.append(Trace(ids, len(prompt), _all_logits(model, ids)))
    return traces


def compare_to(
    reference: Sequence[Trace], model: HFModel, tolerance: float = DEFAULT_TOLERANCE
) -> VerifyReport:
    """Run `model` on the reference's token ids and compare logits and argmaxes."""
    max_diff = 0.0
    agree = positions = same = 0
    for ref in reference:
        logits = _all_logits(model, ref.ids)
        max_diff = max(max_diff, (logits - ref.logits).abs().max().item())
        agrees = logits.argmax(-1) == ref.logits.argmax(-1)  # [T]
        agree += int(agrees.sum())
        positions += len(ref.ids)
        # The model gives the reference's answer iff the argmaxes agree from the last prompt
        # position on (each position predicts the next token).
        same += bool(agrees[ref.prompt_len - 1 : -1].all())
    return VerifyReport(
        prompts=len(reference),
        positions=positions,
        max_abs_diff=max_diff,
        max_abs_logit=max(ref.logits.abs().max().item() for ref in reference),
        greedy_agreement=agree / positions,
        same_answers=same,
        tolerance=tolerance,
    )


def _greedy_answer(model: HFModel, prompt: list[int], n: int) -> list[int]:
    """Up to `n` greedy tokens after `prompt`, stopping after an end-of-turn token."""
    answer: list[int] = []
    with model.session(max_sequences=1, max_context=len(prompt) + n + 1) as session:
        seq, logits = session.prefill(prompt)
        while len(answer) < n:
            answer.append(int(logits.argmax()))
            if answer[-1] in model.info.eos_ids:
                break
            logits = session.step({seq: answer[-1]})[seq]
    return answer


def _all_logits(model: HFModel, ids: list[int]) -> torch.Tensor:
    """Next-token logits at every position of `ids`, one forward pass: [T, n_vocab] fp32."""
    with torch.inference_mode():
        out = model.torch_model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0].to(torch.float32)
