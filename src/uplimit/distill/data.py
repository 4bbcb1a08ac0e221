"""What the weak model trains on: token sequences, and optionally the teacher's distributions.

An `Example` without targets trains on its own answer tokens (hard labels: all the outer side
has). With `SoftTargets` it trains on the strong model's distribution at every answer position
(`distill.teacher`: only the inner side, which holds the strong model, can make them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["Example", "SoftTargets", "load_taught", "save_taught"]


@dataclass(frozen=True)
class SoftTargets:
    """The teacher's `k` most probable tokens at each answer position, and the rest as one."""

    ids: npt.NDArray[np.int64]  # [n, k]
    logprobs: npt.NDArray[np.float32]  # [n, k], natural log, most probable first

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape or self.ids.ndim != 2:
            raise ValueError(f"ids {self.ids.shape} and logprobs {self.logprobs.shape} differ")

    @property
    def rest(self) -> npt.NDArray[np.float32]:
        """[n] the probability outside the top k."""
        mass = np.exp(self.logprobs.astype(np.float64)).sum(1)
        return np.clip(1.0 - mass, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class Example:
    tokens: tuple[int, ...]  # prompt, then answer
    n_prompt: int
    # One row per answer token that is trained on; None: the answer tokens are the targets.
    targets: SoftTargets | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        n_answer = len(self.tokens) - self.n_prompt
        if self.targets is not None and len(self.targets.ids) != n_answer:
            raise ValueError(f"{len(self.targets.ids)} target rows for {n_answer} answer tokens")


def save_taught(path: str | Path, examples: Sequence[Example]) -> None:
    """Write examples that all carry targets (atomically: a crash leaves the old file or none)."""
    if not examples or any(e.targets is None for e in examples):
        raise ValueError("only a non-empty set of examples with the teacher's targets is saved")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(
            f,
            tokens=np.concatenate([np.asarray(e.tokens, np.int64) for e in examples]),
            lengths=np.array([len(e.tokens) for e in examples], np.int64),
            n_prompt=np.array([e.n_prompt for e in examples], np.int64),
            ids=np.concatenate([e.targets.ids for e in examples]),  # type: ignore[union-attr]
            logprobs=np.concatenate([e.targets.logprobs for e in examples]),  # type: ignore[union-attr]
        )
    os.replace(tmp, path)


def load_taught(path: str | Path) -> list[Example]:
    with np.load(path, allow_pickle=False) as data:
        tokens, lengths, n_prompt = data["tokens"], data["lengths"], data["n_prompt"]
        ids, logprobs = data["ids"], data["logprobs"]
    out, at, row = [], 0, 0
    for length, n in zip(lengths.tolist(), n_prompt.tolist(), strict=True):
        rows = slice(row, row + length - n)
        targets = SoftTargets(ids[rows], logprobs[rows])
        out.append(Example(tuple(tokens[at : at + length].tolist()), n, targets))
        at, row = at + length, row + length - n
    if at != len(tokens) or row != len(ids):
        raise ValueError(f"{path}: its arrays do not add up (a file from something else?)")
    return out
