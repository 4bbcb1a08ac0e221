"""A stream as an honest inner serves it: its spec and the strong model's plain tokens."""

from __future__ import annotations

from uplimit.coding.generate import Request, generate
from uplimit.coding.sampling import SamplingParams
from uplimit.models.base import LanguageModel
from uplimit.wire.streams import StreamSpec

__all__ = ["served"]


def served(
    model: LanguageModel, temperature: float, seed: int = 11, max_tokens: int = 12
) -> tuple[StreamSpec, list[int]]:
    prompt = tuple(model.tokenize("def add(a, b):"))
    params = SamplingParams(temperature=temperature)
    [gen], _ = generate(model, [Request(prompt, params, seed, max_tokens)])
    return StreamSpec(3, prompt, params, seed, max_tokens), gen.tokens
