"""The strong model as a teacher on the inner side: its answers, and its full next-token
distributions along them (soft targets).

The inner side holds both models, so it can make training data at no cost to the upload
budget: the strong model answers training prompts (never an evaluation set) and is then run
over each answer with teacher forcing, one forward pass per chunk. What it keeps per answer
position is the `k` most probable tokens' log-probabilities; the rest of the mass is one
bucket (`SoftTargets.rest`), so a loss over them is an exact cross-entropy against the
distribution coarsened to k + 1 outcomes.

    examples = teach(strong, prompts, temperatures=(0.0, 1.0), max_tokens=256, k=32, seed=0)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from uplimit.coding.generate import Request, generate
from uplimit.coding.sampling import SamplingParams
from uplimit.distill.data import Example, SoftTargets
from uplimit.models.base import LanguageModel
from uplimit.progress import Progress
from uplimit.prompts import Prompt

__all__ = ["teach", "top_k"]

CHUNK = 64  # answer tokens per teacher-forcing pass: well inside a llama.cpp batch


def top_k(logits: npt.NDArray[np.float32], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most probable tokens of each row of `logits` [n, vocab] and their log-probabilities
    (log-softmax in float64), most probable first."""
    z = logits.astype(np.float64)
    z -= z.max(1, keepdims=True)
    logz = np.log(np.exp(z).sum(1, keepdims=True))
    ids = np.argpartition(-z, k - 1, axis=1)[:, :k]
    picked = np.take_along_axis(z, ids, 1)
    order = np.argsort(-picked, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, 1)
    return ids.astype(np.int64), (np.take_along_axis(picked, order, 1) - logz).astype(np.float32)


def teach(
    strong: LanguageModel,
    prompts: Sequence[Prompt],
    *,
    temperatures: Sequence[float],
    max_tokens: int,
    k: int,
    seed: int,
    progress: Progress,
) -> list[Example]:
    """The strong model answers every prompt at every temperature, then gives its top-k
    distribution at every answer position."""
    requests = [
        Request(tuple(strong.chat_tokens(p.messages)), SamplingParams(t), seed + i, max_tokens)
        for t in temperatures
        for i, p in enumerate(prompts)
    ]
    context = max(len(r.prompt) for r in requests) + max_tokens + 1
    total = len(requests) * max_tokens
    gens, _ = generate(
        strong,
        requests,
        max_context=context,
        on_step=lambda n: progress("strong answers", n, total),
    )
    answers = sum(len(g.tokens) for g in gens)
    out: list[Example] = []
    done = 0
    with strong.session(1, context) as session:
        for request, gen in zip(requests, gens, strict=True):
            seq, first = session.prefill(request.prompt)
            rows = [first]
            answer = gen.tokens
            for at in range(0, len(answer) - 1, CHUNK):
                chunk = answer[at : min(at + CHUNK, len(answer) - 1)]
                rows.extend(session.extend({seq: chunk})[seq])
            session.drop(seq)
            ids, logprobs = top_k(np.stack(rows), k)
            targets = SoftTargets(ids, logprobs)
            out.append(Example(request.prompt + tuple(answer), len(request.prompt), targets))
            done += len(answer)
            progress("teacher's distributions", done, answers)
    return out
